"""Last pass: the statement for the backend, parsed back and verified against the tree the planner built.

Plans are cached, so this runs once per plan build; a cached query pays nothing (dpgateway/sqlcheck.py).
"""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.sqlcheck import verify


def verify_backend_sql(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.bounded_sql`` from ``plan.bounded``; the sources allowed are the table's and a prepared copy."""
    if plan.bounded is None or plan.table is None:
        return plan
    if plan.relation is not None:  # every declared table the joined relation reads (passes/relations.py)
        sources = [ctx.hooks.source(table) for _, table in plan.relation.sources]
    else:
        sources = [ctx.hooks.source(plan.table)]
    if plan.prepared is not None:
        sources.append(ctx.hooks.file_source(plan.prepared))
    return plan.with_(
        bounded_sql=verify(
            ctx.hooks.finish(plan.bounded),
            ctx.hooks.DIALECT,
            sources=sources,
            nodes=ctx.hooks.BACKEND_NODES,
            functions=ctx.hooks.BACKEND_FUNCTIONS,
        )
    )
