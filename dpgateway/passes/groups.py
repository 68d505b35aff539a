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
from dpgateway.passes.dates import date_key
from dpgateway.passes.intervals import Interval, bounded_value
from dpgateway.plan import DPPlan, GroupKey
from dpgateway.policies.model import Table
from dpgateway.sqlparse import NUMBER, ROW_SAFE, number, row_expression, row_expression_value

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
        key = _binned(expr, f"__g{i}", plan.table, ctx)
        if key is None:
            expr = row_expression(expr, "GROUP BY")
            key = GroupKey(name=f"__g{i}", expr=expr, public_values=_public_domain(expr, plan.table))
        keys.append(key)
    return plan.with_(group_keys=tuple(keys))


def _binned(expr: exp.Expr, name: str, table: Table, ctx: PlanContext) -> GroupKey | None:
    """A key computed from bounded numeric columns (``age / 10``, ``FLOOR(age / 10) * 10``), or None.

    The key reads its columns clamped to their declared bounds (passes/intervals.py: total by
    construction, PostgreSQL's integer division on every backend), so a value outside the bounds falls
    in the edge bin. Its domain is public when it is exact and data-independent: an integer key of one
    integer column with at most MAX_PUBLIC_CELLS values, evaluated at each of them.

    Proof note (public binned domain): the domain is the image of the declared integer range under the
    key's expression, computed from the policy and the SQL alone (no data), and every row's key lies in
    it (its column is clamped into that range first; a NULL column gives a NULL key, in no public cell,
    so it is released nowhere). So the released groups are the same on neighbouring datasets, as for a
    declared ``public_values`` column. Tests: tests/test_binning.py.
    """
    if isinstance(expr, exp.WidthBucket):
        return _width_bucket(expr, name, table)
    if isinstance(expr, (exp.Extract, exp.TimestampTrunc, exp.DateTrunc)):  # of a bounded date (passes/dates.py)
        return date_key(row_expression(expr, "GROUP BY"), name, table, ctx.hooks, MAX_PUBLIC_CELLS)
    if isinstance(expr, exp.Column) or not expr.find(exp.Column):
        return None
    needs_bounds = any(not isinstance(n, ROW_SAFE) for n in expr.walk())  # e.g. '/': only over bounded columns
    numeric = all(
        (c := table.column(col.name)) is not None and c.is_numeric and c.bounds is not None
        for col in expr.find_all(exp.Column)
    )
    if not numeric and not needs_bounds:
        return None
    checked = row_expression_value(expr, "GROUP BY")
    what = f"GROUP BY {expr.sql('postgres')}"
    try:
        built, interval = bounded_value(checked, table, what=what, total=ctx.hooks.total)
    except (PrivacyViolationError, UnsupportedError):
        if needs_bounds:
            raise
        return None  # e.g. a CASE of text results: an ordinary row expression
    domain = _enumerated(checked, interval, table, ctx)
    if domain is None:
        domain = _public_domain(checked, table)  # e.g. CASE with literal results
    return GroupKey(name=name, expr=checked, public_values=domain, bounded=built)


