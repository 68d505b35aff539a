"""Pass 8: the bounded SQL pushed down to the backend, for the rewrite chosen by passes/rewrite.py:

- ``weighted`` (public or no group keys): every matching row of unit ``u`` counts with weight
  ``w_u = k / max(n_u, k)``, ``n_u`` the unit's matching row count (a window count, no sort);
- ``unit_count`` (scalar ``COUNT(*)``): per-unit pre-aggregation ``SUM(LEAST(n_u, k))``;
- ``unit_weighted`` (other scalar queries filtered under ``filter_first``): per-unit pre-aggregation, each
  unit's total weighted once (proof note below);
- ``rows`` (private group keys, row-level tables): hash-ordered row bounding, below;
- filtered queries under ``prepare.filtered: bound_first`` (passes/rewrite.py): the window count or rank
  over all of the unit's rows, the filter in the final aggregate (proof note in passes/prepared.py);
- over a prepared copy (``plan.prepared``, unfiltered or ``bound_first`` queries): the same estimators, reading the copy's
  stored keyed-hash rank (row bounding) or summing its stored per-row weighted contributions
  (weighted; passes/prepared.py).

Row-bounding shape (DuckDB rendering)::

    WITH typed AS (SELECT TRY_CAST(col AS type) AS col, ... FROM source),
         ranked AS (SELECT typed.*, <key exprs> AS __g0, ...,
                           ROW_NUMBER() OVER (PARTITION BY unit ORDER BY hash(key, row...)) AS __rn
                    FROM typed WHERE (<where>) AND unit IS NOT NULL)
    SELECT __g0, ..., COUNT(*) AS __m0, SUM(CASE WHEN x IS NOT NULL THEN
           CAST(ROUND((LEAST(GREATEST(x, lo), hi) - c) * scale) AS BIGINT) END) AS __m1, ...
    FROM ranked WHERE __rn <= k GROUP BY __g0, ...

Weighted shape: ``ranked`` carries ``COUNT(*) OVER (PARTITION BY unit) AS __n`` instead of ``__rn``, and
each row value ``v`` (the fixed-point value above; ``S`` = COUNT_SCALE for a count) is summed as
``v * k // GREATEST(__n, k)``. Where the backend's hooks choose it for a single-table source
(``SQLHooks.unit_count_by_join``; DuckDB over Parquet: a hash aggregate and a hash join instead of the
window's partition-and-sort, about half the time), ``__n`` comes
from ``per_unit AS (SELECT unit AS __u, COUNT(*) AS __n FROM typed WHERE (<where>) AND unit IS NOT NULL
GROUP BY unit)`` and ``ranked`` is ``SELECT *, <keys> FROM typed JOIN per_unit ON unit = __u WHERE (<where>)``.

Proof note (the join form is the window form): ``per_unit`` groups exactly the rows the window partitions
(the same ``typed`` rows, the same filter, NULL units dropped), by the same equality on the unit, so its
``__n`` for unit ``u`` is the window's ``COUNT(*)`` over ``u``'s partition. The inner join on ``unit = __u``
pairs each such row with exactly one ``per_unit`` row, its own unit's (``__u`` is unique after GROUP BY),
and drops rows with a NULL unit as the window form's ``unit IS NOT NULL`` does; the filter is applied to
the joined rows as to the windowed ones. So ``ranked`` holds the same rows with the same ``__n``, the final
aggregate is the same expression, and every exact aggregate is identical (the proof note "weighted" holds
unchanged). Under ``bound_first`` neither form filters before counting, and both filter in the final
aggregate. Tests: tests/test_weighted_forms.py (both forms on DuckDB, persons of many rows, negative and
NULL values, NULL and text units, filters), tests/backends/test_conformance.py (join on DuckDB, window on
PostgreSQL and Spark, identical aggregates).

Proof note (row bounding): the filter runs before ranking, so each unit keeps at most ``k`` of its own
matching rows; which ones depends only on a keyed hash of that unit's own row content, never on other
units' rows or on physical row ids; the hash covers every declared column. Identical rows tie, and are
interchangeable. Rows whose unit is NULL belong to nobody we can bound and are dropped. Clamping to the
declared bounds happens per row before the sum. Tests: tests/test_sensitivity.py, tests/test_rewrite.py.

Per-row values: a measurement's argument is a bare column, clamped here to its declared bounds, or an
expression over clamped columns (passes/intervals.py, with its proof note) clamped here again to its
derived interval ``m.bounds``; a ``FILTER`` is a ``CASE`` in the argument (NULL when the row fails it).
Either way each row's value lies in ``m.bounds`` and is NULL or one number, so ``bound`` below holds.

Proof note (weighted): after the filter (NULL units dropped), unit ``u`` has ``n_u`` rows, a count of
its own rows only. Row ``r`` adds ``trunc(w_u * v(r))`` to its group, ``w_u = k / max(n_u, k)``, with
``|v(r)| <= ceil(bound * scale)`` (clamped, centred, rounded; ``v = S`` or 0 for counts, bound 1, scale
``S``). Adding or removing ``u`` changes no other unit's rows, ``n`` or weight, so the vector of
per-group values moves by at most ``sum_r |trunc(w_u v(r))| <= w_u * sum_r |v(r)|
<= w_u * n_u * ceil(bound * scale) = min(n_u, k) * ceil(bound * scale) <= k * ceil(bound * scale)`` in
L1: the sensitivity passes/budget.py charges. Truncation toward zero is what gives
``|trunc(a)| <= |a|`` (rounding could add 1/2 per row, floor 1 per negative row); the SQL computes it
exactly in integers as ``sign(v) * ((|v| * k) // max(n_u, k))`` (both operands of ``//`` non-negative,
so it truncates). A unit with at most ``k`` rows is counted exactly; a larger one is scaled down
proportionally (a different estimator from keeping ``k`` hash-chosen rows). Weighting does not bound the
number of groups a unit touches, so private group keys (partition selection) keep row bounding.
Tests: tests/test_fastpath.py (one person with 1000 rows, negative values, an independent reference),
tests/test_rewrite.py (golden SQL executed against pandas).

Proof note (unit_weighted): one ``GROUP BY unit`` over the matching rows (NULL units dropped) gives each
unit's ``n_u`` and, per measurement, its total ``T_u = sum_r v(r)`` of the same per-row values ``v`` as
above (summed as DOUBLE, so DuckDB adds in floating point instead of 128-bit integers; exact while the
partial sums stay below 2^53, i.e. up to about 9 * 10^9 rows of one unit; ``T_u = S * COUNT(x)`` for a
count). The unit adds ``t_u = clamp(trunc(T_u * k / max(n_u, k)), -k * V, k * V)`` with
``V = ceil(bound * scale)`` (``v = S`` for counts, bound 1), the truncation toward zero computed exactly in
BIGINT from quotient and remainder (:func:`_unit_contribution`), and ``COUNT(*)`` adds ``min(n_u, k) * S``
(its exact ``trunc``). Since ``|T_u| <= n_u * V``, the clamp changes nothing while the sum is exact; it is
there so that ``|t_u| <= k * V`` holds whatever the floating point does (``T_u`` is also clamped to
``+-2^53`` before the cast, so the cast cannot fail). Adding or removing ``u`` changes no other unit's
``n``, ``T`` or ``t``, and moves each scalar measurement by ``|t_u| <= k * ceil(bound * scale)``: the
sensitivity passes/budget.py charges (the same as the weighted rewrite's). It is the weighted estimator
with the truncation applied once per unit instead of once per row (it differs from the per-row sum by
less than one fixed-point unit per row), so it is chosen only where a prepared copy is never read (scalar
queries with WHERE under ``prepare.filtered: filter_first``, passes/rewrite.py): a copy stores per-row
contributions, and a copy must not change an answer. Tests: tests/test_fastpath.py (one person with many
rows, negative values, NULLs; an independent per-unit reference), tests/test_rewrite.py.
"""

