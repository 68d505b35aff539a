"""Row expressions of bounded columns: the bounded SQL of an aggregate argument or group key, and its interval.

``SUM(income * 2)``, ``AVG(CASE WHEN sex = 1 THEN income ELSE 0 END)``, ``SUM(COALESCE(x, 0))``,
``AVG(LN(income + 1))``, ``GROUP BY age / 10``: :func:`bounded_value` rebuilds such an expression with
every column in a value position replaced by that column clamped to its declared bounds (NULL stays
NULL), and returns the interval every value of the rebuilt expression lies in. The expression follows
PostgreSQL's semantics on every backend: ``/`` of two integers truncates toward zero (rendered as the
backend's integer division), any other ``/`` divides doubles; non-integer literals are doubles;
``ROUND`` rounds half away from zero (the PostgreSQL hooks make it so; passes/bounding.py).

Proof note (interval arithmetic): write ``[e]`` for the interval computed for expression ``e``. For a
column, ``[x]`` is its declared bounds and the rebuilt SQL reads ``clamp(x)``, which lies in them. For a
literal, the point. Each operator ``f`` used here is monotone in each argument on the domain where it is
evaluated (``+``, ``-``, unary minus, ``/`` once the divisor's interval excludes 0, ``EXP``, ``LN`` on
positive inputs, ``SQRT`` on non-negative inputs, ``FLOOR``/``CEIL``/``ROUND``, integer powers split at
0, truncating division) or is the maximum/minimum of such (``*``: the products of the end points;
``ABS``; ``GREATEST``/``LEAST``), so ``f`` over a box of intervals takes its extreme values at corners
of the box: ``[f(a, b)] = [min, max]`` of ``f`` at the corners contains ``f(a, b)`` whenever ``a`` lies in
``[a]`` and ``b`` in ``[b]``. ``CASE``/``COALESCE`` yield one of their branches: the union (hull) of the
branch intervals contains the result. NULL never becomes a value (arithmetic of NULL is NULL; the
clamp keeps NULL; ``GREATEST``/``LEAST`` skip NULLs, so their lower/upper end uses only the arguments
that cannot be NULL). NaN and infinities cannot reach the expression: a typed float column is NULL for
NaN (connectors/base.py) and an infinity clamps to the bound. By induction every value the backend
computes lies in the computed interval, up to floating-point rounding, which is covered twice: float
end points are widened outward by a relative 1e-9 (more than the few ulps each IEEE operation, or a
library EXP/LN, can be off), and the backend clamps the final value to the interval anyway, so the
sensitivity passes/budget.py charges from the interval holds for every row whatever the rounding.

Proof note (no data-dependent errors): every error the backends can raise on these operators is ruled out
from the intervals alone, before anything runs: division whose divisor interval contains 0, ``LN`` of
an interval reaching 0 or below, ``SQRT`` below 0, ``EXP`` above 690 and any intermediate beyond 1e300
(double overflow), integer intermediates beyond 2**53 (BIGINT overflow, and exact in doubles) are
refused with 42501 naming the declaration that would bound them. So the rebuilt value needs no
``TRY``: a row cannot make the query fail. Conditions (``CASE WHEN``, ``FILTER``) are ordinary row
expressions made total by the backend's hook (passes/total.py), as WHERE is.
Tests: tests/test_expressions.py (every operator against an independent evaluation at the interval's
corners and on random in-bounds rows; each refusal), tests/test_sensitivity.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlglot import exp

from dpgateway.errors import PrivacyViolationError, UnsupportedError
from dpgateway.policies.model import Table
from dpgateway.sqlparse import number, row_expression

INT_LIMIT = 2.0**53  # integer intermediates stay exact in doubles and far from BIGINT overflow
FLOAT_LIMIT = 1e300  # no double intermediate can overflow
VALUE_LIMIT = 1e15  # an aggregated value, as declared bounds (policies/loader.py): sums stay exact
FLUSH = 1e-30  # double columns below this magnitude read as 0 (no intermediate can underflow)
TINY_LIMIT = 1e-120  # the smallest non-zero magnitude a double intermediate may reach
EXP_LIMIT = 690.0  # exp(690) ~ 1e299
WIDEN = 1e-9

Total = Callable[[exp.Expr], exp.Expr]

SUPPORTED = (
    "columns with declared bounds, numbers, + - * /, ABS, ROUND, FLOOR, CEIL, EXP, LN, SQRT, POWER with a "
    "constant exponent, GREATEST, LEAST, COALESCE, CASE and CAST to a numeric type"
)


@dataclass(frozen=True)
class Interval:
    """Every non-NULL value of an expression lies in ``[lo, hi]``; ``integer``: it is a BIGINT."""

    lo: float
    hi: float
    integer: bool
    nullable: bool
    tiny: float = 1.0  # every non-zero value has |v| >= tiny (underflow: PostgreSQL raises on it)

    @property
    def point(self) -> float | None:
        return self.lo if self.lo == self.hi else None


Built = tuple[exp.Expr, Interval | None]  # None: the expression is always NULL


class _Context:
    def __init__(self, table: Table, what: str, total: Total, point: dict[str, float] | None) -> None:
        self.table, self.what, self.total, self.point = table, what, total, point

    def refuse(self, why: str) -> PrivacyViolationError:
        return PrivacyViolationError(f"{self.what}: {why}")


def bounded_value(
    node: exp.Expr, table: Table, *, what: str, total: Total, point: dict[str, float] | None = None
) -> tuple[exp.Expr, Interval]:
    """The expression rebuilt over clamped columns, and the interval of its values (proof note above).

    ``what`` names the aggregate or key in messages; ``total`` makes a condition total on the backend;
    ``point`` fixes columns to one value each (the interval is then the value, for key domains).
    """
    ctx = _Context(table, what, total, point)
    built, interval = _build(node, ctx)
    if interval is None:
        raise UnsupportedError(f"{what}: the expression is always NULL")
    if point is None and max(-interval.lo, interval.hi) > VALUE_LIMIT:
        raise ctx.refuse(
            f"its values reach [{interval.lo:g}, {interval.hi:g}] within the declared bounds, beyond "
            f"±{VALUE_LIMIT:g} (the largest bound a sum stays exact with); narrow the columns' `bounds`"
        )
    return built, interval


def _build(node: exp.Expr, ctx: _Context) -> Built:
    handler = _HANDLERS.get(type(node))
    if handler is None:
        name = node.sql_name() if isinstance(node, exp.Func) else node.key.upper()
        raise UnsupportedError(f"{ctx.what}: {name} is not supported in an aggregate argument; allowed are {SUPPORTED}")
    built, interval = handler(node, ctx)
    if interval is not None:
        limit = INT_LIMIT if interval.integer else FLOAT_LIMIT
        if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)) or max(-interval.lo, interval.hi) > limit:
            raise ctx.refuse(
                f"{node.sql('postgres')} can reach [{interval.lo:g}, {interval.hi:g}] within the declared bounds, "
                f"beyond {'BIGINT' if interval.integer else 'double'} range; narrow the columns' `bounds`"
            )
        if not interval.integer and interval.tiny < TINY_LIMIT:
            raise ctx.refuse(
                f"{node.sql('postgres')} can reach non-zero values below {TINY_LIMIT:g} in magnitude within the "
                "declared bounds, which underflow (PostgreSQL raises on that); narrow the columns' `bounds`"
            )
    return built, interval


def _float(lo: float, hi: float, nullable: bool, tiny: float) -> Interval:
    """A double interval widened outward (proof note: rounding); ``tiny`` at least the interval's own smallest magnitude."""
    tiny = max(tiny, _magnitude(lo, hi))
    return Interval(lo - abs(lo) * WIDEN, hi + abs(hi) * WIDEN, False, nullable, tiny * (1 - WIDEN))


