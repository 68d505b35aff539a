"""SQL text to a frozen, costed, bounded :class:`DPPlan`: a tuple of small passes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from dpgateway.passes.aggregates import plan_aggregates
from dpgateway.passes.bounding import bound_contributions
from dpgateway.passes.budget import split_budget
from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import plan_groups
from dpgateway.passes.passthrough import render_passthrough
from dpgateway.passes.post import render_post_processing
from dpgateway.passes.prepared import use_prepared_copy
from dpgateway.passes.resolve import resolve_table
from dpgateway.passes.rewrite import choose_rewrite
from dpgateway.passes.total import make_total
from dpgateway.passes.verify import verify_backend_sql
from dpgateway.plan import DPPlan
from dpgateway.sqlparse import normalize, parse

Pass = Callable[..., DPPlan]

PASSES: tuple[Pass, ...] = (
    resolve_table,  # FROM -> policy table; public-only queries pass through
    plan_groups,  # GROUP BY -> keys, public or private domains
    plan_aggregates,  # aggregates -> measurements; SELECT/HAVING/ORDER BY -> post-processing
    make_total,  # WHERE and GROUP BY keys never fail on a row (no data-dependent errors)
    choose_rewrite,  # bounding estimator for the shape: 'weighted', 'unit_count' or 'rows' (private keys)
    split_budget,  # epsilon/delta per measurement, noise scales, partition threshold
    use_prepared_copy,  # unfiltered queries read a valid prepared (pre-bounded) copy if there is one
    bound_contributions,  # bounded SQL for the backend: cheapest correct rewrite for the shape
    render_post_processing,  # the sandbox query over the noisy values, rendered once per plan
    verify_backend_sql,  # the bounded SQL parsed back: refused unless it is the tree built above
)


PASSTHROUGH_PASSES: tuple[Pass, ...] = (
    render_passthrough,  # public table or no table: the statement rebuilt from allowlisted parts
    verify_backend_sql,
)


def build_plan(sql: str, *, epsilon: float, delta: float, ctx: PlanContext) -> DPPlan:
    """Run every pass; a passthrough plan (public tables only) continues with PASSTHROUGH_PASSES."""
    plan = DPPlan(sql=sql, tree=parse(sql), epsilon=epsilon, delta=delta)
    for step in PASSES:
        plan = step(plan, ctx=ctx)
        if plan.passthrough:
            for rest in PASSTHROUGH_PASSES:
                plan = rest(plan, ctx=ctx)
            break
    return plan


class PlanCache:
    """A small LRU of built plans.

    The key is the context's fingerprint (policy, secret seed, backend hooks and the valid
    prepared copies, see :attr:`PlanContext.fingerprint`), the normalized SQL (the same
    normalization as the replay key, memoized, so it costs nothing extra), epsilon and delta: any
    policy, config or source change gives new keys, so a stale plan is never reused. Plans are frozen
    and never mutated after building, so sharing them between queries is safe. Refusals are not cached.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._plans: OrderedDict[Hashable, DPPlan] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, sql: str, *, epsilon: float, delta: float, ctx: PlanContext) -> DPPlan:
        key = (ctx.fingerprint, normalize(sql), epsilon, delta)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan if plan.sql == sql else plan.with_(sql=sql)
        plan = build_plan(sql, epsilon=epsilon, delta=delta, ctx=ctx)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        return plan