def _width_bucket(node: exp.WidthBucket, name: str, table: Table) -> GroupKey:
    """``width_bucket(x, low, high, n)`` of a numeric column with constant bounds: PostgreSQL's buckets 0..n+1.

    Built as ``CASE WHEN c < low THEN 0 WHEN c >= high THEN n + 1 ELSE LEAST(FLOOR(n * ((c - low) / (high -
    low))), n - 1) + 1 END`` (PostgreSQL's formula and its guard against a quotient rounding up to 1), on
    ``c``: the column as a double, magnitudes below 1e-30 read as 0, clamped to ``[low - 1, high]`` (the same
    bucket, and nothing can overflow or underflow: literals are 0 or at least 1e-10 and at most 1e15 in
    magnitude). Its domain ``0..n+1`` is fixed by the SQL alone: public (proof note of :func:`_binned`).
    """
    operand = node.this
    column = table.column(operand.name) if isinstance(operand, exp.Column) else None
    if column is None or not column.is_numeric:
        raise UnsupportedError("width_bucket needs a numeric column as its first argument (in GROUP BY)")
    low, high, count = (_literal_number(node.args.get(k)) for k in ("min_value", "max_value", "num_buckets"))
    if not (
        low < high
        and all(v == 0 or 1e-10 <= abs(v) <= 1e15 for v in (low, high))
        and count == int(count)
        and 1 <= count <= MAX_PUBLIC_CELLS - 2
    ):
        raise UnsupportedError(
            "width_bucket needs constants low < high (0 or 1e-10 to 1e15 in magnitude) and a count from 1 to "
            f"{MAX_PUBLIC_CELLS - 2}"
        )
    n = int(count)
    x = exp.column(column.name, quoted=True)
    value = exp.cast(x.copy(), "DOUBLE")
    small = exp.LT(this=exp.Abs(this=value.copy()), expression=number(1e-30))
    flushed = exp.Case(ifs=[exp.If(this=small, true=exp.cast(number(0), "DOUBLE"))], default=value)
    clamped = exp.Least(
        this=exp.Greatest(this=flushed, expressions=[number(low - 1)], ignore_nulls=True),
        expressions=[number(high)],
        ignore_nulls=True,
    )
    c = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=clamped)])
    width = exp.Paren(this=exp.Sub(this=number(high), expression=number(low)))
    offset = exp.Paren(this=exp.Sub(this=c.copy(), expression=number(low)))
    share = exp.Mul(this=number(n), expression=exp.Paren(this=exp.Div(this=offset, expression=width, typed=True)))
    index = exp.Least(
        this=exp.cast(exp.Floor(this=share), "BIGINT"), expressions=[exp.Literal.number(n - 1)], ignore_nulls=True
    )
    bucket = exp.Case(
        ifs=[
            exp.If(this=exp.LT(this=c.copy(), expression=number(low)), true=exp.Literal.number(0)),
            exp.If(this=exp.GTE(this=c.copy(), expression=number(high)), true=exp.Literal.number(n + 1)),
        ],
        default=exp.Add(this=index, expression=exp.Literal.number(1)),
    )
    # ``expr`` stays the analyst's node (checked above: a declared column and numbers) so the SELECT list
    # matches it; the backend runs ``bounded`` only (passes/total.py)
    return GroupKey(name=name, expr=node.copy(), public_values=tuple(range(n + 2)), bounded=bucket)


def _literal_number(node: exp.Expr | None) -> float:
    if node is None:
        raise UnsupportedError("width_bucket needs four arguments: width_bucket(x, low, high, count)")
    if isinstance(node, exp.Neg):
        return -_literal_number(node.this)
    if isinstance(node, exp.Literal) and not node.is_string and NUMBER.fullmatch(node.this):
        return float(node.this)
    raise UnsupportedError("width_bucket's low, high and count must be numbers")


def _enumerated(expr: exp.Expr, interval: Interval, table: Table, ctx: PlanContext) -> tuple[Any, ...] | None:
    """The key's exact domain when it is an integer function of one integer column with few values, else None."""
    columns = {c.name for c in expr.find_all(exp.Column)}
    if not interval.integer or len(columns) != 1:
        return None
    column = table.column(columns.pop())
    assert column is not None and column.bounds is not None
    lo, hi = column.bounds
    if column.type != "int" or hi - lo + 1 > MAX_PUBLIC_CELLS:
        return None
    values = []
    for v in range(int(lo), int(hi) + 1):
        _, at = bounded_value(expr, table, what="GROUP BY", total=ctx.hooks.total, point={column.name: float(v)})
        if at.point is None:
            return None  # e.g. a CASE whose branch depends on a condition: not a function of the value alone
        values.append(int(at.point))
    return tuple(sorted(set(values)))


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
