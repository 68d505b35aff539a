"""Quantiles (MIN, MAX, MEDIAN, PERCENTILE_CONT/DISC, quantile_cont/disc) and COUNT(DISTINCT ...).

Planning hooks called from passes/aggregates.py (measurements), passes/rewrite.py (row bounding),
passes/budget.py (calibration) and passes/bounding.py (the per-candidate histogram in SQL); the
mechanism and its proof note are in dpgateway/quantile_mechanism.py.

A quantile of ``x`` is a measurement of kind ``quantile``: the backend computes the query's aggregates
with ``GROUP BY GROUPING SETS ((keys), (keys, __bin0), (keys, __bin1), ...)``, one set per quantile column,
``__bin<i>`` the index of the candidate nearest to ``clamp(x_i)`` on column ``i``'s public grid (-1 for a NULL
``x_i``). The rows of the set ``(keys)`` (every ``__bin<i>`` NULL) are the ordinary per-group aggregates; the
rows of set ``i`` carry ``COUNT(x_i)`` per candidate: the histogram of each quantile of column ``i``. So one
statement, one pass over the kept rows, answers any mix of aggregates, quantiles of several columns and
distinct counts.

Proof note (quantiles of expressions, ``MEDIAN(x + 1)``, ``PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY
income / 1000)``): passes/intervals.py rebuilds the expression over clamped columns and derives the interval
``[lo, hi]`` holding every value it can take (the interval ``SUM`` of the same expression is clamped to; its
proof note rules out every error a row could raise). The candidate grid spans that interval (a double
interval's ends rounded to a millionth of its width), a function of the policy and the SQL only, so it is
public as a column's grid is. Each kept row's value is computed from that row alone, clamped to the grid's
range and snapped, so it lands in exactly one bin (or none when NULL), as a column's value does: one unit
still changes the histograms by at most ``k`` rows, and the mechanism's sensitivity and charge are unchanged
(dpgateway/quantile_mechanism.py). Expressions the interval arithmetic cannot bound (a column without
bounds, a divisor that can be 0, ...) are refused with 42501 naming the declaration. Tests:
tests/test_quantiles.py (histograms against pandas, one person with 1000 rows, refusals),
tests/test_quantiles_golden.py.

MIN and MAX are the ``MIN_ALPHA`` and ``1 - MIN_ALPHA`` quantiles: the true minimum is one person's value,
so any DP release of it is noise spanning the bounds; a quantile just inside the extreme is what can be
released accurately (docs/sql.md).

Proof note (COUNT(DISTINCT col), row bounding): each unit keeps at most ``k`` rows (passes/bounding.py),
chosen by its own rows only. Adding the unit adds its kept rows; each row is in one group and can add at
most one new distinct value to that group, so the vector of per-group distinct counts moves by at most
``min(k, distinct (group, value) pairs of the unit) <= k`` in L1 (removal alike). For the privacy unit
itself and no GROUP BY, the unit adds exactly its one identifier: sensitivity 1 (``COUNT(DISTINCT unit)``
counts people). Tests: tests/test_quantiles.py::test_count_distinct_sensitivity.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from sqlglot import exp

from dpgateway.connectors.base import ExactAggregates
from dpgateway.errors import GroupingError, InternalError, PrivacyViolationError, UnsupportedError
from dpgateway.passes.intervals import Total, bounded_value
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Column, Table
from dpgateway.quantile_mechanism import Grid, calibrate, grid_for, noisy_index, rank_half_width
from dpgateway.sqlparse import number, row_expression_value

MIN_ALPHA = 0.01  # MIN(x) is the 1st percentile, MAX(x) the 99th (module docstring)
BIN = "__bin"  # __bin0, __bin1, ...: one per quantile column
QUANTILE_FUNCTIONS = {"QUANTILE_CONT", "QUANTILE_DISC", "QUANTILE", "PERCENTILE_CONT", "PERCENTILE_DISC", "MEDIAN"}


def is_quantile_call(node: exp.Expr) -> bool:
    """Whether ``node`` is a quantile aggregate the parser leaves untyped (``quantile_cont(x, p)``)."""
    return isinstance(node, exp.Anonymous) and node.name.upper() in QUANTILE_FUNCTIONS


def output_kind(node: exp.Expr) -> str | None:
    """The output kind of a quantile or distinct-count aggregate, else None."""
    if isinstance(node, (exp.Min, exp.Max, exp.Median, exp.WithinGroup, exp.PercentileCont, exp.PercentileDisc)):
        return "quantile"
    if is_quantile_call(node):
        return "quantile"
    if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct):
        return "count"
    return None


def output_name(node: exp.Expr) -> str | None:
    """The column name PostgreSQL gives a quantile call it names by its function, else None."""
    if isinstance(node, exp.WithinGroup) and isinstance(node.this, exp.Func):
        return node.this.sql_name().lower()
    if is_quantile_call(node):
        return node.name.lower()
    return None


def plan_special(node: exp.Expr, measurements: list[Measurement], table: Table, total: Total) -> exp.Expr | None:
    """The noisy expression for a quantile or COUNT(DISTINCT) aggregate (registering it), or None.

    ``total`` makes a condition in a quantile's expression argument total on the backend (passes/total.py).
    """
    if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct):
        return exp.column(_distinct(node.this, measurements, table))
    found = _quantile(node)
    if found is None:
        return None
    name, arg, alpha = found
    m = _argument(name, arg, table, total)
    for known in measurements:
        if (known.kind, known.arg, known.alpha) == ("quantile", m.arg, alpha):
            return exp.column(known.name)
    m = replace(m, name=f"__m{len(measurements)}", alpha=alpha)
    measurements.append(m)
    return exp.column(m.name)


def _quantile(node: exp.Expr) -> tuple[str, exp.Expr | None, float] | None:
    """(function name, argument, alpha) of a quantile aggregate, or None if ``node`` is not one."""
    if isinstance(node, exp.Min):
        return "MIN", node.this, MIN_ALPHA
    if isinstance(node, exp.Max):
        return "MAX", node.this, 1 - MIN_ALPHA
    if isinstance(node, exp.Median):
        return "MEDIAN", node.this, 0.5
    if isinstance(node, (exp.PercentileCont, exp.PercentileDisc)):
        raise UnsupportedError(f"{node.sql_name()}(p) needs WITHIN GROUP (ORDER BY column)")
    if isinstance(node, exp.WithinGroup):
        inner, order = node.this, node.expression
        if not isinstance(inner, (exp.PercentileCont, exp.PercentileDisc)):
            raise UnsupportedError("WITHIN GROUP is supported for PERCENTILE_CONT and PERCENTILE_DISC only")
        name = inner.sql_name()
        if not isinstance(order, exp.Order) or len(order.expressions) != 1:
            raise UnsupportedError(f"{name}(p) WITHIN GROUP needs exactly one ORDER BY column")
        ordered = order.expressions[0]
        alpha = _fraction(inner.this, name)
        return name, ordered.this, 1 - alpha if ordered.args.get("desc") else alpha
    if is_quantile_call(node):
        assert isinstance(node, exp.Anonymous)
        name = node.name.upper()
        args = node.expressions
        if name == "MEDIAN" and len(args) == 1:
            return name, args[0], 0.5
        if name.startswith("QUANTILE") and len(args) == 2:
            return name, args[0], _fraction(args[1], name)
        raise UnsupportedError(f"{name} takes (column, fraction); e.g. quantile_cont(income, 0.9)")
    return None


def _fraction(node: exp.Expr | None, name: str) -> float:
    if isinstance(node, exp.Literal) and not node.is_string:
        value = float(node.this)
        if 0.0 <= value <= 1.0:
            return value
    raise UnsupportedError(f"{name} needs one fraction between 0 and 1 written as a number, e.g. 0.5")


def _argument(name: str, arg: exp.Expr | None, table: Table, total: Total) -> Measurement:
    """A quantile's value (a bounded column, or an expression bounded by passes/intervals.py) and its grid's range.

    A column's range is its declared bounds. An expression's is the interval passes/intervals.py derives for
    it (the one ``SUM`` of the expression is clamped to), a double interval's ends rounded to a millionth of
    its width (they were widened outward by a relative 1e-9 for rounding; the grid needs no such margin,
    since every value is clamped to the range before it is snapped).
    """
    if arg is not None and arg.find(exp.AggFunc):
        raise GroupingError("aggregate function calls cannot be nested")
    if isinstance(arg, exp.Column):
        column = _bounded_column(name, arg, table)
        return Measurement(
            name="", kind="quantile", arg=exp.column(column.name), bounds=column.bounds, integer=column.type == "int"
        )
    if arg is None:
        raise UnsupportedError(f"{name} needs an argument")
    what = f"{name}({arg.sql('postgres')})"
    built, interval = bounded_value(row_expression_value(arg, what), table, what=what, total=total)
    lo, hi = interval.lo, interval.hi
    if not interval.integer and hi > lo:
        unit = 10.0 ** (math.floor(math.log10(hi - lo)) - 6)
        lo, hi = (float(f"{round(v / unit) * unit:.12g}") for v in (lo, hi))
    return Measurement(
        name="", kind="quantile", arg=built, bounds=(lo, hi), integer=interval.integer, text=arg.sql("postgres")
    )


def _bounded_column(name: str, arg: exp.Column, table: Table) -> Column:
    column = table.column(arg.name)
    assert column is not None  # resolve_table checked every column
    if column.name == table.privacy_unit:
        raise PrivacyViolationError(f"{name}({column.name}) would release a privacy unit identifier")
    if not column.is_numeric:
        raise PrivacyViolationError(f"{name} needs a numeric column; {table.name}.{column.name} is {column.type}")
    if column.bounds is None:
        raise PrivacyViolationError(
            f"Column {table.name}.{column.name} has no declared bounds, so {name} has no public candidates to "
            f"choose from; add `bounds: [lo, hi]` under tables.{table.name}.columns.{column.name}"
        )
    return column


def _distinct(distinct: exp.Distinct, measurements: list[Measurement], table: Table) -> str:
    args = distinct.expressions
    if len(args) != 1 or not isinstance(args[0], exp.Column):
        raise UnsupportedError("COUNT(DISTINCT ...) takes one column; e.g. COUNT(DISTINCT pid)")
    column = table.column(args[0].name)
    assert column is not None
    for m in measurements:
        if (m.kind, m.column) == ("count_distinct", column.name):
            return m.name
    m = Measurement(name=f"__m{len(measurements)}", kind="count_distinct", arg=exp.column(column.name))
    measurements.append(m)
    return m.name


def needs_row_bounding(plan: DPPlan) -> bool:
    """Quantiles and distinct counts need each unit's kept rows (weights cannot scale them)."""
    return any(m.kind in ("quantile", "count_distinct") for m in plan.measurements)


