"""SQL text to a frozen, costed, bounded :class:`DPPlan`: a tuple of small passes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import replace

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
from dpgateway.postprocess import post_processing_sql
from dpgateway.sqlparse import alias_free, normalize, parse

Pass = Callable[..., DPPlan]

PASSES: tuple[Pass, ...] = (
    resolve_table,  # FROM -> policy table; public-only queries pass through
    plan_groups,  # GROUP BY -> keys, public or private domains
    plan_aggregates,  # aggregates -> measurements; SELECT/HAVING/ORDER BY -> post-processing
    make_total,  # WHERE and GROUP BY keys never fail on a row (no data-dependent errors)
    choose_rewrite,  # bounding estimator: 'weighted', 'unit_*' (per unit) or 'rows' (private keys)
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


def _with_aliases(plan: DPPlan, aliases: tuple[str | None, ...]) -> DPPlan:
    """A cached plan with the output names of the query at hand (the plans differ in nothing else)."""
    outputs = tuple(o if a is None else replace(o, name=a) for o, a in zip(plan.outputs, aliases, strict=True))
    if outputs == plan.outputs:
        return plan
    if plan.post_python is not None:  # the sandbox query only if the Python form declines: rendered then
        return plan.renamed(outputs=outputs, post_sql="")
    renamed = plan.renamed(outputs=outputs)
    return renamed.renamed(post_sql=post_processing_sql(renamed)) if plan.post_sql else renamed


class PlanCache:
    """A small LRU of built plans.

    The key is the context's fingerprint (policy, secret seed, backend hooks and the valid
    prepared copies, see :attr:`PlanContext.fingerprint`), the normalized SQL (the same
    normalization as the replay key, memoized, so it costs nothing extra), epsilon and delta: any
    policy, config or source change gives new keys, so a stale plan is never reused. Plans are frozen
    and never mutated after building, so sharing them between queries is safe. Refusals are not cached.

    DP plans are keyed without their output aliases (:func:`alias_free`): two queries that differ only
    in the names of their outputs share one plan, and the names are set on the copy handed out. Output
    names reach only the released column names and the post-processing query (whose columns are read by
    position); the bounded SQL, measurements, costs and noise do not depend on them. A query whose alias
    appears anywhere else keys on its full text, and so do passthrough plans (their SQL carries the aliases).
    A renamed copy is also kept under its own text's key, so a repeated text gets the same plan object
    (no renaming, and per-plan memos such as the result typing stay warm).
    Test: tests/test_fastpath.py::test_plans_are_shared_by_queries_that_differ_only_in_output_aliases.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._plans: OrderedDict[Hashable, DPPlan] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, sql: str, *, epsilon: float, delta: float, ctx: PlanContext) -> DPPlan:
        free = alias_free(sql)
        full_key = (ctx.fingerprint, normalize(sql), epsilon, delta)
        free_key = (ctx.fingerprint, "\x00" + free[0], epsilon, delta) if free else None
        with self._lock:
            plan = self._plans.get(full_key)  # this text (normalized) before: passthrough, or a renamed copy
            if plan is not None:
                self._plans.move_to_end(full_key)
                return plan if plan.sql == sql else plan.renamed(sql=sql)
            plan = self._plans.get(free_key) if free_key is not None else None
            if plan is not None and free is not None:
                self._plans.move_to_end(free_key)
                plan = _with_aliases(plan, free[1])
                plan = plan if plan.sql == sql else plan.renamed(sql=sql)
                self._remember(full_key, plan)  # the next time this text comes, no renaming
                return plan
        plan = build_plan(sql, epsilon=epsilon, delta=delta, ctx=ctx)
        key = free_key if free_key is not None and not plan.passthrough else full_key
        with self._lock:
            self._remember(key, plan)
        return plan

    def _remember(self, key: Hashable, plan: DPPlan) -> None:
        """Store ``plan`` (the lock is held), dropping the least recently used beyond ``maxsize``."""
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.maxsize:
            self._plans.popitem(last=False)
