"""Pass 3: turn aggregates into measurements and the SELECT list into post-processing over noisy values.

Each aggregate is rewritten to a few basic measurements (COUNT(*), COUNT(x), SUM(clamp(x) - c),
SUM((clamp(x) - c)^2)) that are noised once and shared by every output that needs them; outputs,
HAVING and ORDER BY become expressions over the noisy frame (pure post-processing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp

from dpgateway.errors import GroupingError, PrivacyViolationError, UnsupportedError
from dpgateway.passes import quantiles
from dpgateway.passes.context import PlanContext
from dpgateway.passes.intervals import Total, bounded_value, condition
from dpgateway.plan import DPPlan, GroupKey, MeasureKind, Measurement, Output
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import int_clause, number, post_expression, row_expression, row_expression_value

VARIANCES = (exp.Variance, exp.VariancePop, exp.Stddev, exp.StddevSamp, exp.StddevPop)
ANONYMOUS_AGGREGATES = {"VAR": exp.Variance, "STDEV": exp.Stddev, "VARP": exp.VariancePop, "STDEVP": exp.StddevPop}
POSTGRES_NAMES = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Variance: "variance",
    exp.VariancePop: "var_pop",
    exp.Stddev: "stddev",
    exp.StddevSamp: "stddev_samp",
    exp.StddevPop: "stddev_pop",
}


def plan_aggregates(plan: DPPlan, *, ctx: PlanContext) -> DPPlan:
    """Register measurements; build outputs, HAVING and ORDER BY over the noisy frame."""
    select = plan.tree
    assert isinstance(select, exp.Select) and plan.table is not None
    if select.args.get("distinct"):
        raise UnsupportedError("SELECT DISTINCT is not supported; use GROUP BY to list groups")
    if select.find(exp.Window):
        raise UnsupportedError("window functions are not supported")
    where = select.args.get("where")
    condition = row_expression(where.this, "WHERE") if where is not None else None
    if any(_is_star(e) for e in select.expressions):
        raise PrivacyViolationError("SELECT * would release raw rows; select aggregates and GROUP BY columns")
    if not plan.group_keys and not any(_is_aggregate(n) for e in select.expressions for n in e.walk()):
        raise PrivacyViolationError(
            "this query would release raw rows; aggregate them (COUNT, SUM, AVG, VARIANCE, STDDEV) "
            "and/or GROUP BY columns"
        )
    registry = _Registry(plan.table, ctx.hooks.total)
    aliases = {e.alias.lower() for e in select.expressions if isinstance(e, exp.Alias)}
    outputs = tuple(_output(e, plan.group_keys, registry, plan.table) for e in select.expressions)
    having = select.args.get("having")
    order = select.args.get("order")
    # HAVING and ORDER BY may register measurements the SELECT list does not use: build them before
    # the measurements are read (they were read first, so HAVING COUNT(*) failed after the spend).
    post_having = _post(having.this, plan.group_keys, registry, plan.table, "HAVING", aliases) if having else None
    post_order = (
        tuple(_ordered(o, plan.group_keys, registry, plan.table, aliases) for o in order.expressions) if order else ()
    )
    return plan.with_(
        where=condition,
        outputs=outputs,
        measurements=tuple(registry.measurements),
        having=post_having,
        order=post_order,
        limit=int_clause(select, "limit"),
        offset=int_clause(select, "offset"),
    )


def _is_aggregate(node: exp.Expr) -> bool:
    return (
        isinstance(node, exp.AggFunc)
        or (isinstance(node, exp.Anonymous) and node.name.upper() in ANONYMOUS_AGGREGATES)
        or quantiles.is_quantile_call(node)
    )


@dataclass
class _Registry:
    """Measurements by identity, so AVG(x) and COUNT(x) share one noisy COUNT(x)."""

    table: Table
    total: Total  # the backend's hook making a raw-row condition total (passes/total.py)
    measurements: list[Measurement] = field(default_factory=list)

    def get(self, kind: MeasureKind, arg: Argument | None, *, center: float = 0.0, squared: bool = False) -> str:
        expr = arg.expr if arg is not None else None
        for m in self.measurements:
            if (m.kind, m.arg, m.center, m.squared) == (kind, expr, center, squared):
                return m.name
        bound = 1.0
        bounds = None
        if kind == "sum":
            assert arg is not None and arg.bounds is not None
            bounds = arg.bounds
            bound = sum_bound(bounds, center, squared)
        m = Measurement(
            name=f"__m{len(self.measurements)}", kind=kind, arg=expr, bounds=bounds,
            text=arg.text if arg is not None else "", center=center, squared=squared, bound=bound,
        )  # fmt: skip
        self.measurements.append(m)
        return m.name


@dataclass(frozen=True)
class Argument:
    """An aggregate's argument as the backend evaluates it, its value interval (sums) and the analyst's text."""

    expr: exp.Expr
    bounds: tuple[float, float] | None = None
    text: str = ""  # '' for a bare column (the label shows its name)


def sum_bound(bounds: tuple[float, float], center: float, squared: bool) -> float:
    """Largest absolute per-row value of ``clamp(v) - center`` (squared: of its square), from the bounds."""
    lo, hi = bounds
    bound = max(abs(lo - center), abs(hi - center))
    return bound * bound if squared else bound


def moment_center(bounds: tuple[float, float]) -> float:
    """The centre AVG and the variances subtract: the mid-point of the value bounds."""
    lo, hi = bounds
    return (lo + hi) / 2


def _is_star(node: exp.Expr) -> bool:
    return isinstance(node, exp.Star) or (isinstance(node, exp.Column) and isinstance(node.this, exp.Star))


def _output(node: exp.Expr, keys: tuple[GroupKey, ...], registry: _Registry, table: Table) -> Output:
    inner = node.this if isinstance(node, exp.Alias) else node
    expr = _post(inner, keys, registry, table, "SELECT", set())
    kind = "expr"
    if any(inner == k.expr for k in keys):
        kind = "key"
    elif quantiles.output_kind(inner):
        kind = quantiles.output_kind(inner) or kind
    elif isinstance(inner, exp.AggFunc):
        kind = _kind(inner)
    elif isinstance(inner, exp.Filter) and isinstance(inner.this, exp.AggFunc):
        kind = _kind(inner.this)
    names = {m.name for m in registry.measurements}
    used = tuple(sorted({c.name for c in expr.find_all(exp.Column) if c.name in names}))
    return Output(name=_output_name(node), expr=expr, kind=kind, measurements=used)


def _output_name(node: exp.Expr) -> str:
    """The column name PostgreSQL would give this output."""
    if isinstance(node, exp.Alias):
        return node.alias
    if isinstance(node, exp.Column):
        return node.name
    if quantiles.output_name(node):  # percentile_cont, quantile_cont, ...
        return quantiles.output_name(node) or ""
    for cls, name in POSTGRES_NAMES.items():
        if type(node) is cls:
            return name
    if isinstance(node, exp.Func):
        return node.sql_name().lower()
    return "?column?"


def _kind(agg: exp.Expr) -> str:
    if isinstance(agg, exp.Count):
        return "count"
    if isinstance(agg, exp.Sum):
        return "sum"
    if isinstance(agg, exp.Avg):
        return "avg"
    if isinstance(agg, (exp.Stddev, exp.StddevSamp, exp.StddevPop)):
        return "stddev"
    return "var"


def _ordered(
    node: exp.Ordered, keys: tuple[GroupKey, ...], registry: _Registry, table: Table, aliases: set[str]
) -> exp.Ordered:
    out = node.copy()
    target = node.this
    if isinstance(target, exp.Literal) and not target.is_string:
        return out
    out.set("this", _post(target, keys, registry, table, "ORDER BY", aliases))
    return out


def _post(
    node: exp.Expr,
    keys: tuple[GroupKey, ...],
    registry: _Registry,
    table: Table,
    clause: str,
    aliases: set[str],
) -> exp.Expr:
    """Rewrite ``node`` over the noisy frame: keys become key columns, aggregates noisy expressions."""

    def visit(n: exp.Expr) -> exp.Expr:
        for key in keys:
            if n == key.expr:
                return exp.column(key.name)
        special = quantiles.plan_special(n, registry.measurements, table, registry.total)  # quantiles, COUNT(DISTINCT)
        if special is not None:
            return special
        if isinstance(n, exp.Anonymous) and n.name.upper() in ANONYMOUS_AGGREGATES:
            n = ANONYMOUS_AGGREGATES[n.name.upper()](this=n.expressions[0] if n.expressions else None)
        if isinstance(n, exp.Filter) and isinstance(n.this, exp.AggFunc):
            return _aggregate(n.this, registry, table, n.expression.this)
        if isinstance(n, exp.AggFunc):
            return _aggregate(n, registry, table, None)
        if isinstance(n, exp.Column):
            if n.name.lower() in aliases and not n.table:
                return exp.column(n.name, quoted=True)
            raise GroupingError(
                f'column "{n.name}" must appear in the GROUP BY clause or be used in an aggregate function'
            )
        if isinstance(n, (exp.Subquery, exp.Select)):
            raise UnsupportedError(f"subqueries are not supported (in {clause})")
        return n

    return post_expression(node.copy().transform(visit), clause)


def _aggregate(agg: exp.AggFunc, registry: _Registry, table: Table, where: exp.Expr | None) -> exp.Expr:
    """The noisy expression for one SQL aggregate (``where``: its FILTER), registering the measurements it needs."""
    arg = agg.this
    for sub in agg.find_all(exp.AggFunc):
        if sub is not agg:
            raise GroupingError("aggregate function calls cannot be nested")
    if isinstance(arg, exp.Distinct):
        raise UnsupportedError(f"{agg.sql_name()}(DISTINCT ...) is not supported yet")
    if isinstance(agg, exp.Count):
        if isinstance(arg, exp.Star) or arg is None:
            star = Argument(exp.Literal.number(1), text="*") if where is not None else None
            return _count(registry.get("count", _filtered(star, where, registry) if star else None))
        return _count(registry.get("count", _filtered(_count_arg(agg, table, registry), where, registry)))
    if not isinstance(agg, (exp.Sum, exp.Avg, *VARIANCES)):
        raise UnsupportedError(
            f"aggregate {agg.sql_name()} is not supported yet; supported are COUNT, COUNT(DISTINCT col), SUM, AVG, "
            "VARIANCE, VAR_POP, VAR_SAMP, STDDEV, STDDEV_POP, STDDEV_SAMP, MIN, MAX, MEDIAN, PERCENTILE_CONT, "
            "PERCENTILE_DISC, quantile_cont, quantile_disc"
        )
    value = _filtered(_value_arg(agg, table, registry), where, registry)
    assert value.bounds is not None
    lo, hi = value.bounds
    if isinstance(agg, exp.Sum):
        total = exp.column(registry.get("sum", value))
        return _clamp(total, 0 if lo >= 0 else None, 0 if hi <= 0 else None)
    mid = moment_center(value.bounds)
    n = exp.Greatest(this=exp.column(registry.get("count", value)), expressions=[number(1)], ignore_nulls=True)
    shifted = _div(exp.column(registry.get("sum", value, center=mid)), n)
    if isinstance(agg, exp.Avg):
        return _clamp(exp.Add(this=number(mid), expression=exp.Paren(this=shifted)), lo, hi)
    squares = _div(exp.column(registry.get("sum", value, center=mid, squared=True)), n)
    half = (hi - lo) / 2
    var = _clamp(
        exp.Sub(this=squares, expression=exp.Pow(this=exp.Paren(this=shifted), expression=number(2))), 0, half * half
    )
    if isinstance(agg, (exp.Variance, exp.Stddev, exp.StddevSamp)):  # sample variance, as PostgreSQL
        n2 = exp.Greatest(this=n.copy(), expressions=[number(2)], ignore_nulls=True)
        n2_minus_1 = exp.Paren(this=exp.Sub(this=n2.copy(), expression=number(1)))  # the builder adds no parentheses
        var = exp.Div(this=exp.Mul(this=var, expression=n2), expression=n2_minus_1)
    return exp.Sqrt(this=var) if isinstance(agg, (exp.Stddev, exp.StddevSamp, exp.StddevPop)) else var


def _filtered(arg: Argument, where: exp.Expr | None, registry: _Registry) -> Argument:
    """``FILTER (WHERE cond)`` folded into the argument: ``CASE WHEN cond THEN value END`` (NULL rows do not count).

    Proof note (FILTER): the condition reads only the row it is evaluated on and is made total like WHERE;
    it decides whether that row's value is its (bounded) value or NULL. A NULL value adds nothing to a
    sum or count, so each kept row still moves each measurement by at most the ``bound`` it had without
    the filter, and the unit's rows are bounded (chosen, or weighted by ``k / max(n_u, k)`` over its rows
    matching the query's WHERE) before and independently of the per-aggregate filters, exactly as for an
    unfiltered aggregate: the sensitivity of passes/budget.py holds unchanged. Several aggregates with
    different filters share the unit's bounding, so one unit's ``k`` rows are the same for all of them.
    Tests: tests/test_expressions.py (sensitivity with one person with many rows, pandas reference).
    """
    if where is None:
        return arg
    _refuse_unit(where, registry.table, "FILTER (WHERE ...)")
    cond = condition(where, total=registry.total, what="FILTER (WHERE ...)")
    shown = arg.text or (arg.expr.name if isinstance(arg.expr, exp.Column) else arg.expr.sql("postgres"))
    text = f"{shown} FILTER (WHERE {where.sql('postgres')})"
    return Argument(exp.Case(ifs=[exp.If(this=cond, true=arg.expr)]), arg.bounds, text)


def _count_arg(agg: exp.AggFunc, table: Table, registry: _Registry) -> Argument:
    """COUNT(x): a bare column, or a row expression made total (only whether it is NULL matters)."""
    arg = agg.this
    if isinstance(arg, exp.Column):
        _column_arg(agg, table, need_bounds=False)
        return Argument(exp.column(arg.name, quoted=True))
    _refuse_unit(arg, table, "COUNT")
    return Argument(condition(arg, total=registry.total, what="COUNT"), text=arg.sql("postgres"))


def _value_arg(agg: exp.AggFunc, table: Table, registry: _Registry) -> Argument:
    """SUM/AVG/VARIANCE's argument: a bare column with bounds, or an expression bounded by passes/intervals.py."""
    arg = agg.this
    if isinstance(arg, exp.Column) or arg is None:
        column = _column_arg(agg, table, need_bounds=True)
        return Argument(exp.column(column.name, quoted=True), column.bounds)
    what = f"{agg.sql_name()}({arg.sql('postgres')})"
    _refuse_unit(arg, table, what)
    built, interval = bounded_value(row_expression_value(arg, what), table, what=what, total=registry.total)
    return Argument(built, (interval.lo, interval.hi), arg.sql("postgres"))