def distinct_sensitivity(m: Measurement, plan: DPPlan) -> int:
    """L1 sensitivity of the per-group distinct counts (module docstring): 1 for people overall, else k."""
    assert plan.table is not None
    if m.column == plan.table.privacy_unit and not plan.group_keys:
        return 1
    return plan.table.max_rows_per_unit


def grid(m: Measurement, table: Table) -> Grid:
    """The public candidate grid of a quantile measurement: from its value's range and type only."""
    assert m.bounds is not None
    lo, hi = m.bounds
    return grid_for(float(lo), float(hi), m.integer)


# -- SQL hooks (passes/bounding.py) ------------------------------------------------------------------------


def _value(m: Measurement) -> exp.Expr:
    """The measured row value: a bare column (quoted), or the bounded expression over clamped columns."""
    assert m.arg is not None
    return exp.column(m.column, quoted=True) if m.column else m.arg.copy()


def aggregate_sql(m: Measurement) -> exp.Expr | None:
    """The per-group (per-bin, for quantiles) aggregate of a quantile or distinct-count measurement."""
    if m.kind == "quantile":
        return exp.Count(this=_value(m))
    if m.kind == "count_distinct":
        return exp.Count(this=exp.Distinct(expressions=[exp.column(m.column or "", quoted=True)]))
    return None


