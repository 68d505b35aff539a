"""Pass 7: read a prepared copy of the table instead of computing unit row counts and ranks on the fly.

Proof note (prepared copy): ``dpgateway prepare`` stores every row whose unit is not NULL (typed,
unclamped, clustered by unit) with two columns: the unit's row count ``n_u`` and the row's rank by the
keyed hash over all declared columns within its unit (``dpgateway/prepare.py``). For a query *without
WHERE* these are exactly what the on-the-fly rewrites compute: the weighted rewrite's ``n_u`` is the
unit's count of matching rows, here all of them; row bounding keeps the rows of rank ``<= k``. So the
exact bounded aggregates over the copy equal the on-the-fly ones, and the sensitivity arguments of
``passes/bounding.py`` and ``passes/budget.py`` apply unchanged. A query with WHERE computes weights and
ranks over the *matching* rows on the fly (``prepare.filtered: filter_first``, the default); the stored
ones count all rows, so those queries do not read the copy. Under ``bound_first`` a filtered query bounds
over all of each unit's rows and filters after, on the fly as over the copy (next note). A copy is
only offered here when the gateway found it valid for the current source (a file's inode, size, mtime, ctime; for a
folder, those of the folder and of every entry under it: dpgateway/prepare.py; for a PostgreSQL source the
same change count, identity and trigger state as at the build: proof note in connectors/postgres_copy.py) and
policy (policy hash, secret seed identity and fixed-point constants). The copy's columns hold the values
the ``typed`` CTE produced (each cast to its declared type, NaN as NULL, the unit on its exact identity),
and typing a typed value changes nothing, so a query reads them as stored, without casting again (which
also lets the engine push the filter into the scan). Tests: tests/test_prepare.py (NULLs, NaN and
infinities), tests/test_fastpath.py.

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

Proof note (bound first, filter after; ``prepare.filtered: bound_first``): the query's filter ``F`` is
applied to rows that are already bounded by their unit's *unfiltered* rows: row bounding keeps the rows of
``u`` with stored rank ``<= k`` and then those matching ``F``; the weighted rewrite sums the stored
``c_m(r)`` (computed with the unfiltered ``n_u``) over the rows of ``u`` matching ``F``. Rank, ``n_u`` and
``c_m(r)`` are functions of ``u``'s own rows, the secret key and the policy only (the notes above), and
``F`` is a predicate on one row at a time, so the rows ``u`` contributes are a subset, chosen by ``u``'s own
rows, of what the unfiltered query takes from ``u``. Adding or removing ``u`` therefore changes no other
unit's contribution and moves the vector of per-group values by at most what it moves unfiltered: for row
bounding at most ``k`` kept rows in at most ``k`` groups (each clamped to the bound, so the count and
partition-selection sensitivities hold), for the weighted rewrite
``sum_{r in u, F(r)} |c_m(r)| <= sum_{r in u} |c_m(r)| <= min(n_u, k) * ceil(bound * scale) <= k * bound``
in L1, whatever ``F`` is. The cold path under ``bound_first`` computes the same estimator on the fly (the
window count and rank over all of the unit's rows, the filter in the final aggregate;
``passes/bounding.py``), so a copy changes the speed of a query, never its answer or its cost. Tests:
tests/test_fastpath.py::test_bound_first_moves_each_aggregate_by_at_most_its_sensitivity,
tests/test_prepare.py::test_bound_first_filtered_queries_read_the_copy_and_give_the_on_the_fly_aggregates.

Proof note (stored unit contributions; unfiltered scalar queries, ``unit_weighted``): the copy stores each
unit's total contribution ``t_u`` on its row of rank 1, computed from the same ``n_u`` and unit totals as the
on-the-fly ``GROUP BY unit``; the query sums them (proof note in passes/unit_forms.py). A scalar query with a
measurement the copy stores no ``t_u`` for (an expression argument) runs on the fly. Unfiltered grouped queries by
``per_unit`` columns (``unit_grouped``) sum the same stored ``t_u``, grouped by the keys of each unit's rank-1 row:
the on-the-fly answer when the data keeps the declaration (proof note in passes/unit_grouped.py).

Joined relations, unit paths and per-person subqueries (``plan.relation``, passes/relations.py) never read a
copy: a copy's ranks and weights are one table's, not the joined relation's, so they are computed on the
fly. Test: tests/test_relations.py::test_joins_never_read_prepared_copies.
"""

from __future__ import annotations

from dpgateway.passes.context import PlanContext
from dpgateway.passes.rewrite import bounds_before_filter
from dpgateway.passes.unit_grouped import copy_serves
from dpgateway.plan import DPPlan


def use_prepared_copy(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Swap the source for a valid prepared copy when the query has no WHERE or bounds before filtering."""
    table = plan.table
    if table is None or not table.privacy_unit or not plan.measurements:
        return plan
    if plan.relation is not None:  # a copy holds one table's ranks and weights, not a joined relation's
        return plan
    if plan.where is not None and not bounds_before_filter(plan, ctx):
        return plan
    if plan.rewrite in ("unit_weighted", "unit_grouped") and not copy_serves(plan, table):
        return plan  # the copy stores each unit's total contribution only for the measurements it knows
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
