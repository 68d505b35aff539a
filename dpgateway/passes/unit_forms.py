"""Per-unit pre-aggregated forms of the bounded SQL for scalar queries (no GROUP BY): one ``GROUP BY unit``
instead of a per-row window or join (passes/rewrite.py chooses them; passes/bounding.py dispatches here).

- ``unit_count`` (scalar ``COUNT(*)``): ``SUM(LEAST(n_u, k))`` over units (proof note in :func:`unit_count`);
- ``unit_weighted`` (other scalar queries, unfiltered or filtered under ``prepare.filtered: filter_first``)::

    WITH typed AS (...),
         per_unit AS (SELECT COUNT(*) AS __n, SUM(<fixed-point value>) AS m0, COUNT(x) * S AS m1, ...
                      FROM typed WHERE (<where>) AND NOT unit IS NULL GROUP BY unit)
    SELECT SUM(<unit_contribution(m0)>) AS m0, ... FROM per_unit

Proof note (unit_weighted): one ``GROUP BY unit`` over the matching rows (NULL units dropped) gives each
unit's ``n_u`` (its matching *rows*: ``COUNT(*)``, whatever the measurement) and, per measurement, its total
``T_u = sum_r v(r)`` of the per-row fixed-point values ``v`` of the weighted rewrite (passes/sql_parts.py:
clamped, centred, rounded, ``|v| <= V = ceil(bound * scale)``; NULL rows add nothing); for ``COUNT(x)``,
``T_u = S * COUNT(x)``, the non-NULL rows times the count scale (``V = S``, bound 1). ``T_u`` is summed as
DOUBLE (exact while partial sums stay below 2^53: up to about 9 * 10^9 rows of one unit), or as the engine's
exact integer SUM where the hooks say so (``SQLHooks.UNIT_TOTALS_AS_DOUBLE``; no backend does today). The unit adds ``t_u = clamp(trunc(T_u * k / max(n_u, k)), -k * V, k * V)``, the truncation toward zero
computed exactly in BIGINT (:func:`unit_contribution`), or NULL when ``T_u`` is (no non-NULL value);
``COUNT(*)`` adds ``min(n_u, k) * S``, its exact ``trunc``. The weight's ``n_u`` counts rows, as the per-row
weighted rewrite's does, not non-NULL values: ``|T_u| <= (non-NULL rows) * V <= n_u * V``, so
``|T_u * k / max(n_u, k)| <= min(n_u, k) * V <= k * V`` and the clamp changes nothing while the sum is exact;
it is there so that ``|t_u| <= k * V`` holds whatever the arithmetic does (``T_u`` is also clamped to
``+-2^53`` before the cast, so the cast cannot fail). Adding or removing ``u`` changes no other unit's
``n``, ``T`` or ``t``, and moves each scalar measurement by ``|t_u| <= k * ceil(bound * scale)``: the
sensitivity passes/budget.py charges, the same as the weighted rewrite's. It is the weighted estimator with
the truncation applied once per unit instead of once per row: it differs from the sum of per-row
contributions by less than one fixed-point unit per row of a unit with more than ``k`` rows (units of at
most ``k`` rows have weight 1 and no truncation; docs/sql.md). Tests: tests/test_fastpath.py (one person with
many rows, negative values, NULLs, filtered and unfiltered; an independent per-unit reference),
tests/test_rewrite.py, tests/backends/test_conformance.py.

Proof note (stored unit contributions): a prepared copy stores, for every measurement of
:func:`dpgateway.passes.sql_parts.stored_contributions`, ``t_u`` on the unit's row of keyed-hash rank 1 (NULL
on its other rows; every unit has exactly one such row), computed by :func:`unit_contribution` from
``n_u`` and ``T_u`` taken as window aggregates over the unit's rows (all of them: the copy is unfiltered),
i.e. the same integers the on-the-fly ``GROUP BY unit`` of an unfiltered query sums. An unfiltered
``unit_weighted`` query over the copy sums those columns (passes/bounding.py), so its exact aggregates equal
the on-the-fly ones and a copy changes no answer. Test:
tests/test_prepare.py::test_prepared_contributions_give_the_on_the_fly_weighted_aggregates_for_every_kind,
tests/test_fastpath.py::test_one_person_with_many_rows_moves_each_aggregate_by_at_most_its_sensitivity (over a
copy too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.helper import find_new_name

from dpgateway.passes.context import PlanContext
from dpgateway.passes.sql_parts import (
    and_unit_not_null,
    contribution_key,
    fixed_point,
    needed_columns,
    rendered,
    source_rows,
    stored_contributions,
    stored_unit_contributions,
    unit_columns,
)
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Table
from dpgateway.sqlparse import number


def unit_count(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Scalar ``COUNT(*)`` by per-unit pre-aggregation: ``SUM(LEAST(n_u, k))`` over units.

    Proof note (exact equivalence): row bounding keeps ``min(n_u, k)`` of the ``n_u`` rows of unit
    ``u`` that pass the filter (which ones does not matter to a count), so the row-bounded count is
    ``sum_u min(n_u, k)``, computed here without ranking or hashing. The filter runs before the per-unit
    count exactly as before ranking, and NULL units are dropped as there. Adding one unit adds one
    term ``min(n_u, k) <= k``: the sensitivity ``k`` of passes/budget.py holds. With GROUP BY, which
    ``k`` rows a unit keeps decides which groups it counts in, and for COUNT(x), SUM and the moments which
    rows are kept changes the value, so ``min`` per unit is not the row-bounded statistic there (scalar
    queries of those take ``unit_weighted``, the weighted estimator per unit). Tests: tests/test_fastpath.py.
    """
    assert table.privacy_unit is not None
    typed = source_rows(plan, needed_columns(plan, table), table, ctx)
    n, _ = unit_columns(table)
    per_unit = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), n, quoted=True), copy=False)
        .from_("typed", copy=False)
        .where(and_unit_not_null(plan.where.copy() if plan.where is not None else None, table), copy=False)
        .group_by(exp.column(table.privacy_unit, quoted=True), copy=False)
    )
    k = exp.Literal.number(table.max_rows_per_unit)
    total = exp.Sum(this=exp.Least(this=exp.column(n, quoted=True), expressions=[k], ignore_nulls=True))
    name = plan.measurements[0].name
    bounded = exp.select(exp.alias_(total, name, quoted=True), copy=False).from_("per_unit", copy=False)
    bounded = bounded.with_("typed", as_=typed, copy=False).with_("per_unit", as_=per_unit, copy=False)
    return rendered(plan, bounded, table.name, ctx, settings=ctx.hooks.per_unit_settings())