def quantile_sources(plan: DPPlan) -> list[Measurement]:
    """One quantile measurement per distinct value the query takes quantiles of, in order of first use (one
    histogram each; quantiles of one value at several fractions share it)."""
    first: dict[exp.Expr, Measurement] = {}
    for m in plan.measurements:
        if m.kind == "quantile" and m.arg is not None:
            first.setdefault(m.arg, m)
    return list(first.values())


def with_bins(plan: DPPlan, table: Table, final: exp.Select) -> exp.Select:
    """``final`` grouped by ``GROUPING SETS ((keys), (keys, __bin0), ...)`` when the query has quantiles."""
    sources = quantile_sources(plan)
    if not sources:
        return final
    keys = [exp.column(k.name, quoted=True) for k in plan.group_keys]
    bins = [bin_index(m, table) for m in sources]
    final = final.select(*(exp.alias_(b, f"{BIN}{i}", quoted=True) for i, b in enumerate(bins)), copy=False)

    def grouping_set(items: list[exp.Expr]) -> exp.Expr:  # the parser's shape: (a) is a Paren, () and (a, b) Tuples
        return exp.Paren(this=items[0]) if len(items) == 1 else exp.Tuple(expressions=items)

    sets = [grouping_set([k.copy() for k in keys])]
    sets.extend(grouping_set([*(k.copy() for k in keys), b.copy()]) for b in bins)
    final.set("group", exp.Group(expressions=[exp.GroupingSets(expressions=sets)]))
    return final