def _make(values: list[float], integer: bool, nullable: bool, tiny: float) -> Interval:
    lo, hi = min(values), max(values)
    return Interval(lo, hi, True, nullable) if integer else _float(lo, hi, nullable, tiny)


def _magnitude(lo: float, hi: float) -> float:
    """The smallest non-zero magnitude in ``[lo, hi]`` when 0 is outside it, else 0."""
    return 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))


def _double(node: exp.Expr, interval: Interval) -> exp.Expr:
    """``node`` as a DOUBLE (integers are cast so every backend divides and rounds the same type).

    Every ``/`` built here has DOUBLE operands and ``typed=True``: each dialect then writes a plain ``/``
    (sqlglot would otherwise add its own cast for PostgreSQL), which divides doubles everywhere."""
    return exp.cast(node, "DOUBLE") if interval.integer else node


def _column(node: exp.Column, ctx: _Context) -> Built:
    table = ctx.table
    column = table.column(node.name)
    assert column is not None  # resolve_table checked every column
    declare = f"`bounds: [lo, hi]` under tables.{table.name}.columns.{column.name}"
    if column.name == table.privacy_unit:
        raise ctx.refuse(f"{column.name} is the privacy unit identifier and cannot be aggregated")
    if not column.is_numeric:
        raise ctx.refuse(f"{table.name}.{column.name} is {column.type}, not a number")
    if column.bounds is None:
        raise ctx.refuse(
            f"Column {table.name}.{column.name} has no declared bounds, so the value would be unbounded; add {declare}"
        )
    lo, hi = column.bounds
    integer = column.type == "int"
    if ctx.point is not None and column.name in ctx.point:
        value = ctx.point[column.name]
        return exp.column(column.name, quoted=True), Interval(value, value, integer, False, abs(value) or 1.0)
    x = exp.column(column.name, quoted=True)
    read: exp.Expr = x
    tiny = 1.0 if integer else _magnitude(lo, hi)
    if not integer and tiny < FLUSH:  # tiny doubles read as 0: no product or quotient can underflow
        small = exp.LT(this=exp.Abs(this=x.copy()), expression=number(FLUSH))
        read = exp.Case(ifs=[exp.If(this=small, true=exp.cast(number(0), "DOUBLE"))], default=x.copy())
        tiny = FLUSH
    clamped = exp.Least(
        this=exp.Greatest(this=read, expressions=[number(lo)], ignore_nulls=True),
        expressions=[number(hi)],
        ignore_nulls=True,
    )
    kept = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=clamped)])
    return kept, Interval(lo, hi, integer, True, tiny)


