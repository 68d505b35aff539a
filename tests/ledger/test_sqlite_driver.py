"""The SQLite hot path on the sqlite3 driver (``DriverStatements``): same ledger as SQLAlchemy, locks, threads."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import BUDGET, DAY, FakeClock, make_spend
from helpers import run_concurrently

from dpgateway.budget_store import sql_base
from dpgateway.budget_store import sqlite as sqlite_store
from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.budget_store.sqlite import SQLiteBudgetStore
from dpgateway.errors import BackendError, BudgetError, DPGatewayError, InternalError
from dpgateway.policies.model import Budget, Cap


class SQLAlchemyPathStore(SQLiteBudgetStore):
    """The SQLite ledger with its hot path on SQLAlchemy connections, as before the driver path."""

    _prebuilt_transaction = SQLBudgetStore._prebuilt_transaction


def scenario(store: SQLBudgetStore, clock: FakeClock) -> list[Any]:
    """Reserves, commits, refusals, a release, a replay, a late commit and window expiry; what each step saw."""
    seen: list[Any] = []

    def step(action: Callable[[], Any]) -> None:
        try:
            seen.append(action())
        except DPGatewayError as exc:
            seen.append((type(exc).__name__, exc.message))
        seen.append(store.remaining("alice", ["pid", "other"]).as_dict())

    def spend_and_commit(epsilon: float, debit: float, **options: Any) -> Any:
        return store.commit_and_remaining(
            store.reserve(make_spend(epsilon=epsilon, **options)),
            epsilon=debit,
            delta=0.0,
            answer={"rows": [[epsilon]]},
            analyst=options.get("analyst", "alice"),
            domains=options.get("domains", ("pid",)),
        ).as_dict()

    step(lambda: spend_and_commit(0.5, 0.25, key="a"))
    step(lambda: spend_and_commit(0.7, 0.7, domains=("pid", "other"), key="b"))
    step(lambda: spend_and_commit(0.4, 0.4, analyst="bob", key="c"))
    step(lambda: store.cached_answer("alice", "b"))
    step(lambda: store.cached_answer("bob", "b"))
    step(lambda: store.reserve(make_spend(epsilon=1.5)))  # over the per-query cap
    held = store.reserve(make_spend(epsilon=1.0, key="d"))
    step(lambda: store.reserve(make_spend(epsilon=0.2)))  # over alice's cap while d is pending
    step(lambda: store.release(held, outcome="error", message="backend down"))
    late = store.reserve(make_spend(epsilon=0.3, key="e"))
    clock.advance(120)
    step(lambda: store.reap_abandoned())
    step(lambda: store.commit(late, epsilon=0.2, delta=0.0, answer=[1]))
    step(lambda: store.commit("unknown", epsilon=0.1, delta=0.0))
    step(lambda: store.grant("domain:pid", epsilon=1.0, by="boss"))
    step(lambda: spend_and_commit(0.9, 0.9, analyst="carol", key="f"))
    clock.advance(BUDGET.window_days * DAY - 60)
    step(lambda: store.reserve(make_spend(epsilon=0.1)) and None)
    step(lambda: store.cached_answer("alice", "e"))
    seen.append(sorted((c.at, c.analyst, c.scopes, c.epsilon, c.delta, c.state) for c in store.history()))
    seen.append([(u.scope, u.cap, u.spent_epsilon, u.next_expiry) for u in store.usage()])
    seen.append([(r.at, r.analyst, r.sql, r.epsilon, r.outcome, r.message) for r in store.audit_log(limit=None)])
    return seen


def test_the_driver_path_keeps_the_same_ledger_as_sqlalchemy(tmp_path):
    runs = []
    for name, kind in (("driver", SQLiteBudgetStore), ("sqlalchemy", SQLAlchemyPathStore)):
        clock = FakeClock()
        store = kind(f"sqlite:///{tmp_path / name}.db", BUDGET, clock=clock, database_clock=clock, lease_seconds=60)
        runs.append(scenario(store, clock))
        assert (set(store._drivers) == {False, True}) == (
            kind is SQLiteBudgetStore
        )  # the writing and reading connections
        store.close()
    assert runs[0] == runs[1]
    assert any(isinstance(step, tuple) and step[0] == "BudgetError" for step in runs[0])
    assert any(isinstance(step, tuple) and step[0] == "InternalError" for step in runs[0])


def hold_write_lock(path: str) -> sqlite3.Connection:
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_locked_ledger_is_retried_until_free_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_SECONDS", 0.01)
    path = str(tmp_path / "ledger.db")
    store = SQLiteBudgetStore(f"sqlite:///{path}", BUDGET)
    store.commit(store.reserve(make_spend(key="warm")), epsilon=0.5, delta=0.0)  # the driver connection is open

    other = hold_write_lock(path)
    releaser = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    releaser.start()
    started = time.monotonic()
    store.commit(store.reserve(make_spend()), epsilon=0.5, delta=0.0)  # waits for the lock, retrying
    assert time.monotonic() - started >= 0.25
    releaser.join()

    monkeypatch.setattr(sql_base, "MAX_RETRIES", 3)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(
        BackendError, match=r"Ledger database sqlite:///.*ledger\.db failed: OperationalError: .*locked"
    ):
        store.reserve(make_spend())
    other.execute("COMMIT")
    other.close()
    assert store.remaining("alice", []).analyst.spent_epsilon == 1.0  # nothing of the failed attempts stayed
    store.commit(store.reserve(make_spend()), epsilon=0.5, delta=0.0)  # and the connection is usable again
    assert [r.outcome for r in store.audit_log()] == ["released"] * 3
    store.close()


@pytest.mark.parametrize("where", ["file", "memory"])
def test_threads_sharing_one_store_never_overspend(tmp_path, where):
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if where == "file" else "sqlite:///:memory:"
    budget = Budget(window_days=1, per_analyst=Cap(1.0, 1.0), per_subject=Cap(100.0, 1.0), per_query=Cap(1.0, 1.0))
    store = SQLiteBudgetStore(url, budget)

    def race(worker: int) -> int:
        mine = 0
        for i in range(25):
            try:
                rid = store.reserve(make_spend(epsilon=0.01, delta=0.0, key=f"{worker}-{i}"))
            except BudgetError:
                continue
            store.commit(rid, epsilon=0.01, delta=0.0, answer=[i])
            store.usage()  # the admin side (SQLAlchemy) meanwhile
            mine += 1
        return mine

    assert sum(run_concurrently(race, 8)) == 100
    assert store.remaining("alice", []).analyst.spent_epsilon == pytest.approx(1.0, rel=1e-12)
    assert len(store.audit_log(outcome="refused", limit=None)) == 100
    store.close()


def test_only_prebuilt_statements_run_on_the_driver():
    store = SQLiteBudgetStore("sqlite:///:memory:", BUDGET)
    with pytest.raises(InternalError, match=r"not prebuilt: .*; this is a bug"):
        store._run_prebuilt(lambda conn: conn.execute(sa.select(sa.literal(1))))
    store.close()


def test_reads_do_not_wait_for_the_writing_connection(tmp_path):
    """The replay lookup and the budget left run on the reading connection: they answer, with every committed
    write, while a write transaction holds the writing connection (as during its fsync)."""
    store = SQLiteBudgetStore(f"sqlite:///{tmp_path / 'ledger.db'}", BUDGET)
    store.commit(store.reserve(make_spend(key="k")), epsilon=0.5, delta=0.0, answer=[7])
    answers: list[Any] = []
    with store._mutex:  # the writing connection is busy
        reader = threading.Thread(
            target=lambda: answers.extend([store.cached_answer("alice", "k"), store.remaining("alice", ["pid"])])
        )
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
    assert answers[0] == [7]
    assert answers[1].analyst.spent_epsilon == 0.5
    store.close()
