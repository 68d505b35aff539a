"""Grouped queries by person attributes: ``unit_grouped``, one ``GROUP BY unit`` and each unit's total weighted once.

A column declared ``per_unit: true`` (policies/model.py) has, by the data owner's word, one value for all the rows
of a privacy unit (a person attribute: region, sex, birth cohort). A grouped query whose public group keys read
only such columns (and literals) is then answered per unit instead of per row (passes/rewrite.py chooses it; the
conditions are there)::

    WITH typed AS (...),
         per_unit AS (SELECT COUNT(*) AS __n, <T_u of each measurement>, MIN(<key 0>) AS __g0, ...
                      FROM typed WHERE (<where>) AND NOT unit IS NULL GROUP BY unit),
         weights AS (SELECT __n, GREATEST(__n, k) AS __d, <T_u and its BIGINT cast>, __g0, ... FROM per_unit)
    SELECT __g0, ..., SUM(<t_u of each measurement>) AS __m0, ... FROM weights GROUP BY __g0, ...

``per_unit``, ``weights`` and ``t_u`` are exactly those of the scalar ``unit_weighted`` form
(passes/unit_forms.py, :func:`~dpgateway.passes.unit_forms.unit_totals`), with each group key's smallest value
over the unit's matching rows added (a boolean key as ``MIN(CAST(key AS INT))``, cast back: PostgreSQL has no
``MIN`` of booleans). The join back of every row to its unit's ``n_u`` that the per-row ``weighted`` form needs
is gone: the per-person GROUP BY is the whole work (bench/README.md, session 9).

Proof note (sensitivity, whether or not the data keeps the declaration): neighbouring datasets differ by one
unit ``u`` with all its rows. ``per_unit`` has one row per unit (GROUP BY unit, NULL units dropped, the filter
read one row at a time), a function of that unit's own matching rows only: its ``n_u``, its totals ``T_u``, and
its cell ``(MIN(key 0), ...)``, each the smallest value of a key over the unit's rows (whatever values they hold:
the declaration is not relied on). So adding or removing ``u`` changes no other unit's row, and adds or removes
exactly one term ``t_u`` per measurement, in exactly one cell (NULL keys included: ``MIN`` of only NULLs is NULL,
the NULL cell). By the proof note of passes/unit_forms.py, ``|t_u| <= k * V`` with ``V = ceil(bound * scale)``
(``S`` for counts); the vector of per-cell values of each measurement thus moves by at most ``k * V`` in L1
(and L2): the sensitivity passes/budget.py charges for ``weighted``, with the same fixed-point scales. Which
cells are released is fixed by the public domains (passes/groups.py), as for ``weighted``: a unit whose cell is
outside them (a value not in ``public_values``, a NULL key) adds to no released cell. Data that breaks the
declaration (a person with rows in several cells) costs accuracy only: all of the person's contribution is
counted in the cell of their smallest key value (for text keys, in the engine's order). Tests:
tests/test_unit_grouped.py (a person with many rows spread over every cell, negative values, NULLs),
tests/backends/test_conformance.py.

Proof note (the weighted estimator, when the declaration holds): all of ``u``'s matching rows then have one key
value, so ``MIN`` is that value and ``u``'s rows all fall in the cell the ``weighted`` form gives them. There
they add ``sum_r trunc(v(r) * k / max(n_u, k))``; here ``trunc(T_u * k / max(n_u, k))`` with ``T_u = sum_r v(r)``:
the same weighted estimator, truncated once per unit instead of once per row (less than one fixed-point unit per
row of a unit with more than ``k`` rows; equal for units of at most ``k`` rows, weight 1). For ``COUNT(*)`` the
unit adds ``min(n_u, k) * S``: exactly the row-bounded count, where the per-row form adds ``n_u * trunc(S k /
n_u)``. Test: tests/test_unit_grouped.py (an independent per-unit reference; the weighted form within the
truncation).

Proof note (over a prepared copy; unfiltered queries only: filtered ones bound on the fly, passes/prepared.py):
the copy stores each unit's ``t_u`` of every stored measurement on its row of keyed-hash rank 1, computed from
the same ``n_u`` and ``T_u`` as the on-the-fly ``GROUP BY unit`` (passes/unit_forms.py), and every row's typed
columns. The query sums those ``t_u`` grouped by the keys of the rank-1 rows (every unit has exactly one). That
row is chosen by the keyed hash of the unit's own rows, so each unit still adds one ``t_u`` to one cell, chosen
by its own rows: the sensitivity above holds unchanged. When the declaration holds, the rank-1 row's key values
are the unit's only ones, its ``MIN``: the exact aggregates equal the on-the-fly ones. When the data breaks it, a
unit's cell may differ between the copy (its rank-1 row's) and on the fly (its smallest key), at the same cost.
Test: tests/test_unit_grouped.py::test_a_prepared_copy_gives_the_on_the_fly_aggregates.
"""

from __future__ import annotations

from dataclasses import replace

from sqlglot import exp

