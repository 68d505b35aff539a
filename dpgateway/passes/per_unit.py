"""Per-person subqueries and CTEs: an inner query grouped by the privacy unit, read as one row per person.

``SELECT AVG(t) FROM (SELECT pid, SUM(x) AS t FROM pums GROUP BY pid) AS s WHERE t >= 4`` (or the same
inner query in WITH): the inner query is built over its own relation (one table, joins, unit paths:
passes/relations.py) as two CTEs, ``__rN`` (the inner relation's typed columns) and ``__uN``::

    __uN AS (SELECT <unit> AS pid, LEAST(GREATEST(SUM(LEAST(GREATEST(x, lo), hi)), k*lo), k*hi) AS t
             FROM __rN WHERE (<inner where>) AND NOT <unit> IS NULL GROUP BY <unit>)

and the outer query reads ``__uN`` as a private table with one row per unit (``k = 1``), whose columns
carry bounds derived from the inner aggregate and the policy: ``COUNT`` in ``[0, k]`` (clamped to ``k``),
``SUM(x)`` in ``[min(0, k*lo), max(0, k*hi)]`` (each row clamped to ``[lo, hi]``, the total clamped too),
``AVG``/``MIN``/``MAX(x)`` in ``[lo, hi]`` (over the clamped rows); ``k`` is the inner relation's bound.
Inner queries must be grouped by exactly the privacy unit (0A000 otherwise), list only the unit and
aggregates, and carry no HAVING, ORDER BY, LIMIT or DISTINCT.

Proof note (sensitivity one row per unit): ``__uN`` groups by the unit and drops the NULL unit, so it
has at most one row per unit, and that row is a function of the unit's own (joined) rows only: the inner
relation's joined rows are partitioned by unit (passes/relations.py) and the inner WHERE reads one row at
a time. Adding or removing a unit adds or removes at most that one row and changes no other row. The outer
query bounds ``__uN`` with ``k = 1`` and clamps each value to the derived bounds above, which hold for
every value by construction (and the outer clamp enforces them regardless), so passes/budget.py's
sensitivity ``1 * ceil(bound * scale)`` per measurement holds. Tests: tests/test_relations.py.
"""

from __future__ import annotations

from sqlglot import exp

from dpgateway.errors import PrivacyViolationError, UnsupportedError
from dpgateway.passes.context import PlanContext
from dpgateway.passes.relations import Derive, Instance, RelationBuilder, from_clause, refuse_unconsumed
from dpgateway.policies.model import Column, ColumnType, Table
from dpgateway.sqlparse import number, row_expression

