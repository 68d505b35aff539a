"""Eight processes race 50 reservations each against a cap that fits exactly N: exactly N succeed."""

from __future__ import annotations

import math
import multiprocessing

import pytest
import workers

from dpgateway.budget_store import open_store, scope_name
from dpgateway.policies.model import Budget, Cap

PROCESSES = 8
ATTEMPTS = 50
FITS = 40  # N: the cap is N x 0.1, so exactly 40 of the 400 attempts fit


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shared", ["analyst", "domain"])
def test_racing_processes_never_overspend(ledger_url, shared):
    cap = Cap(FITS * workers.STEP, 1.0)
    unlimited = Cap(math.inf, 1.0)
    if shared == "analyst":  # one analyst in eight processes
        budget = Budget(window_days=1, per_analyst=cap, per_subject=unlimited, per_query=Cap(1.0, 1.0))
        analysts = ["alice"] * PROCESSES
    else:  # eight analysts, one subject domain
        budget = Budget(window_days=1, per_analyst=unlimited, per_subject=cap, per_query=Cap(1.0, 1.0))
        analysts = [f"analyst{i}" for i in range(PROCESSES)]
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=workers.race, args=(ledger_url, budget, a, ATTEMPTS, start, results)) for a in analysts]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0, "a racing process failed; its traceback is in the captured stderr"
    outcomes = [results.get() for _ in procs]
    assert sum(granted for granted, _ in outcomes) == FITS
    assert sum(refused for _, refused in outcomes) == PROCESSES * ATTEMPTS - FITS

    store = open_store(ledger_url, budget)
    scope = scope_name("analyst", "alice") if shared == "analyst" else scope_name("domain", "pid")
    usage = next(u for u in store.usage() if u.scope == scope)
    assert usage.spent_epsilon == pytest.approx(cap.epsilon, rel=1e-12)
    assert [c.state for c in store.history()] == ["committed"] * FITS
    assert len(store.audit_log(outcome="released", limit=None)) == FITS
    assert len(store.audit_log(outcome="refused", limit=None)) == PROCESSES * ATTEMPTS - FITS
    assert len(store.secret_seed()) == 32
    store.close()
