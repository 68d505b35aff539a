"""Process bodies for the concurrency and crash tests (importable by spawned processes)."""

from __future__ import annotations

import signal
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Barrier

from dpgateway.budget_store import Spend, open_store
from dpgateway.errors import BudgetError
from dpgateway.policies.model import Budget

STEP = 0.1


def spend(analyst: str, epsilon: float = STEP) -> Spend:
    return Spend(analyst, ("pid",), epsilon, 0.0, f"{analyst}-q", "SELECT COUNT(*) FROM pums", "ab" * 32)


def race(url: str, budget: Budget, analyst: str, attempts: int, start: Barrier, results: SimpleQueue) -> None:
    """Open the ledger when every racer is ready, then reserve+commit ``attempts`` times as fast as possible."""
    start.wait()
    store = open_store(url, budget)
    granted = refused = 0
    for i in range(attempts):
        try:
            rid = store.reserve(spend(analyst))
        except BudgetError:
            refused += 1
            continue
        store.commit(rid, epsilon=STEP, delta=0.0, answer={"columns": ["n"], "rows": [[i]]})
        granted += 1
    store.close()
    results.put((granted, refused))


def reserve_and_hang(url: str, budget: Budget, epsilon: float, report: SimpleQueue) -> None:
    """Reserve, report the id, then wait to be killed before committing."""
    store = open_store(url, budget)
    report.put(store.reserve(spend("alice", epsilon)))
    signal.pause()


def commit_and_hang(url: str, budget: Budget, report: SimpleQueue) -> None:
    """Reserve and commit, report the id, then wait to be killed before the answer reaches anyone."""
    store = open_store(url, budget)
    rid = store.reserve(spend("alice"))
    store.commit(rid, epsilon=STEP, delta=0.0, answer={"columns": ["n"], "rows": [[42]]})
    report.put(rid)
    signal.pause()


def churn(url: str, budget: Budget, report: SimpleQueue) -> None:
    """Reserve+commit small charges forever, reporting each committed id; killed at an arbitrary point."""
    store = open_store(url, budget)
    while True:
        rid = store.reserve(spend("alice", 0.001))
        store.commit(rid, epsilon=0.001, delta=0.0)
        report.put(rid)