def _column_arg(agg: exp.AggFunc, table: Table, *, need_bounds: bool) -> Column:
    arg = agg.this
    name = agg.sql_name()
    if not isinstance(arg, exp.Column):
        raise UnsupportedError(f"{name} needs an argument")
    column = table.column(arg.name)
    assert column is not None  # resolve_table checked every column
    if not need_bounds:
        return column
    if column.name == table.privacy_unit:
        raise PrivacyViolationError(f"{name}({column.name}) would aggregate the privacy unit identifier")
    if not column.is_numeric:
        raise PrivacyViolationError(f"{name} needs a numeric column; {table.name}.{column.name} is {column.type}")
    if column.bounds is None:
        raise PrivacyViolationError(
            f"Column {table.name}.{column.name} has no declared bounds, so {name} would be unbounded; "
            f"add `bounds: [lo, hi]` under tables.{table.name}.columns.{column.name}"
        )
    return column


def _refuse_unit(node: exp.Expr, table: Table, what: str) -> None:
    """Aggregate arguments and FILTERs may not read the privacy unit (they could single one unit out per
    aggregate; WHERE applies to the whole query and is bounded as a whole)."""
    unit = table.privacy_unit
    if unit and any(c.name.lower() == unit.lower() for c in node.find_all(exp.Column)):
        raise PrivacyViolationError(
            f"{what} reads the privacy unit {table.name}.{unit}; aggregate arguments and FILTER conditions "
            "may not use the unit identifier"
        )


def _count(name: str) -> exp.Expr:
    return exp.Greatest(this=exp.column(name), expressions=[number(0)], ignore_nulls=True)


def _div(num: exp.Expr, den: exp.Expr) -> exp.Expr:
    return exp.Div(this=num, expression=den)


def _clamp(value: exp.Expr, lo: float | None, hi: float | None) -> exp.Expr:
    if lo is not None:
        value = exp.Greatest(this=value, expressions=[number(lo)], ignore_nulls=True)
    if hi is not None:
        value = exp.Least(this=value, expressions=[number(hi)], ignore_nulls=True)
    return value
