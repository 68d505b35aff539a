"""How a query's budget is shared by its measurements: the split that minimises the expected error.

A query releases outputs built from a few noisy measurements (AVG = mid + noisy centred SUM / noisy COUNT,
VARIANCE from the sums of x - c, (x - c)^2 and the count, several aggregates in one SELECT), each with noise
of variance ``V_i`` (real units). Per released cell, to first order (the delta method), each output's
squared relative error is ``sum_i a_i V_i / N^2`` with ``N`` the cell's row count, so over the query the
expected squared relative error is ``sum_i w_i V_i / N^2`` with ``w_i`` the sum of the ``a_i`` of every
output that uses measurement ``i`` (:func:`error_weights`). ``N`` is common to the measurements of a cell
and drops out of the minimisation; the data's mean and spread are replaced by public proxies, from the
declared bounds ``[lo, hi]`` only (mid-point ``c``, half-width ``h``): a value's magnitude ``E[x^2]`` of the
uniform distribution on the bounds, the mean's distance from ``c`` by its average ``h^2 / 3`` over the
bounds, the variance by ``h^2 / 3``.

- COUNT: ``a = 1`` (relative error of N).
- SUM(x): ``a = 1 / E[x^2]`` (the sum is about ``N x``).
- AVG(x) = c + S / N: ``Var ~ (V_S + (mean - c)^2 V_N) / N^2``, relative to ``E[x^2]``:
  ``a_S = 1 / E[x^2]``, ``a_N = (h^2 / 3) / E[x^2]``.
- VAR(x) = Q / N - (S / N)^2: ``Var ~ (V_Q + 4 d^2 V_S + (q - 2 d^2)^2 V_N) / N^2`` with ``d`` the mean's
  distance from c and ``q`` the mean of (x - c)^2; relative to the variance proxy ``(h^2 / 3)^2``, with ``d``
  uniform on [-h, h] and the spread ``h^2 / 3``: ``a_Q = 9 / h^4``, ``a_S = 12 / h^2``, ``a_N = 4 / 5``.
  STDDEV has the same relative weights (a quarter of each).
- Anything else (arithmetic over aggregates, HAVING, ORDER BY, the partition-selecting count): each
  measurement as if it were released alone (COUNT or SUM above).

Minimising ``sum_i w_i V_i`` under the budget:

- Laplace, ``V_i = 2 (r_i / eps_i)^2`` for real-unit L1 sensitivity ``r_i``, subject to ``sum eps_i = eps``:
  Lagrange gives ``eps_i`` proportional to ``(w_i r_i^2)^(1/3)`` (:func:`laplace_shares`), and the minimum
  ``2 (sum_i (w_i r_i^2)^(1/3))^3 / eps^2``.
- Gaussian under zCDP, ``V_i = r_i^2 / (2 rho_i)``, subject to ``sum rho_i = rho``: ``rho_i`` proportional
  to ``sqrt(w_i) r_i`` (:func:`gaussian_shares`), minimum ``(sum_i sqrt(w_i) r_i)^2 / (2 rho)``.

Proof note (the split is data-independent and never changes the total). The weights read the plan's
outputs (from the SQL text), the measurements' kinds and sensitivities, and the declared bounds: nothing
computed from the data, so choosing the split releases nothing. The shares sum to the budget handed in
(passes/budget.py then calibrates each measurement with OpenDP's map at its share and checks the charged
total is at most the epsilon asked: sequential composition). Tests: tests/test_split.py
(test_split_depends_on_the_plan_only, test_total_charge_is_the_epsilon_asked,
test_split_beats_equal_shares_for_avg_and_variance).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from dpgateway.plan import DPPlan, Measurement

AVG_KINDS = ("avg",)
VARIANCE_KINDS = ("var", "stddev")


def error_weights(plan: DPPlan, measurements: Sequence[Measurement]) -> dict[str, float]:
    """``w_i`` per measurement name (module docstring): positive for every measurement in ``measurements``."""
    by_name = {m.name: m for m in measurements}
    weights = dict.fromkeys(by_name, 0.0)
    for output in plan.outputs:
        used = [by_name[n] for n in output.measurements if n in by_name]
        if not used:
            continue
        try:
            special = _moment_weights(output.kind, used)
        except (OverflowError, ZeroDivisionError):
            special = None
        for m in used:
            weights[m.name] += special[m.name] if special is not None else standalone_weight(m)
    for name, m in by_name.items():  # HAVING / ORDER BY only, or the partition-selecting count
        if weights[name] <= 0:
            weights[name] = standalone_weight(m)
    if not all(0 < w < math.inf for w in weights.values()):  # bounds so extreme the proxies overflow: equal weights
        return dict.fromkeys(by_name, 1.0)
    return weights


def standalone_weight(m: Measurement) -> float:
    """``1 / E[v^2]`` of the measured per-row value ``v`` (1 for counts): its relative error weight alone
    (infinite when the bounds are so extreme that it overflows; error_weights then weighs all equally)."""
    if m.kind != "sum" or m.bounds is None:
        return 1.0
    lo, hi = m.bounds[0] - m.center, m.bounds[1] - m.center
    try:
        second = _uniform_moment(lo, hi, 4 if m.squared else 2)  # E[v^2], v = (x - c)^2 for a squared sum
    except (OverflowError, ZeroDivisionError):
        return math.inf
    return 1.0 / second if second > 0 else math.inf


def _moment_weights(kind: str, used: Sequence[Measurement]) -> dict[str, float] | None:
    """The delta-method weights of an AVG or a variance over its measurements, or None for other outputs."""
    counts = [m for m in used if m.kind == "count"]
    sums = [m for m in used if m.kind == "sum" and not m.squared]
    squares = [m for m in used if m.kind == "sum" and m.squared]
    if len(counts) != 1 or len(sums) != 1 or sums[0].bounds is None:
        return None
    lo, hi = sums[0].bounds
    h2 = ((hi - lo) / 2) ** 2
    if kind in AVG_KINDS and len(used) == 2:
        magnitude = _uniform_moment(lo, hi, 2)
        if magnitude <= 0 or h2 <= 0:
            return None
        return {sums[0].name: 1.0 / magnitude, counts[0].name: (h2 / 3) / magnitude}
    if kind in VARIANCE_KINDS and len(used) == 3 and len(squares) == 1 and h2 > 0:
        return {squares[0].name: 9.0 / (h2 * h2), sums[0].name: 12.0 / h2, counts[0].name: 0.8}
    return None


def _uniform_moment(lo: float, hi: float, power: int) -> float:
    """``E[v^power]`` for ``v`` uniform on ``[lo, hi]`` (``lo^power`` when the interval is a point)."""
    if hi <= lo:
        return float(lo) ** power
    return (hi ** (power + 1) - lo ** (power + 1)) / ((power + 1) * (hi - lo))


def laplace_shares(
    weights: Mapping[str, float], sensitivities: Mapping[str, float], epsilon: float
) -> dict[str, float]:
    """``eps_i = epsilon * c_i / sum c`` with ``c_i = (w_i r_i^2)^(1/3)`` (real-unit sensitivities ``r_i``)."""
    costs = {name: _cube_root(weights[name]) * _cube_root(sensitivities[name]) ** 2 for name in weights}
    return _proportional(costs, epsilon)


def _cube_root(value: float) -> float:
    return value ** (1 / 3)


def gaussian_shares(weights: Mapping[str, float], sensitivities: Mapping[str, float], rho: float) -> dict[str, float]:
    """``rho_i = rho * a_i / sum a`` with ``a_i = sqrt(w_i) r_i``."""
    costs = {name: weights[name] ** 0.5 * sensitivities[name] for name in weights}
    return _proportional(costs, rho)


def _proportional(costs: Mapping[str, float], total: float) -> dict[str, float]:
    """``total`` split in proportion to ``costs`` (equal shares if any cost is zero or not finite)."""
    values = list(costs.values())
    if not values:
        return {}
    if any(not (c > 0 and c < float("inf")) for c in values):
        return dict.fromkeys(costs, total / len(values))
    whole = sum(values)
    return {name: total * (c / whole) for name, c in costs.items()}  # (c / whole) <= 1: no overflow
