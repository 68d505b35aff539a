"""Pass 8: the bounded SQL pushed down to the backend, for the rewrite chosen by passes/rewrite.py:

- ``weighted`` (public or no group keys): every matching row of unit ``u`` counts with weight
  ``w_u = k / max(n_u, k)``, ``n_u`` the unit's matching row count (a window count, no sort);
- ``unit_count`` (scalar ``COUNT(*)``): per-unit pre-aggregation ``SUM(LEAST(n_u, k))``;
- ``unit_weighted`` (other scalar queries, unfiltered or filtered under ``filter_first``): per-unit
  pre-aggregation, each unit's total weighted once (these two, with their proof notes: passes/unit_forms.py);
- ``unit_grouped`` (grouped queries by ``per_unit`` columns): the same per unit, each unit in one cell
  (passes/unit_grouped.py, with its proof notes);
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
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.helper import find_new_name

from dpgateway.passes import quantiles
from dpgateway.passes.context import PlanContext
from dpgateway.passes.rewrite import bounds_before_filter
from dpgateway.passes.sql_parts import (
    and_unit_not_null,
    contribution_key,
    fixed_point,
    needed_columns,
    read_by,
    rendered,
    source_rows,
    stored_contributions,
    typed_columns,
    unit_columns,
)
from dpgateway.passes.unit_forms import stored_unit_columns, unit_count, unit_weighted, unit_weighted_over_copy
from dpgateway.passes.unit_grouped import unit_grouped, unit_grouped_over_copy
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Table


def bound_contributions(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Build the bounded aggregate query for the backend: the cheapest rewrite that is correct for the shape."""
    table = plan.table
    assert table is not None
    if plan.prepared is not None and plan.rewrite == "unit_weighted":
        return unit_weighted_over_copy(plan, table, ctx)
    if plan.prepared is not None and plan.rewrite == "unit_grouped":
        return unit_grouped_over_copy(plan, table, ctx)
    if plan.prepared is not None:
        return _over_prepared(plan, table, ctx)
    if plan.rewrite == "unit_count":
        return unit_count(plan, table, ctx)
    if plan.rewrite == "unit_weighted":
        return unit_weighted(plan, table, ctx)
    if plan.rewrite == "unit_grouped":
        return unit_grouped(plan, table, ctx)
    if plan.rewrite == "weighted":
        return _weighted(plan, table, ctx)
    return _row_bounded(plan, table, ctx)


def _weighted(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Per-unit weighted contributions: each matching row counts ``k / max(n_u, k)`` (proof note above)."""
    assert table.privacy_unit is not None
    typed = source_rows(plan, needed_columns(plan, table), table, ctx)
    n, _ = unit_columns(table)
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
            .where(and_unit_not_null(before.copy() if before is not None else None, table), copy=False)
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
        rows = rows.where(and_unit_not_null(before, table), copy=False)
    final = _final(plan, table, "ranked", weight=n)
    if after:
        assert plan.where is not None
        final = final.where(plan.where.copy(), copy=False)
    for name, body in [*ctes, ("ranked", rows)]:
        final = final.with_(name, as_=body, copy=False)
    return rendered(plan, final, table.name, ctx)


def _row_bounded(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Hash-ordered row bounding: each unit keeps its ``k`` matching rows with the smallest keyed hash."""
    hooks = ctx.hooks
    # The hash covers every declared column (not only the ones this query reads), so an unfiltered
    # query keeps exactly the rows a prepared copy keeps (passes/prepared.py).
    columns = list(table.columns) if table.privacy_unit else needed_columns(plan, table)
    typed = source_rows(plan, columns, table, ctx)
    _, rn = unit_columns(table)
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
        condition = and_unit_not_null(condition, table)
    if condition is not None:
        ranked = ranked.where(condition, copy=False)
    final = _final(plan, table, "ranked")
    if table.privacy_unit:
        final = final.where(exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(k)), copy=False)
    if after:
        assert plan.where is not None
        final = final.where(exp.Paren(this=plan.where.copy()), copy=False)
    bounded = final.with_("typed", as_=typed, copy=False).with_("ranked", as_=ranked, copy=False)
    return rendered(plan, bounded, table.name, ctx, settings=hooks.settings(k) if table.privacy_unit else ())


