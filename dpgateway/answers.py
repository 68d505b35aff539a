"""What the gateway hands back: a released :class:`Result`, an :class:`Explanation`, and the accuracy
statements both carry, computed from the plan and the noisy release only (post-processing)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from typing import Any

import pandas as pd

from dpgateway.executors.base import Executor
from dpgateway.mechanisms import noise_half_width
from dpgateway.noise import Noisy
from dpgateway.passes.quantiles import grid, quantile_accuracy
from dpgateway.plan import DPPlan, Measurement
from dpgateway.postprocess import Released

REWRITE_NOTES = {
    "weighted": "bounding: each matching row weighted by k / max(rows of its unit, k) (at most k rows' worth per unit)",
    "unit_weighted": (
        "bounding: per-unit pre-aggregation, each unit's total weighted by k / max(rows of its unit, k) "
        "(at most k rows' worth per unit)"
    ),
    "unit_grouped": (
        "bounding: per-unit pre-aggregation, each unit's total weighted by k / max(rows of its unit, k) "
        "(at most k rows' worth per unit), in one cell"
    ),
    "rows": "bounding: each unit's rows ranked by a keyed hash, the first k kept",
    "unit_count": "bounding: per-unit pre-aggregation, SUM(LEAST(rows per unit, k)) (exactly the row-bounded count)",
}


@dataclass(frozen=True)
class Result:
    """A released answer, exactly what it cost, and how far each column may be from the truth.

    ``frame`` (pandas) and ``rows`` (plain, JSON-friendly values) are built from ``released`` when first read.
    ``accuracy`` describes each output column's 95% error (``"±18"``, ``"exact (public data)"``, ...);
    ``half_width`` is that half-width as a number where it is exact (COUNT and SUM; 0 for exact columns),
    else None; ``warnings`` flag values that are mostly noise (see :func:`avg_warnings`); ``plan`` is the plan
    the query was answered under (not part of the released answer).
    """

    released: Released
    epsilon: float
    delta: float
    remaining: dict[str, Any]
    replayed: bool = False
    accuracy: dict[str, str] = field(default_factory=dict)
    half_width: dict[str, float | None] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    plan: DPPlan | None = field(default=None, repr=False, compare=False)  # what answered (e.g. the server types it)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.released.columns]

    @cached_property
    def rows(self) -> list[list[Any]]:
        return plain_rows(self.released.rows)

    @cached_property
    def frame(self) -> pd.DataFrame:
        return self.released.frame()

    def to_dict(self) -> dict[str, Any]:
        """The CLI's JSON shape."""
        return {
            "columns": self.columns,
            "rows": self.rows,
            "accuracy_95": self.accuracy,
            "half_width_95": self.half_width,
            "warnings": list(self.warnings),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "remaining": self.remaining,
            "replayed": self.replayed,
        }


@dataclass(frozen=True)
class MechanismInfo:
    """One noisy measurement as EXPLAIN shows it (real units)."""

    measurement: str
    mechanism: str
    epsilon: float
    sensitivity: float
    noise_scale: float
    threshold: int | None = None


@dataclass(frozen=True)
class Explanation:
    """What a query would do and cost, computed without touching data or budget."""

    sql: str
    bounded_sql: str
    epsilon: float
    delta: float
    mechanisms: tuple[MechanismInfo, ...]
    accuracy: dict[str, str]
    notes: tuple[str, ...] = field(default=())
    plan: DPPlan | None = None
    executor: str = "plain"
    executor_detail: str = "plain"  # Executor.describe(): says simulated for a simulated executor
    simulated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sql": self.sql,
            "bounded_sql": self.bounded_sql,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "mechanisms": [m.__dict__ for m in self.mechanisms],
            "accuracy_95": self.accuracy,
            "notes": list(self.notes),
            "executor": self.executor,
            "executor_detail": self.executor_detail,
            "simulated": self.simulated,
        }