def _literal(node: exp.Literal, ctx: _Context) -> Built:
    if node.is_string:
        raise ctx.refuse(f"the text {node.sql('postgres')} is not a number")
    text = node.this
    if text.isdigit():
        value = float(int(text))
        return exp.Literal.number(text), Interval(value, value, True, False)
    value = float(text)
    return exp.cast(number(value), "DOUBLE"), Interval(value, value, False, False, abs(value) or 1.0)


def _null(node: exp.Null, ctx: _Context) -> Built:
    return exp.Null(), None


def _paren(node: exp.Paren, ctx: _Context) -> Built:
    built, interval = _build(node.this, ctx)
    return exp.Paren(this=built), interval


def _neg(node: exp.Neg, ctx: _Context) -> Built:
    built, a = _build(node.this, ctx)
    if a is None:
        return exp.Null(), None
    return exp.Neg(this=built), Interval(-a.hi, -a.lo, a.integer, a.nullable, a.tiny)


def _binary(node: exp.Binary, ctx: _Context) -> tuple[exp.Expr, exp.Expr, Interval, Interval] | None:
    left, a = _build(node.this, ctx)
    right, b = _build(node.expression, ctx)
    if a is None or b is None:
        return None
    return left, right, a, b


def _arith(node: exp.Binary, ctx: _Context) -> Built:
    parts = _binary(node, ctx)
    if parts is None:
        return exp.Null(), None
    left, right, a, b = parts
    integer, nullable = a.integer and b.integer, a.nullable or b.nullable
    if isinstance(node, exp.Add):
        values, tiny = [a.lo + b.lo, a.hi + b.hi], min(a.tiny, b.tiny) * 2.0**-53  # at least half an ulp
    elif isinstance(node, exp.Sub):
        values, tiny = [a.lo - b.hi, a.hi - b.lo], min(a.tiny, b.tiny) * 2.0**-53
    else:
        values, tiny = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)], a.tiny * b.tiny
    return type(node)(this=left, expression=right), _make(values, integer, nullable, tiny)


