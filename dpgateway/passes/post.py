"""Pass 9: render the post-processing query (SELECT list, HAVING, ORDER BY, LIMIT over the noisy frame) and
its Python form once per plan, so a cached plan does not build them again for every query; and bind the
query now, over an empty relation of the release's column types, so that it cannot fail after the spend.

Proof note (bind skipped): the bind (about 5 ms) is skipped only when :func:`_types_check` proves it would
pass: no HAVING, ORDER BY, LIMIT or OFFSET, every output compiled to a Python evaluator (a column of the
release, integer literals, unary minus, ``+ - * /``, GREATEST/LEAST, nothing else), and every column that
such an output computes with (anything but a bare column) a measurement (BIGINT or DOUBLE) or a key typed
BIGINT or DOUBLE by the same inference the bind uses. Numeric operators over numbers always bind in DuckDB,
and a bare column of any type does, so the sandbox query (run when the Python form declines at run time,
e.g. on NULLs) binds too: what remains at run time is value-dependent, as with the bind. Test:
tests/test_fastpath.py::test_post_processing_is_bound_only_when_its_types_are_not_known.
"""

from __future__ import annotations

from dataclasses import replace

from sqlglot import exp
from sqlglot.optimizer.annotate_types import annotate_types

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan, GroupKey
from dpgateway.policies.model import Table
from dpgateway.postprocess import NOISY, post_processing_query, post_processing_sql, python_evaluators, run_sandboxed
from dpgateway.sqlparse import bottom_up

_SQL_TYPES = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "bool": "BOOLEAN", "date": "DATE"}


def render_post_processing(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.post_python`` and ``plan.post_sql``; both read only the noisy values (dpgateway/postprocess.py).

    The sandbox query runs here once over an empty relation with the release's columns and types: a
    reference to a value the release lacks or an operation its types do not support is refused now, at
    no cost, instead of failing after the budget was charged (every retry charged again).
    """
    plan = _postgres_division(plan)
    if not plan.measurements:  # public key values only: post-processed without any spend
        post_python = python_evaluators(plan)
        return plan.with_(
            post_python=post_python, post_sql="" if post_python is not None else post_processing_sql(plan)
        )
    sql = post_processing_sql(plan)
    post_python = python_evaluators(plan)
    if post_python is None or not _types_check(plan):
        empty = exp.select(*_typed_nulls(plan), copy=False).limit(0, copy=False)
        bind = post_processing_query(plan).with_(NOISY, as_=empty, copy=False).sql(dialect="duckdb")
        run_sandboxed(bind, what="the query's outputs, HAVING or ORDER BY")
    return plan.with_(post_python=post_python, post_sql=sql)


def _types_check(plan: DPPlan) -> bool:
    """Whether every output that computes (not a bare column) reads numeric columns only (proof note above);
    call only when the outputs compiled to Python evaluators."""
    assert plan.table is not None
    measured = {m.name for m in plan.measurements}
    keys = {k.name: k for k in plan.group_keys}
    for output in plan.outputs:
        expr = output.expr
        while isinstance(expr, exp.Paren):
            expr = expr.this
        if isinstance(expr, exp.Column):
            continue
        for column in expr.find_all(exp.Column):
            if column.name in measured:
                continue
            key = keys.get(column.name)
            if key is None or _key_type(key, plan.table) not in ("BIGINT", "DOUBLE"):
                return False
    return True


_INTEGER_TYPES = ("BIGINT",)


def _postgres_division(plan: DPPlan) -> DPPlan:
    """Outputs, HAVING and ORDER BY with PostgreSQL's ``/``: of two integers (noisy counts, integer keys and
    literals, and arithmetic of those) it truncates toward zero, as ``COUNT(*) / 7`` does in PostgreSQL;
    any other ``/`` divides as a double. A zero divisor gives NULL (PostgreSQL raises; here the budget
    is already spent, so the answer keeps its other values). Tests: tests/test_postprocess.py."""
    assert plan.table is not None
    integer = {k.name for k in plan.group_keys if _key_type(k, plan.table) in _INTEGER_TYPES}
    integer |= {m.name for m in plan.measurements if m.kind == "count"}
    outputs = {o.name: o.expr for o in plan.outputs}

    def is_integer(node: exp.Expr, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(node, exp.Paren | exp.Neg | exp.Abs):
            return is_integer(node.this, seen)
        if isinstance(node, exp.Column):
            if node.name in integer:
                return True
            aliased = outputs.get(node.name)  # HAVING / ORDER BY may name an output
            return aliased is not None and node.name not in seen and is_integer(aliased, seen | {node.name})
        if isinstance(node, exp.Literal):
            return not node.is_string and node.this.isdigit()
        if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.IntDiv):
            return is_integer(node.this, seen) and is_integer(node.expression, seen)
        if isinstance(node, exp.Nullif):
            return is_integer(node.this, seen)
        if isinstance(node, exp.Greatest | exp.Least | exp.Coalesce):
            return all(is_integer(a, seen) for a in (node.this, *node.expressions))
        return False

    def rewrite(node: exp.Expr) -> exp.Expr:
        if type(node) is exp.Div and node.args.get("typed") and is_integer(node.this) and is_integer(node.expression):
            divisor = exp.Nullif(this=node.expression, expression=exp.Literal.number(0))
            return exp.IntDiv(this=node.this, expression=divisor)
        return node

    def fixed(tree: exp.Expr) -> exp.Expr:
        return bottom_up(tree.copy(), rewrite)  # children first: nested divisions

    return plan.with_(
        outputs=tuple(replace(o, expr=fixed(o.expr)) for o in plan.outputs),
        having=fixed(plan.having) if plan.having is not None else None,
        order=tuple(fixed(o) for o in plan.order),  # type: ignore[misc]
    )


def _typed_nulls(plan: DPPlan) -> list[exp.Expr]:
    """The columns of ``add_noise``'s release, as typed NULLs: keys typed as the backend computes them, then
    the measurements (counts as integers, sums as floats)."""
    assert plan.table is not None
    columns = [(k.name, _key_type(k, plan.table)) for k in plan.group_keys]
    columns += [(m.name, "BIGINT" if m.kind == "count" else "DOUBLE") for m in plan.measurements]
    return [exp.alias_(exp.cast(exp.Null(), kind), name, quoted=True) for name, kind in columns]


def _key_type(key: GroupKey, table: Table) -> str:
    """The SQL type of a key's values: sqlglot's type inference of the expression over the declared columns."""
    expr = key.expr.this if isinstance(key.expr, exp.Try) else key.expr
    schema: dict[str, object] = {"t": {c.name: _SQL_TYPES[c.type] for c in table.columns}}
    qualified = expr.copy().transform(
        lambda n: exp.column(n.name, table="t", quoted=True) if isinstance(n, exp.Column) else n
    )  # annotate_types resolves qualified columns only
    typed = annotate_types(exp.select(qualified).from_("t"), schema=schema).expressions[0].type
    if typed is None or typed.is_type(exp.DataType.Type.UNKNOWN, exp.DataType.Type.NULL):
        return "VARCHAR"
    if typed.is_type(*exp.DataType.INTEGER_TYPES):
        return "BIGINT"
    if typed.is_type(*exp.DataType.REAL_TYPES):
        return "DOUBLE"
    if typed.is_type(exp.DataType.Type.BOOLEAN):
        return "BOOLEAN"
    if typed.is_type(*exp.DataType.TEMPORAL_TYPES):
        return "DATE"
    return "VARCHAR"
