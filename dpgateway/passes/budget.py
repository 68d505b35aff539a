"""Pass 6: split the query's epsilon/delta over its measurements and calibrate each mechanism.

Proof note (sensitivity): neighbouring datasets differ by one privacy unit with all its rows.
Row bounding ('rows', 'unit_count'): a unit keeps at most ``k`` rows, each in one group, so the vector of
per-group counts moves by at most ``k`` in L1, and the vector of per-group fixed-point sums by at most
``k * ceil(bound * scale)``, where ``bound`` is the largest absolute per-row value after clamping and
centering. Weighted ('weighted', passes/bounding.py): every count is a fixed-point sum with ``bound`` 1
and ``scale`` COUNT_SCALE, and each of the unit's ``n_u`` rows adds ``trunc(w_u * v)`` with
``w_u = k / max(n_u, k)`` and ``|v| <= ceil(bound * scale)``, so the unit moves the vector by at most
``w_u * n_u * ceil(bound * scale) = min(n_u, k) * ceil(bound * scale)``: the same ``k * ceil(bound * scale)``.
The per-unit forms ('unit_weighted', 'unit_grouped': passes/unit_forms.py, passes/unit_grouped.py) add each
unit's whole weighted total ``|t_u| <= k * ceil(bound * scale)`` to one cell, with the same scales: the same bound.
The same bound holds in L2 (``|v|_2 <= |v|_1`` for the change ``v`` of the integer vector), which is the
sensitivity a discrete Gaussian is calibrated to.

Split (passes/split.py): quantiles take ``epsilon / n`` each; the other measurements share the rest in
proportion to ``(w_i r_i^2)^(1/3)`` (Laplace; ``w_i`` the public error weight, ``r_i`` the sensitivity in
real units), each calibrated with OpenDP's map at its share, and basic composition sums them. When the query
allows a delta, its keys are public and no executor that noises by itself (mpc) may run it, the same
measurements are also planned as discrete Gaussians sharing the largest rho whose OpenDP conversion at that
delta costs at most the rest, in proportion to ``sqrt(w_i) r_i``; the one with the smaller expected
weighted squared error is released, and a Gaussian plan debits the rest's (epsilon, delta) from OpenDP's
zCDP conversion (:func:`gaussian_plan`). The total charged never exceeds the epsilon asked.
With private group keys (always 'rows') one extra COUNT(*) chooses the released groups through a Laplace
threshold (costing delta). Quantiles take their share through OpenDP's quantile mechanism, and distinct
counts have their own sensitivity (proof notes in dpgateway/quantile_mechanism.py and passes/quantiles.py).
Tests: tests/test_sensitivity.py (a unit with 1000 rows), tests/test_mechanisms.py, tests/test_split.py,
tests/test_gaussian.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpgateway.errors import InternalError
from dpgateway.mechanisms import (
    gaussian_rho_upper,
    gaussian_scale,
    laplace_scale,
    partition_threshold,
    zcdp_budget,
    zcdp_to_approx,
)
from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import public_cells
from dpgateway.passes.quantiles import calibrate_quantile, distinct_sensitivity
from dpgateway.passes.split import error_weights, gaussian_shares, laplace_shares
from dpgateway.plan import DPPlan, Measurement

FIXED_POINT_DIGITS = 6
COUNT_SCALE = 10**FIXED_POINT_DIGITS  # weighted counts: each row adds trunc(w_u * COUNT_SCALE)
# executors whose parties add Laplace noise themselves (executors/mpc/party.py): a table that may run on one
# is always planned with Laplace
LAPLACE_ONLY_EXECUTORS = frozenset({"mpc"})
# above this epsilon the Laplace noise of a fixed-point value is far below its last digit, and the zCDP
# conversion would overflow floats: Laplace only
GAUSSIAN_MAX_EPSILON = 1000.0


def fixed_point_scale(bound: float) -> float:
    """Per-row values are summed as ``round(value * scale)``: about 6 significant digits of ``bound``."""
    if bound <= 0:
        return 1.0
    # At most 1e300, so the scale stays a finite double for denormal bounds (or squares that underflow);
    # the sensitivity k * ceil(bound * scale) still bounds every round(value * scale).
    return 10.0 ** min(300, FIXED_POINT_DIGITS - math.ceil(math.log10(bound)))


def split_budget(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Share epsilon (and delta) over the measurements to minimise the expected error, and calibrate each one.

    Quantiles take an equal share ``epsilon / n`` (their own calibration); the integer measurements share
    the rest as passes/split.py says, with discrete Laplace, or with discrete Gaussian under zCDP when the
    query allows a delta and that is more accurate (:func:`choose_noise`).
    """
    assert plan.table is not None
    k = plan.table.max_rows_per_unit
    measurements = list(plan.measurements)
    private_keys = bool(plan.group_keys) and public_cells(plan.group_keys) is None
    selector = None
    if private_keys:
        # Any count selects partitions equally privately (a unit adds at most k to at most k groups);
        # prefer COUNT(*), else reuse the COUNT(x) an AVG already needs rather than spend on another.
        counts = sorted((m for m in measurements if m.kind == "count"), key=lambda m: m.arg is not None)
        selector = counts[0].name if counts else None
        if selector is None:
            selector = f"__m{len(measurements)}"
            measurements.append(Measurement(name=selector, kind="count", arg=None))
    if not measurements:  # only public group keys are listed: nothing about the data is released
        return plan.with_(delta=0.0)
    share = plan.epsilon / len(measurements)
    quantiles = {m.name: calibrate_quantile(m, plan, share) for m in measurements if m.kind == "quantile"}
    sized = [_sized(m, plan) for m in measurements if m.kind != "quantile"]
    rest = plan.epsilon - math.fsum(q.epsilon for q in quantiles.values())
    gaussian_ok = (
        ctx.config.budget.noise != "laplace"
        and plan.delta > 0
        and plan.epsilon <= GAUSSIAN_MAX_EPSILON
        and not private_keys
        and not ({plan.table.executor, *plan.table.executors_allowed} & LAPLACE_ONLY_EXECUTORS)
    )
    for _ in range(8):  # floating-point sums: shrink the rest until the total charged is at most epsilon
        noisy, zcdp, delta = choose_noise(
            plan, sized, rest, selector, k, gaussian_ok, prefer_gaussian=ctx.config.budget.noise == "gaussian"
        )
        by_name = {m.name: m for m in noisy} | quantiles
        out = plan.with_(
            measurements=tuple(by_name[m.name] for m in measurements),
            zcdp_rho=zcdp[0],
            zcdp_epsilon=zcdp[1],
            delta=delta if not private_keys else plan.delta,
        )
        if out.spent_epsilon <= plan.epsilon:
            return out
        rest *= 1 - 1e-12
    raise InternalError("could not split the budget within the epsilon asked; this is a bug")


