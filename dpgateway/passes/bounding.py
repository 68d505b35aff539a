"""Pass 5: the bounded SQL pushed down to the backend.

Shape (DuckDB rendering)::

    WITH typed AS (SELECT TRY_CAST(col AS type) AS col, ... FROM source),
         ranked AS (SELECT typed.*, <key exprs> AS __g0, ...,
                           ROW_NUMBER() OVER (PARTITION BY unit ORDER BY hash(key, row...)) AS __rn
                    FROM typed WHERE (<where>) AND unit IS NOT NULL)
    SELECT __g0, ..., COUNT(*) AS __m0, SUM(CASE WHEN x IS NOT NULL THEN
           CAST(ROUND((LEAST(GREATEST(x, lo), hi) - c) * scale) AS BIGINT) END) AS __m1, ...
    FROM ranked WHERE __rn <= k GROUP BY __g0, ...

Proof note (bounding): the filter runs before ranking, so each unit keeps at most ``k`` of its own
matching rows; which ones depends only on a keyed hash of that unit's own row content, never on other
units' rows or on physical row ids. Identical rows tie, and are interchangeable. Rows whose unit is
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
    """Build the bounded aggregate query for the backend."""
    table = plan.table
    assert table is not None
    hooks = ctx.hooks
    columns = _needed_columns(plan, table)
    typed_columns = [exp.alias_(hooks.typed(c), c.name, quoted=True) for c in columns] or [exp.true()]
    typed = exp.select(*typed_columns).from_(hooks.source(table))
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
        not_null = exp.Not(this=exp.Is(this=unit.copy(), expression=exp.Null()))
        condition = exp.and_(exp.Paren(this=condition), not_null) if condition is not None else not_null
    if condition is not None:
        ranked = ranked.where(condition)
    final = exp.select(
        *(exp.column(k.name, quoted=True) for k in plan.group_keys),
        *(exp.alias_(_aggregate(m, table), m.name, quoted=True) for m in plan.measurements),
    ).from_("ranked")
    if table.privacy_unit:
        final = final.where(exp.LTE(this=exp.column(rn, quoted=True), expression=exp.Literal.number(k)))
    if plan.group_keys:
        final = final.group_by(*(exp.column(k.name, quoted=True) for k in plan.group_keys))
    bounded = final.with_("typed", as_=typed).with_("ranked", as_=ranked)
    return plan.with_(
        bounded=bounded,
        bounded_sql=bounded.sql(dialect=hooks.DIALECT),
        settings=hooks.settings(k) if table.privacy_unit else (),
    )


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