def bin_index(m: Measurement, table: Table) -> exp.Expr:
    """The index of the candidate nearest to ``clamp(v)``: ``floor((clamp(v) - lo) * (1 / step) + 1/2)``, -1 for NULL v.

    ``v`` is the measured value (a column, or an expression over clamped columns), clamped to the grid's
    range. Computed in DOUBLE on every backend (IEEE multiplication and FLOOR agree across engines; a product,
    since dialects disagree on what ``/`` means), then clamped to ``[0, size - 1]`` so a rounding at the top
    edge cannot leave the grid. Which candidate a row snaps to is a function of that row alone.
    """
    assert m.bounds is not None
    lo, hi = m.bounds
    g = grid(m, table)
    x = _value(m)
    clamped = exp.Least(
        this=exp.Greatest(this=x, expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    offset = exp.Sub(this=exp.cast(clamped, "DOUBLE"), expression=number(g.lo))
    scaled = exp.Add(this=exp.Mul(this=exp.Paren(this=offset), expression=number(g.per_unit)), expression=number(0.5))
    index: exp.Expr = exp.cast(exp.Floor(this=scaled), "BIGINT")
    index = exp.Least(
        this=exp.Greatest(this=index, expressions=[exp.Literal.number(0)], ignore_nulls=True),
        expressions=[exp.Literal.number(g.size - 1)],
        ignore_nulls=True,
    )
    not_null = exp.Not(this=exp.Is(this=_value(m), expression=exp.Null()))
    return exp.Case(ifs=[exp.If(this=not_null, true=index)], default=exp.Literal.number(-1))


def calibrate_quantile(m: Measurement, plan: DPPlan, epsilon: float) -> Measurement:
    """The quantile measurement with its score sensitivity, noisy-max scale and charged epsilon."""
    assert plan.table is not None and m.alpha is not None
    k = plan.table.max_rows_per_unit * plan.table.cross_party_factor
    sensitivity, scale, cost = calibrate(k, m.alpha, grid(m, plan.table).size, epsilon)
    return replace(m, scale=1.0, sensitivity=sensitivity, epsilon=cost, noise_scale=scale)


# -- release hooks (noise.py) ------------------------------------------------------------------------------

Key = tuple[Any, ...]
Histograms = dict[str, dict[Key, dict[int, int]]]


def split_bins(plan: DPPlan, exact: ExactAggregates) -> tuple[ExactAggregates, Histograms]:
    """The grouping sets' rows apart: the ``(keys)`` rows as the exact aggregates, the others as histograms."""
    sources = quantile_sources(plan)
    if not sources:
        return exact, {}
    n_keys, names = len(plan.group_keys), [m.name for m in plan.measurements]
    if len(exact.columns) != n_keys + len(names) + len(sources):
        raise InternalError("the backend returned an unexpected number of columns")
    rows = []
    histograms: Histograms = {m.name: {} for m in plan.measurements if m.kind == "quantile"}
    readers = [
        [(n_keys + j, m.name) for j, m in enumerate(plan.measurements) if m.kind == "quantile" and m.arg == s.arg]
        for s in sources
    ]
    for row in exact.rows:
        bins = row[n_keys + len(names) :]
        filled = [i for i, b in enumerate(bins) if b is not None]
        if not filled:  # the (keys) grouping set
            rows.append(tuple(row[: n_keys + len(names)]))
            continue
        if len(filled) != 1:
            raise InternalError("a histogram row belongs to two grouping sets; this is a bug")
        index = int(bins[filled[0]])
        if index < 0:  # rows whose value is NULL: in no histogram
            continue
        key = tuple(row[:n_keys])
        for position, name in readers[filled[0]]:
            histograms[name].setdefault(key, {})[index] = int(row[position] or 0)
    return ExactAggregates(columns=exact.columns[: n_keys + len(names)], rows=tuple(rows)), histograms


def noisy_indexes(plan: DPPlan, m: Measurement, histograms: Histograms, cells: list[Key]) -> list[int]:
    """The candidate index OpenDP's quantile mechanism releases for each cell (an empty group scores all zeros)."""
    assert plan.table is not None and m.alpha is not None
    size = grid(m, plan.table).size
    released = []
    for cell in cells:
        counts = histograms.get(m.name, {}).get(tuple(cell), {})
        histogram = [0] * size
        for index, count in counts.items():
            histogram[index] = count
        released.append(noisy_index(histogram, m.alpha, m.noise_scale))
    return released


def quantile_accuracy(m: Measurement, table: Table, confidence: float = 0.95) -> str:
    """The 95% accuracy of a released quantile: a rank error in rows, and the grid's resolution."""
    assert m.alpha is not None
    g = grid(m, table)
    rows = rank_half_width(m.noise_scale, m.alpha, g.size, confidence)
    return (
        f"rank within ±{rows:.3g} rows of the {m.alpha:g} quantile, "
        f"on a grid of step {g.value(1) - g.value(0) if g.size > 1 else 0:g} (values of one candidate tie)"
    )