def unit_weighted(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """Scalar measurements by per-unit pre-aggregation, each unit's total weighted once (proof note above)."""
    assert not plan.group_keys
    parts = unit_totals(plan, table, ctx)
    sums = zip(plan.measurements, parts.contributions, strict=True)
    bounded = exp.select(*(exp.alias_(exp.Sum(this=c), m.name, quoted=True) for m, c in sums), copy=False)
    bounded = bounded.from_("weights", copy=False)
    return rendered(plan, parts.statement(bounded), table.name, ctx)


@dataclass(frozen=True)
class UnitTotals:
    """The CTEs of a per-unit form, and each measurement's per-unit contribution ``t_u`` over ``weights``.

    ``per_unit`` is one ``GROUP BY unit`` over the matching ``typed`` rows (NULL units dropped) with ``n_u``
    and each measurement's ``T_u``; ``weights`` holds, per unit, each total clamped and cast to BIGINT next to
    ``d = max(n_u, k)`` (named once, so the engine computes each once per unit, not once per use in the final
    expression; :func:`unit_contribution` is the same arithmetic inline). A caller may add columns to both
    (passes/unit_grouped.py: each unit's group keys) before :meth:`statement`."""

    typed: exp.Select
    per_unit: exp.Select
    weights: exp.Select
    contributions: tuple[exp.Expr, ...]

    def statement(self, final: exp.Select) -> exp.Select:
        """``final`` (a query over ``weights``) with the three CTEs."""
        final = final.with_("typed", as_=self.typed, copy=False).with_("per_unit", as_=self.per_unit, copy=False)
        return final.with_("weights", as_=self.weights, copy=False)


def unit_totals(plan: DPPlan, table: Table, ctx: PlanContext, taken: frozenset[str] = frozenset()) -> UnitTotals:
    """The per-unit CTEs of ``plan``'s measurements (proof note above); ``taken``: more names to avoid."""
    assert table.privacy_unit is not None
    typed = source_rows(plan, needed_columns(plan, table), table, ctx)
    n, _ = unit_columns(table)
    names = {c.name for c in table.columns} | {n} | {m.name for m in plan.measurements} | set(taken)
    d = find_new_name(names, "__d")
    names.add(d)
    k = table.max_rows_per_unit
    as_double = ctx.hooks.UNIT_TOTALS_AS_DOUBLE
    per_unit = exp.select(exp.alias_(exp.Count(this=exp.Star()), n, quoted=True), copy=False)
    greatest = exp.Greatest(this=exp.column(n, quoted=True), expressions=[number(k)], ignore_nulls=True)
    weights = exp.select(exp.column(n, quoted=True), exp.alias_(greatest, d, quoted=True), copy=False)
    contributions: list[exp.Expr] = []
    for m in plan.measurements:
        total = unit_total(m, None, as_double)
        if total is None:  # COUNT(*): trunc(n_u * S * k / max(n_u, k)) = min(n_u, k) * S
            contributions.append(_contribution(m, m.name, n, k))
            continue
        per_unit = per_unit.select(exp.alias_(total, m.name, quoted=True), copy=False)
        t = find_new_name(names, f"{m.name}_t")
        names.add(t)
        weights = weights.select(
            exp.column(m.name, quoted=True), exp.alias_(_as_bigint(exp.column(m.name, quoted=True)), t, quoted=True)
        )
        weighted = _weighted_total(exp.column(t, quoted=True), exp.column(d, quoted=True), k, _bound(m))
        contributions.append(_present(exp.column(m.name, quoted=True), weighted))
    where = plan.where.copy() if plan.where is not None else None
    per_unit = (
        per_unit.from_("typed", copy=False)
        .where(and_unit_not_null(where, table), copy=False)
        .group_by(exp.column(table.privacy_unit, quoted=True), copy=False)
    )
    return UnitTotals(typed, per_unit, weights.from_("per_unit", copy=False), tuple(contributions))


def _bound(m: Measurement) -> int:
    """``V = ceil(bound * scale)``: the largest ``|v|`` of one row of ``m``."""
    return math.ceil(m.bound * m.scale)


def unit_total(m: Measurement, unit: exp.Expr | None, as_double: bool) -> exp.Expr | None:
    """The unit's total ``T_u`` of measurement ``m`` (None for ``COUNT(*)``, which needs only ``n_u``): an
    aggregate under ``GROUP BY unit``, or with ``unit`` given the same aggregate as a window over the unit."""
    if m.kind == "count" and m.arg is None:
        return None
    if m.kind == "count":  # COUNT(x): x a column or a total row expression (passes/intervals.py)
        assert m.arg is not None
        count: exp.Expr = _over(exp.Count(this=m.arg.copy()), unit)
        return exp.Mul(this=exp.cast(count, "DOUBLE") if as_double else count, expression=number(int(m.scale)))
    value = fixed_point(m)
    return _over(exp.Sum(this=exp.cast(value, "DOUBLE") if as_double else value), unit)


def _over(aggregate: exp.Expr, unit: exp.Expr | None) -> exp.Expr:
    return aggregate if unit is None else exp.Window(this=aggregate, partition_by=[unit.copy()])


def _contribution(m: Measurement, total: str, n: str, k: int) -> exp.Expr:
    """The unit's ``t_u`` from its ``n_u`` (column ``n``) and its total ``T_u`` (column ``total``)."""
    if m.kind == "count" and m.arg is None:  # trunc(n_u * S * k / max(n_u, k)) = min(n_u, k) * S
        least = exp.Least(this=exp.column(n, quoted=True), expressions=[number(k)], ignore_nulls=True)
        return exp.Mul(this=least, expression=number(int(m.scale)))
    return unit_contribution(exp.column(total, quoted=True), n, k, _bound(m))


def stored_unit_columns(table: Table, as_double: bool) -> tuple[list[exp.Expr], list[exp.Expr]]:
    """A prepared copy's stored ``t_u`` (proof note above): the window totals its ranked rows carry, and the
    stored columns, each ``t_u`` on the unit's row of rank 1, NULL on its other rows."""
    assert table.privacy_unit is not None
    unit = exp.column(table.privacy_unit, quoted=True)
    n, rn = unit_columns(table)
    k = table.max_rows_per_unit
    windows: list[exp.Expr] = []
    stored: list[exp.Expr] = []
    names = stored_unit_contributions(table)
    for (_, m), (name, total) in zip(stored_contributions(table), names, strict=True):
        window = unit_total(m, unit, as_double)
        if window is not None:
            windows.append(exp.alias_(window, total, quoted=True))
        first = exp.EQ(this=exp.column(rn, quoted=True), expression=exp.Literal.number(1))
        stored.append(
            exp.alias_(exp.Case(ifs=[exp.If(this=first, true=_contribution(m, total, n, k))]), name, quoted=True)
        )
    return windows, stored


def stored_unit_column(m: Measurement, table: Table) -> str | None:
    """The prepared copy's column of ``t_u`` for measurement ``m``, or None when the copy stores none."""
    key = contribution_key(m)
    stored = zip(stored_contributions(table), stored_unit_contributions(table), strict=True)
    return next((name for (_, s), (name, _) in stored if contribution_key(s) == key), None)


def unit_weighted_over_copy(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """An unfiltered ``unit_weighted`` query over a prepared copy: the sum of each measurement's stored ``t_u``
    (proof note above; passes/prepared.py offers the copy only when every measurement has its column)."""
    assert plan.prepared is not None and plan.where is None and not plan.group_keys
    found = {m.name: stored_unit_column(m, table) for m in plan.measurements}
    columns = {name: column for name, column in found.items() if column is not None}
    assert len(columns) == len(found)
    names = sorted(set(columns.values()))
    typed = exp.select(*(exp.column(name, quoted=True) for name in names), copy=False)
    typed = typed.from_(ctx.hooks.file_source(plan.prepared), copy=False)
    bounded = exp.select(
        *(
            exp.alias_(exp.Sum(this=exp.column(columns[m.name], quoted=True)), m.name, quoted=True)
            for m in plan.measurements
        ),
        copy=False,
    ).from_("typed", copy=False)
    bounded = bounded.with_("typed", as_=typed, copy=False)
    return rendered(plan, bounded, f"{table.name} (prepared copy)", ctx)


def unit_contribution(total: exp.Expr, n: str, k: int, v: int) -> exp.Expr:
    """``clamp(trunc(T * k / max(n, k)), -k v, k v)`` as a BIGINT, NULL when the unit total ``T`` is.

    ``T`` (an integer, or an integer-valued DOUBLE) is clamped to ``+-2^53`` and cast to BIGINT; then, with
    ``d = max(n, k)`` and ``//`` truncating, ``trunc(T k / d) = (T // d) k + ((T - (T // d) d) k) // d``
    (quotient and remainder share the sign of ``T``), in BIGINT: ``|T // d| k <= 2^53`` since ``d >= k``, and
    the remainder times ``k`` is below ``d k``, which fits for any unit of fewer than about ``9 * 10^18 / k``
    rows (``9 * 10^14`` at the largest ``k``, 10^4), far beyond any table a backend could scan.
    """
    d = exp.Greatest(this=exp.column(n, quoted=True), expressions=[number(k)], ignore_nulls=True)
    return _present(total, _weighted_total(_as_bigint(total), d, k, v))


def _as_bigint(total: exp.Expr) -> exp.Expr:
    """``T`` clamped to ``+-2^53`` and cast to BIGINT (exact for every integer-valued total below 2^53)."""
    limit = 2**53
    clamped = exp.Least(
        this=exp.Greatest(this=total.copy(), expressions=[number(-limit)], ignore_nulls=True),
        expressions=[number(limit)],
        ignore_nulls=True,
    )
    return exp.cast(clamped, "BIGINT")


def _present(total: exp.Expr, value: exp.Expr) -> exp.Expr:
    # GREATEST and LEAST skip NULLs: a unit whose values are all NULL must add nothing, not the lower clamp
    return exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=total.copy(), expression=exp.Null())), true=value)])


def _weighted_total(t: exp.Expr, d: exp.Expr, k: int, v: int) -> exp.Expr:
    """``clamp((t // d) k + ((t - (t // d) d) k) // d, -k v, k v)`` for BIGINT ``t`` and ``d = max(n, k)``."""
    quotient = exp.Paren(this=exp.IntDiv(this=t.copy(), expression=d.copy()))
    remainder = exp.Paren(this=exp.Sub(this=t.copy(), expression=exp.Mul(this=quotient.copy(), expression=d.copy())))
    weighted = exp.Add(
        this=exp.Mul(this=quotient.copy(), expression=number(k)),
        expression=exp.IntDiv(this=exp.Mul(this=remainder, expression=number(k)), expression=d.copy()),
    )
    return exp.Least(
        this=exp.Greatest(this=weighted, expressions=[number(-k * v)], ignore_nulls=True),
        expressions=[number(k * v)],
        ignore_nulls=True,
    )
