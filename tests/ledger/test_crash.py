"""kill -9 a worker anywhere; after a restart no answer is undebited and nothing dangles."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import workers

from dpgateway.budget_store import open_store
from dpgateway.errors import BudgetError
from dpgateway.policies.model import Budget, Cap

LEASE = 60.0
BUDGET = Budget(window_days=1, per_analyst=Cap(1.0, 1.0), per_subject=Cap(5.0, 1.0), per_query=Cap(1.0, 1.0))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def run_and_kill(target, *args, reports: int = 1) -> list[str]:
    """Start ``target`` in a fresh process, wait for ``reports`` ids from it, then SIGKILL it."""
    ctx = multiprocessing.get_context("spawn")
    report = ctx.SimpleQueue()
    proc = ctx.Process(target=target, args=(*args, report))
    proc.start()
    ids = [report.get() for _ in range(reports)]
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    return ids


def after_the_lease() -> float:
    return time.time() + LEASE + 1


def test_killed_before_commit_the_reservation_is_charged_as_abandoned(ledger_url):
    (rid,) = run_and_kill(workers.reserve_and_hang, ledger_url, BUDGET, 0.7)
    store = open_store(
        ledger_url, BUDGET, clock=after_the_lease, database_clock=after_the_lease, lease_seconds=LEASE
    )  # the restart
    assert [(c.id, c.state, c.epsilon) for c in store.history()] == [(rid, "abandoned", 0.7)]
    assert [r.outcome for r in store.audit_log()] == ["abandoned"]
    assert store.remaining("alice", ["pid"]).analyst.spent_epsilon == pytest.approx(0.7)
    store.commit(store.reserve(workers.spend("alice", 0.3)), epsilon=0.3, delta=0.0)
    with pytest.raises(BudgetError, match="analyst 'alice'"):
        store.reserve(workers.spend("alice", 0.01))
    store.close()


def test_killed_after_commit_before_release_the_debit_stands(ledger_url):
    (rid,) = run_and_kill(workers.commit_and_hang, ledger_url, BUDGET)
    store = open_store(ledger_url, BUDGET, clock=after_the_lease, database_clock=after_the_lease, lease_seconds=LEASE)
    assert [(c.id, c.state) for c in store.history()] == [(rid, "committed")]
    assert store.remaining("alice", []).analyst.spent_epsilon == pytest.approx(workers.STEP)
    assert store.cached_answer("alice", "alice-q") == {"columns": ["n"], "rows": [[42]]}
    assert [r.outcome for r in store.audit_log()] == ["released"]
    store.close()


def test_killed_at_an_arbitrary_point_keeps_every_invariant(ledger_url):
    reported = run_and_kill(workers.churn, ledger_url, BUDGET, reports=30)
    store = open_store(ledger_url, BUDGET, clock=after_the_lease, database_clock=after_the_lease, lease_seconds=LEASE)
    charges = {c.id: c for c in store.history()}
    assert {charges[rid].state for rid in reported} == {"committed"}  # every reported debit survived
    assert {c.state for c in charges.values()} <= {"committed", "abandoned"}  # nothing dangles
    released = store.audit_log(outcome="released", limit=None)
    assert len(released) == sum(c.state == "committed" for c in charges.values())  # debit and record together
    spent = store.remaining("alice", ["pid"]).analyst.spent_epsilon
    assert spent == pytest.approx(sum(c.epsilon for c in charges.values()))
    assert spent <= BUDGET.per_analyst.epsilon
    store.close()