INNER_ARGS = frozenset({"expressions", "from_", "joins", "where", "group"})
PER_PERSON = {exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max"}


def deriver(ctx: PlanContext, scope: dict[str, exp.Select]) -> Derive:
    """The function passes/relations.py calls for a subquery or a WITH name in FROM."""

    def derive(label: str, inner: exp.Select, outer: RelationBuilder) -> Instance:
        if inner.args.get("with_") or inner.args.get("with"):
            raise UnsupportedError("WITH inside a subquery is not supported; put every CTE in the outer WITH")
        if inner.args.get("having"):
            raise UnsupportedError(
                f"HAVING in the per-person query {label} is not supported; filter per-person values in the outer WHERE"
            )
        refuse_unconsumed(inner, INNER_ARGS, f"the per-person query {label}")
        source = inner.args.get("from_")
        if source is None:
            raise UnsupportedError(f"the subquery {label} needs a FROM clause")
        builder = RelationBuilder(ctx, outer.ctes, outer.sources)
        from_clause(inner, builder, scope, derive)
        relation, table = builder.relation()
        assert table.privacy_unit is not None
        _check_grouped_by_unit(inner, builder, table.privacy_unit, label)
        unit = exp.column(table.privacy_unit, quoted=True)
        rows = f"__r{len(outer.ctes)}"
        outer.ctes.append((rows, relation.typed(c.name for c in table.columns)))
        unit_name, items, columns = table.privacy_unit, [], []
        for node in inner.expressions:
            expr = node.this if isinstance(node, exp.Alias) else node
            if isinstance(expr, exp.Column):
                if _is_unit(expr, builder, table.privacy_unit):
                    unit_name = node.alias if isinstance(node, exp.Alias) else expr.name
                    continue
                raise UnsupportedError(
                    f"the per-person query {label} may list its privacy unit and aggregates only, not {expr.name}"
                )
            value, column = _aggregate(expr, builder, table, label)
            name = node.alias if isinstance(node, exp.Alias) else PER_PERSON.get(type(expr), "?column?")
            items.append(exp.alias_(value, name, quoted=True))
            columns.append(Column(name=name, type=column[0], bounds=column[1]))
        names = [unit_name, *(c.name for c in columns)]
        if len({n.lower() for n in names}) != len(names):
            raise UnsupportedError(f"the per-person query {label} lists two columns of one name; alias each aggregate")
        unit_column = table.column(table.privacy_unit)
        assert unit_column is not None
        per_person = exp.select(exp.alias_(unit.copy(), unit_name, quoted=True), *items, copy=False).from_(
            rows, copy=False
        )
        not_null: exp.Expr = exp.Not(this=exp.Is(this=unit.copy(), expression=exp.Null()))
        where = inner.args.get("where")
        if where is not None:
            condition = ctx.hooks.total(_exposed(row_expression(where.this, "WHERE"), builder))
            not_null = exp.and_(exp.Paren(this=condition), not_null)
        per_person = per_person.where(not_null, copy=False).group_by(unit.copy(), copy=False)
        cte = f"__u{len(outer.ctes)}"
        outer.ctes.append((cte, per_person))
        all_columns = (Column(name=unit_name, type=unit_column.type), *columns)
        return outer.add_derived(label, cte, all_columns, unit_name, table.domain)

    return derive


def _exposed(node: exp.Expr, builder: RelationBuilder) -> exp.Expr:
    """``node`` with each column reference replaced by the inner relation's exposed column name."""

    def exposed(n: exp.Expr) -> exp.Expr:
        if not isinstance(n, exp.Column):
            return n
        instance, declared = builder.find(n)
        return exp.column(builder.exposed_name(instance, declared), quoted=True)

    return node.copy().transform(exposed, copy=False)


def _is_unit(column: exp.Column, builder: RelationBuilder, unit: str) -> bool:
    """Whether ``column`` is the relation's unit, or a unit column equal to it on every joined row."""
    instance, declared = builder.find(column)
    if builder.exposed_name(instance, declared) == unit:
        return True
    return instance.unit == declared.name and not instance.nullable


def _check_grouped_by_unit(inner: exp.Select, builder: RelationBuilder, unit: str, label: str) -> None:
    group = inner.args.get("group")
    items = group.expressions if group is not None else []
    if any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets")) if group is not None else False:
        items = []
    if len(items) != 1 or not isinstance(items[0], exp.Column) or not _is_unit(items[0], builder, unit):
        raise UnsupportedError(
            f"the subquery {label} must be grouped by exactly the privacy unit ({unit}), one row per person, "
            "so that the outer query can bound each person; add GROUP BY "
            f"{unit} and aggregate the rest"
        )


def _aggregate(
    agg: exp.Expr, builder: RelationBuilder, table: Table, label: str
) -> tuple[exp.Expr, tuple[ColumnType, tuple[float, float]]]:
    """The per-person value of one inner aggregate, its type and its derived bounds."""
    k = table.max_rows_per_unit
    if type(agg) not in PER_PERSON:
        raise UnsupportedError(
            f"the per-person query {label} may aggregate with COUNT, SUM, AVG, MIN and MAX; not {agg.sql('postgres')}"
        )
    arg = agg.this
    if isinstance(arg, exp.Distinct):
        raise UnsupportedError(f"{type(agg).__name__.upper()}(DISTINCT ...) is not supported in a per-person query")
    if isinstance(agg, exp.Count):
        counted = (
            exp.Star() if arg is None or isinstance(arg, exp.Star) else _exposed(_plain_column(arg, label), builder)
        )
        value = exp.Least(this=exp.Count(this=counted), expressions=[exp.Literal.number(k)], ignore_nulls=True)
        return value, ("int", (0.0, float(k)))
    column = _exposed(_plain_column(arg, label), builder)
    assert isinstance(column, exp.Column)
    declared = table.column(column.name)
    assert declared is not None
    name = type(agg).__name__.upper()
    if declared.name == table.privacy_unit or not declared.is_numeric:
        raise PrivacyViolationError(f"{name}({declared.name}) needs a numeric column other than the privacy unit")
    if declared.bounds is None:
        raise PrivacyViolationError(
            f"column {declared.name} has no declared bounds, so {name} per person would be unbounded; add "
            "`bounds: [lo, hi]` under its table's columns"
        )
    lo, hi = declared.bounds
    clamped = exp.Least(
        this=exp.Greatest(this=column, expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    if isinstance(agg, exp.Sum):
        low, high = min(0.0, k * lo), max(0.0, k * hi)
        total = exp.Greatest(this=exp.Sum(this=clamped), expressions=[number(low)], ignore_nulls=True)
        return exp.Least(this=total, expressions=[number(high)], ignore_nulls=True), (declared.type, (low, high))
    if isinstance(agg, exp.Avg):
        return exp.Avg(this=clamped), ("float", (lo, hi))
    return type(agg)(this=clamped), (declared.type, (lo, hi))


def _plain_column(arg: exp.Expr, label: str) -> exp.Column:
    if not isinstance(arg, exp.Column) or isinstance(arg.this, exp.Star):
        raise UnsupportedError(f"aggregates in the per-person query {label} take a column, e.g. SUM(x)")
    return arg
