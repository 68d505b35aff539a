"""Post-processing on released (noisy) values only: outputs, HAVING, ORDER BY, LIMIT.

It runs in a separate in-memory DuckDB that holds nothing but the noisy frame and cannot read files,
so anything computed here is a function of the DP release. The sandbox database is opened once per
process (opening one costs about 17 ms); each call gets its own cursor, a separate connection on which
the noisy frame is registered, and which is closed afterwards, so calls never see each other's frames.

Division follows PostgreSQL (passes/post.py rewrites it before either evaluator sees it): of two integers
(``COUNT(*) / 7``) it truncates toward zero, NULL on a zero divisor; otherwise it divides doubles. ``ROUND``
is DuckDB's, half away from zero, as PostgreSQL rounds numeric values (``AVG`` of integers is numeric).

The common case, a SELECT list of columns, integer literals, ``+ - * /`` and GREATEST/LEAST with no
HAVING, ORDER BY, LIMIT or OFFSET, is evaluated in Python instead (:func:`_python_outputs`, about 2 ms
less per query). It gives exactly DuckDB's values and types or declines, and DuckDB answers: it declines
anything whose DuckDB semantics it does not reproduce (NULLs, keys that are not all ``int`` or all
``str``, non-integer literals, integers of 2**31 or more that DuckDB might overflow on, division by zero,
non-finite floats, an empty release whose binding errors would go unseen).
Test: tests/test_gateway.py::test_python_post_processing_agrees_with_duckdb.
"""

from __future__ import annotations

import math
import operator
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd
from sqlglot import exp

from dpgateway.errors import InvalidParameterError
from dpgateway.noise import Noisy
from dpgateway.plan import DPPlan

NOISY = "__noisy"
INT_LIMIT = 2**31  # below this, no BIGINT (nor INTEGER literal) arithmetic of two operands overflows in DuckDB

_lock = threading.Lock()
_sandbox: tuple[int, duckdb.DuckDBPyConnection] | None = None

Columns = Sequence[list[Any]]
Evaluator = Callable[[Columns], list[Any]]  # a whole output column at once: no Python call per node and row


@dataclass(frozen=True)
class Released:
    """Output rows as computed (Python values as DuckDB returns them); the DataFrame only when asked for."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(self.columns))


def post_process(plan: DPPlan, noisy: Noisy) -> Released:
    """Evaluate the query's SELECT list, HAVING, ORDER BY and LIMIT over the noisy release."""
    names = tuple(o.name for o in plan.outputs)
    rows = _python_outputs(plan, noisy)
    if rows is None:
        rows = run_sandboxed(plan.post_sql or post_processing_sql(plan), noisy.frame(), what="the outputs").rows
    return Released(names, rows)


class _Declined(Exception):
    """The Python evaluator does not reproduce DuckDB here: use the sandbox."""


def python_evaluators(plan: DPPlan) -> tuple[Evaluator, ...] | None:
    """The SELECT list compiled to functions of the noisy columns (once per plan); None where DuckDB must answer."""
    if plan.having is not None or plan.order or plan.limit is not None or plan.offset is not None:
        return None
    names = (*(k.name for k in plan.group_keys), *(m.name for m in plan.measurements))  # add_noise's columns
    try:
        return tuple(_compile(o.expr, {name: i for i, name in enumerate(names)}) for o in plan.outputs)
    except _Declined:
        return None


def _python_outputs(plan: DPPlan, noisy: Noisy) -> list[tuple[Any, ...]] | None:
    """The SELECT list evaluated in Python, exactly as DuckDB would; None when that is not certain."""
    if plan.post_python is None or not noisy.values or not noisy.values[0]:
        return None
    for column in noisy.values:
        kind = type(column[0])
        if kind not in (int, float, str) or any(type(v) is not kind for v in column):
            return None  # NULLs, bools, dates, decimals, mixed types: pandas and DuckDB convert them
    try:
        return list(zip(*(f(noisy.values) for f in plan.post_python), strict=True))
    except _Declined:
        return None


