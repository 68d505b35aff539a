"""Make every expression evaluated on raw rows total, so that no value can make the backend fail.

Proof note (error side channel): the WHERE filter and the GROUP BY keys run on each raw row, before
bounding. If one of them could raise on some value (``CAST('x' AS INT)``, ``ABS`` of the smallest BIGINT,
a SUBSTRING offset out of range), whether the whole query fails would depend on one person's data,
outside the DP release; charging the budget for the failure does not make that private. The backend's
hook rewrites each into a total form (on DuckDB: casts to TRY_CAST, the whole expression under TRY), so
a row where it would fail yields NULL: the row is filtered out, or falls in the NULL group, a function
of that row alone. A binned key over bounded columns (passes/groups.py) is already total: passes/intervals.py
refused every operation that could fail within the declared bounds, and it reads the columns clamped.
Errors that remain are raised while binding, from the SQL and the schema alone.
Test: tests/attacks/test_side_channels.py::test_outcome_does_not_depend_on_one_person.

Proof note (expressions left alone): :func:`cannot_fail` accepts only expressions built from declared
columns (typed: a value of the column's type or NULL), literals, ``AND``/``OR``/``NOT``, ``IS [NOT] NULL``,
and comparisons (``= <> < <= > >=``, ``BETWEEN``, ``IN`` over literals) whose operands are both text (str
columns, string literals) or both numbers: int columns with int columns, float columns and integer literals
within BIGINT range; float columns also with any finite decimal literal; and a searched ``CASE`` (a group key
such as an age band) whose conditions are such expressions and whose results are literals of one kind or
NULL (evaluating it evaluates conditions and picks a constant). No such operator raises on any
value of those types on our backends: two strings, or two numbers promoted to a type that holds both (BIGINT,
or DOUBLE), and three-valued logic over the results. An int column against a decimal literal is left out:
DuckDB compares them as a DECIMAL that need not hold the column's value (a cast error on such rows). Anything
else (casts, arithmetic, functions, mixed types, dates) keeps the backend's total form. The hook is
skipped only where it would not change what a row yields, and it costs (DuckDB: about 10 ms of ``TRY``
at 10M rows). Test: tests/test_fastpath.py::test_try_only_around_expressions_that_can_fail.
"""

from __future__ import annotations

import math
from dataclasses import replace

from sqlglot import exp

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.policies.model import Table

_BIGINT = 2**63
_COMPARISONS = (exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE)


def make_total(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Wrap the WHERE filter and each GROUP BY key in the backend's total form (outputs are already built)."""
    assert plan.table is not None
    table = plan.table

    def total(expr: exp.Expr) -> exp.Expr:
        return expr if cannot_fail(expr, table) else ctx.hooks.total(expr)

    return plan.with_(
        where=total(plan.where) if plan.where is not None else None,
        group_keys=tuple(
            replace(k, expr=k.bounded if k.bounded is not None else total(k.expr)) for k in plan.group_keys
        ),
    )


def cannot_fail(expr: exp.Expr, table: Table) -> bool:
    """Whether ``expr`` over one typed row can never raise (proof note above); False when unsure."""
    if isinstance(expr, exp.Paren):
        return cannot_fail(expr.this, table)
    if isinstance(expr, (exp.And, exp.Or)):
        return cannot_fail(expr.this, table) and cannot_fail(expr.expression, table)
    if isinstance(expr, exp.Not):
        return cannot_fail(expr.this, table)
    if isinstance(expr, exp.Is):
        return isinstance(expr.expression, exp.Null) and _kind(expr.this, table) is not None
    if isinstance(expr, exp.Boolean):
        return True
    if isinstance(expr, exp.Case):
        return _case_cannot_fail(expr, table)
    if isinstance(expr, exp.Column):
        return _kind(expr, table) == "bool"
    if isinstance(expr, _COMPARISONS):
        return _comparable(_kind(expr.this, table), _kind(expr.expression, table))
    if isinstance(expr, exp.Between):
        kind = _kind(expr.this, table)
        return _comparable(kind, _kind(expr.args["low"], table)) and _comparable(kind, _kind(expr.args["high"], table))
    if isinstance(expr, exp.In):
        kind = _kind(expr.this, table)
        items = expr.expressions
        return bool(items) and not expr.args.get("query") and all(_comparable(kind, _kind(i, table)) for i in items)
    return False


def _case_cannot_fail(case: exp.Case, table: Table) -> bool:
    """A searched ``CASE WHEN c THEN r ... [ELSE r] END`` whose conditions cannot fail and whose results are
    literals of one kind (or NULL): choosing a branch only evaluates conditions, and a result is a constant."""
    if case.this is not None:
        return False
    ifs = case.args.get("ifs") or []
    results = [i.args.get("true") for i in ifs] + [case.args.get("default")]
    kinds = {_kind(r, table) for r in results if r is not None and not isinstance(r, exp.Null)}
    literals = all(r is None or isinstance(r, (exp.Null, exp.Literal, exp.Neg)) for r in results)
    return (
        bool(ifs)
        and literals
        and len(kinds) == 1
        and None not in kinds
        and all(cannot_fail(i.this, table) for i in ifs)
    )


_NUMBERS = {"int", "float", "decimal"}


def _comparable(a: str | None, b: str | None) -> bool:
    """Text with text; numbers with numbers, except an int column with a decimal literal (DuckDB compares those
    as a DECIMAL that need not hold the column's value: a cast error on some rows)."""
    if a == b == "str":
        return True
    return a in _NUMBERS and b in _NUMBERS and {a, b} != {"int", "decimal"}


def _kind(expr: exp.Expr, table: Table) -> str | None:
    """'int', 'float', 'str' or 'bool' for a declared column; 'int' (within BIGINT), 'decimal' (other finite
    numbers) or 'str' for a plain literal; None for anything else."""
    if isinstance(expr, exp.Paren):
        return _kind(expr.this, table)
    if isinstance(expr, exp.Column):
        column = table.column(expr.name) if not expr.table else None
        if column is None:
            return None
        return column.type if column.type in ("int", "float", "str", "bool") else None
    negative = isinstance(expr, exp.Neg)
    literal = expr.this if negative else expr
    if not isinstance(literal, exp.Literal):
        return None
    if literal.is_string:
        return None if negative else "str"
    text = str(literal.this)
    if text.isdigit():
        return "int" if int(text) < _BIGINT else None
    try:
        value = float(text)
    except ValueError:
        return None
    return "decimal" if math.isfinite(value) else None
