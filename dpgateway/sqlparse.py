"""Parse analyst SQL (PostgreSQL dialect) and classify what is allowed in row-level expressions."""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from dpgateway.errors import GroupingError, PrivacyViolationError, QuerySyntaxError, UnsupportedError

READ_DIALECT = "postgres"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# sqlglot logs a warning when it falls back to a generic Command; we refuse those anyway.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

WRITE_STATEMENTS = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Merge, exp.TruncateTable)

# Scalar expression nodes allowed over raw rows (WHERE, GROUP BY keys). Every one is total on the backend
# (CAST becomes TRY_CAST), so no backend error can reveal a row value.
ROW_SAFE: tuple[type[exp.Expr], ...] = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.Tuple,
    exp.And,
    exp.Or,
    exp.Not,
    exp.Xor,
    exp.EQ,
    exp.NEQ,
    exp.NullSafeEQ,
    exp.NullSafeNEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.ILike,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Neg,
    exp.Case,
    exp.If,
    exp.Coalesce,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Var,
    exp.Lower,
    exp.Upper,
    exp.Abs,
    exp.Floor,
    exp.Ceil,
    exp.Round,
    exp.Length,
    exp.Substring,
    exp.Concat,
    exp.DPipe,
    exp.Trim,
    exp.Greatest,
    exp.Least,
    exp.Extract,
    exp.Year,
    exp.Month,
    exp.Day,
    exp.DateTrunc,
    exp.TimestampTrunc,
)


def parse(sql: str) -> exp.Expr:
    """Parse one statement; syntax errors become 42601 with line and column."""
    if not isinstance(sql, str) or not sql.strip():
        raise QuerySyntaxError("empty query: send one SELECT statement")
    try:
        statements = [s for s in sqlglot.parse(sql, read=READ_DIALECT) if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first.get("line") else ""
        text = _ANSI.sub("", str(first.get("description") or exc)).splitlines()[0]
        raise QuerySyntaxError(f"syntax error{where}: {text}") from None
    except TokenError as exc:
        raise QuerySyntaxError(f"syntax error: {_ANSI.sub('', str(exc)).splitlines()[0]}") from None
    if not statements:
        raise QuerySyntaxError("empty query: send one SELECT statement")
    if len(statements) > 1:
        raise UnsupportedError("send one statement at a time (found several separated by ';')")
    statement = statements[0]
    if isinstance(statement, WRITE_STATEMENTS):
        raise PrivacyViolationError("the gateway is read-only: only SELECT statements are allowed")
    if isinstance(statement, exp.SetOperation):
        raise UnsupportedError("UNION, INTERSECT and EXCEPT are not supported; send each SELECT separately")
    if not isinstance(statement, exp.Select):
        raise UnsupportedError(f"only SELECT statements are supported, not {statement.key.upper()}")
    return statement


def query_key(sql: str, *parameters: object) -> str:
    """Replay-cache key: the normalized SQL (parsed and regenerated) plus the privacy parameters."""
    payload = "\x1f".join([normalize(sql), *map(repr, parameters)])
    return hashlib.sha256(payload.encode()).hexdigest()


@lru_cache(maxsize=1024)
def normalize(sql: str) -> str:
    """The SQL text parsed and regenerated (memoized: a pure function of the text, ~1 ms to compute)."""
    try:
        return parse(sql).sql(dialect=READ_DIALECT, normalize=True)
    except (QuerySyntaxError, UnsupportedError, PrivacyViolationError):
        return " ".join(sql.split())


def check_row_expression(node: exp.Expr, where: str) -> None:
    """Refuse nodes that are unsafe or unsupported over raw rows (aggregates, subqueries, functions)."""
    for sub in node.walk():
        if isinstance(sub, (exp.Subquery, exp.Select, exp.Exists)):
            raise UnsupportedError(f"subqueries are not supported (in {where})")
        if isinstance(sub, exp.AggFunc):
            raise GroupingError(f"aggregate functions are not allowed in {where}")
        if isinstance(sub, exp.Window):
            raise UnsupportedError(f"window functions are not supported (in {where})")
        if isinstance(sub, exp.Star):
            raise PrivacyViolationError(f"* is not allowed in {where}")
        if not isinstance(sub, ROW_SAFE):
            name = sub.sql_name() if isinstance(sub, exp.Func) else sub.key.upper()
            raise UnsupportedError(
                f"{name} is not supported in {where}; allowed are comparisons, arithmetic (+ - *), CASE, "
                "COALESCE, CAST, string and rounding functions"
            )


def number(value: float) -> exp.Expr:
    """A numeric literal (negative values as unary minus); integral floats are written as integers."""
    as_float = float(value)
    text = str(int(abs(as_float))) if as_float.is_integer() else repr(abs(as_float))
    literal = exp.Literal.number(text)
    return exp.Neg(this=literal) if as_float < 0 else literal
