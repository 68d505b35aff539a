"""Make every expression evaluated on raw rows total, so that no value can make the backend fail.

Proof note (error side channel): the WHERE filter and the GROUP BY keys run on each raw row, before
bounding. If one of them could raise on some value (``CAST('x' AS INT)``, ``ABS`` of the smallest BIGINT,
a SUBSTRING offset out of range), whether the whole query fails would depend on one person's data,
outside the DP release; charging the budget for the failure does not make that private. The backend's
hook rewrites each into a total form (on DuckDB: casts to TRY_CAST, the whole expression under TRY), so
a row where it would fail yields NULL: the row is filtered out, or falls in the NULL group, a function
of that row alone. A binned key over bounded columns (passes/groups.py) is already total: passes/intervals.py
refused every operation that could fail within the declared bounds, and it reads the columns clamped.
Errors that remain are raised while binding, from the SQL and the schema alone.
Test: tests/attacks/test_side_channels.py::test_outcome_does_not_depend_on_one_person.
"""

from __future__ import annotations

from dataclasses import replace

from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan


def make_total(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Wrap the WHERE filter and each GROUP BY key in the backend's total form (outputs are already built)."""
    total = ctx.hooks.total
    return plan.with_(
        where=total(plan.where) if plan.where is not None else None,
        group_keys=tuple(
            replace(k, expr=k.bounded if k.bounded is not None else total(k.expr)) for k in plan.group_keys
        ),
    )
