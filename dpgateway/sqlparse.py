"""Parse analyst SQL (PostgreSQL dialect) and classify what is allowed in row-level expressions."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
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
    exp.Var,  # a date-part unit only, rebuilt from DATE_PARTS (check_args)
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
    return _negations_as_not(statement)


def _negations_as_not(tree: exp.Expr) -> exp.Expr:
    """``x IS NOT NULL``, ``NOT LIKE`` and ``NOT ILIKE`` as ``NOT (...)`` around the plain node.

    sqlglot 30 reads them in the PostgreSQL dialect as one node flagged ``negate``, which the DuckDB and Spark
    generators write as ``x IS NOT NULL`` and their parsers read back as ``NOT x IS NULL``: a different tree, so
    sqlcheck.verify refused every such query. ``NOT (...)`` is what every dialect reads back, and the one shape
    the passes know (a pass that reads ``exp.Is`` need not know of the flag). Test: tests/test_expressions.py.
    """
    for node in list(tree.find_all(exp.Is, exp.Like, exp.ILike)):
        if node.args.get("negate"):
            negation = exp.Not()
            node.replace(negation)  # detaches node: it becomes the NOT's operand, unflagged, without a copy
            node.set("negate", None)
            negation.set("this", node)
    return tree


@lru_cache(maxsize=1024, typed=True)  # typed: 1 and 1.0 have other reprs, so other keys
def query_key(sql: str, *parameters: object) -> str:
    """Replay-cache key: the normalized SQL (parsed and regenerated) plus the privacy parameters (memoized:
    a pure function of its arguments)."""
    payload = "\x1f".join([normalize(sql), *map(repr, parameters)])
    return hashlib.sha256(payload.encode()).hexdigest()


AliasFree = tuple[str, tuple[str | None, ...]]


def normalize(sql: str) -> str:
    """The SQL text parsed and regenerated (memoized in :func:`normal_forms`, ~0.3 ms to compute)."""
    return normal_forms(sql)[0]


@lru_cache(maxsize=1024)
def normal_forms(sql: str) -> tuple[str, AliasFree | None]:
    """The normalized text (:func:`normalize`) and the alias-free form (:func:`alias_free`), from one parse.

    ``copy=False``: the generator works on the tree itself instead of a deep copy (which cost more than the
    parse); nothing else holds this tree. Test: tests/test_overhead.py::test_generating_without_a_copy_is_the_same_text.
    """
    try:
        tree = parse(sql)
    except (QuerySyntaxError, UnsupportedError, PrivacyViolationError):
        return " ".join(sql.split()), None
    return tree.sql(dialect=READ_DIALECT, normalize=True, copy=False), _alias_free(tree)


def alias_free(sql: str) -> AliasFree | None:
    """The normalized SQL with each output alias replaced by its position, and the aliases (None where an
    output has none); None when the text does not parse, has no alias, or names an alias anywhere else
    (HAVING, ORDER BY, GROUP BY, or a column of that name), where the alias could change what is computed."""
    return normal_forms(sql)[1]


def _alias_free(tree: exp.Expr) -> AliasFree | None:
    """:func:`alias_free` of a parsed statement (a tree nothing else holds: its aliases are replaced)."""
    assert isinstance(tree, exp.Select)
    aliases = tuple(e.alias if isinstance(e, exp.Alias) else None for e in tree.expressions)
    if not any(aliases):
        return None
    own = [e.args["alias"] for e in tree.expressions if isinstance(e, exp.Alias)]
    names = {a.lower() for a in aliases if a}
    if any(i.name.lower() in names for i in tree.find_all(exp.Identifier) if not any(i is o for o in own)):
        return None
    for position, item in enumerate(tree.expressions):
        if isinstance(item, exp.Alias):
            item.set("alias", exp.to_identifier(f"__out{position}", quoted=True))
    return tree.sql(dialect=READ_DIALECT, normalize=True, copy=False), aliases


# Post-processing (over released values only) also divides, and takes roots and powers.
POST_SAFE: tuple[type[exp.Expr], ...] = (*ROW_SAFE, exp.Div, exp.Sqrt, exp.Pow)

# Aggregate arguments (passes/intervals.py rebuilds them over clamped columns, refusing any operation
# that could fail or be unbounded within the declared bounds) also divide and take EXP, LN, SQRT, POWER.
VALUE_SAFE: tuple[type[exp.Expr], ...] = (*ROW_SAFE, exp.Div, exp.Exp, exp.Ln, exp.Sqrt, exp.Pow)

# Date-part units: the analyst's text is looked up here and replaced by our own constant (never kept).
DATE_PARTS: dict[str, str] = {
    p: p
    for p in (
        "YEAR", "QUARTER", "MONTH", "WEEK", "DAY", "DOW", "DOY", "ISODOW", "ISOYEAR", "HOUR", "MINUTE",
        "SECOND", "MILLISECOND", "MICROSECOND", "EPOCH", "DECADE", "CENTURY", "MILLENNIUM",
    )
}  # fmt: skip
_UNIT_OF: dict[type[exp.Expr], str] = {exp.Extract: "this", exp.DateTrunc: "unit", exp.TimestampTrunc: "unit"}
TYPE_NAMES = frozenset(
    exp.DataType.Type[name]
    for name in (
        "TINYINT", "SMALLINT", "INT", "BIGINT", "INT128", "FLOAT", "DOUBLE", "DECIMAL", "VARCHAR", "CHAR",
        "TEXT", "BOOLEAN", "DATE", "TIMESTAMP", "TIMESTAMPTZ", "TIME",
    )
)  # fmt: skip
TRIM_POSITIONS = frozenset({"BOTH", "LEADING", "TRAILING"})
NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# The only arguments that may hold text rather than a node; every other argument is a node, a list of
# nodes, a flag or empty. Text in a Literal is quoted by the generator (strings) or checked against
# NUMBER; an Identifier is a declared column name (resolve_table) or an alias, quoted when generated.
TEXT_ARGS = frozenset({(exp.Identifier, "this"), (exp.Literal, "this"), (exp.Var, "this"), (exp.Trim, "position")})


def row_expression(node: exp.Expr, where: str) -> exp.Expr:
    """An allowlisted copy of ``node`` for raw rows (WHERE, GROUP BY keys): columns, no aggregate, no subquery.

    Proof note (no analyst text in SQL): every node kind is in :data:`ROW_SAFE`, every text argument is
    one of :data:`TEXT_ARGS` (checked by :func:`check_args`), and date-part units are rebuilt from
    :data:`DATE_PARTS`, so what the generator writes is our keywords, quoted strings and identifiers, and
    numbers. Tests: tests/attacks/test_injection.py.
    """
    return allowlisted(node, where, ROW_SAFE, columns=True)


def row_expression_value(node: exp.Expr, where: str) -> exp.Expr:
    """An allowlisted copy of an aggregate argument or binned key (:data:`VALUE_SAFE`; bounded by passes/intervals.py)."""
    return allowlisted(node, where, VALUE_SAFE, columns=True)


def constant_expression(node: exp.Expr, where: str) -> exp.Expr:
    """An allowlisted copy of ``node`` with no column at all (a table-less SELECT)."""
    return allowlisted(node, where, POST_SAFE, columns=False)


def post_expression(node: exp.Expr, where: str) -> exp.Expr:
    """An allowlisted copy of a post-processing expression (its columns are noisy values or output aliases)."""
    return allowlisted(node, where, POST_SAFE, columns=True)


def allowlisted(
    node: exp.Expr, where: str, allowed: tuple[type[exp.Expr], ...], *, columns: bool, aggregates: bool = False
) -> exp.Expr:
    """A copy of ``node`` whose every node kind is in ``allowed`` and every text argument checked, units rebuilt."""
    checked = node.copy()
    for sub in checked.walk():
        if isinstance(sub, (exp.Subquery, exp.Select, exp.Exists)):
            raise UnsupportedError(f"subqueries are not supported (in {where})")
        if isinstance(sub, exp.AggFunc) and not aggregates:
            raise GroupingError(f"aggregate functions are not allowed in {where}")
        if isinstance(sub, exp.Window):
            raise UnsupportedError(f"window functions are not supported (in {where})")
        if isinstance(sub, exp.Star) and not aggregates:
            raise PrivacyViolationError(f"* is not allowed in {where}")
        if isinstance(sub, exp.Column) and not columns:
            raise UnsupportedError(f"columns need a FROM clause naming a table (in {where})")
        if not isinstance(sub, allowed):
            name = (
                sub.name.upper()
                if isinstance(sub, exp.Anonymous)
                else sub.sql_name()
                if isinstance(sub, exp.Func)
                else sub.key.upper()
            )
            raise UnsupportedError(
                f"{name} is not supported in {where}; allowed are comparisons, arithmetic (+ - *), CASE, "
                "COALESCE, CAST, string and rounding functions"
            )
        check_args(sub, where)
    return checked.transform(_rebuild_unit, copy=False)


def check_args(node: exp.Expr, where: str) -> None:
    """Refuse free text: only :data:`TEXT_ARGS` hold text, and each of those is checked for its kind."""
    for key, value in node.args.items():
        if value is None or isinstance(value, (bool, exp.Expr)):
            continue
        if isinstance(value, list) and all(isinstance(v, exp.Expr) for v in value):
            continue
        if isinstance(node, exp.DataType) and key == "this" and value in TYPE_NAMES:
            continue
        if (type(node), key) not in TEXT_ARGS or not isinstance(value, str):
            raise UnsupportedError(f"{node.key.upper()} is not supported in {where} (argument {key})")
    if isinstance(node, exp.Literal) and not node.is_string and not NUMBER.fullmatch(node.this):
        raise UnsupportedError(f"the number {node.this!r} is not supported in {where}")
    if isinstance(node, exp.Trim) and str(node.args.get("position") or "BOTH").upper() not in TRIM_POSITIONS:
        raise UnsupportedError(f"TRIM is not supported in {where} with that position")
    if isinstance(node, exp.Var):
        parent = node.parent
        unit = _UNIT_OF.get(type(parent)) if parent is not None else None
        if parent is None or unit is None or parent.args.get(unit) is not node:
            raise UnsupportedError(f"the keyword {node.name!r} is not supported in {where}")
        _date_part(node.name, where)
    if isinstance(node, exp.Extract) and isinstance(node.this, exp.Literal):
        _date_part(node.this.name, where)  # EXTRACT('year' FROM x): rebuilt as a keyword
    if isinstance(node, exp.DataType) and (node.args.get("kind") or node.args.get("nested")):
        raise UnsupportedError(f"the type {node.sql(READ_DIALECT)!r} is not supported in {where}")
    if isinstance(node, exp.DataType) and any(not isinstance(e, exp.DataTypeParam) for e in node.expressions):
        raise UnsupportedError(f"the type {node.sql(READ_DIALECT)!r} is not supported in {where}")
    if isinstance(node, exp.DataTypeParam) and not (
        isinstance(node.this, exp.Literal) and not node.this.is_string and node.this.name.isdigit()
    ):
        raise UnsupportedError(f"type parameters must be integers (in {where})")
    if isinstance(node, exp.Identifier) and not isinstance(node.parent, exp.Column):
        raise UnsupportedError(f"the name {node.name!r} is not supported in {where}")


def _date_part(text: str, where: str) -> str:
    part = DATE_PARTS.get(text.strip().upper())
    if part is None:
        raise UnsupportedError(f"unknown date part {text!r} in {where}; use one of: {', '.join(DATE_PARTS)}")
    return part


def _rebuild_unit(node: exp.Expr) -> exp.Expr:
    """Date-part units rebuilt from our own constant: the analyst's text is never kept."""
    unit = _UNIT_OF.get(type(node))
    value = node.args.get(unit) if unit else None
    if unit and isinstance(value, (exp.Var, exp.Literal)):
        node.set(unit, exp.var(_date_part(value.name, "a date part")))
    return node


