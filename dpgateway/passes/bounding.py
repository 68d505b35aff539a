"""Pass 7: the bounded SQL pushed down to the backend, the cheapest correct rewrite for the query's shape:

- a prepared copy (``plan.prepared``, unfiltered queries): rows are already bounded, aggregate directly;
- scalar ``COUNT(*)``: per-unit pre-aggregation ``SUM(LEAST(n_u, k))`` (exactly the row-bounded count);
- everything else: hash-ordered row bounding, below.

Row-bounding shape (DuckDB rendering)::

    WITH typed AS (SELECT TRY_CAST(col AS type) AS col, ... FROM source),
         ranked AS (SELECT typed.*, <key exprs> AS __g0, ...,
                           ROW_NUMBER() OVER (PARTITION BY unit ORDER BY hash(key, row...)) AS __rn
                    FROM typed WHERE (<where>) AND unit IS NOT NULL)
    SELECT __g0, ..., COUNT(*) AS __m0, SUM(CASE WHEN x IS NOT NULL THEN
           CAST(ROUND((LEAST(GREATEST(x, lo), hi) - c) * scale) AS BIGINT) END) AS __m1, ...
    FROM ranked WHERE __rn <= k GROUP BY __g0, ...

Proof note (bounding): the filter runs before ranking, so each unit keeps at most ``k`` of its own
matching rows; which ones depends only on a keyed hash of that unit's own row content, never on other
units' rows or on physical row ids; the hash covers every declared column. Identical rows tie, and are interchangeable. Rows whose unit is
NULL belong to nobody we can bound and are dropped. Clamping to the declared bounds happens per row
before the sum. Tests: tests/test_sensitivity.py, tests/test_rewrite.py.
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.helper import find_new_name

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import number


def bound_contributions(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Build the bounded aggregate query for the backend: the cheapest rewrite that is correct for the shape."""
    table = plan.table
    assert table is not None
    if plan.prepared is not None:
        return _over_prepared(plan, table, ctx)
    if table.privacy_unit and _is_scalar_count(plan):
        return _unit_count(plan, table, ctx)
    return _row_bounded(plan, table, ctx)


