"""Pass 2: GROUP BY keys, and whether their domain is public (no partition selection needed)."""

from __future__ import annotations

import itertools
from typing import Any

from sqlglot import exp

from dpgateway.errors import (
    InternalError,
    PrivacyViolationError,
    QuerySyntaxError,
    UnknownColumnError,
    UnsupportedError,
)
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan, GroupKey
from dpgateway.policies.model import Table
from dpgateway.sqlparse import row_expression

MAX_PUBLIC_CELLS = 10_000


def plan_groups(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Resolve each GROUP BY item (column, expression, ordinal or output alias) to a row expression."""
    select = plan.tree
    assert isinstance(select, exp.Select) and plan.table is not None
    group = select.args.get("group")
    if group is None:
        return plan
    if any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets")):
        raise UnsupportedError("ROLLUP, CUBE and GROUPING SETS are not supported; run one GROUP BY per query")
    keys = []
    for i, item in enumerate(group.expressions):
        expr = _resolve_item(item, select, plan.table)
        _refuse_identifier(expr, plan.table)
        expr = row_expression(expr, "GROUP BY")
        keys.append(GroupKey(name=f"__g{i}", expr=expr, public_values=_public_domain(expr, plan.table)))
    return plan.with_(group_keys=tuple(keys))


def public_cells(keys: tuple[GroupKey, ...]) -> list[tuple[Any, ...]] | None:
    """Every combination of public key values, or None if some key is private or there are too many."""
    domains = [k.public_values for k in keys]
    if any(d is None for d in domains):
        return None
    size = 1
    for d in domains:
        size *= len(d)  # type: ignore[arg-type]
    if size > MAX_PUBLIC_CELLS:
        return None
    cells = list(itertools.product(*domains))  # type: ignore[arg-type]
    # Proof note: each public cell is released once, with its own noise; a repeated cell would be
    # released twice with independent noise (averaging it away). Domains are distinct by construction
    # (policies/loader.py, _public_domain), so a repeat is a bug. Test: tests/test_sources.py.
    if len(set(cells)) != len(cells):
        raise InternalError("public group key values repeat: a group would be released twice with independent noise")
    return cells


def _resolve_item(item: exp.Expr, select: exp.Select, table: Table) -> exp.Expr:
    outputs = select.expressions
    if isinstance(item, exp.Literal) and not item.is_string:
        if not item.name.isdigit():
            raise QuerySyntaxError(f"non-integer constant in GROUP BY: {item.name}")  # as PostgreSQL
        position = int(item.name)
        if not 1 <= position <= len(outputs):
            raise UnknownColumnError(f"GROUP BY position {position} is not in select list")
        return _unalias(outputs[position - 1]).copy()
    if isinstance(item, exp.Column) and table.column(item.name) is None:
        for out in outputs:
            if isinstance(out, exp.Alias) and out.alias.lower() == item.name.lower():
                return out.this.copy()
    return item.copy()


def _unalias(node: exp.Expr) -> exp.Expr:
    return node.this if isinstance(node, exp.Alias) else node


def _refuse_identifier(expr: exp.Expr, table: Table) -> None:
    unit = table.privacy_unit
    if unit and any(c.name.lower() == unit.lower() for c in expr.find_all(exp.Column)):
        raise PrivacyViolationError(
            f"grouping by the privacy unit {table.name}.{unit} would release identifiers; "
            "group by other columns, or aggregate per unit in a later version"
        )


def _public_domain(expr: exp.Expr, table: Table) -> tuple[Any, ...] | None:
    """A data-independent key domain: declared public values, booleans, or CASE with literal results."""
    if isinstance(expr, exp.Paren):
        return _public_domain(expr.this, table)
    if isinstance(expr, exp.Column):
        column = table.column(expr.name)
        if column is not None and column.public_values is not None:
            return column.public_values
        if column is not None and column.type == "bool":
            return (False, True)
        return None
    if isinstance(expr, exp.Case) and not expr.this:
        results = [branch.args["true"] for branch in expr.args.get("ifs", [])]
        default = expr.args.get("default")
        if all(_is_literal(r) for r in results) and (default is None or _is_literal(default)):
            values = [literal_value(r) for r in results] + [literal_value(default) if default is not None else None]
            return tuple(dict.fromkeys(values))
    return None


def _is_literal(node: exp.Expr) -> bool:
    return isinstance(node, (exp.Literal, exp.Boolean, exp.Null)) or (
        isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal)
    )


def literal_value(node: exp.Expr) -> Any:
    """The Python value of a literal node."""
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return node.this
    if isinstance(node, exp.Neg):
        return -literal_value(node.this)
    assert isinstance(node, exp.Literal)
    if node.is_string:
        return node.this
    text = node.this
    return int(text) if text.lstrip("-").isdigit() else float(text)
