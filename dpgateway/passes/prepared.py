"""Pass 6: read a prepared (pre-bounded) copy of the table instead of bounding on the fly.

Proof note (prepared copy): ``dpgateway prepare`` keeps, for each privacy unit, the ``k`` rows that the
on-the-fly rewrite keeps for an *unfiltered* query: the smallest keyed hashes over all declared
columns (typed), with NULL units dropped (``dpgateway/prepare.py``). So for a query without WHERE the
bounded aggregates over the copy equal the on-the-fly ones exactly, and the sensitivity argument of
``passes/budget.py`` applies unchanged. A query with WHERE filters before bounding on the fly (each unit
keeps up to ``k`` *matching* rows); over the copy it would filter after bounding, which is still DP with
the same sensitivity but a different, usually less accurate estimate, so filtered queries do not use
the copy. A copy is only offered here when the gateway found it valid for the current source file
(mtime and size) and policy (policy hash and secret seed identity). Tests: tests/test_prepare.py.
"""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan


def use_prepared_copy(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Swap the source for a valid prepared copy when the query has no WHERE."""
    table = plan.table
    if table is None or not table.privacy_unit or plan.where is not None or not plan.measurements:
        return plan
    copy = ctx.prepared_copy(table.name)
    if copy is None or copy.k != table.max_rows_per_unit:
        return plan
    return plan.with_(prepared=copy.path, notes=(*plan.notes, "reads the prepared bounded copy"))
