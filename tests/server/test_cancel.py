"""CancelRequest interrupts the DP query running now, on DuckDB and on PostgreSQL: the client gets 57014 long
before the query would have ended, the session goes on, and the ledger holds no open reservation: the
interrupted query is charged (its backend ran; docs/server.md, "Cancel")."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg2
import pytest
from conftest import Running, start_server
from pg_server import SystemPostgres, WheelPostgres

from dpgateway import Gateway
from dpgateway.connectors.base import Interrupts
from dpgateway.policies.loader import parse_config
from dpgateway.server.server import ServerSettings

psycopg = pytest.importorskip("psycopg")

BIG = {"epsilon": 1000.0, "delta": 0.1}
COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "income": {"type": "float", "bounds": [0, 1000]},
}
SQL = "SELECT COUNT(*) AS n, SUM(income) AS s FROM people WHERE age > 10"
SLEEP_SECONDS = 30  # the PostgreSQL source sleeps this long before its first row


def _gateway(folder: Path, source: Any) -> Gateway:
    raw = {
        "tables": {"people": {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": COLUMNS}},
        "budget": {"per_subject": BIG, "per_analyst": BIG, "per_query": {"epsilon": 10.0, "delta": 0.01}},
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
    }
    return Gateway(parse_config(raw, base_dir=folder))


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows that the DP query runs for seconds on DuckDB."""
    path = tmp_path_factory.mktemp("cancel") / "people.parquet"
    duckdb.connect().execute(
        "COPY (SELECT i AS pid, i % 90 AS age, (i % 1000)::DOUBLE AS income FROM range(12000000) t(i)) "
        f"TO '{path}' (FORMAT parquet)"
    )
    return path


@pytest.fixture
def duckdb_wire(tmp_path: Path, big_parquet: Path) -> Iterator[Running]:
    with _gateway(tmp_path, str(big_parquet)) as gw:
        yield from start_server(gw, ServerSettings(port=0, startup_timeout=5.0))


@pytest.fixture
def postgres_wire(
    tmp_path: Path, postgres_server: SystemPostgres | WheelPostgres, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Running]:
    """The source is a view that sleeps before its rows: the bounded query runs as long as the sleep."""
    schema = f"cancel_{uuid.uuid4().hex[:8]}"
    with psycopg2.connect(postgres_server.url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(
            f"CREATE VIEW {schema}.people AS SELECT g::bigint AS pid, 40::bigint AS age, 1.5::float8 AS income "
            f"FROM generate_series(1, 100) g, pg_sleep({SLEEP_SECONDS}) s"
        )
    monkeypatch.setenv("DPGATEWAY_TEST_CANCEL_URL", postgres_server.url)
    source = {"connector": "postgres", "url": {"$env": "DPGATEWAY_TEST_CANCEL_URL"}, "table": f"{schema}.people"}
    with _gateway(tmp_path, source) as gw:
        yield from start_server(gw, ServerSettings(port=0, startup_timeout=5.0))


def _cancel_after(conn: Any, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), conn.cancel_safe()))
    thread.start()
    return thread


def _check_cancelled(wire: Running, within: float) -> None:
    with psycopg.connect(wire.dsn(), autocommit=True) as conn:
        canceller = _cancel_after(conn, 0.5)
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
            conn.execute(SQL)
        elapsed = time.monotonic() - start
        canceller.join()
        assert elapsed < within
        assert conn.execute("SHOW dp.epsilon").fetchone() == ("0.5",)  # the session goes on
    store = wire.server.gateway.store
    charges = [c for c in store.history() if c.analyst == "alice"]
    assert [c.state for c in charges] == ["committed"]  # no open reservation; charged: the backend ran
    assert charges[0].epsilon == pytest.approx(0.5)
    (record,) = store.audit_log(analyst="alice")
    assert record.outcome == "error" and "SQLSTATE 57014" in record.message


@pytest.mark.slow
def test_cancel_interrupts_a_duckdb_query(duckdb_wire: Running) -> None:
    # The audit's 57014 is only written when DuckDB raised for an interrupted statement (a query that had
    # finished would be "released"); the time bound shows the client did not wait for the whole scan.
    _check_cancelled(duckdb_wire, within=30.0)


@pytest.mark.postgres
def test_cancel_interrupts_a_postgres_query(postgres_wire: Running) -> None:
    _check_cancelled(postgres_wire, within=SLEEP_SECONDS / 3)


def test_cancel_of_an_idle_session_is_ignored(wire: Running) -> None:
    with psycopg.connect(wire.dsn(), autocommit=True) as conn:
        conn.cancel_safe()
        time.sleep(0.2)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the next statement is not cancelled


def test_interrupts_reach_only_the_statement_running_on_that_thread() -> None:
    cancelled: list[str] = []
    interrupts = Interrupts(cancelled.append)
    me = threading.get_ident()
    interrupts.interrupt(me)  # nothing runs: nothing to cancel
    with interrupts.running("statement") as running:
        interrupts.interrupt(me + 1)  # another thread's statement: not this one
        interrupts.interrupt(me)
        interrupts.interrupt(me)  # cancelled once
    interrupts.interrupt(me)  # it ended: a late cancel reaches nothing
    assert cancelled == ["statement"] and running.cancelled
