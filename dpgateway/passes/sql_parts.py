"""Pieces of the bounded SQL shared by passes/bounding.py and passes/unit_forms.py: the ``typed`` CTE, the
per-row fixed-point value, the unit's helper column names, and the plan's rendered (and shown) statement.

Proof note (fixed-point value): :func:`fixed_point` is a row's ``round((clamp(v) - c)^p * scale)`` as an
integer, NULL when ``v`` is: clamped to the measurement's bounds (declared, or derived by
passes/intervals.py and clamped again here), so ``|value| <= ceil(bound * scale)`` whatever floating point
did. Every rewrite's sensitivity argument starts from that bound (passes/bounding.py, passes/unit_forms.py).
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.helper import find_new_name

from dpgateway.passes.aggregates import moment_center, sum_bound
from dpgateway.passes.budget import COUNT_SCALE, fixed_point_scale
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan, Measurement
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import number


def unit_columns(table: Table) -> tuple[str, str]:
    """Names of the unit's row count and a row's keyed-hash rank (in the bounded SQL and a prepared copy)."""
    taken = {c.name for c in table.columns}
    return find_new_name(taken, "__n"), find_new_name(taken, "__rn")


def source_rows(plan: DPPlan, columns: list[Column], table: Table, ctx: PlanContext) -> exp.Select:
    """The ``typed`` CTE: the declared source's columns typed, or the joined relation's columns
    (passes/relations.py: its per-table typed CTEs are added to the statement by :func:`rendered`)."""
    if plan.relation is not None:
        return plan.relation.typed(c.name for c in columns)
    return typed_columns(columns, ctx.hooks.source(table), table, ctx)


def typed_columns(columns: list[Column], source: exp.Expr, table: Table, ctx: PlanContext) -> exp.Select:
    """The ``typed`` CTE: each column cast to its type, the privacy unit on its exact identity."""
    hooks = ctx.hooks
    selected = [
        exp.alias_(hooks.unit(c) if c.name == table.privacy_unit else hooks.typed(c), c.name, quoted=True)
        for c in columns
    ]
    return exp.select(*(selected or [exp.true()]), copy=False).from_(source, copy=False)


ROW_ORDER_KEY = "<row-order key>"


def rendered(
    plan: DPPlan, bounded: exp.Select, relation: str, ctx: PlanContext, settings: tuple[tuple[str, object], ...] = ()
) -> DPPlan:
    """The plan with its bounded SQL, and the same SQL as shown by ``explain`` and hashed by the audit log.

    Proof note (nothing secret or host-specific shown): the shown SQL reads a relation named after the
    policy table (``relation``) instead of the source (file path and read options), and ``ROW_ORDER_KEY``
    instead of the keyed hash's secret key; everything else is the executed tree. So ``explain`` is
    free of paths, options and the key, and the audited hash does not change when the data moves.
    Tests: tests/test_sources.py::test_explain_shows_no_path_option_or_key.
    """
    if plan.relation is not None:  # the relation's own CTEs (typed sources, per-person rows) come first
        with_ = bounded.args["with_"]
        ctes = [
            exp.CTE(this=body.copy(), alias=exp.TableAlias(this=exp.to_identifier(name)))
            for name, body in plan.relation.ctes
        ]
        with_.set("expressions", [*ctes, *with_.expressions])
    shown = bounded.copy()
    shown_sources = dict(plan.relation.sources) if plan.relation is not None else {"typed": None}
    for cte in shown.find_all(exp.CTE):
        if cte.alias in shown_sources:
            name = relation if plan.relation is None else shown_sources[cte.alias].name  # type: ignore[union-attr]
            cte.this.from_(exp.Table(this=exp.to_identifier(name, quoted=True)), copy=False)
    key = ctx.hooks.row_order_key(ctx.seed)
    for literal in [n for n in shown.find_all(exp.Literal) if n.is_string and n.this == key]:
        literal.replace(exp.Literal.string(ROW_ORDER_KEY))
    dialect = ctx.hooks.DIALECT
    return plan.with_(
        bounded=bounded,
        shown_sql=shown.sql(dialect=dialect),
        settings=settings,
    )


def and_unit_not_null(condition: exp.Expr | None, table: Table) -> exp.Expr:
    assert table.privacy_unit is not None
    not_null = exp.Not(this=exp.Is(this=exp.column(table.privacy_unit, quoted=True), expression=exp.Null()))
    return exp.and_(exp.Paren(this=condition), not_null) if condition is not None else not_null


def needed_columns(plan: DPPlan, table: Table) -> list[Column]:
    """Declared columns the query touches, plus the privacy unit, in policy order."""
    names = {table.privacy_unit} if table.privacy_unit else set()
    for m in plan.measurements:
        names |= m.columns
    for expr in [plan.where, *(k.expr for k in plan.group_keys)]:
        if expr is not None:
            names |= {c.name for c in expr.find_all(exp.Column)}
    return [c for c in table.columns if c.name in names]


def read_by(plan: DPPlan, name: str) -> bool:
    """Whether a group key or the filter reads column ``name``."""
    exprs = [k.expr for k in plan.group_keys] + ([plan.where] if plan.where is not None else [])
    return any(c.name == name for e in exprs for c in e.find_all(exp.Column))


def fixed_point(m: Measurement) -> exp.Expr:
    """The row's value ``round((clamp(v) - c)^p * scale)`` as an integer, NULL when ``v`` is NULL.

    ``v`` is the measurement's argument: a bare column (clamped to its declared bounds here), or an
    expression over already clamped columns (passes/intervals.py) clamped again to its derived interval,
    so whatever floating-point rounding did, the value lies in ``bounds`` (proof note there)."""
    assert m.arg is not None and m.bounds is not None
    x = m.arg
    lo, hi = m.bounds
    value: exp.Expr = exp.Least(
        this=exp.Greatest(this=x.copy(), expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    if m.center:
        value = exp.Paren(this=exp.Sub(this=value, expression=number(m.center)))
    if m.squared:
        value = exp.Pow(this=value, expression=exp.Literal.number(2))
    fixed = exp.cast(exp.Round(this=exp.Mul(this=value, expression=number(m.scale))), "BIGINT")
    return exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=fixed)])


ContributionKey = tuple[str, exp.Expr | None, tuple[float, float] | None, float, bool, float]


def contribution_key(m: Measurement) -> ContributionKey:
    """What fixes a measurement's per-row value: kind, argument, its clamp, centre, squared and fixed-point scale."""
    return (m.kind, m.arg, m.bounds, m.center, m.squared, m.scale)