def prepared_copy_tree(table: Table, ctx: PlanContext) -> exp.Select:
    """The rows a prepared copy stores: every row with a unit, typed, clustered by unit, with two columns more.

    The unit's unfiltered row count ``n_u`` (the weight input of the weighted rewrite), the row's rank
    by the keyed hash within its unit (``rank <= k`` are the rows row bounding keeps), and the row's
    weighted contribution ``trunc(v * k / max(n_u, k))`` to every measurement the weighted rewrite can
    ask of this table (:func:`stored_contributions`), computed by the very expression of
    :func:`_weighted`: the same typed columns, keyed hash and NULL-unit rule as :func:`_weighted` and
    :func:`_row_bounded` (proof note in passes/prepared.py); and each unit's total contribution ``t_u`` of
    the ``unit_weighted`` form, on its row of rank 1 (passes/unit_forms.py). Values are stored typed but
    unclamped, so GROUP BY keys over them mean what they mean on the source, and queries clamp as usual.
    """
    assert table.privacy_unit is not None
    hooks = ctx.hooks
    columns = list(table.columns)
    typed = typed_columns(columns, hooks.source(table), table, ctx)
    n, rn = unit_columns(table)
    unit = exp.column(table.privacy_unit, quoted=True)
    key = exp.Literal.string(hooks.row_order_key(ctx.seed))
    order = hooks.row_hash(key, [exp.column(c.name, quoted=True) for c in columns])
    window = exp.Window(
        this=exp.RowNumber(), partition_by=[unit], order=exp.Order(expressions=[exp.Ordered(this=order)])
    )
    count = exp.Window(this=exp.Count(this=exp.Star()), partition_by=[unit.copy()])
    ranked = exp.select(exp.Star(), exp.alias_(count, n, quoted=True), exp.alias_(window, rn, quoted=True), copy=False)
    unit_totals, unit_contributions = stored_unit_columns(table, hooks.UNIT_TOTALS_AS_DOUBLE)
    ranked = ranked.select(*unit_totals, copy=False)
    ranked = ranked.from_("typed", copy=False).where(and_unit_not_null(None, table), copy=False)
    k = table.max_rows_per_unit
    contributions = [
        exp.alias_(_weighted_value(m, table, n, k), name, quoted=True) for name, m in stored_contributions(table)
    ]
    stored = (
        exp.select(
            *(exp.column(name, quoted=True) for name in [*(c.name for c in columns), n, rn]),
            *contributions,
            *unit_contributions,
            copy=False,
        )
        .from_("ranked", copy=False)
        .order_by(unit.copy(), exp.column(rn, quoted=True), copy=False)
    )
    return stored.with_("typed", as_=typed, copy=False).with_("ranked", as_=ranked, copy=False)


def _over_prepared(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """The chosen estimator over a prepared copy, from its stored contributions or keyed-hash rank.

    Unfiltered queries, and filtered ones that bound first (``prepare.filtered: bound_first``): the stored
    (unfiltered) ``n_u``, ranks and weighted contributions are what the on-the-fly rewrite computes, and
    the filter then drops rows (proof notes in passes/prepared.py). A weighted measurement the copy does not
    store (none today) is weighted from the stored ``n_u`` as on the fly.
    """
    hooks = ctx.hooks
    assert plan.prepared is not None and (plan.where is None or bounds_before_filter(plan, ctx))
    n, rn = unit_columns(table)
    stored: dict[str, str] = {}
    extra = [rn]
    if plan.rewrite == "weighted":
        by_key = {contribution_key(m): name for name, m in stored_contributions(table)}
        stored = {m.name: by_key[contribution_key(m)] for m in plan.measurements if contribution_key(m) in by_key}
        extra = sorted(set(stored.values())) + ([n] if len(stored) < len(plan.measurements) else [])
    # Read only the declared columns still needed: group keys, and the inputs of unstored measurements.
    unstored = tuple(m for m in plan.measurements if m.name not in stored)
    columns = needed_columns(plan.with_(measurements=unstored), table)
    if not unstored:
        columns = [c for c in columns if c.name != table.privacy_unit or read_by(plan, c.name)]
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
    return rendered(plan, bounded, f"{table.name} (prepared copy)", ctx)


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


def _aggregate(m: Measurement, table: Table) -> exp.Expr:
    special = quantiles.aggregate_sql(m)  # quantile histograms, COUNT(DISTINCT) (passes/quantiles.py)
    if special is not None:
        return special
    if m.kind == "count":
        return exp.Count(this=m.arg.copy() if m.arg is not None else exp.Star())
    return exp.Sum(this=fixed_point(m))


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
    product = exp.Mul(this=fixed_point(m), expression=exp.Literal.number(k))
    return exp.IntDiv(this=product, expression=denominator)
