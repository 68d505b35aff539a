"""Empirical privacy audit: estimate a lower bound on epsilon from many runs of a mechanism on two neighbouring
datasets and check it never exceeds what the gateway charges.

For an event S, (epsilon, delta)-DP gives P[M(D) in S] <= e^eps P[M(D') in S] + delta for both orders of D and
D'. With Clopper-Pearson bounds on both probabilities, ln((p_lo - delta) / q_hi) is a lower bound on epsilon at
the stated confidence. The events are the tails {y >= t} and {y <= t} (for the discrete Laplace they are the
likelihood-ratio tests, where the bound is tight). Bonferroni over the events: each audit fails wrongly with
probability <= ALPHA. The exact bounded aggregates come from the gateway's own bounded SQL on the backend; the
many runs call dpgateway.mechanisms directly (the ledger would make them slow), with the plan's noise scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from attack_support import ATTACKER, attack_gateway, clopper_pearson

from dpgateway import Gateway
from dpgateway.mechanisms import noisy_vector, select_partitions

ALPHA = 1e-3
COLUMNS = {
    "pid": {"type": "int"},
    "income": {"type": "float", "bounds": [0, 1000]},
    "city": {"type": "str"},
}
K = 2


def neighbours(rows_of_target: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    base = [{"pid": i, "income": float(i * 13 % 1000), "city": "big"} for i in range(300)]
    return base, base + rows_of_target


def exact_and_plan(tmp_path: Path, rows: list[dict[str, Any]], sql: str, epsilon: float, delta: float) -> Any:
    """The exact bounded aggregates (first measurement, first group) and the plan, from the real pipeline."""
    with attack_gateway(tmp_path, rows, COLUMNS, k=K) as gw:
        plan = gw.explain(sql, epsilon=epsilon, delta=delta).plan
        assert plan is not None
        exact = gw.connector.execute(plan.bounded_sql)
    return exact, plan


def epsilon_lower_bound(d: np.ndarray, d2: np.ndarray, thresholds: list[int], delta: float, alpha: float) -> float:
    """Largest ln((p_lo - delta) / q_hi) over tail events, both directions, at joint confidence 1 - alpha."""
    n = len(d)
    events = [(">=", t) for t in thresholds] + [("<=", t) for t in thresholds]
    per_event = alpha / (2 * len(events))  # two orders (D, D') per event
    best = 0.0
    for op, t in events:
        hits = [int((x >= t).sum()) if op == ">=" else int((x <= t).sum()) for x in (d, d2)]
        for a, b in ((0, 1), (1, 0)):
            p_lo, _ = clopper_pearson(hits[a], n, per_event)
            _, q_hi = clopper_pearson(hits[b], n, per_event)
            if p_lo - delta > 0 and q_hi > 0:
                best = max(best, math.log((p_lo - delta) / q_hi))
    return best


def audit(values: tuple[int, int], scale: float, runs: int) -> float:
    d = np.array(noisy_vector([values[0]] * runs, scale))
    d2 = np.array(noisy_vector([values[1]] * runs, scale))
    lo, hi = sorted(values)
    thresholds = [int(t) for t in np.linspace(lo - 2 * scale, hi + 2 * scale, 9)]
    return epsilon_lower_bound(d, d2, thresholds, 0.0, ALPHA)


def test_audit_count(tmp_path: Path) -> None:
    """COUNT(*): the target adds 5 rows, bounded to k = 2."""
    rows_d, rows_d2 = neighbours([{"pid": 999, "income": 1.0, "city": "big"}] * 5)
    sql, eps = "SELECT COUNT(*) FROM t", 1.0
    exact_d, plan = exact_and_plan(tmp_path / "d", rows_d, sql, eps, 0.0)
    exact_d2, _ = exact_and_plan(tmp_path / "d2", rows_d2, sql, eps, 0.0)
    values = (int(exact_d.rows[0][0]), int(exact_d2.rows[0][0]))
    assert values[1] - values[0] == K
    found = audit(values, plan.measurements[0].noise_scale, 100_000)
    print(f"COUNT: epsilon lower bound {found:.3f}, charged {plan.spent_epsilon:.3f}")
    assert found <= plan.spent_epsilon


def test_audit_clamped_sum(tmp_path: Path) -> None:
    """SUM(income): the target adds 50 rows of 1e12, bounded to k = 2 rows clamped to 1000."""
    rows_d, rows_d2 = neighbours([{"pid": 999, "income": 1e12, "city": "big"}] * 50)
    sql, eps = "SELECT SUM(income) FROM t", 1.0
    exact_d, plan = exact_and_plan(tmp_path / "d", rows_d, sql, eps, 0.0)
    exact_d2, _ = exact_and_plan(tmp_path / "d2", rows_d2, sql, eps, 0.0)
    m = plan.measurements[0]
    values = (int(exact_d.rows[0][0]), int(exact_d2.rows[0][0]))
    assert values[1] - values[0] == m.sensitivity  # the worst case: k rows at the bound
    found = audit(values, m.noise_scale, 100_000)
    print(f"SUM: epsilon lower bound {found:.3f}, charged {plan.spent_epsilon:.3f}")
    assert found <= plan.spent_epsilon


def test_audit_partition_selection(tmp_path: Path) -> None:
    """A group only the target has (k rows) is released with probability at most the charged delta; on D it
    does not exist and is never released. 100,000 independent partitions in one call."""
    rows_d, rows_d2 = neighbours([{"pid": 999, "income": 1.0, "city": "atlantis"}] * K)
    sql, eps, delta = "SELECT city, COUNT(*) FROM t GROUP BY city", 1.0, 0.05
    _, plan = exact_and_plan(tmp_path / "d", rows_d, sql, eps, delta)
    exact_d2, _ = exact_and_plan(tmp_path / "d2", rows_d2, sql, eps, delta)
    count = dict((row[0], int(row[1])) for row in exact_d2.rows)["atlantis"]
    assert count == K
    m = next(m for m in plan.measurements if m.threshold is not None)
    runs = 100_000
    released = len(select_partitions(dict.fromkeys(range(runs), count), m.noise_scale, m.threshold))
    lo, _ = clopper_pearson(released, runs, ALPHA)
    print(f"partition selection: released {released / runs:.4f}, lower bound {lo:.4f}, charged delta {plan.delta}")
    assert lo <= plan.delta


@pytest.mark.slow
def test_audit_end_to_end_through_the_gateway(tmp_path: Path) -> None:
    """SUM through Gateway.query (ledger, backend, noise, post-processing) on both neighbours, replay off."""
    rows_d, rows_d2 = neighbours([{"pid": 999, "income": 1e12, "city": "big"}] * 50)
    sql, eps, runs = "SELECT SUM(income) FROM t", 1.0, 600
    released = []
    for name, rows in (("d", rows_d), ("d2", rows_d2)):
        with attack_gateway(tmp_path / name, rows, COLUMNS, k=K, replay="off") as gw:
            plan = gw.explain(sql, epsilon=eps).plan
            assert plan is not None
            m = plan.measurements[0]
            answers = [gw.query(sql, analyst=ATTACKER, epsilon=eps).rows[0][0] for _ in range(runs)]
            released.append(np.round(np.array(answers) * m.scale).astype(np.int64))
            exact = int(gw.connector.execute(plan.bounded_sql).rows[0][0])
    # Released sums are clamped at 0 (post-processing); the exact ones are far above 0 here.
    thresholds = [int(t) for t in np.linspace(exact - 2 * m.sensitivity, exact + 3 * m.sensitivity, 7)]
    found = epsilon_lower_bound(released[0], released[1], thresholds, 0.0, ALPHA)
    print(f"end to end SUM: epsilon lower bound {found:.3f}, charged {plan.spent_epsilon:.3f}")
    assert found <= plan.spent_epsilon


def test_gateway_is_the_mechanism_audited(tmp_path: Path) -> None:
    """The audits above use the plan's noise scale: the gateway charges what that scale's privacy map says."""
    with attack_gateway(tmp_path, neighbours([])[0], COLUMNS, k=K) as gw:
        res = gw.query("SELECT SUM(income) FROM t", analyst=ATTACKER, epsilon=1.0)
        plan = gw.explain("SELECT SUM(income) FROM t", epsilon=1.0).plan
    assert isinstance(gw, Gateway) and plan is not None
    assert res.epsilon == pytest.approx(plan.spent_epsilon) and res.epsilon <= 1.0
