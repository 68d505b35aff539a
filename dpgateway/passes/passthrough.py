"""Queries that touch no private data: a public table (answered exactly) or no table at all (constants).

Neither is free text: the statement is rebuilt from allowlisted parts, as every private query is.

- A public table: the SELECT list, HAVING and ORDER BY may use the row-safe nodes and the aggregates of
  :data:`AGGREGATES`; WHERE and GROUP BY the row-safe nodes only; the one declared public table is read
  through the backend hooks. The statement is then verified like any other (passes/verify.py).
- No table: constant expressions only (:func:`dpgateway.sqlparse.constant_expression`: no column, no
  function outside the allowlist, so no ``version()`` or ``current_setting(...)``), evaluated in the
  post-processing sandbox (dpgateway/postprocess.py), which holds no data and reads no file.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlglot import exp

from dpgateway.errors import UnsupportedError
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.sqlparse import AGGREGATES, POST_SAFE, allowlisted, constant_expression, int_clause, row_expression

PUBLIC_SAFE: tuple[type[exp.Expr], ...] = (*POST_SAFE, *AGGREGATES, exp.Star)


def render_passthrough(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.bounded`` (public table) or ``plan.post_sql`` (no table) from allowlisted parts."""
    select = plan.tree
    assert isinstance(select, exp.Select)
    if plan.table is None:
        if any(select.args.get(k) for k in ("where", "group", "having", "order", "limit", "offset", "distinct")):
            raise UnsupportedError("a SELECT without FROM may only list constant expressions")
        items = [_item(e, lambda n: constant_expression(n, "SELECT")) for e in select.expressions]
        return plan.with_(post_sql=exp.select(*items, copy=False).sql(dialect="duckdb"))
    distinct = select.args.get("distinct")
    if distinct is not None and distinct.args.get("on"):
        raise UnsupportedError("DISTINCT ON is not supported; use GROUP BY")
    query = exp.select(*(_item(e, _public) for e in select.expressions), copy=False)
    query = query.from_(ctx.hooks.source(plan.table), copy=False)
    if distinct is not None:
        query = query.distinct(copy=False)
    where = select.args.get("where")
    if where is not None:
        query = query.where(row_expression(where.this, "WHERE"), copy=False)
    group = select.args.get("group")
    if group is not None:
        if any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets", "totals", "all")):
            raise UnsupportedError("ROLLUP, CUBE and GROUPING SETS are not supported; run one GROUP BY per query")
        query = query.group_by(*(_key(e) for e in group.expressions), copy=False)
    having = select.args.get("having")
    if having is not None:
        query = query.having(_public(having.this), copy=False)
    order = select.args.get("order")
    if order is not None:
        query = query.order_by(*(_ordered(o) for o in order.expressions), copy=False)
    for clause in ("limit", "offset"):
        value = int_clause(select, clause)
        if value is not None:
            query = getattr(query, clause)(value, copy=False)
    return plan.with_(bounded=query)


def _public(node: exp.Expr) -> exp.Expr:
    return allowlisted(node, "a query on a public table", PUBLIC_SAFE, columns=True, aggregates=True)


def _item(node: exp.Expr, check: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
    """A SELECT item: the expression allowlisted, its alias rebuilt as a quoted identifier."""
    if isinstance(node, exp.Alias):
        return exp.alias_(check(node.this), node.alias, quoted=True)
    return check(node)


def _key(node: exp.Expr) -> exp.Expr:
    if isinstance(node, exp.Literal) and not node.is_string and node.name.isdigit():
        return exp.Literal.number(int(node.name))  # GROUP BY ordinal
    return row_expression(node, "GROUP BY")


def _ordered(node: exp.Expr) -> exp.Expr:
    if not isinstance(node, exp.Ordered):
        raise UnsupportedError("ORDER BY items must be expressions")
    target = node.this
    if isinstance(target, exp.Literal) and not target.is_string and target.name.isdigit():
        value: exp.Expr = exp.Literal.number(int(target.name))
    else:
        value = _public(target)
    return exp.Ordered(this=value, desc=bool(node.args.get("desc")), nulls_first=bool(node.args.get("nulls_first")))