def number(value: float) -> exp.Expr:
    """A numeric literal (negative values as unary minus); integral floats are written as integers."""
    as_float = float(value)
    text = str(int(abs(as_float))) if as_float.is_integer() else repr(abs(as_float))
    literal = exp.Literal.number(text)
    return exp.Neg(this=literal) if as_float < 0 else literal


AGGREGATES: tuple[type[exp.Expr], ...] = (
    exp.Count,
    exp.Sum,
    exp.Avg,
    exp.Min,
    exp.Max,
    exp.Variance,
    exp.VariancePop,
    exp.Stddev,
    exp.StddevSamp,
    exp.StddevPop,
)
"""Aggregates a public-table passthrough may compute (and so a backend statement may hold)."""


def int_clause(select: exp.Select, key: str) -> int | None:
    """The value of ``LIMIT``/``OFFSET`` (``key``): a non-negative integer literal, or None when absent."""
    clause = select.args.get(key)
    if clause is None:
        return None
    value = clause.expression if isinstance(clause, (exp.Limit, exp.Offset)) else clause
    if not isinstance(value, exp.Literal) or value.is_string or not value.name.isdigit():
        raise UnsupportedError(f"{key.upper()} must be a non-negative integer literal")
    return int(value.name)


def bottom_up(tree: exp.Expr, rewrite: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
    """``tree`` with ``rewrite`` applied to every node, children first (``transform`` skips the children of a
    node it replaced, so a rewrite nested inside another, e.g. an integer division or ROUND inside one,
    would be missed). Mutates ``tree``; copy it first if it is shared."""
    for node in reversed(list(tree.walk(bfs=True))):
        new = rewrite(node)
        if new is not node:
            if node is tree:
                return new
            node.replace(new)
    return tree