def _compile(node: exp.Expr, positions: dict[str, int]) -> Evaluator:
    """A function of the noisy columns computing ``node`` with DuckDB's semantics, or :class:`_Declined`."""
    if isinstance(node, exp.Paren):
        return _compile(node.this, positions)
    if isinstance(node, exp.Column) and not node.table and node.name in positions:
        index = positions[node.name]  # each column holds values of one type (checked by the caller)
        return lambda cols: cols[index] if type(cols[index][0]) is str else _checked_column(cols[index])
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        value = _checked(int(node.this))  # DuckDB: INTEGER
        return lambda cols: [value] * len(cols[0])
    if isinstance(node, exp.Neg):
        inner = _compile(node.this, positions)
        return lambda cols: _arith_column(operator.neg, inner(cols))
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul)):
        op = operator.add if isinstance(node, exp.Add) else operator.sub if isinstance(node, exp.Sub) else operator.mul
        left, right = _compile(node.left, positions), _compile(node.right, positions)
        return lambda cols: _arith_column(op, left(cols), right(cols))
    if type(node) is exp.Div and not node.args.get("typed") and not node.args.get("safe"):
        left, right = _compile(node.left, positions), _compile(node.right, positions)
        return lambda cols: _divide_column(left(cols), right(cols))
    if isinstance(node, exp.IntDiv) and isinstance(node.expression, exp.Nullif):  # passes/post.py's integer ``/``
        left, right = _compile(node.left, positions), _compile(node.expression.this, positions)
        return lambda cols: [_int_divide(a, b) for a, b in zip(left(cols), right(cols), strict=True)]
    if type(node) in (exp.Greatest, exp.Least):
        pick = max if isinstance(node, exp.Greatest) else min
        args = [_compile(a, positions) for a in (node.this, *node.expressions)]
        return lambda cols: _extreme_column(pick, [a(cols) for a in args])
    raise _Declined


# Whole columns at once: where every operand column holds only ints or only floats (so each row has the types
# of every other), the per-value functions below are applied by map() and the checks run once per column, with
# the same results; anything else goes value by value.


def _kind(column: list[Any]) -> type | None:
    """``int`` or ``float`` when every value of ``column`` has that type (not bool), else None."""
    kinds = set(map(type, column))
    return kinds.pop() if len(kinds) == 1 and kinds <= {int, float} else None


def _checked_column(values: list[Any]) -> list[Any]:
    """:func:`_checked` of each value."""
    kind = _kind(values)
    if kind is int and min(values) > -INT_LIMIT and max(values) < INT_LIMIT:
        return values
    if kind is float and all(map(math.isfinite, values)):
        return values
    return [_checked(v) for v in values]


def _arith_column(op: Callable[..., Any], *columns: list[Any]) -> list[Any]:
    """:func:`_arith` row by row."""
    if all(_kind(c) is not None for c in columns):
        return _checked_column(list(map(op, *columns)))
    return [_arith(op, *row) for row in zip(*columns, strict=True)]


def _divide_column(left: list[Any], right: list[Any]) -> list[float]:
    """:func:`_divide` row by row."""
    if _kind(left) is not None and _kind(right) is not None and 0 not in right:  # 0 == 0.0 == -0.0
        return _checked_column([a / b for a, b in zip(map(float, left), map(float, right), strict=True)])
    return [_divide(a, b) for a, b in zip(left, right, strict=True)]


def _extreme_column(pick: Callable[..., Any], columns: list[list[Any]]) -> list[Any]:
    """:func:`_extreme` row by row."""
    kinds = [_kind(c) for c in columns]
    if None in kinds:
        return [_extreme(pick, list(row)) for row in zip(*columns, strict=True)]
    chosen = list(map(pick, *columns)) if len(columns) > 1 else list(columns[0])  # pick(x) is not pick([x])
    return [float(v) for v in chosen] if float in kinds else chosen