def _row_bounded(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Hash-ordered row bounding: each unit keeps its ``k`` matching rows with the smallest keyed hash."""
    hooks = ctx.hooks
    # The hash covers every declared column (not only the ones this query reads), so an unfiltered
    # query keeps exactly the rows a prepared copy keeps (passes/prepared.py).
    columns = list(table.columns) if table.privacy_unit else _needed_columns(plan, table)
    typed = _typed(columns, hooks.source(table), ctx)
    taken = {c.name for c in table.columns}
    rn = find_new_name(taken, "__rn")
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    ranked = exp.select(exp.Star(), *keys).from_("typed")
    condition = plan.where.copy() if plan.where is not None else None
    k = table.max_rows_per_unit
    if table.privacy_unit:
        unit = exp.column(table.privacy_unit, quoted=True)
        order = hooks.row_hash(ctx.seed, [exp.column(c.name, quoted=True) for c in columns])
        window = exp.Window(
            this=exp.RowNumber(), partition_by=[unit], order=exp.Order(expressions=[exp.Ordered(this=order)])
        )
        ranked = ranked.select(exp.alias_(window, rn, quoted=True))
        condition = _and_unit_not_null(condition, table)
    if condition is not None:
        ranked = ranked.where(condition)
    final = _final(plan, table, "ranked")
    if table.privacy_unit:
        final = final.where(exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(k)))
    bounded = final.with_("typed", as_=typed).with_("ranked", as_=ranked)
    return plan.with_(
        bounded=bounded,
        bounded_sql=bounded.sql(dialect=hooks.DIALECT),
        settings=hooks.settings(k) if table.privacy_unit else (),
        rewrite="rows",
    )


def prepared_copy_sql(table: Table, ctx: PlanContext) -> str:
    """The rows a prepared copy stores: per unit, the ``k`` rows an unfiltered query keeps, clustered by unit.

    The same typed columns, keyed hash and NULL-unit rule as :func:`_row_bounded` (proof note in
    passes/prepared.py); values are stored typed but unclamped, so GROUP BY keys over them mean what
    they mean on the source, and queries clamp as usual.
    """
    assert table.privacy_unit is not None
    hooks = ctx.hooks
    columns = list(table.columns)
    typed = _typed(columns, hooks.source(table), ctx)
    rn = find_new_name({c.name for c in columns}, "__rn")
    unit = exp.column(table.privacy_unit, quoted=True)
    order = hooks.row_hash(ctx.seed, [exp.column(c.name, quoted=True) for c in columns])
    window = exp.Window(
        this=exp.RowNumber(), partition_by=[unit], order=exp.Order(expressions=[exp.Ordered(this=order)])
    )
    ranked = exp.select(exp.Star(), exp.alias_(window, rn, quoted=True)).from_("typed")
    ranked = ranked.where(_and_unit_not_null(None, table))
    kept = (
        exp.select(*(exp.column(c.name, quoted=True) for c in columns))
        .from_("ranked")
        .where(exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(table.max_rows_per_unit)))
        .order_by(unit.copy(), order.copy())
    )
    return kept.with_("typed", as_=typed).with_("ranked", as_=ranked).sql(dialect=hooks.DIALECT)


def _is_scalar_count(plan: DPPlan) -> bool:
    return not plan.group_keys and [(m.kind, m.column) for m in plan.measurements] == [("count", None)]


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
    hooks = ctx.hooks
    assert table.privacy_unit is not None
    typed = _typed(_needed_columns(plan, table), hooks.source(table), ctx)
    unit = exp.column(table.privacy_unit, quoted=True)
    taken = {c.name for c in table.columns}
    n = find_new_name(taken, "__n")
    per_unit = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), n, quoted=True))
        .from_("typed")
        .where(_and_unit_not_null(plan.where.copy() if plan.where is not None else None, table))
        .group_by(unit)
    )
    k = exp.Literal.number(table.max_rows_per_unit)
    total = exp.Sum(this=exp.Least(this=exp.column(n, quoted=True), expressions=[k], ignore_nulls=True))
    name = plan.measurements[0].name
    bounded = exp.select(exp.alias_(total, name, quoted=True)).from_("per_unit")
    bounded = bounded.with_("typed", as_=typed).with_("per_unit", as_=per_unit)
    return plan.with_(
        bounded=bounded, bounded_sql=bounded.sql(dialect=hooks.DIALECT), settings=(), rewrite="unit_count"
    )


def _over_prepared(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Aggregate a prepared copy directly: its rows are already bounded (proof note in passes/prepared.py)."""
    hooks = ctx.hooks
    assert plan.prepared is not None and plan.where is None
    typed = _typed(_needed_columns(plan, table), hooks.file_source(plan.prepared), ctx)
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    rows = exp.select(exp.Star(), *keys).from_("typed")
    bounded = _final(plan, table, "kept").with_("typed", as_=typed).with_("kept", as_=rows)
    return plan.with_(bounded=bounded, bounded_sql=bounded.sql(dialect=hooks.DIALECT), settings=(), rewrite="prepared")


def _typed(columns: list[Column], source: exp.Expr, ctx: PlanContext) -> exp.Select:
    typed_columns = [exp.alias_(ctx.hooks.typed(c), c.name, quoted=True) for c in columns] or [exp.true()]
    return exp.select(*typed_columns).from_(source)


def _and_unit_not_null(condition: exp.Expr | None, table: Table) -> exp.Expr:
    assert table.privacy_unit is not None
    not_null = exp.Not(this=exp.Is(this=exp.column(table.privacy_unit, quoted=True), expression=exp.Null()))
    return exp.and_(exp.Paren(this=condition), not_null) if condition is not None else not_null


def _final(plan: DPPlan, table: Table, source: str) -> exp.Select:
    final = exp.select(
        *(exp.column(k.name, quoted=True) for k in plan.group_keys),
        *(exp.alias_(_aggregate(m, table), m.name, quoted=True) for m in plan.measurements),
    ).from_(source)
    if plan.group_keys:
        final = final.group_by(*(exp.column(k.name, quoted=True) for k in plan.group_keys))
    return final


def _needed_columns(plan: DPPlan, table: Table) -> list[Column]:
    """Declared columns the query touches, plus the privacy unit, in policy order."""
    names = {table.privacy_unit} if table.privacy_unit else set()
    names |= {m.column for m in plan.measurements if m.column}
    for expr in [plan.where, *(k.expr for k in plan.group_keys)]:
        if expr is not None:
            names |= {c.name for c in expr.find_all(exp.Column)}
    return [c for c in table.columns if c.name in names]


def _aggregate(m: Measurement, table: Table) -> exp.Expr:
    if m.kind == "count":
        return exp.Count(this=exp.column(m.column, quoted=True) if m.column else exp.Star())
    column = table.column(m.column or "")
    assert column is not None and column.bounds is not None
    x = exp.column(column.name, quoted=True)
    lo, hi = column.bounds
    value: exp.Expr = exp.Least(
        this=exp.Greatest(this=x, expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    if m.center:
        value = exp.Paren(this=exp.Sub(this=value, expression=number(m.center)))
    if m.squared:
        value = exp.Pow(this=value, expression=exp.Literal.number(2))
    fixed = exp.cast(exp.Round(this=exp.Mul(this=value, expression=number(m.scale))), "BIGINT")
    guarded = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=fixed)])
    return exp.Sum(this=guarded)