from dpgateway.passes.context import PlanContext
from dpgateway.passes.sql_parts import rendered, unit_columns
from dpgateway.passes.unit_forms import stored_unit_column, unit_totals
from dpgateway.plan import DPPlan, GroupKey
from dpgateway.policies.model import Table


def per_unit_keys(plan: DPPlan, table: Table) -> tuple[str, ...] | None:
    """The declared ``per_unit`` columns the group keys read, or None when a key reads any other column (or
    there are no keys). A key of literals only reads nothing and qualifies."""
    if not plan.group_keys:
        return None
    read: dict[str, None] = {}
    for key in plan.group_keys:
        for node in key.expr.find_all(exp.Column):
            column = table.column(node.name)
            if column is None or not column.per_unit:
                return None
            read[column.name] = None
    return tuple(read)


def per_unit_note(columns: tuple[str, ...]) -> str:
    """What ``explain`` says about the form."""
    declared = ", ".join(columns) if columns else "none: literal keys"
    return (
        f"group keys read only columns declared per_unit ({declared}): each unit's rows are pre-aggregated once and "
        "its whole weighted total counts in one cell, its smallest key value (unit_grouped); rows of one unit with "
        "different values cost accuracy, never privacy"
    )


def unit_grouped(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """The grouped measurements by per-unit pre-aggregation, each unit in the cell of its keys' ``MIN`` (proof notes
    above)."""
    assert table.privacy_unit is not None and plan.group_keys
    parts = unit_totals(plan, table, ctx, taken=frozenset(k.name for k in plan.group_keys))
    per_unit, weights = parts.per_unit, parts.weights
    for key in plan.group_keys:
        boolean = _boolean(key)
        value = exp.cast(key.expr.copy(), "INT") if boolean else key.expr.copy()
        per_unit = per_unit.select(exp.alias_(exp.Min(this=value), key.name, quoted=True), copy=False)
        cell: exp.Expr = exp.column(key.name, quoted=True)
        weights = weights.select(exp.alias_(exp.cast(cell, "BOOLEAN"), key.name, quoted=True) if boolean else cell)
    keys = [exp.column(k.name, quoted=True) for k in plan.group_keys]
    sums = zip(plan.measurements, parts.contributions, strict=True)
    final = exp.select(*keys, *(exp.alias_(exp.Sum(this=c), m.name, quoted=True) for m, c in sums), copy=False)
    final = final.from_("weights", copy=False).group_by(*(k.copy() for k in keys), copy=False)
    statement = replace(parts, per_unit=per_unit, weights=weights).statement(final)
    return rendered(plan, statement, table.name, ctx)


def _boolean(key: GroupKey) -> bool:
    """Whether the key's values are booleans: its public domain (passes/groups.py) holds booleans and NULL only."""
    values = [v for v in key.public_values or () if v is not None]
    return bool(values) and all(isinstance(v, bool) for v in values)


def copy_serves(plan: DPPlan, table: Table) -> bool:
    """Whether a prepared copy stores ``t_u`` for every measurement (else the query runs on the fly)."""
    return all(stored_unit_column(m, table) is not None for m in plan.measurements)


def unit_grouped_over_copy(plan: DPPlan, table: Table, ctx: PlanContext) -> DPPlan:
    """An unfiltered ``unit_grouped`` query over a prepared copy: the stored ``t_u`` of each unit's rank-1 row, summed
    by that row's keys (proof note above; passes/prepared.py offers the copy only when :func:`copy_serves`)."""
    assert plan.prepared is not None and plan.where is None and plan.group_keys
    found = {m.name: stored_unit_column(m, table) for m in plan.measurements}
    stored = {name: column for name, column in found.items() if column is not None}
    assert len(stored) == len(found)
    _, rn = unit_columns(table)
    read = {c.name for k in plan.group_keys for c in k.expr.find_all(exp.Column)}
    names = [*(c.name for c in table.columns if c.name in read), *sorted(set(stored.values())), rn]
    # The copy stores every column typed (passes/bounding.py prepared_copy_tree): read as stored.
    typed = exp.select(*(exp.column(name, quoted=True) for name in names), copy=False)
    typed = typed.from_(ctx.hooks.file_source(plan.prepared), copy=False)
    keys = [exp.alias_(k.expr.copy(), k.name, quoted=True) for k in plan.group_keys]
    first = exp.EQ(this=exp.column(rn, quoted=True), expression=exp.Literal.number(1))
    kept = exp.select(exp.Star(), *keys, copy=False).from_("typed", copy=False).where(first, copy=False)
    columns = [exp.column(k.name, quoted=True) for k in plan.group_keys]
    sums = [
        exp.alias_(exp.Sum(this=exp.column(stored[m.name], quoted=True)), m.name, quoted=True)
        for m in plan.measurements
    ]
    final = exp.select(*columns, *sums, copy=False).from_("kept", copy=False)
    final = final.group_by(*(c.copy() for c in columns), copy=False)
    final = final.with_("typed", as_=typed, copy=False).with_("kept", as_=kept, copy=False)
    return rendered(plan, final, f"{table.name} (prepared copy)", ctx)