def plain_rows(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as JSON-friendly lists (what the CLI prints and the replay cache stores)."""
    return [[v if _is_plain(v) else _plain(v) for v in row] for row in rows]


def _is_plain(value: Any) -> bool:
    """Already JSON-friendly as it is: an int (not a bool), a string or a finite float."""
    kind = type(value)
    return kind is int or kind is str or (kind is float and math.isfinite(value))


def _plain(value: Any) -> Any:
    """A JSON-friendly Python value (NaN and NA become None)."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, Decimal):  # DuckDB's type for arithmetic with decimal literals, e.g. COUNT(*) + 0.5
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def explanation(plan: DPPlan, executor: Executor | None) -> Explanation:
    if plan.passthrough:
        return Explanation(
            plan.sql, plan.tree.sql(dialect="postgres"), 0.0, 0.0, (), {}, ("public data: exact, no cost",)
        )
    k = plan.table.max_rows_per_unit if plan.table else 1
    mechanisms = tuple(
        MechanismInfo(
            measurement=m.label,
            mechanism=_mechanism_name(plan, m),
            epsilon=m.epsilon,
            sensitivity=m.sensitivity / m.scale,
            noise_scale=m.noise_scale / m.scale,
            threshold=m.threshold,
        )
        for m in plan.measurements
    )
    assert executor is not None
    accuracy = accuracies(plan, executor)[0]
    notes = [f"each privacy unit contributes at most {k} row(s)' worth; values are clamped to the declared bounds"]
    notes.append(REWRITE_NOTES.get(plan.rewrite, plan.rewrite))
    notes.extend(plan.notes)  # e.g. reads a prepared copy
    notes.append(f"executor: {executor.describe()}")
    if plan.selects_partitions:
        notes.append("group keys are private: only groups whose noisy count passes the threshold are released")
    return Explanation(
        plan.sql,
        plan.shown_sql,
        plan.spent_epsilon,
        plan.delta,
        mechanisms,
        accuracy,
        tuple(notes),
        plan,
        executor.name,
        executor.describe(),
        executor.simulated,
    )


def _mechanism_name(plan: DPPlan, m: Measurement) -> str:
    if m.kind == "quantile":
        assert plan.table is not None
        return f"OpenDP quantile (report noisy max over {grid(m, plan.table).size} candidates)"
    if m.mechanism == "gaussian":
        return (
            f"discrete Gaussian (zCDP rho {m.rho:.6g}; the plan's rho {plan.zcdp_rho:.6g} costs epsilon "
            f"{plan.zcdp_epsilon:.6g} at delta {plan.delta:.3g})"
        )
    return "discrete Laplace threshold (partition selection)" if m.threshold is not None else "discrete Laplace"


def accuracies(plan: DPPlan, executor: Executor) -> tuple[dict[str, str], dict[str, float | None]]:
    """Each output column's 95% accuracy as text, and as a number where the half-width is exact."""
    text = {o.name: _accuracy(plan, executor, o.kind, o.measurements) for o in plan.outputs}
    number: dict[str, float | None] = {}
    for o in plan.outputs:
        if o.kind == "key" or not o.measurements:
            number[o.name] = 0.0
        elif o.kind in ("count", "sum") and len(o.measurements) == 1:
            m = plan.measurement(o.measurements[0])
            number[o.name] = executor.half_width(m.noise_scale, mechanism=m.mechanism) / m.scale
        else:
            number[o.name] = None
    return text, number


def _accuracy(plan: DPPlan, executor: Executor, kind: str, used: tuple[str, ...]) -> str:
    """95% half-width of one output column (exact for COUNT/SUM, per group size n for AVG)."""
    ms = [plan.measurement(n) for n in used]
    widths = {m.name: executor.half_width(m.noise_scale, mechanism=m.mechanism) / m.scale for m in ms if m.is_laplace}
    if kind == "key":
        return "exact key" if not plan.selects_partitions else "exact key (released by partition selection)"
    if not ms:
        return "exact (no noisy value)"
    if kind == "quantile" and len(ms) == 1:
        assert plan.table is not None
        return quantile_accuracy(ms[0], plan.table)
    if kind in ("count", "sum") and len(ms) == 1:
        return f"±{widths[ms[0].name]:.6g}"
    if kind == "avg" and len(ms) == 2:
        total = next(m for m in ms if m.kind == "sum")
        return f"≈ ±{widths[total.name]:.6g} / n (n = rows in the group)"
    return "depends on the data (derived from several noisy measurements)"


def _key_sql(plan: DPPlan) -> list[str]:
    return [k.expr.sql(dialect="postgres") for k in plan.group_keys]


def avg_warnings(plan: DPPlan, noisy: Noisy, executor: Executor | None = None) -> tuple[str, ...]:
    """Warnings for AVG values that are mostly noise; computed from the noisy release only (post-processing).

    AVG(x) is ``clamp(mid + S / n, lo, hi)`` with S the noisy centred sum and n the noisy count. With W_n
    and W_S their 95% half-widths (real units) and h = (hi - lo) / 2, a group warns when
    ``n <= max(W_n, W_S / h)``: then either the count is within its own noise of zero, or the sum's noise
    divided by n spans the whole declared range, so the released average says little about the data.
    Test: tests/test_cli.py::test_avg_over_a_tiny_group_warns.
    """
    position = {name: i for i, name in enumerate(noisy.columns)}
    warnings = []
    for output in plan.outputs:
        if output.kind != "avg" or len(output.measurements) != 2:
            continue
        count, total = sorted((plan.measurement(n) for n in output.measurements), key=lambda m: m.kind)
        width = executor.half_width if executor is not None else noise_half_width
        w_count = width(count.noise_scale, mechanism=count.mechanism) / count.scale
        w_sum = width(total.noise_scale, mechanism=total.mechanism) / total.scale
        floor = max(w_count, w_sum / total.bound) if total.bound > 0 else w_count
        counts = noisy.values[position[count.name]]
        tiny = [i for i, n in enumerate(counts) if n <= floor]
        if not tiny:
            continue
        keys = plan.memo("key_sql", _key_sql)  # rendered for a warning only, once per plan
        if keys:
            shown = ", ".join(
                "(" + ", ".join(f"{k}={noisy.values[j][i]!r}" for j, k in enumerate(keys)) + f"; noisy n={counts[i]})"
                for i in tiny[:5]
            )
            where = f"in {len(tiny)} of {len(counts)} group(s): {shown}" + (" ..." if len(tiny) > 5 else "")
        else:
            where = f"(noisy n={counts[0]})"
        warnings.append(
            f"column {output.name!r} (AVG) is mostly noise {where}; an AVG warns when its noisy count n is at most "
            f"{floor:.6g}, where the count's 95% noise, or the sum's divided by n, spans the declared range. "
            "Widen the filter or spend more epsilon"
        )
    return tuple(warnings)
