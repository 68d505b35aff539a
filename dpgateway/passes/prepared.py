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
only offered here when the gateway found it valid for the current source file (inode, size, mtime, ctime) and
policy (policy hash, secret seed identity and fixed-point constants). Tests: tests/test_prepare.py,
tests/test_fastpath.py.

Proof note (stored weighted contributions): the copy also stores, per row ``r`` of unit ``u``, the
integer ``c_m(r) = trunc(v_m(r) * k / max(n_u, k))`` (NULL when the column is NULL) for every
measurement ``m`` of :func:`dpgateway.passes.bounding.stored_contributions`: ``COUNT(*)``, ``COUNT(x)``
for each column, and ``SUM(x)``, ``SUM(x - c)``, ``SUM((x - c)^2)`` for each bounded numeric column.
``v_m(r)`` (clamp to the bounds, centre, square, ``round(. * scale)``, or ``S`` for a count) depends only
on the row's typed value, on ``(kind, column, centre, squared, scale)`` and on ``k``; centre
(mid-point of the bounds), bound and scale (``budget.fixed_point_scale(bound)``, ``COUNT_SCALE``) are
functions of the policy and of code constants only, and all of those are in the copy's validity digest
(``dpgateway/prepare.py``: a change of bounds, ``k``, types or constants makes the copy invalid, so it
is not read). ``c_m(r)`` is computed at ``prepare`` time by the same SQL expression
(``bounding._weighted_value``) over the same typed values and the same unfiltered ``n_u`` that an
unfiltered weighted query evaluates per row. A weighted query reads ``c_m`` only for a measurement whose
``(kind, column, centre, squared, scale)`` equals the stored one, and sums it per group: the per-row
integers are identical and integer sums are exact and order-independent, so the exact bounded
aggregates are equal, NULLs included (both skip them); any other measurement is weighted from the stored
``n_u`` as before. Equality of the exact aggregates means the sensitivity argument of
``passes/bounding.py`` (weighted) applies unchanged; nothing about the stored contributions is released
other than through those noised sums.
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
        notes=(
            *plan.notes,
            "reads the prepared copy (`dpgateway prepare`): stored weighted contributions, unit row counts and ranks",
        ),
    )
