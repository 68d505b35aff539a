"""Pass 9: render the post-processing query (SELECT list, HAVING, ORDER BY, LIMIT over the noisy frame) and
its Python form once per plan, so a cached plan does not build them again for every query; and bind the
query now, over an empty relation of the release's column types, so that it cannot fail after the spend."""

from __future__ import annotations

from sqlglot import exp
from sqlglot.optimizer.annotate_types import annotate_types

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan, GroupKey
from dpgateway.policies.model import Table
from dpgateway.postprocess import NOISY, post_processing_query, post_processing_sql, python_evaluators, run_sandboxed

_SQL_TYPES = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "bool": "BOOLEAN", "date": "DATE"}


def render_post_processing(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.post_python`` and ``plan.post_sql``; both read only the noisy values (dpgateway/postprocess.py).

    The sandbox query runs here once over an empty relation with the release's columns and types: a
    reference to a value the release lacks or an operation its types do not support is refused now, at
    no cost, instead of failing after the budget was charged (every retry charged again).
    """
    if not plan.measurements:  # public key values only: post-processed without any spend
        post_python = python_evaluators(plan)
        return plan.with_(
            post_python=post_python, post_sql="" if post_python is not None else post_processing_sql(plan)
        )
    sql = post_processing_sql(plan)
    empty = exp.select(*_typed_nulls(plan), copy=False).limit(0, copy=False)
    bind = post_processing_query(plan).with_(NOISY, as_=empty, copy=False).sql(dialect="duckdb")
    run_sandboxed(bind, what="the query's outputs, HAVING or ORDER BY")
    return plan.with_(post_python=python_evaluators(plan), post_sql=sql)


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
    typed = annotate_types(exp.select(expr.copy()).from_("t"), schema=schema).expressions[0].type
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