def _div(node: exp.Div, ctx: _Context) -> Built:
    parts = _binary(node, ctx)
    if parts is None:
        return exp.Null(), None
    left, right, a, b = parts
    if b.lo <= 0 <= b.hi:
        raise ctx.refuse(
            f"the divisor {node.expression.sql('postgres')} can be 0 within its declared bounds "
            f"([{b.lo:g}, {b.hi:g}]); declare `bounds` that exclude 0 on its columns, or divide by a "
            "value that cannot be 0 (e.g. GREATEST(x, 1))"
        )
    nullable = a.nullable or b.nullable
    if a.integer and b.integer and node.args.get("typed", True):  # PostgreSQL: integer / integer truncates
        values = [float(_trunc_div(int(x), int(y))) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        return exp.IntDiv(this=left, expression=right), Interval(min(values), max(values), True, nullable)
    values = [x / y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    tiny = a.tiny / max(abs(b.lo), abs(b.hi))
    return exp.Div(this=_double(left, a), expression=_double(right, b), typed=True), _float(
        min(values), max(values), nullable, tiny
    )


def _trunc_div(x: int, y: int) -> int:
    """Integer division truncating toward zero (PostgreSQL's, DuckDB's ``//``, Spark's ``DIV``)."""
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y > 0) else -q


def _abs(node: exp.Abs, ctx: _Context) -> Built:
    built, a = _build(node.this, ctx)
    if a is None:
        return exp.Null(), None
    lo = 0.0 if a.lo <= 0 <= a.hi else min(abs(a.lo), abs(a.hi))
    return exp.Abs(this=built), Interval(lo, max(abs(a.lo), abs(a.hi)), a.integer, a.nullable, a.tiny)


def _monotone(node: exp.Func, ctx: _Context) -> Built:
    """EXP, LN, SQRT (increasing), FLOOR, CEIL, ROUND: of a double, refusing inputs where they raise."""
    built, a = _build(node.this, ctx)
    if a is None:
        return exp.Null(), None
    name = node.sql_name()
    if isinstance(node, (exp.Floor, exp.Ceil, exp.Round)):
        decimals = node.args.get("decimals")
        if isinstance(node, exp.Round) and decimals is not None:
            return _round_to(node, built, a, decimals, ctx)
        if node.args.get("decimals") is not None or node.args.get("to") is not None:
            raise UnsupportedError(f"{ctx.what}: {name} takes one argument in an aggregate argument")
        if a.integer:  # an integer is its own FLOOR/CEIL/ROUND
            return built, a
        step: dict[type[exp.Expr], Callable[[float], float]] = {
            exp.Floor: math.floor, exp.Ceil: math.ceil, exp.Round: _round_half_away
        }  # fmt: skip
        f = step[type(node)]
        rebuilt = exp.cast(type(node)(this=built), "DOUBLE")  # Spark's FLOOR/CEIL return BIGINT: keep a double
        return rebuilt, Interval(float(f(a.lo)), float(f(a.hi)), False, a.nullable)
    if isinstance(node, exp.Exp) and (a.hi > EXP_LIMIT or a.lo < -EXP_LIMIT):
        raise ctx.refuse(
            f"EXP overflows or underflows outside [-{EXP_LIMIT:g}, {EXP_LIMIT:g}] and its argument reaches "
            f"[{a.lo:g}, {a.hi:g}] within the declared bounds; narrow the columns' `bounds`"
        )
    if isinstance(node, exp.Ln) and a.lo <= 0:
        raise ctx.refuse(
            f"LN is undefined at or below 0 and its argument reaches {a.lo:g} within the declared bounds; declare "
            "`bounds` with a positive lower bound, or take LN(x + c) with c making it positive"
        )
    if isinstance(node, exp.Sqrt) and a.lo < 0:
        raise ctx.refuse(
            f"SQRT is undefined below 0 and its argument reaches {a.lo:g} within the declared bounds; declare "
            "`bounds` with a non-negative lower bound"
        )
    curve: dict[type[exp.Expr], Callable[[float], float]] = {exp.Exp: math.exp, exp.Ln: math.log, exp.Sqrt: math.sqrt}
    g = curve[type(node)]
    # non-zero magnitudes: EXP is positive; |LN(x)| >= 1e-17 for every double x != 1; SQRT of the tiniest
    tiny = {exp.Exp: math.exp(a.lo), exp.Ln: 1e-17, exp.Sqrt: math.sqrt(a.tiny)}[type(node)]  # type: ignore[index]
    return type(node)(this=_double(built, a)), _float(g(a.lo), g(a.hi), a.nullable, tiny)


def _round_half_away(value: float) -> float:
    return math.copysign(math.floor(abs(value) + 0.5), value)


def _round_to(node: exp.Expr, built: exp.Expr, a: Interval, decimals: exp.Expr, ctx: _Context) -> Built:
    """``ROUND(x, d)`` as ``ROUND(x * 10^d) / 10^d`` in doubles (half away from zero, as numeric rounds)."""
    d = _constant(decimals, ctx)
    if d != int(d) or abs(d) > 15:
        raise UnsupportedError(f"{ctx.what}: ROUND's digits must be an integer between -15 and 15")
    if a.integer and d >= 0:
        return built, a
    factor = exp.cast(number(10.0**d), "DOUBLE")
    scaled = exp.Round(this=exp.Mul(this=_double(built, a), expression=factor))
    lo, hi = _round_half_away(a.lo * 10.0**d) / 10.0**d, _round_half_away(a.hi * 10.0**d) / 10.0**d
    return exp.Div(this=scaled, expression=factor.copy(), typed=True), _float(lo, hi, a.nullable, min(1.0, 10.0**-d))


def _constant(node: exp.Expr, ctx: _Context) -> float:
    if isinstance(node, exp.Neg):
        return -_constant(node.this, ctx)
    if isinstance(node, exp.Literal) and not node.is_string:
        return float(node.this)
    raise UnsupportedError(f"{ctx.what}: {node.sql('postgres')} must be a number")


def _pow(node: exp.Pow, ctx: _Context) -> Built:
    built, a = _build(node.this, ctx)
    p = _constant(node.expression, ctx)
    if a is None:
        return exp.Null(), None
    if p == int(p) and 0 <= p <= 16:
        values = [a.lo**p, a.hi**p] + ([0.0] if a.lo <= 0 <= a.hi else [])
    elif p > 0 and a.lo >= 0:
        values = [a.lo**p, a.hi**p]
    else:
        raise ctx.refuse(
            f"POWER with exponent {p:g} is defined for every value only as an integer power from 0 to 16, or any "
            "positive power of a non-negative base; declare `bounds` with a non-negative lower bound"
        )
    exponent = exp.cast(number(p), "DOUBLE")
    tiny = min(a.tiny, 1.0) ** p if p else 1.0
    return exp.Pow(this=_double(built, a), expression=exponent), _float(min(values), max(values), a.nullable, tiny)


def _extreme(node: exp.Greatest | exp.Least, ctx: _Context) -> Built:
    args = [_build(arg, ctx) for arg in (node.this, *node.expressions)]
    present = [(b, i) for b, i in args if i is not None]
    if not present:
        return exp.Null(), None
    intervals = [i for _, i in present]
    firm = [i for i in intervals if not i.nullable]  # always a value: the result is at least (most) it
    if isinstance(node, exp.Greatest):
        hi = max(i.hi for i in intervals)
        lo = max([min(i.lo for i in intervals)] + [i.lo for i in firm])
    else:
        lo = min(i.lo for i in intervals)
        hi = min([max(i.hi for i in intervals)] + [i.hi for i in firm])
    integer = all(i.integer for i in intervals)
    built = [b if integer else _double(b, i) for b, i in present]
    rebuilt = type(node)(this=built[0], expressions=built[1:], ignore_nulls=True)
    return rebuilt, Interval(lo, hi, integer, not firm, min(i.tiny for i in intervals))


def _hull(branches: list[Built], nullable: bool) -> Built:
    """The branches cast to one type (DOUBLE unless all are integers), and the union of their intervals."""
    intervals = [i for _, i in branches if i is not None]
    if not intervals:
        return exp.Null(), None
    integer = all(i.integer for i in intervals)
    nullable = nullable or any(i is None or i.nullable for _, i in branches)
    tiny = min(i.tiny for i in intervals)
    interval = Interval(min(i.lo for i in intervals), max(i.hi for i in intervals), integer, nullable, tiny)
    return exp.Tuple(expressions=[b if integer or i is None else _double(b, i) for b, i in branches]), interval


def _coalesce(node: exp.Coalesce, ctx: _Context) -> Built:
    args = [_build(a, ctx) for a in (node.this, *node.expressions)]
    joined, interval = _hull(args, nullable=True)
    if interval is None:
        return joined, None
    values = list(joined.expressions)
    firm = any(i is not None and not i.nullable for _, i in args)
    return exp.Coalesce(this=values[0], expressions=values[1:]), Interval(
        interval.lo, interval.hi, interval.integer, not firm, interval.tiny
    )


def _case(node: exp.Case, ctx: _Context) -> Built:
    """CASE: conditions (and a simple CASE's operand) are row expressions made total; branch values are bounded."""
    operand = node.args.get("this")
    ifs = node.args.get("ifs") or []
    default = node.args.get("default")
    branches = [_build(branch.args["true"], ctx) for branch in ifs]
    branches.append(_build(default, ctx) if default is not None else (exp.Null(), None))
    joined, interval = _hull(branches, nullable=default is None)
    values = list(joined.expressions) if isinstance(joined, exp.Tuple) else [exp.Null()] * len(branches)
    rebuilt = exp.Case(
        this=condition(operand, total=ctx.total, what=ctx.what) if operand is not None else None,
        ifs=[
            exp.If(this=condition(branch.this, total=ctx.total, what=ctx.what), true=value)
            for branch, value in zip(ifs, values[:-1], strict=True)
        ],
        default=values[-1] if default is not None else None,
    )
    return rebuilt, interval


def condition(node: exp.Expr, *, total: Total, what: str) -> exp.Expr:
    """A condition over raw rows (CASE WHEN, FILTER, a COUNT's argument): allowlisted, then total on the backend."""
    return total(row_expression(node, what))


def _cast(node: exp.Cast, ctx: _Context) -> Built:
    built, a = _build(node.this, ctx)
    to = node.to
    if to.is_type(*exp.DataType.REAL_TYPES) or to.is_type(exp.DataType.Type.DECIMAL):
        if a is None:
            return exp.Null(), None
        return exp.cast(built, "DOUBLE"), Interval(a.lo, a.hi, False, a.nullable, a.tiny)
    if to.is_type(*exp.DataType.INTEGER_TYPES) and (a is None or a.integer):
        return built, a
    raise UnsupportedError(
        f"{ctx.what}: CAST to {to.sql('postgres')} is not supported in an aggregate argument (backends round "
        "differently when casting a double to an integer); use ROUND, FLOOR or CEIL, or CAST to DOUBLE PRECISION"
    )


_HANDLERS: dict[type[exp.Expr], Callable[..., Built]] = {
    exp.Column: _column,
    exp.Literal: _literal,
    exp.Null: _null,
    exp.Paren: _paren,
    exp.Neg: _neg,
    exp.Add: _arith,
    exp.Sub: _arith,
    exp.Mul: _arith,
    exp.Div: _div,
    exp.Abs: _abs,
    exp.Exp: _monotone,
    exp.Ln: _monotone,
    exp.Sqrt: _monotone,
    exp.Floor: _monotone,
    exp.Ceil: _monotone,
    exp.Round: _monotone,
    exp.Pow: _pow,
    exp.Greatest: _extreme,
    exp.Least: _extreme,
    exp.Coalesce: _coalesce,
    exp.Case: _case,
    exp.Cast: _cast,
    exp.TryCast: _cast,
}
