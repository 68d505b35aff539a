"""Pass 7: read a prepared copy of the table instead of computing unit row counts and ranks on the fly.

Proof note (prepared copy): ``dpgateway prepare`` stores every row whose unit is not NULL (typed,
unclamped, clustered by unit) with two columns: the unit's row count ``n_u`` and the row's rank by the
keyed hash over all declared columns within its unit (``dpgateway/prepare.py``). For a query *without
WHERE* these are exactly what the on-the-fly rewrites compute: the weighted rewrite's ``n_u`` is the
unit's count of matching rows, here all of them; row bounding keeps the rows of rank ``<= k``. So the
exact bounded aggregates over the copy equal the on-the-fly ones, and the sensitivity arguments of
``passes/bounding.py`` and ``passes/budget.py`` apply unchanged. A query with WHERE computes weights and
ranks over the *matching* rows on the fly; the stored ones count all rows, so using them would be a
different (still bounded, but less accurate) estimator: filtered queries do not use the copy. A copy is
only offered here when the gateway found it valid for the current source file (mtime and size) and
policy (policy hash and secret seed identity). Tests: tests/test_prepare.py, tests/test_fastpath.py.
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
    return plan.with_(
        prepared=copy.path,
        notes=(*plan.notes, "reads the prepared copy (`dpgateway prepare`): stored unit row counts and ranks"),
    )
