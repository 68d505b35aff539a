"""Pass 6: split the query's epsilon/delta over its measurements and calibrate each mechanism.

Proof note (sensitivity): neighbouring datasets differ by one privacy unit with all its rows.
Row bounding ('rows', 'unit_count'): a unit keeps at most ``k`` rows, each in one group, so the vector of
per-group counts moves by at most ``k`` in L1, and the vector of per-group fixed-point sums by at most
``k * ceil(bound * scale)``, where ``bound`` is the largest absolute per-row value after clamping and
centering. Weighted ('weighted', passes/bounding.py): every count is a fixed-point sum with ``bound`` 1
and ``scale`` COUNT_SCALE, and each of the unit's ``n_u`` rows adds ``trunc(w_u * v)`` with
``w_u = k / max(n_u, k)`` and ``|v| <= ceil(bound * scale)``, so the unit moves the vector by at most
``w_u * n_u * ceil(bound * scale) = min(n_u, k) * ceil(bound * scale)``: the same ``k * ceil(bound * scale)``.
Each measurement gets ``epsilon / n`` and OpenDP's map confirms the cost; basic composition sums them.
With private group keys (always 'rows') one extra COUNT(*) chooses the released groups through a Laplace
threshold (costing delta). Quantiles take their share through OpenDP's quantile mechanism, and distinct
counts have their own sensitivity (proof notes in dpgateway/quantile_mechanism.py and passes/quantiles.py).
Tests: tests/test_sensitivity.py (a unit with 1000 rows), tests/test_mechanisms.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpgateway.mechanisms import laplace_scale, partition_threshold
from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import public_cells
from dpgateway.passes.quantiles import calibrate_quantile, distinct_sensitivity
from dpgateway.plan import DPPlan, Measurement

FIXED_POINT_DIGITS = 6
COUNT_SCALE = 10**FIXED_POINT_DIGITS  # weighted counts: each row adds trunc(w_u * COUNT_SCALE)


def fixed_point_scale(bound: float) -> float:
    """Per-row values are summed as ``round(value * scale)``: about 6 significant digits of ``bound``."""
    if bound <= 0:
        return 1.0
    # At most 1e300, so the scale stays a finite double for denormal bounds (or squares that underflow);
    # the sensitivity k * ceil(bound * scale) still bounds every round(value * scale).
    return 10.0 ** min(300, FIXED_POINT_DIGITS - math.ceil(math.log10(bound)))


def split_budget(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Assign epsilon to each measurement (equal split) and delta to partition selection."""
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
    calibrated = []
    count_scale = float(COUNT_SCALE) if plan.rewrite in ("weighted", "unit_weighted") else 1.0
    for m in measurements:
        if m.kind == "quantile":  # OpenDP's quantile mechanism: its own calibration (dpgateway/quantile_mechanism.py)
            calibrated.append(calibrate_quantile(m, plan, share))
            continue
        scale = fixed_point_scale(m.bound) if m.kind == "sum" else count_scale
        # counts: bound 1; a table split across parties counts each party's bound (Table.cross_party_factor)
        sensitivity = k * math.ceil(m.bound * scale) * plan.table.cross_party_factor
        if m.kind == "count_distinct":  # passes/quantiles.py, proof note
            sensitivity = distinct_sensitivity(m, plan) * plan.table.cross_party_factor
        noise_scale, cost = laplace_scale(sensitivity, share)
        threshold = None
        if m.name == selector:
            threshold, cost, _ = partition_threshold(noise_scale, k, plan.delta)
        calibrated.append(
            replace(m, scale=scale, sensitivity=sensitivity, epsilon=cost, noise_scale=noise_scale, threshold=threshold)
        )
    return plan.with_(measurements=tuple(calibrated), delta=plan.delta if private_keys else 0.0)
