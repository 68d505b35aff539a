"""Pass 9: render the post-processing query (SELECT list, HAVING, ORDER BY, LIMIT over the noisy frame) and
its Python form once per plan, so a cached plan does not build them again for every query."""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.postprocess import post_processing_sql, python_evaluators


def render_post_processing(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.post_python``, else ``plan.post_sql``; both read only the noisy values (dpgateway/postprocess.py).

    With a Python form, the sandbox query is rendered only if some release needs it (e.g. a NULL value).
    """
    post_python = python_evaluators(plan)
    return plan.with_(post_python=post_python, post_sql="" if post_python is not None else post_processing_sql(plan))