def _sized(m: Measurement, plan: DPPlan) -> Measurement:
    """The measurement with its fixed-point scale and integer L1 sensitivity (module docstring)."""
    assert plan.table is not None
    count_scale = float(COUNT_SCALE) if plan.rewrite in ("weighted", "unit_weighted", "unit_grouped") else 1.0
    scale = fixed_point_scale(m.bound) if m.kind == "sum" else count_scale
    # counts: bound 1; a table split across parties counts each party's bound (Table.cross_party_factor)
    sensitivity = plan.table.max_rows_per_unit * math.ceil(m.bound * scale) * plan.table.cross_party_factor
    if m.kind == "count_distinct":  # passes/quantiles.py, proof note
        sensitivity = distinct_sensitivity(m, plan) * plan.table.cross_party_factor
    return replace(m, scale=scale, sensitivity=sensitivity)


def choose_noise(
    plan: DPPlan,
    sized: list[Measurement],
    epsilon: float,
    selector: str | None,
    k: int,
    gaussian_ok: bool,
    *,
    prefer_gaussian: bool = False,
) -> tuple[list[Measurement], tuple[float, float], float]:
    """The calibrated measurements, (rho, its epsilon) of the Gaussian ones, and the delta they spend.

    Both candidates use the error-minimising split of passes/split.py; the Gaussian is taken only when its
    expected weighted squared error (``sum_i w_i sigma_i^2``, real units) is below the Laplace one's (exact
    discrete Laplace variances), at the same epsilon and the delta asked; ``prefer_gaussian`` (``budget.noise:
    gaussian``) takes it whenever it is allowed.
    """
    if not sized:
        return [], (0.0, 0.0), 0.0
    weights = error_weights(plan, sized)
    real = {m.name: m.sensitivity / m.scale for m in sized}
    shares = laplace_shares(weights, real, epsilon)
    laplace = []
    for m in sized:
        noise_scale, cost = laplace_scale(m.sensitivity, shares[m.name])
        threshold = None
        if m.name == selector:
            threshold, cost, _ = partition_threshold(noise_scale, k, plan.delta)
        laplace.append(
            replace(m, epsilon=cost, noise_scale=noise_scale, threshold=threshold, mechanism="laplace", rho=0.0)
        )
    if not gaussian_ok:
        return laplace, (0.0, 0.0), 0.0
    laplace_error = expected_error(weights, laplace)
    # the Gaussian's error at the largest rho any conversion could allow: skip OpenDP's search when it cannot win
    spread = math.fsum(weights[m.name] ** 0.5 * real[m.name] for m in sized)
    best_case = spread * spread / (2 * gaussian_rho_upper(epsilon, plan.delta))
    if not best_case < laplace_error and not prefer_gaussian:
        return laplace, (0.0, 0.0), 0.0
    gaussian = gaussian_plan(sized, weights, real, epsilon, plan.delta)
    if gaussian is None:
        return laplace, (0.0, 0.0), 0.0
    noisy, rho, (eps, delta) = gaussian
    if not expected_error(weights, noisy) < laplace_error and not prefer_gaussian:
        return laplace, (0.0, 0.0), 0.0
    return noisy, (rho, eps), delta