def _checked(value: Any) -> Any:
    """Numbers DuckDB computes with exactly as Python does: small ints, finite floats."""
    if type(value) is int and -INT_LIMIT < value < INT_LIMIT:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise _Declined


def _number(value: Any) -> int | float:
    if type(value) not in (int, float):
        raise _Declined  # e.g. arithmetic on a text key: DuckDB's error message is kept
    return value  # type: ignore[no-any-return]


def _arith(op: Callable[..., Any], *values: Any) -> Any:
    """DuckDB: BIGINT op BIGINT is BIGINT; any DOUBLE operand makes it DOUBLE (the BIGINT converted, as Python does)."""
    return _checked(op(*(_number(v) for v in values)))


def _divide(left: Any, right: Any) -> float:
    """DuckDB's ``/`` divides as DOUBLE, both operands converted first."""
    a, b = float(_number(left)), float(_number(right))
    if b == 0:
        raise _Declined
    return _checked(a / b)  # type: ignore[no-any-return]


def _int_divide(left: Any, right: Any) -> int:
    """PostgreSQL's (and DuckDB's ``//``) integer division: truncates toward zero; a zero divisor (NULL) declines."""
    a, b = _number(left), _number(right)
    if type(a) is not int or type(b) is not int or b == 0:
        raise _Declined
    q = abs(a) // abs(b)
    return _checked(q if (a >= 0) == (b > 0) else -q)  # type: ignore[no-any-return]


def _extreme(pick: Callable[..., Any], values: list[Any]) -> Any:
    """GREATEST/LEAST: DOUBLE if any argument is, else BIGINT."""
    double = False
    for v in values:  # (one pass: this runs per cell and argument)
        kind = type(v)
        if kind is float:
            double = True
        elif kind is not int:
            raise _Declined  # e.g. a text key: DuckDB's error message is kept
    chosen = pick(values)
    return float(chosen) if double else chosen


def post_processing_sql(plan: DPPlan) -> str:
    """The sandbox query over ``__noisy`` (rendered by passes/post.py, or on demand when the Python form declines)."""
    return post_processing_query(plan).sql(dialect="duckdb")


def post_processing_query(plan: DPPlan) -> exp.Select:
    """The tree of :func:`post_processing_sql`."""
    query = exp.select(*(exp.alias_(o.expr.copy(), o.name, quoted=True) for o in plan.outputs), copy=False).from_(
        NOISY, copy=False
    )
    if plan.having is not None:
        query = query.where(plan.having.copy(), copy=False)
    if plan.order:
        query = query.order_by(*(o.copy() for o in plan.order), copy=False)
    if plan.limit is not None:
        query = query.limit(plan.limit, copy=False)
    if plan.offset is not None:
        query = query.offset(plan.offset, copy=False)
    return query


def run_sandboxed(query: str, noisy: pd.DataFrame | None = None, *, what: str) -> Released:
    """Run ``query`` where only ``noisy`` (as table ``__noisy``) exists and no file can be read.

    A failure names ``what`` was computed and the likely causes; the engine's own message is never shown.
    """
    con = _sandbox_cursor()
    try:
        if noisy is not None:
            con.register(NOISY, noisy)
        result = con.execute(query)
        return Released(tuple(d[0] for d in result.description or ()), result.fetchall())
    except duckdb.Error as exc:
        raise InvalidParameterError(
            f"could not compute {what} ({type(exc).__name__}): check for operations the values' types do not "
            "support (e.g. arithmetic on text), division by zero or out-of-range casts"
        ) from None
    finally:
        con.close()


def _sandbox_cursor() -> duckdb.DuckDBPyConnection:
    """A fresh cursor on this process's sandbox database (re-opened after a fork)."""
    global _sandbox
    with _lock:
        if _sandbox is None or _sandbox[0] != os.getpid():
            _sandbox = (os.getpid(), duckdb.connect(":memory:", config={"enable_external_access": False}))
        return _sandbox[1].cursor()
