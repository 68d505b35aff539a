"""Pass 5: choose the contribution-bounding rewrite for the query's shape, before the budget is split.

- ``rows``: hash-ordered row bounding (each unit keeps ``k`` of its matching rows). Required when the
  group keys are private: partition selection needs each unit to touch at most ``k`` groups, which only
  dropping rows gives. Also tables without a privacy unit (row-level: nothing to bound).
- ``unit_count``: scalar ``COUNT(*)``, ``SUM(LEAST(n_u, k))`` per unit: exactly the row-bounded count
  (and the weighted count divided by its scale), with a GROUP BY instead of a window over all rows.
- ``weighted``: everything else (public or no group keys): each row counts with its unit's weight
  ``k / max(n_u, k)``. Counts become fixed-point sums, so ``passes/budget.py`` reads this choice.

The SQL of each, and the proof notes, are in ``passes/bounding.py``.
"""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import public_cells
from dpgateway.plan import DPPlan


def choose_rewrite(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.rewrite`` to 'rows', 'unit_count' or 'weighted'."""
    table = plan.table
    assert table is not None
    if not table.privacy_unit or (plan.group_keys and public_cells(plan.group_keys) is None):
        return plan.with_(rewrite="rows")
    if not plan.group_keys and [(m.kind, m.column) for m in plan.measurements] == [("count", None)]:
        return plan.with_(rewrite="unit_count")
    return plan.with_(rewrite="weighted")