def gaussian_plan(
    sized: list[Measurement], weights: dict[str, float], real: dict[str, float], epsilon: float, delta: float
) -> tuple[list[Measurement], float, tuple[float, float]] | None:
    """Discrete Gaussians sharing the largest rho whose (epsilon, delta) fits, or None if none does.

    Proof note (the debit is OpenDP's): each measurement's rho is its own OpenDP map at its L2 sensitivity
    (its L1 sensitivity, an upper bound); zCDP composes by adding rho (Bun and Steinke 2016, Lemma 2.3;
    what OpenDP's ``make_composition`` does); the sum is converted to (epsilon, delta) by OpenDP's
    ``make_zCDP_to_approxDP`` + ``make_fix_delta`` (mechanisms.zcdp_to_approx), and that pair is what the
    ledger debits. Tests: tests/test_gaussian.py.
    """
    rho = zcdp_budget(epsilon, delta)
    for _ in range(8):
        if rho <= 0:
            return None
        shares = gaussian_shares(weights, real, rho)
        noisy = []
        for m in sized:
            noise_scale, cost = gaussian_scale(m.sensitivity, shares[m.name])
            noisy.append(replace(m, epsilon=0.0, noise_scale=noise_scale, mechanism="gaussian", rho=cost))
        total = math.fsum(m.rho for m in noisy)
        # rho rounded up by 1e-9 (relative): covers the float rounding of any order of summing the maps
        charged = zcdp_to_approx(total * (1 + 1e-9), delta)
        if charged[0] <= epsilon and charged[1] <= delta:
            return noisy, total, charged
        rho *= 1 - 1e-9
    return None


def expected_error(weights: dict[str, float], measurements: list[Measurement]) -> float:
    """``sum_i w_i Var_i`` in real units (discrete Laplace exactly, discrete Gaussian by its bound ``scale^2``);
    infinite when extreme bounds overflow it (the choice then keeps Laplace)."""
    total = 0.0
    try:
        for m in measurements:
            sd = m.noise_scale if m.mechanism == "gaussian" else dlap_sd(m.noise_scale)
            ratio = sd / m.scale
            total += weights[m.name] * ratio * ratio
    except (OverflowError, ZeroDivisionError):
        return math.inf
    return total if math.isfinite(total) else math.inf


def dlap_sd(scale: float) -> float:
    """Standard deviation of the discrete Laplace of ``scale``: ``sqrt(2 q) / (1 - q)``, ``q = exp(-1 / scale)``,
    written ``1 / (sqrt(2) sinh(1 / (2 scale)))`` so that it neither overflows nor divides by zero."""
    if scale <= 0:
        return 0.0
    return 1 / (math.sqrt(2) * math.sinh(0.5 / scale))
