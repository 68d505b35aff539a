"""Group commit of audit records (``budget_store/group_commit.py``): every caller's record written exactly once,
in its order, and a record that cannot be written fails its own caller, never silently and never the others."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from conftest import make_spend

from dpgateway.budget_store.group_commit import GroupCommit
from dpgateway.budget_store.sql_schema import audit
from dpgateway.errors import BackendError, InternalError

THREADS = 16
REPLAYS = 200


def audit_rows(store) -> list[tuple[int, str, str, str]]:
    with store.engine.connect() as conn:
        query = sa.select(audit.c.id, audit.c.analyst, audit.c.outcome, audit.c.message).order_by(audit.c.id)
        return [tuple(row) for row in conn.execute(query)]


def run_threads(count: int, target) -> list[BaseException]:
    """Run ``target(i)`` in ``count`` threads; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # collected for the test to check
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    return errors


@pytest.mark.timeout(300)
def test_concurrent_replays_are_each_audited_once_in_order(make_store):
    store = make_store()
    transactions = []
    write = store._audit_batch._write

    def counting(rows: Sequence[dict]) -> None:
        write(rows)
        transactions.append(len(rows))

    store._audit_batch._write = counting

    def replays(i: int) -> None:
        spend = make_spend(analyst=f"analyst{i}")
        for j in range(REPLAYS):
            store.audit_event(spend, outcome="replayed", message=str(j))

    assert run_threads(THREADS, replays) == []
    rows = audit_rows(store)
    assert len(rows) == THREADS * REPLAYS == sum(transactions)
    for i in range(THREADS):
        mine = [message for _, analyst, outcome, message in rows if analyst == f"analyst{i}" and outcome == "replayed"]
        assert mine == [str(j) for j in range(REPLAYS)]  # each exactly once, in the caller's order
    assert len(transactions) < THREADS * REPLAYS  # some transactions committed several callers' records
    assert max(transactions) <= THREADS


def test_a_record_that_cannot_be_written_fails_only_its_caller(make_store):
    """A batch holding a record the database rejects (NULL analyst, NOT NULL column) is written again row by
    row: the bad record's caller gets a BackendError, every other caller's record is committed."""
    store = make_store()
    batcher = store._audit_batch
    write = batcher._write
    first = threading.Event()
    release = threading.Event()

    def gated(rows: Sequence[dict]) -> None:
        if not first.is_set():  # hold the first batch so that the others queue up behind it
            first.set()
            assert release.wait(30)
        write(rows)

    batcher._write = gated
    blocker = threading.Thread(target=lambda: store.audit_event(make_spend(analyst="first"), outcome="replayed"))
    blocker.start()
    assert first.wait(30)
    others = 8
    bad = 3

    def one(i: int) -> None:
        spend = make_spend(analyst=None if i == bad else f"analyst{i}")  # type: ignore[arg-type]
        store.audit_event(spend, outcome="refused", message=f"m{i}")

    results: list[list[BaseException]] = []
    runner = threading.Thread(target=lambda: results.append(run_threads(others, one)))
    runner.start()
    deadline = time.monotonic() + 30
    while len(batcher._queue) < others:  # every other caller waits in the queue: they form one batch
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    blocker.join(30)
    runner.join(60)
    [errors] = results
    assert len(errors) == 1 and isinstance(errors[0], BackendError)
    written = {analyst for _, analyst, _, _ in audit_rows(store)}
    assert written == {"first", *(f"analyst{i}" for i in range(others) if i != bad)}


def test_every_caller_of_a_failing_batch_gets_an_error():
    """The database is down: no caller returns as if its record were written."""

    def down(rows: Sequence[str]) -> None:
        time.sleep(0.001)
        raise BackendError("ledger unreachable")

    batcher: GroupCommit[str] = GroupCommit(down)
    errors = run_threads(THREADS, lambda i: batcher.submit(f"row{i}"))
    assert len(errors) == THREADS and all(isinstance(e, BackendError) for e in errors)


class Interrupt(BaseException):
    pass


def test_an_interrupted_writer_fails_the_rows_it_did_not_write():
    """The writing thread is interrupted (a BaseException): it raises that, and every other caller of its
    batch gets an InternalError instead of returning as if written."""
    entered = threading.Event()
    release = threading.Event()
    written: list[str] = []

    def write(rows: Sequence[str]) -> None:
        if "lead" in rows:
            entered.set()
            assert release.wait(30)
            return written.extend(rows)
        if "row0" in rows:
            raise Interrupt
        written.extend(rows)

    batcher: GroupCommit[str] = GroupCommit(write)
    leader = threading.Thread(target=lambda: batcher.submit("lead"))
    leader.start()
    assert entered.wait(30)
    results: list[list[BaseException]] = []
    runner = threading.Thread(target=lambda: results.append(run_threads(4, lambda i: batcher.submit(f"row{i}"))))
    runner.start()
    deadline = time.monotonic() + 30
    while len(batcher._queue) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    leader.join(30)
    runner.join(30)
    [errors] = results
    assert sorted(type(e).__name__ for e in errors) == ["InternalError", "InternalError", "InternalError", "Interrupt"]
    assert written == ["lead"]
    assert next(e for e in errors if isinstance(e, InternalError)).sqlstate == "XX000"


@pytest.mark.timeout(300)
def test_gateway_replays_from_16_threads_are_each_audited_once(demo_gateway):
    sql = "SELECT COUNT(*) AS n FROM pums WHERE income > -1"
    first = demo_gateway.query(sql, analyst="alice", epsilon=0.5)
    assert not first.replayed

    def replays(i: int) -> None:
        for _ in range(REPLAYS):
            result = demo_gateway.query(sql, analyst="alice", epsilon=0.5)
            assert result.replayed and result.rows == first.rows and result.epsilon == 0.0

    assert run_threads(THREADS, replays) == []
    log = demo_gateway.store.audit_log(analyst="alice", limit=None)
    assert sum(r.outcome == "replayed" for r in log) == THREADS * REPLAYS
    assert [r.outcome for r in log if r.outcome != "replayed"] == ["released"]
