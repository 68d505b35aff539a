"""SQL text to a frozen, costed, bounded :class:`DPPlan`: a tuple of small passes."""

from __future__ import annotations

from collections.abc import Callable

from dpgateway.passes.aggregates import plan_aggregates
from dpgateway.passes.bounding import bound_contributions
from dpgateway.passes.budget import split_budget
from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import plan_groups
from dpgateway.passes.resolve import resolve_table
from dpgateway.plan import DPPlan
from dpgateway.sqlparse import parse

Pass = Callable[..., DPPlan]

PASSES: tuple[Pass, ...] = (
    resolve_table,  # FROM -> policy table; public-only queries pass through
    plan_groups,  # GROUP BY -> keys, public or private domains
    plan_aggregates,  # aggregates -> measurements; SELECT/HAVING/ORDER BY -> post-processing
    split_budget,  # epsilon/delta per measurement, noise scales, partition threshold
    bound_contributions,  # bounded SQL for the backend
)


def build_plan(sql: str, *, epsilon: float, delta: float, ctx: PlanContext) -> DPPlan:
    """Run every pass; a passthrough plan (public tables only) stops after resolution."""
    plan = DPPlan(sql=sql, tree=parse(sql), epsilon=epsilon, delta=delta)
    for step in PASSES:
        plan = step(plan, ctx=ctx)
        if plan.passthrough:
            break
    return plan