from __future__ import annotations

import math

from sqlglot import exp
from sqlglot.helper import find_new_name

from dpgateway.passes import quantiles
from dpgateway.passes.aggregates import moment_center, sum_bound
from dpgateway.passes.budget import COUNT_SCALE, fixed_point_scale
from dpgateway.passes.context import PlanContext
from dpgateway.passes.rewrite import bounds_before_filter
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import number


def bound_contributions(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Build the bounded aggregate query for the backend: the cheapest rewrite that is correct for the shape."""
    table = plan.table
    assert table is not None
    if plan.prepared is not None:
        return _over_prepared(plan, table, ctx)
    if plan.rewrite == "unit_count":
        return _unit_count(plan, table, ctx)
    if plan.rewrite == "unit_weighted":
        return _unit_weighted(plan, table, ctx)
    if plan.rewrite == "weighted":
        return _weighted(plan, table, ctx)
    return _row_bounded(plan, table, ctx)


def _weighted(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Per-unit weighted contributions: each matching row counts ``k / max(n_u, k)`` (proof note above)."""
    assert table.privacy_unit is not None
    typed = _source_rows(plan, _needed_columns(plan, table), table, ctx)
    n, _ = _unit_columns(table)
    unit = exp.column(table.privacy_unit, quoted=True)
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    after = bounds_before_filter(plan, ctx)  # n_u over all of the unit's rows, the filter on the weighted rows
    before = plan.where.copy() if plan.where is not None and not after else None
    ctes: list[tuple[str, exp.Select]] = [("typed", typed)]
    if plan.relation is None and ctx.hooks.unit_count_by_join(
        table
    ):  # n_u by GROUP BY unit, joined back (proof note above)
        joined = find_new_name({c.name for c in table.columns} | {n}, "__u")
        per_unit = (
            exp.select(
                exp.alias_(unit.copy(), joined, quoted=True),
                exp.alias_(exp.Count(this=exp.Star()), n, quoted=True),
                copy=False,
            )
            .from_("typed", copy=False)
            .where(_and_unit_not_null(before.copy() if before is not None else None, table), copy=False)
            .group_by(unit.copy(), copy=False)
        )
        on = exp.EQ(this=unit.copy(), expression=exp.column(joined, quoted=True))
        rows = exp.select(exp.Star(), *keys, copy=False).from_("typed", copy=False).join("per_unit", on=on, copy=False)
        if before is not None:
            rows = rows.where(before, copy=False)
        ctes.append(("per_unit", per_unit))
    else:
        window = exp.Window(this=exp.Count(this=exp.Star()), partition_by=[unit.copy()])
        rows = exp.select(exp.Star(), *keys, exp.alias_(window, n, quoted=True), copy=False).from_("typed", copy=False)
        rows = rows.where(_and_unit_not_null(before, table), copy=False)
    final = _final(plan, table, "ranked", weight=n)
    if after:
        assert plan.where is not None
        final = final.where(plan.where.copy(), copy=False)
    for name, body in [*ctes, ("ranked", rows)]:
        final = final.with_(name, as_=body, copy=False)
    return _rendered(plan, final, table.name, ctx)


def _unit_columns(table: Table) -> tuple[str, str]:
    """Names of the unit's row count and a row's keyed-hash rank (in the bounded SQL and a prepared copy)."""
    taken = {c.name for c in table.columns}
    return find_new_name(taken, "__n"), find_new_name(taken, "__rn")


def _row_bounded(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Hash-ordered row bounding: each unit keeps its ``k`` matching rows with the smallest keyed hash."""
    hooks = ctx.hooks
    # The hash covers every declared column (not only the ones this query reads), so an unfiltered
    # query keeps exactly the rows a prepared copy keeps (passes/prepared.py).
    columns = list(table.columns) if table.privacy_unit else _needed_columns(plan, table)
    typed = _source_rows(plan, columns, table, ctx)
    _, rn = _unit_columns(table)
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    ranked = exp.select(exp.Star(), *keys, copy=False).from_("typed", copy=False)
    after = bounds_before_filter(plan, ctx)  # rank over all of the unit's rows, filter the kept ones
    condition = plan.where.copy() if plan.where is not None and not after else None
    k = table.max_rows_per_unit
    if table.privacy_unit:
        unit = exp.column(table.privacy_unit, quoted=True)
        key = exp.Literal.string(hooks.row_order_key(ctx.seed))
        order = hooks.row_hash(key, [exp.column(c.name, quoted=True) for c in columns])
        window = exp.Window(
            this=exp.RowNumber(), partition_by=[unit], order=exp.Order(expressions=[exp.Ordered(this=order)])
        )
        ranked = ranked.select(exp.alias_(window, rn, quoted=True), copy=False)
        condition = _and_unit_not_null(condition, table)
    if condition is not None:
        ranked = ranked.where(condition, copy=False)
    final = _final(plan, table, "ranked")
    if table.privacy_unit:
        final = final.where(exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(k)), copy=False)
    if after:
        assert plan.where is not None
        final = final.where(exp.Paren(this=plan.where.copy()), copy=False)
    bounded = final.with_("typed", as_=typed, copy=False).with_("ranked", as_=ranked, copy=False)
    return _rendered(plan, bounded, table.name, ctx, settings=hooks.settings(k) if table.privacy_unit else ())


def prepared_copy_tree(table: Table, ctx: PlanContext) -> exp.Select:
    """The rows a prepared copy stores: every row with a unit, typed, clustered by unit, with two columns more.

    The unit's unfiltered row count ``n_u`` (the weight input of the weighted rewrite), the row's rank
    by the keyed hash within its unit (``rank <= k`` are the rows row bounding keeps), and the row's
    weighted contribution ``trunc(v * k / max(n_u, k))`` to every measurement the weighted rewrite can
    ask of this table (:func:`stored_contributions`), computed by the very expression of
    :func:`_weighted`: the same typed columns, keyed hash and NULL-unit rule as :func:`_weighted` and
    :func:`_row_bounded` (proof note in passes/prepared.py). Values are stored typed but unclamped, so
    GROUP BY keys over them mean what they mean on the source, and queries clamp as usual.
    """
    assert table.privacy_unit is not None
    hooks = ctx.hooks
    columns = list(table.columns)
    typed = _typed(columns, hooks.source(table), table, ctx)
    n, rn = _unit_columns(table)
    unit = exp.column(table.privacy_unit, quoted=True)
    key = exp.Literal.string(hooks.row_order_key(ctx.seed))
    order = hooks.row_hash(key, [exp.column(c.name, quoted=True) for c in columns])
    window = exp.Window(
        this=exp.RowNumber(), partition_by=[unit], order=exp.Order(expressions=[exp.Ordered(this=order)])
    )
    count = exp.Window(this=exp.Count(this=exp.Star()), partition_by=[unit.copy()])
    ranked = exp.select(exp.Star(), exp.alias_(count, n, quoted=True), exp.alias_(window, rn, quoted=True), copy=False)
    ranked = ranked.from_("typed", copy=False).where(_and_unit_not_null(None, table), copy=False)
    k = table.max_rows_per_unit
    contributions = [
        exp.alias_(_weighted_value(m, table, n, k), name, quoted=True) for name, m in stored_contributions(table)
    ]
    stored = (
        exp.select(
            *(exp.column(name, quoted=True) for name in [*(c.name for c in columns), n, rn]), *contributions, copy=False
        )
        .from_("ranked", copy=False)
        .order_by(unit.copy(), exp.column(rn, quoted=True), copy=False)
    )
    return stored.with_("typed", as_=typed, copy=False).with_("ranked", as_=ranked, copy=False)


ContributionKey = tuple[str, exp.Expr | None, tuple[float, float] | None, float, bool, float]


def _contribution_key(m: Measurement) -> ContributionKey:
    """What fixes a measurement's per-row value: kind, argument, its clamp, centre, squared and fixed-point scale."""
    return (m.kind, m.arg, m.bounds, m.center, m.squared, m.scale)


def _bare(column: Column) -> exp.Expr:
    """A bare column argument, as passes/aggregates.py builds one."""
    return exp.column(column.name, quoted=True)


def stored_contributions(table: Table) -> list[tuple[str, Measurement]]:
    """The weighted measurements a prepared copy stores per row, with their column names in the copy.

    Every measurement passes/aggregates.py and passes/budget.py can make for a weighted query on this
    table: ``COUNT(*)``, ``COUNT(x)`` for every column (scale COUNT_SCALE), and for every numeric column
    with bounds (not the unit) ``SUM(x)``, ``SUM(x - c)`` and ``SUM((x - c)^2)`` with ``c`` the mid-point
    of the bounds (scale ``fixed_point_scale(bound)``). Centre, bound and scale are functions of the
    policy's bounds only, and the copy is rebuilt when the policy changes (dpgateway/prepare.py), so a
    stored column is valid for every later query; a query measurement is read from the copy only when its
    :func:`_contribution_key` equals a stored one. Names are deterministic (``__w0``, ``__w1``, ...; fresh
    against the declared columns), so the query side recomputes the same list.
    """
    wanted: list[Measurement] = [Measurement(name="", kind="count", arg=None, scale=float(COUNT_SCALE))]
    for c in table.columns:
        wanted.append(Measurement(name="", kind="count", arg=_bare(c), scale=float(COUNT_SCALE)))
    for c in table.columns:
        if c.name == table.privacy_unit or not c.is_numeric or c.bounds is None:
            continue
        mid = moment_center(c.bounds)
        for center, squared in ((0.0, False), (mid, False), (mid, True)):
            bound = sum_bound(c.bounds, center, squared)
            m = Measurement(
                name="", kind="sum", arg=_bare(c), bounds=c.bounds, center=center, squared=squared, bound=bound,
                scale=fixed_point_scale(bound),
            )  # fmt: skip
            wanted.append(m)
    taken = {c.name for c in table.columns} | set(_unit_columns(table))
    stored: list[tuple[str, Measurement]] = []
    seen: set[ContributionKey] = set()
    for m in wanted:
        if _contribution_key(m) in seen:  # e.g. SUM(x - c) is SUM(x) when the bounds are symmetric
            continue
        seen.add(_contribution_key(m))
        name = find_new_name(taken, f"__w{len(stored)}")
        taken.add(name)
        stored.append((name, m))
    return stored


def _unit_count(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Scalar ``COUNT(*)`` by per-unit pre-aggregation: ``SUM(LEAST(n_u, k))`` over units.

    Proof note (exact equivalence): row bounding keeps ``min(n_u, k)`` of the ``n_u`` rows of unit
    ``u`` that pass the filter (which ones does not matter to a count), so the row-bounded count is
    ``sum_u min(n_u, k)``, computed here without ranking or hashing. The filter runs before the per-unit
    count exactly as before ranking, and NULL units are dropped as there. Adding one unit adds one
    term ``min(n_u, k) <= k``: the sensitivity ``k`` of passes/budget.py holds. This is the only
    shape pre-aggregated: with GROUP BY, which ``k`` rows a unit keeps decides which groups it
    counts in, and for COUNT(x), SUM and the moments which rows are kept changes the value, so
    ``min`` per unit and group (or per unit) is a different statistic, not the row-bounded one.
    Tests: tests/test_fastpath.py.
    """
    assert table.privacy_unit is not None
    typed = _source_rows(plan, _needed_columns(plan, table), table, ctx)
    unit = exp.column(table.privacy_unit, quoted=True)
    taken = {c.name for c in table.columns}
    n = find_new_name(taken, "__n")
    per_unit = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), n, quoted=True), copy=False)
        .from_("typed", copy=False)
        .where(_and_unit_not_null(plan.where.copy() if plan.where is not None else None, table), copy=False)
        .group_by(unit, copy=False)
    )
    k = exp.Literal.number(table.max_rows_per_unit)
    total = exp.Sum(this=exp.Least(this=exp.column(n, quoted=True), expressions=[k], ignore_nulls=True))
    name = plan.measurements[0].name
    bounded = exp.select(exp.alias_(total, name, quoted=True), copy=False).from_("per_unit", copy=False)
    bounded = bounded.with_("typed", as_=typed, copy=False).with_("per_unit", as_=per_unit, copy=False)
    return _rendered(plan, bounded, table.name, ctx, settings=ctx.hooks.per_unit_settings())


def _unit_weighted(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Scalar measurements by per-unit pre-aggregation, each unit's total weighted once (proof note above)."""
    assert table.privacy_unit is not None and not plan.group_keys
    typed = _source_rows(plan, _needed_columns(plan, table), table, ctx)
    n, _ = _unit_columns(table)
    k = table.max_rows_per_unit
    per_unit = exp.select(exp.alias_(exp.Count(this=exp.Star()), n, quoted=True), copy=False)
    totals: list[exp.Expr] = []
    for m in plan.measurements:
        if m.kind == "count" and m.arg is None:  # trunc(n_u * S * k / max(n_u, k)) = min(n_u, k) * S
            least = exp.Least(this=exp.column(n, quoted=True), expressions=[number(k)], ignore_nulls=True)
            totals.append(exp.Mul(this=least, expression=number(int(m.scale))))
            continue
        if m.kind == "count":  # COUNT(x): x a column or a total row expression (passes/intervals.py)
            assert m.arg is not None
            count = exp.Count(this=m.arg.copy())
            unit_total: exp.Expr = exp.Mul(this=exp.cast(count, "DOUBLE"), expression=number(m.scale))
        else:
            unit_total = exp.Sum(this=exp.cast(_fixed_point(m), "DOUBLE"))
        per_unit = per_unit.select(exp.alias_(unit_total, m.name, quoted=True), copy=False)
        totals.append(_unit_contribution(exp.column(m.name, quoted=True), n, k, math.ceil(m.bound * m.scale)))
    where = plan.where.copy() if plan.where is not None else None
    per_unit = (
        per_unit.from_("typed", copy=False)
        .where(_and_unit_not_null(where, table), copy=False)
        .group_by(exp.column(table.privacy_unit, quoted=True), copy=False)
    )
    bounded = exp.select(
        *(exp.alias_(exp.Sum(this=t), m.name, quoted=True) for m, t in zip(plan.measurements, totals, strict=True)),
        copy=False,
    ).from_("per_unit", copy=False)
    bounded = bounded.with_("typed", as_=typed, copy=False).with_("per_unit", as_=per_unit, copy=False)
    return _rendered(plan, bounded, table.name, ctx)


def _unit_contribution(total: exp.Expr, n: str, k: int, v: int) -> exp.Expr:
    """``clamp(trunc(T * k / max(n, k)), -k v, k v)`` as a BIGINT, NULL when the unit total ``T`` is.

    ``T`` (an integer-valued DOUBLE) is clamped to ``+-2^53`` and cast to BIGINT; then, with ``d = max(n, k)``
    and ``//`` truncating, ``trunc(T k / d) = (T // d) k + ((T - (T // d) d) k) // d`` (quotient and
    remainder share the sign of ``T``), in BIGINT: ``|T // d| k <= 2^53`` since ``d >= k``, and the remainder
    times ``k`` is below ``d k``, which fits for any unit of fewer than about ``9 * 10^18 / k`` rows (``9 * 10^14``
    at the largest ``k``, 10^4), far beyond any table a backend could scan.
    """
    d = exp.Greatest(this=exp.column(n, quoted=True), expressions=[number(k)], ignore_nulls=True)
    limit = 2**53
    clamped_total = exp.Least(
        this=exp.Greatest(this=total.copy(), expressions=[number(-limit)], ignore_nulls=True),
        expressions=[number(limit)],
        ignore_nulls=True,
    )
    t = exp.cast(clamped_total, "BIGINT")
    quotient = exp.Paren(this=exp.IntDiv(this=t, expression=d))
    remainder = exp.Paren(this=exp.Sub(this=t.copy(), expression=exp.Mul(this=quotient.copy(), expression=d.copy())))
    weighted = exp.Add(
        this=exp.Mul(this=quotient.copy(), expression=number(k)),
        expression=exp.IntDiv(this=exp.Mul(this=remainder, expression=number(k)), expression=d.copy()),
    )
    clamped = exp.Least(
        this=exp.Greatest(this=weighted, expressions=[number(-k * v)], ignore_nulls=True),
        expressions=[number(k * v)],
        ignore_nulls=True,
    )
    # GREATEST and LEAST skip NULLs: a unit whose values are all NULL must add nothing, not the lower clamp
    present = exp.Not(this=exp.Is(this=total.copy(), expression=exp.Null()))
    return exp.Case(ifs=[exp.If(this=present, true=clamped)])


def _over_prepared(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """The chosen estimator over a prepared copy, from its stored contributions or keyed-hash rank.

    Unfiltered queries, and filtered ones that bound first (``prepare.filtered: bound_first``): the stored
    (unfiltered) ``n_u``, ranks and weighted contributions are what the on-the-fly rewrite computes, and
    the filter then drops rows (proof notes in passes/prepared.py). A weighted measurement the copy does not
    store (none today) is weighted from the stored ``n_u`` as on the fly.
    """
    hooks = ctx.hooks
    assert plan.prepared is not None and (plan.where is None or bounds_before_filter(plan, ctx))
    n, rn = _unit_columns(table)
    stored: dict[str, str] = {}
    extra = [rn]
    if plan.rewrite == "weighted":
        by_key = {_contribution_key(m): name for name, m in stored_contributions(table)}
        stored = {m.name: by_key[_contribution_key(m)] for m in plan.measurements if _contribution_key(m) in by_key}
        extra = sorted(set(stored.values())) + ([n] if len(stored) < len(plan.measurements) else [])
    # Read only the declared columns still needed: group keys, and the inputs of unstored measurements.
    unstored = tuple(m for m in plan.measurements if m.name not in stored)
    columns = _needed_columns(plan.with_(measurements=unstored), table)
    if not unstored:
        columns = [c for c in columns if c.name != table.privacy_unit or _read_by(plan, c.name)]
    # The copy stores every column already typed (prepared_copy_tree): typing is idempotent, so its columns
    # are read as they are, which lets the engine push a filter into the scan.
    names = [*(c.name for c in columns), *extra]
    typed = exp.select(*(exp.column(name, quoted=True) for name in names), copy=False)
    typed = typed.from_(hooks.file_source(plan.prepared), copy=False)
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    rows = exp.select(exp.Star(), *keys, copy=False).from_("typed", copy=False)
    if plan.rewrite == "weighted":
        final = _final(plan, table, "kept", weight=n, stored=stored)
    else:  # 'rows' and 'unit_count': the k rows of smallest keyed hash, as on the fly
        rows = rows.where(
            exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(table.max_rows_per_unit)),
            copy=False,
        )
        final = _final(plan, table, "kept")
    if plan.where is not None:  # bound first, filter after: the filter only drops already-bounded rows
        rows = rows.where(exp.Paren(this=plan.where.copy()), copy=False)
    bounded = final.with_("typed", as_=typed, copy=False).with_("kept", as_=rows, copy=False)
    return _rendered(plan, bounded, f"{table.name} (prepared copy)", ctx)


def _source_rows(plan: DPPlan, columns: list[Column], table: Table, ctx: PlanContext) -> exp.Select:
    """The ``typed`` CTE: the declared source's columns typed, or the joined relation's columns
    (passes/relations.py: its per-table typed CTEs are added to the statement by :func:`_rendered`)."""
    if plan.relation is not None:
        return plan.relation.typed(c.name for c in columns)
    return _typed(columns, ctx.hooks.source(table), table, ctx)


def _typed(columns: list[Column], source: exp.Expr, table: Table, ctx: PlanContext) -> exp.Select:
    """The ``typed`` CTE: each column cast to its type, the privacy unit on its exact identity."""
    hooks = ctx.hooks
    typed_columns = [
        exp.alias_(hooks.unit(c) if c.name == table.privacy_unit else hooks.typed(c), c.name, quoted=True)
        for c in columns
    ]
    return exp.select(*(typed_columns or [exp.true()]), copy=False).from_(source, copy=False)


ROW_ORDER_KEY = "<row-order key>"


def _rendered(
    plan: DPPlan, bounded: exp.Select, relation: str, ctx: PlanContext, settings: tuple[tuple[str, object], ...] = ()
) -> DPPlan:
    """The plan with its bounded SQL, and the same SQL as shown by ``explain`` and hashed by the audit log.

    Proof note (nothing secret or host-specific shown): the shown SQL reads a relation named after the
    policy table (``relation``) instead of the source (file path and read options), and ``ROW_ORDER_KEY``
    instead of the keyed hash's secret key; everything else is the executed tree. So ``explain`` is
    free of paths, options and the key, and the audited hash does not change when the data moves.
    Tests: tests/test_sources.py::test_explain_shows_no_path_option_or_key.
    """
    if plan.relation is not None:  # the relation's own CTEs (typed sources, per-person rows) come first
        with_ = bounded.args["with_"]
        ctes = [
            exp.CTE(this=body.copy(), alias=exp.TableAlias(this=exp.to_identifier(name)))
            for name, body in plan.relation.ctes
        ]
        with_.set("expressions", [*ctes, *with_.expressions])
    shown = bounded.copy()
    shown_sources = dict(plan.relation.sources) if plan.relation is not None else {"typed": None}
    for cte in shown.find_all(exp.CTE):
        if cte.alias in shown_sources:
            name = relation if plan.relation is None else shown_sources[cte.alias].name  # type: ignore[union-attr]
            cte.this.from_(exp.Table(this=exp.to_identifier(name, quoted=True)), copy=False)
    key = ctx.hooks.row_order_key(ctx.seed)
    for literal in [n for n in shown.find_all(exp.Literal) if n.is_string and n.this == key]:
        literal.replace(exp.Literal.string(ROW_ORDER_KEY))
    dialect = ctx.hooks.DIALECT
    return plan.with_(
        bounded=bounded,
        shown_sql=shown.sql(dialect=dialect),
        settings=settings,
    )


def _and_unit_not_null(condition: exp.Expr | None, table: Table) -> exp.Expr:
    assert table.privacy_unit is not None
    not_null = exp.Not(this=exp.Is(this=exp.column(table.privacy_unit, quoted=True), expression=exp.Null()))
    return exp.and_(exp.Paren(this=condition), not_null) if condition is not None else not_null


def _final(
    plan: DPPlan, table: Table, source: str, *, weight: str | None = None, stored: dict[str, str] | None = None
) -> exp.Select:
    """The per-group aggregates; ``weight`` names the unit row count column of the weighted rewrite, and
    ``stored`` maps a measurement to a prepared copy's column of its weighted contributions."""

    def aggregate(m: Measurement, t: Table) -> exp.Expr:
        if stored and m.name in stored:
            return exp.Sum(this=exp.column(stored[m.name], quoted=True))
        if weight is not None:
            return exp.Sum(this=_weighted_value(m, t, weight, t.max_rows_per_unit))
        return _aggregate(m, t)

    final = exp.select(
        *(exp.column(k.name, quoted=True) for k in plan.group_keys),
        *(exp.alias_(aggregate(m, table), m.name, quoted=True) for m in plan.measurements),
        copy=False,
    ).from_(source, copy=False)
    if plan.group_keys:
        final = final.group_by(*(exp.column(k.name, quoted=True) for k in plan.group_keys), copy=False)
    return quantiles.with_bins(plan, table, final)  # quantiles: per-candidate counts (passes/quantiles.py)


def _needed_columns(plan: DPPlan, table: Table) -> list[Column]:
    """Declared columns the query touches, plus the privacy unit, in policy order."""
    names = {table.privacy_unit} if table.privacy_unit else set()
    for m in plan.measurements:
        names |= m.columns
    for expr in [plan.where, *(k.expr for k in plan.group_keys)]:
        if expr is not None:
            names |= {c.name for c in expr.find_all(exp.Column)}
    return [c for c in table.columns if c.name in names]


def _read_by(plan: DPPlan, name: str) -> bool:
    """Whether a group key or the filter reads column ``name``."""
    exprs = [k.expr for k in plan.group_keys] + ([plan.where] if plan.where is not None else [])
    return any(c.name == name for e in exprs for c in e.find_all(exp.Column))


def _aggregate(m: Measurement, table: Table) -> exp.Expr:
    special = quantiles.aggregate_sql(m)  # quantile histograms, COUNT(DISTINCT) (passes/quantiles.py)
    if special is not None:
        return special
    if m.kind == "count":
        return exp.Count(this=m.arg.copy() if m.arg is not None else exp.Star())
    return exp.Sum(this=_fixed_point(m))


def _weighted_value(m: Measurement, table: Table, n: str, k: int) -> exp.Expr:
    """A row's ``trunc(v * k / max(n_u, k))`` in exact integer arithmetic, truncated toward zero; NULL when ``x`` is."""
    denominator = exp.Greatest(this=exp.column(n, quoted=True), expressions=[exp.Literal.number(k)], ignore_nulls=True)
    if m.kind == "count":  # v = S >= 0 for every row (COUNT(*)) or every non-NULL x (COUNT(x))
        weighted: exp.Expr = exp.IntDiv(this=exp.Literal.number(int(m.scale) * k), expression=denominator)
        if m.arg is not None:
            x = m.arg.copy()
            weighted = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x, expression=exp.Null())), true=weighted)])
        return weighted
    # Integer division truncates toward zero on the backend (DuckDB and PostgreSQL alike; tested), and
    # |v| * k <= (10**6 + 1) * 10**4 fits BIGINT (fixed_point_scale keeps |v| <= ceil(bound * scale)).
    product = exp.Mul(this=_fixed_point(m), expression=exp.Literal.number(k))
    return exp.IntDiv(this=product, expression=denominator)


def _fixed_point(m: Measurement) -> exp.Expr:
    """The row's value ``round((clamp(v) - c)^p * scale)`` as an integer, NULL when ``v`` is NULL.

    ``v`` is the measurement's argument: a bare column (clamped to its declared bounds here), or an
    expression over already clamped columns (passes/intervals.py) clamped again to its derived interval,
    so whatever floating-point rounding did, the value lies in ``bounds`` (proof note there)."""
    assert m.arg is not None and m.bounds is not None
    x = m.arg
    lo, hi = m.bounds
    value: exp.Expr = exp.Least(
        this=exp.Greatest(this=x.copy(), expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    if m.center:
        value = exp.Paren(this=exp.Sub(this=value, expression=number(m.center)))
    if m.squared:
        value = exp.Pow(this=value, expression=exp.Literal.number(2))
    fixed = exp.cast(exp.Round(this=exp.Mul(this=value, expression=number(m.scale))), "BIGINT")
    return exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=fixed)])
