"""Pass 9: render the post-processing query (SELECT list, HAVING, ORDER BY, LIMIT over the noisy frame) once
per plan, so a cached plan does not render it again for every query."""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.postprocess import post_processing_sql


def render_post_processing(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.post_sql``; it reads only the noisy frame (dpgateway/postprocess.py)."""
    return plan.with_(post_sql=post_processing_sql(plan))
