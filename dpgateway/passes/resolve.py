"""Pass 1: resolve the FROM clause against the policy and refuse shapes we cannot make private.

One declared table is read directly; joins, tables whose unit is reached through foreign keys and
per-person subqueries become one relation (passes/relations.py, passes/per_unit.py) that later passes
see as one table with plain column names.
"""

from __future__ import annotations

from dataclasses import replace

from sqlglot import exp

from dpgateway.errors import (
    PrivacyViolationError,
    UnknownColumnError,
    UnknownTableError,
    UnsupportedError,
)
from dpgateway.passes.context import PlanContext
from dpgateway.passes.per_unit import deriver
from dpgateway.passes.relations import TABLE_ARGS, RelationBuilder, from_clause
from dpgateway.passes.relations import refuse_unconsumed as _refuse_unconsumed
from dpgateway.plan import DPPlan
from dpgateway.policies.model import Table, table_key

# The SELECT arguments the planner consumes (some only to refuse them with a clear message). Any other
# (TABLESAMPLE, INTO, FOR UPDATE, WINDOW, QUALIFY, FETCH, ...) would change the question and be dropped
# silently, so it is refused: a generic rule, not a list of known clauses.
CONSUMED = frozenset({"expressions", "from_", "where", "group", "having", "order", "limit", "offset", "distinct"})
RELATION_ARGS = frozenset({"with_", "with", "joins"})  # passes/relations.py


def resolve_table(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Find the table or relation the query reads; unqualify its columns; public-only queries pass through."""
    select = plan.tree
    assert isinstance(select, exp.Select)
    _refuse_unconsumed(select, CONSUMED | RELATION_ARGS, "SELECT")
    source = select.args.get("from_") or select.args.get("from")
    _refuse_subqueries(select)
    if source is None:
        if any(isinstance(n, exp.Column) for n in select.walk()):
            raise UnknownColumnError("columns need a FROM clause naming a table")
        return plan.with_(passthrough=True)
    relation = source.this
    with_ = select.args.get("with_") or select.args.get("with")
    if with_ is not None or select.args.get("joins") or not isinstance(relation, exp.Table):
        return _resolve_relation(plan, select, ctx)
    if not isinstance(relation.this, exp.Identifier):
        raise PrivacyViolationError("FROM must name a table declared in the policy (table functions are not allowed)")
    _refuse_unconsumed(relation, TABLE_ARGS, "FROM")
    alias = relation.args.get("alias")
    if alias is not None:
        _refuse_unconsumed(alias, frozenset({"this"}), "FROM (column aliases)")
    qualified = ".".join(p.name for p in (relation.args.get("db"), relation.this) if p is not None)
    table = ctx.config.table(qualified)
    if table is None:
        known = ", ".join(t.name for t in ctx.config.tables)
        raise UnknownTableError(f'relation "{qualified}" does not exist; the policy declares: {known}')
    if table.unit_path:  # its unit is found by joining along the declared foreign keys
        return _resolve_relation(plan, select, ctx)
    names = {relation.name.lower(), relation.alias_or_name.lower()}
    tree = select.copy()
    for column in tree.find_all(exp.Column):
        _check_column(column, table, names)
        if column.args.get("db") is not None and table_key(f"{column.text('db')}.{column.table}") != table_key(
            table.name
        ):
            raise UnknownTableError(f'missing FROM-clause entry for table "{column.text("db")}.{column.table}"')
        column.set("table", None)
        column.set("db", None)
        column.set("catalog", None)
    return plan.with_(table=table, tree=tree, passthrough=table.public)


def _resolve_relation(plan: DPPlan, select: exp.Select, ctx: PlanContext) -> DPPlan:
    """Joins, unit paths, per-person subqueries: one relation (passes/relations.py, passes/per_unit.py)."""
    with_ = select.args.get("with_") or select.args.get("with")
    scope: dict[str, exp.Select] = {}
    if with_ is not None:
        _refuse_unconsumed(with_, frozenset({"expressions"}), "WITH (RECURSIVE is not supported)")
        for cte in with_.expressions:
            if not isinstance(cte.this, exp.Select):
                raise UnsupportedError("each WITH query must be one SELECT grouped by the privacy unit")
            scope[cte.alias.lower()] = cte.this
    ctes: list[tuple[str, exp.Select]] = []
    sources: list[tuple[str, Table]] = []
    builder = RelationBuilder(ctx, ctes, sources)
    from_clause(select, builder, scope, deriver(ctx, scope))
    relation, table = builder.relation()
    relation = replace(relation, ctes=tuple(ctes), sources=tuple(sources))
    tree = select.copy()
    for key in ("with_", "with", "joins"):
        tree.set(key, None)
    tree.set("from_", exp.From(this=exp.to_table("relation")))
    for column in list(tree.find_all(exp.Column)):
        if isinstance(column.this, exp.Star):
            raise PrivacyViolationError("SELECT * would release raw rows; select aggregates and GROUP BY columns")
        if _is_output_alias(column):
            continue
        instance, declared = builder.find(column)
        column.replace(exp.column(builder.exposed_name(instance, declared)))
    note = (
        f"relation {table.name} (joins, unit paths or per-person rows): each person's joined rows are bounded "
        f"together, at most {table.max_rows_per_unit} kept (docs/sql.md)"
    )
    return plan.with_(table=table, tree=tree, relation=relation, notes=(*plan.notes, note))


def _refuse_subqueries(select: exp.Select) -> None:
    """Subqueries are answered only as FROM items and WITH queries (per-person subqueries)."""
    for key in ("expressions", "where", "group", "having", "order"):
        value = select.args.get(key)
        for node in value if isinstance(value, list) else [value]:
            if isinstance(node, exp.Expr) and any(
                isinstance(n, (exp.Subquery, exp.Exists, exp.Select)) for n in node.walk()
            ):
                raise UnsupportedError(
                    "subqueries are supported only in FROM and WITH, grouped by the privacy unit (one row per person)"
                )


def _check_column(column: exp.Column, table: Table, names: set[str]) -> None:
    if column.table and column.table.lower() not in names:
        raise UnknownTableError(f'missing FROM-clause entry for table "{column.table}"')
    if isinstance(column.this, exp.Star):
        return
    if table.public or _is_output_alias(column):
        return
    declared = table.column(column.name)
    if declared is None:
        names_list = ", ".join(c.name for c in table.columns)
        raise UnknownColumnError(
            f'column "{column.name}" does not exist in {table.name} (or is not declared in the policy); '
            f"declared columns: {names_list}"
        )
    column.set("this", exp.to_identifier(declared.name))


def _is_output_alias(column: exp.Column) -> bool:
    """ORDER BY, GROUP BY and HAVING may name an output alias; the grouping pass resolves those."""
    select = column.find_ancestor(exp.Select)
    if select is None or column.table:
        return False
    aliases = {e.alias.lower() for e in select.expressions if isinstance(e, exp.Alias)}
    clause = column.find_ancestor(exp.Order, exp.Group, exp.Having, exp.Where)
    return column.name.lower() in aliases and isinstance(clause, (exp.Order, exp.Group, exp.Having))