def _bare(column: Column) -> exp.Expr:
    """A bare column argument, as passes/aggregates.py builds one."""
    return exp.column(column.name, quoted=True)


def stored_contributions(table: Table) -> list[tuple[str, Measurement]]:
    """The weighted measurements a prepared copy stores per row, with their column names in the copy.

    Every measurement passes/aggregates.py and passes/budget.py can make for a weighted query on this
    table: ``COUNT(*)``, ``COUNT(x)`` for every column (scale COUNT_SCALE), and for every numeric column
    with bounds (not the unit) ``SUM(x)``, ``SUM(x - c)`` and ``SUM((x - c)^2)`` with ``c`` the mid-point
    of the bounds (scale ``fixed_point_scale(bound)``). Centre, bound and scale are functions of the
    policy's bounds only, and the copy is rebuilt when the policy changes (dpgateway/prepare.py), so a
    stored column is valid for every later query; a query measurement is read from the copy only when its
    :func:`contribution_key` equals a stored one. Names are deterministic (``__w0``, ``__w1``, ...; fresh
    against the declared columns), so the query side recomputes the same list.
    """
    wanted: list[Measurement] = [Measurement(name="", kind="count", arg=None, scale=float(COUNT_SCALE))]
    for c in table.columns:
        wanted.append(Measurement(name="", kind="count", arg=_bare(c), scale=float(COUNT_SCALE)))
    for c in table.columns:
        if c.name == table.privacy_unit or not c.is_numeric or c.bounds is None:
            continue
        mid = moment_center(c.bounds)
        for center, squared in ((0.0, False), (mid, False), (mid, True)):
            bound = sum_bound(c.bounds, center, squared)
            m = Measurement(
                name="", kind="sum", arg=_bare(c), bounds=c.bounds, center=center, squared=squared, bound=bound,
                scale=fixed_point_scale(bound),
            )  # fmt: skip
            wanted.append(m)
    taken = {c.name for c in table.columns} | set(unit_columns(table))
    stored: list[tuple[str, Measurement]] = []
    seen: set[ContributionKey] = set()
    for m in wanted:
        if contribution_key(m) in seen:  # e.g. SUM(x - c) is SUM(x) when the bounds are symmetric
            continue
        seen.add(contribution_key(m))
        name = find_new_name(taken, f"__w{len(stored)}")
        taken.add(name)
        stored.append((name, m))
    return stored


def stored_unit_contributions(table: Table) -> list[tuple[str, str]]:
    """A prepared copy's columns of per-unit contributions ``t_u`` (passes/unit_forms.py), one per entry of
    :func:`stored_contributions` and in its order: the stored column's name and the name of the window total
    ``T_u`` it is computed from (deterministic, fresh against the declared and stored columns)."""
    stored = stored_contributions(table)
    taken = {c.name for c in table.columns} | set(unit_columns(table)) | {name for name, _ in stored}
    names: list[tuple[str, str]] = []
    for i in range(len(stored)):
        name = find_new_name(taken, f"__t{i}")
        taken.add(name)
        total = find_new_name(taken, f"__tt{i}")
        taken.add(total)
        names.append((name, total))
    return names
