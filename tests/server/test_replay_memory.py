"""Replays answered from memory on the event loop (dpgateway/server/memory.py): the same answer, NOTICE and
audit record as through ``Gateway.query``, under the same key (analyst, text, epsilon, delta); an audit record
that cannot be written is an ErrorResponse and no answer."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from conftest import Running

from dpgateway import Gateway
from dpgateway.budget_store.base import Remaining, Spend, Usage
from dpgateway.errors import BackendError
from dpgateway.policies.model import Cap
from dpgateway.server.memory import ReplayAudits

SQL = "SELECT COUNT(*) AS n FROM pums WHERE age > 40"


@pytest.fixture
def calls(demo_gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every ``Gateway.query`` call."""
    seen: list[str] = []
    query = demo_gateway.query

    def counted(sql: str, **kwargs: Any) -> Any:
        seen.append(sql)
        return query(sql, **kwargs)

    monkeypatch.setattr(demo_gateway, "query", counted)
    return seen


def _connect(wire: Running, user: str = "alice") -> Any:
    conn = psycopg2.connect(wire.dsn(user=user))
    conn.autocommit = True
    return conn


def _run(conn: Any, sql: str = SQL) -> tuple[list[Any], str]:
    del conn.notices[:]
    with conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall()
    assert len(conn.notices) == 1
    return rows, conn.notices[0]


def _replays(gateway: Gateway, analyst: str) -> list[str]:
    return [r.outcome for r in gateway.store.audit_log(analyst=analyst, limit=None) if r.sql == SQL]


def test_a_replay_from_memory_is_audited_and_answers_as_the_first(
    wire: Running, demo_gateway: Gateway, calls: list[str]
) -> None:
    conn = _connect(wire)
    first, spent = _run(conn)  # released: spends
    second, replayed = _run(conn)  # replayed by Gateway.query (the ledger's replay cache): remembered
    assert "spent epsilon" in spent and "replayed an earlier answer: nothing spent" in replayed
    assert len(calls) == 2
    other = _connect(wire)  # another connection of the same analyst
    for c in (conn, other):
        rows, notice = _run(c)
        assert rows == first == second and notice == replayed  # same rows, same NOTICE (budget unchanged)
    assert len(calls) == 2  # answered from memory: no Gateway.query
    assert _replays(demo_gateway, "alice") == ["replayed"] * 3 + ["released"]  # newest first: none dropped
    conn.close()
    other.close()


def test_the_memory_keys_on_analyst_epsilon_and_text(wire: Running, demo_gateway: Gateway, calls: list[str]) -> None:
    alice = _connect(wire)
    for _ in range(3):
        _run(alice)
    assert len(calls) == 2
    bob = _connect(wire, "bob")
    _, notice = _run(bob)  # the same text from another analyst is charged again
    assert "spent epsilon" in notice and len(calls) == 3
    with alice.cursor() as cur:
        cur.execute("SET dp.epsilon = 0.25")
    _, notice = _run(alice)  # another epsilon: another query
    assert "spent epsilon 0.25" in notice and len(calls) == 4
    _, notice = _run(alice, SQL.replace(" ", "  "))  # another text, the same ledger key: Gateway.query replays it
    assert "replayed" in notice and len(calls) == 5
    alice.close()
    bob.close()


def test_a_failed_audit_write_is_an_error_and_no_answer(
    wire: Running, demo_gateway: Gateway, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _connect(wire)
    _run(conn)
    _run(conn)
    store = demo_gateway.store
    audit: Callable[..., Any] = store.audit_replays

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("the ledger is unavailable")

    monkeypatch.setattr(store, "audit_replays", broken)
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as info:
            cur.execute(SQL)
        assert info.value.pgcode == BackendError.sqlstate
    monkeypatch.setattr(store, "audit_replays", audit)
    _, notice = _run(conn)  # the session goes on
    assert "replayed" in notice and len(calls) == 2
    conn.close()


def test_a_failed_transaction_is_not_answered_from_memory(wire: Running, calls: list[str]) -> None:
    conn = psycopg2.connect(wire.dsn())  # not autocommit: psycopg2 sends BEGIN
    with conn.cursor() as cur:
        cur.execute(SQL)
        cur.execute(SQL)
        cur.execute(SQL)
        assert len(calls) == 2
        with pytest.raises(psycopg2.Error):
            cur.execute("SELECT COUNT(*) FROM pums_nope")
        with pytest.raises(psycopg2.Error) as info:
            cur.execute(SQL)
        assert info.value.pgcode == "25P02"
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute(SQL)
        assert "replayed" in conn.notices[-1]
    conn.close()


class _SlowStore:
    """audit_replays waits for ``go`` on its first call; a batch holding the spend named "bad" fails."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.batches: list[list[str]] = []

    def audit_replays(self, spends: list[Spend]) -> list[Remaining]:
        self.batches.append([s.sql for s in spends])
        if len(self.batches) == 1:
            self.go.wait(10)
        if any(s.sql == "bad" for s in spends):
            raise BackendError("cannot write this record")
        return [Remaining(analyst=Usage("analyst:" + s.analyst, Cap(1.0, 0.0), 0.0, 0.0)) for s in spends]


def test_replay_audits_batch_the_records_queued_meanwhile_and_fail_one_by_one() -> None:
    store = _SlowStore()

    async def main() -> list[Any]:
        audits = ReplayAudits(store, asyncio.get_running_loop())  # type: ignore[arg-type]
        spend = Spend(analyst="alice", domains=(), epsilon=0.0, delta=0.0, query_key="k", sql="first")
        first = audits.write(spend)
        await asyncio.sleep(0.05)  # the writer is in its first batch
        later = [audits.write(dataclasses.replace(spend, sql=sql)) for sql in ("a", "bad", "b")]
        store.go.set()
        done = await asyncio.gather(first, *later, return_exceptions=True)
        audits.close()
        return done

    done = asyncio.run(main())
    assert store.batches == [["first"], ["a", "bad", "b"], ["a"], ["bad"], ["b"]]
    assert isinstance(done[0], Remaining) and isinstance(done[1], Remaining) and isinstance(done[3], Remaining)
    assert isinstance(done[2], BackendError)


def test_audit_replays_commits_every_record_with_the_budget_left(demo_gateway: Gateway) -> None:
    result = demo_gateway.query(SQL, analyst="carol")
    assert result.plan is not None
    spend = demo_gateway.replay_spend(SQL, result.plan, analyst="carol", epsilon=None, delta=None)
    store = demo_gateway.store
    one = store.audit_and_remaining(spend, outcome="replayed", domains=spend.domains)
    assert store.audit_replays([spend, spend]) == [one, one]  # nothing spent in between
    assert _replays(demo_gateway, "carol") == ["replayed"] * 3 + ["released"]
    assert spend.domains and set(one.domains) == set(spend.domains)
