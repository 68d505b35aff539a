"""Pass 1: resolve the FROM clause against the policy and refuse shapes we cannot make private."""

from __future__ import annotations

from sqlglot import exp

from dpgateway.errors import (
    PrivacyViolationError,
    UnknownColumnError,
    UnknownTableError,
    UnsupportedError,
)
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.policies.model import Table, table_key

# The SELECT arguments the planner consumes (some only to refuse them with a clear message). Any other
# (TABLESAMPLE, INTO, FOR UPDATE, WINDOW, QUALIFY, FETCH, ...) would change the question and be dropped
# silently, so it is refused: a generic rule, not a list of known clauses.
CONSUMED = frozenset({"expressions", "from_", "where", "group", "having", "order", "limit", "offset", "distinct"})
REFUSED_HERE = frozenset({"with_", "with", "joins"})  # refused below with their own message
TABLE_ARGS = frozenset({"this", "db", "alias"})


def resolve_table(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Find the one table the query reads; unqualify its columns; public-only queries pass through."""
    select = plan.tree
    assert isinstance(select, exp.Select)
    _refuse_unconsumed(select, CONSUMED | REFUSED_HERE, "SELECT")
    if select.args.get("with") or select.args.get("with_"):
        raise UnsupportedError("WITH (common table expressions) is not supported yet; query the table directly")
    if select.args.get("joins"):
        raise UnsupportedError("JOIN is not supported yet; query one table at a time")
    source = select.args.get("from_") or select.args.get("from")
    if any(
        isinstance(n, (exp.Subquery, exp.Exists)) or (isinstance(n, exp.Select) and n is not select)
        for n in select.walk()
    ):
        raise UnsupportedError("subqueries are not supported yet; query the table directly")
    if source is None:
        if any(isinstance(n, exp.Column) for n in select.walk()):
            raise UnknownColumnError("columns need a FROM clause naming a table")
        return plan.with_(passthrough=True)
    relation = source.this
    if isinstance(relation, exp.Subquery):
        raise UnsupportedError("subqueries in FROM are not supported yet; query the table directly")
    if not isinstance(relation, exp.Table) or not isinstance(relation.this, exp.Identifier):
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


def _refuse_unconsumed(node: exp.Expr, consumed: frozenset[str], where: str) -> None:
    """0A000 for any argument of ``node`` the planner would not act on (it would change the question)."""
    for key, value in node.args.items():
        if key not in consumed and value not in (None, False, []):
            what = value.key.upper() if isinstance(value, exp.Expr) else key.upper()
            raise UnsupportedError(
                f"{what} is not supported in {where}: the gateway would ignore it and answer a different "
                "question; remove it"
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
