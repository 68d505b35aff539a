"""Pass 5: choose the contribution-bounding rewrite for the query's shape, before the budget is split.

- ``rows``: hash-ordered row bounding (each unit keeps ``k`` of its matching rows). Required when the
  group keys are private: partition selection needs each unit to touch at most ``k`` groups, which only
  dropping rows gives. Also tables without a privacy unit (row-level: nothing to bound).
- ``unit_count``: scalar ``COUNT(*)``, ``SUM(LEAST(n_u, k))`` per unit: exactly the row-bounded count
  (and the weighted count divided by its scale), with a GROUP BY instead of a window over all rows.
- ``unit_weighted``: other scalar queries, unfiltered or with WHERE under ``filter_first``: the weighted
  estimator by per-unit pre-aggregation (each unit's total weighted once; a GROUP BY instead of a window or
  a join; a prepared copy stores each unit's total contribution too). Filtered ``bound_first`` queries keep
  ``weighted`` (a unit's weight from all of its rows, the filter on each row), and so do tables the ``he``
  executor may answer (its encrypted cube holds per-row contributions only).
- ``unit_grouped``: grouped queries (public keys) whose keys read only columns declared ``per_unit`` (a person
  attribute), unfiltered or under ``filter_first``, on tables no per-row-only executor may answer: one
  ``GROUP BY unit``, each unit's total weighted once in the cell of its keys' smallest values
  (passes/unit_grouped.py, with its proof notes: the sensitivity holds even when the data breaks the declaration).
- ``weighted``: everything else (public or no group keys): each row counts with its unit's weight
  ``k / max(n_u, k)``. Counts become fixed-point sums, so ``passes/budget.py`` reads this choice.

Filtered queries bound in one of two orders, fixed by the config (``prepare.filtered``), never by whether a
prepared copy exists: ``filter_first`` (default) bounds each unit's *matching* rows; ``bound_first``
bounds over all of a unit's rows (its ``n_u`` and keyed-hash ranks ignore the filter), then filters, which
a prepared copy answers from its stored columns. A filtered scalar ``COUNT(*)`` under ``bound_first`` is
``weighted`` (``SUM(LEAST(n_u, k))`` would need the unfiltered ranks). Proof notes: passes/bounding.py.

The SQL of each, and the proof notes, are in ``passes/bounding.py``.
"""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.passes.groups import public_cells
from dpgateway.passes.quantiles import needs_row_bounding
from dpgateway.passes.unit_grouped import per_unit_keys, per_unit_note
from dpgateway.plan import DPPlan

FILTER_FIRST_NOTE = (
    "estimator for this filtered query: filter first (prepare.filtered: filter_first): each unit is bounded over "
    "its matching rows only; prepared copies are not read"
)
BOUND_FIRST_NOTE = (
    "estimator for this filtered query: bound first, filter after (prepare.filtered: bound_first): each unit's "
    "weight or k kept rows come from all of its rows, then the filter applies; a unit with more than k rows "
    "counts k / (its rows) of its matching rows, whatever the filter"
)

PER_ROW_EXECUTORS = frozenset({"he"})
"""Executors that answer weighted queries from stored per-row contributions only (executors/he/cube.py)."""


def choose_rewrite(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Set ``plan.rewrite`` to 'rows', 'unit_count', 'unit_weighted', 'unit_grouped' or 'weighted', and say which
    filtered estimator applies."""
    table = plan.table
    assert table is not None
    if plan.where is not None and table.privacy_unit:
        plan = plan.with_(
            notes=(*plan.notes, BOUND_FIRST_NOTE if bounds_before_filter(plan, ctx) else FILTER_FIRST_NOTE)
        )
    if not table.privacy_unit or (plan.group_keys and public_cells(plan.group_keys) is None):
        return plan.with_(rewrite="rows")
    if needs_row_bounding(plan):  # quantiles and distinct counts need kept rows (passes/quantiles.py)
        return plan.with_(rewrite="rows")
    scalar_count = [(m.kind, m.arg) for m in plan.measurements] == [("count", None)]
    if not plan.group_keys and scalar_count and not bounds_before_filter(plan, ctx):
        return plan.with_(rewrite="unit_count")
    per_row_only = bool({table.executor, *table.executors_allowed} & PER_ROW_EXECUTORS)
    if bounds_before_filter(plan, ctx) or per_row_only:
        return plan.with_(rewrite="weighted")
    if not plan.group_keys:
        return plan.with_(rewrite="unit_weighted")
    declared = per_unit_keys(plan, table)
    if declared is not None:
        return plan.with_(rewrite="unit_grouped", notes=(*plan.notes, per_unit_note(declared)))
    return plan.with_(rewrite="weighted")


def bounds_before_filter(plan: DPPlan, ctx: PlanContext) -> bool:
    """Whether this query bounds over all of each unit's rows and filters after (``prepare.filtered``)."""
    table = plan.table
    filtered = plan.where is not None and table is not None and table.privacy_unit is not None
    return filtered and ctx.config.prepare.filtered == "bound_first"
