"""Statements over the wire: splitting a query string, session commands, bound parameters, result types.

Analyst SQL is never assembled from text here. A statement string is split at the tokenizer's semicolons and
passed on as it was written; bound parameters are put into the parsed sqlglot tree as literal nodes
(:func:`bind_parameters`), and the tree is rendered by sqlglot.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError, TokenError
from sqlglot.optimizer.annotate_types import annotate_types
from sqlglot.optimizer.qualify import qualify
from sqlglot.tokens import Token, TokenType

from dpgateway.errors import InvalidParameterError, QuerySyntaxError, UnsupportedError
from dpgateway.plan import DPPlan, Output
from dpgateway.policies.model import Config
from dpgateway.server import pgtypes as t
from dpgateway.server.protocol import Field

DIALECT = "postgres"
_POSTGRES = sqlglot.Dialect.get_or_raise(DIALECT)

TRANSACTION_WORDS = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"})
SESSION_WORDS = frozenset({"SET", "RESET", "SHOW", "DISCARD", "EXPLAIN"})


@dataclass(frozen=True)
class Statement:
    """One statement of a query string: its text and its first keyword (upper case, '' when empty)."""

    text: str
    keyword: str

    @property
    def is_empty(self) -> bool:
        return not self.keyword


@functools.lru_cache(maxsize=512)
def _cached_tokens(sql: str) -> tuple[Token, ...]:
    return tuple(_POSTGRES.tokenize(sql))


def _tokens(sql: str) -> tuple[Token, ...]:
    """sqlglot's tokens of ``sql``; short statements are remembered (the same text is split and routed, and
    clients repeat statements), tokens are only read."""
    return _cached_tokens(sql) if len(sql) <= 4096 else tuple(_POSTGRES.tokenize(sql))


def split(sql: str) -> list[Statement]:
    """Split at top-level semicolons (strings and comments respected); a trailing empty part is dropped."""
    plain = _plain_first_word(sql)
    if plain is not None:  # one statement: no tokenizing (the planner tokenizes a DP statement anyway)
        return [Statement(sql.strip(), plain.upper())]
    return _split_tokens(sql)


def _split_tokens(sql: str) -> list[Statement]:
    try:
        tokens = _tokens(sql)
    except (TokenError, SqlglotError) as exc:
        raise QuerySyntaxError(f"syntax error: {_first_line(exc)}") from None
    statements: list[Statement] = []
    start, first = 0, ""
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append(Statement(sql[start : token.start].strip(), first))
            start, first = token.end + 1, ""
        elif not first:
            first = token.text.upper()
    if first or not statements:
        statements.append(Statement(sql[start:].strip(), first))
    return statements


# A plain statement: a first word, then only words, numbers, white space and operator characters: no `;`, quote,
# `$`, `/` (block comment), `#`, `[`, non-ASCII, .... The tokenizer cannot fail on such text (no string,
# quoted name or block comment can start in it), it is one statement, and its first token is its first word,
# unless that word may begin a keyword of several words (GROUP BY, DOUBLE PRECISION, ...). Tokenizing costs more
# than the rest of routing a fresh DP statement; tests/server/test_statements.py compares with the tokenizer.
_PLAIN = re.compile(r"[ \t\n\r]*+([A-Za-z_][A-Za-z0-9_]*+)[A-Za-z0-9_ \t\n\r(),.*<>=!+%:-]*+")
_WORD = re.compile(r"[A-Za-z0-9_]++")
_MULTIWORD_FIRST = frozenset(k.split(" ")[0] for k in _POSTGRES.tokenizer_class.KEYWORDS if " " in k)


def _plain_first_word(sql: str) -> str | None:
    """The first word of a plain statement (see ``_PLAIN``), else None."""
    match = _PLAIN.fullmatch(sql) if len(sql) <= 4096 else None
    if match is None or match.group(1).upper() in _MULTIWORD_FIRST:
        return None
    return match.group(1)


_STRINGS = frozenset(
    {
        TokenType.STRING,
        TokenType.NATIONAL_STRING,
        TokenType.RAW_STRING,
        TokenType.HEREDOC_STRING,
        TokenType.BYTE_STRING,
        TokenType.BIT_STRING,
        TokenType.HEX_STRING,
        TokenType.UNICODE_STRING,
    }
)


def names_policy_table(sql: str, config: Config) -> bool:
    """Whether any word of the statement outside string literals is the name of a policy table.

    Deliberately wide: a column, alias or function of that name counts too (the statement then goes to the DP
    path, which refuses what it cannot answer). The last part of a qualified name is compared, case-insensitively.
    A name inside a string literal (``'pums'::regclass``, ``query_to_xml('select ...')``) does not count: such
    statements go to the row-less shadow catalog, which has nothing to return.
    """
    names = {table.name.rpartition(".")[2].lower() for table in config.tables}
    # A plain SELECT or WITH (no comment either): every word is a token, so a name found needs no tokenizing.
    first = _plain_first_word(sql) if "--" not in sql else None
    if (
        first is not None
        and first.upper() in ("SELECT", "WITH")
        and any(word.lower() in names and word.upper() not in _MULTIWORD_FIRST for word in _WORD.findall(sql))
    ):
        return True
    return _names_in_tokens(sql, names)


def _names_in_tokens(sql: str, names: set[str]) -> bool:
    try:
        tokens = _tokens(sql)
    except (TokenError, SqlglotError):
        return True  # not understood: the DP path refuses it with a syntax error
    return any(token.token_type not in _STRINGS and token.text.lower() in names for token in tokens)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ---- session commands ------------------------------------------------------------------------------------

_SET = re.compile(r"(?is)SET\s+(?:(SESSION|LOCAL)\s+)?([A-Za-z_][\w.]*)\s*(?:=|\s+TO\s+|\s+)\s*(.+?)\s*")
_SET_TIMEZONE = re.compile(r"(?is)SET\s+(?:SESSION\s+)?TIME\s+ZONE\s+(.+?)\s*")
_SHOW = re.compile(r"(?is)SHOW\s+(.+?)\s*")
_RESET = re.compile(r"(?is)RESET\s+([A-Za-z_][\w.]*|ALL)\s*")


@dataclass(frozen=True)
class SetCommand:
    name: str  # lower case
    value: str  # unquoted; 'DEFAULT' resets


def parse_set(text: str) -> SetCommand:
    match = _SET_TIMEZONE.fullmatch(text)
    if match:
        return SetCommand("timezone", _unquote(match.group(1)))
    match = _SET.fullmatch(text)
    if match is None:
        raise QuerySyntaxError(f"syntax error in SET: expected SET name = value, got {text[:80]!r}")
    if match.group(1) and match.group(1).upper() == "LOCAL":
        raise UnsupportedError("SET LOCAL is not supported; use SET (it lasts for the session)")
    return SetCommand(match.group(2).lower(), _unquote(match.group(3)))


def parse_show(text: str) -> str:
    match = _SHOW.fullmatch(text)
    if match is None:
        raise QuerySyntaxError("syntax error in SHOW: expected SHOW name")
    return " ".join(match.group(1).lower().split())


def parse_reset(text: str) -> str:
    match = _RESET.fullmatch(text)
    if match is None:
        raise QuerySyntaxError("syntax error in RESET: expected RESET name or RESET ALL")
    return match.group(1).lower()


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace(value[0] * 2, value[0])
    return value


def explain_target(text: str) -> str:
    """The query of ``EXPLAIN [ANALYZE|VERBOSE|(...)] query``; options are ignored (nothing is ever run)."""
    rest = re.sub(r"(?is)^EXPLAIN\s+", "", text)
    rest = re.sub(r"(?is)^\([^)]*\)\s*", "", rest)
    rest = re.sub(r"(?is)^((ANALYZE|ANALYSE|VERBOSE)\s+)+", "", rest)
    return rest


_SESSION_FUNCTIONS: dict[type[exp.Expr], tuple[str, str]] = {
    exp.CurrentSchema: ("current_schema", "schema"),
    exp.SessionUser: ("session_user", "user"),
    exp.CurrentUser: ("current_user", "user"),
    exp.CurrentCatalog: ("current_catalog", "database"),
    exp.CurrentDatabase: ("current_database", "database"),
    exp.CurrentVersion: ("version", "version"),
}
_SESSION_WORDS = {"user": "user", "current_role": "user"}
_MENTIONS_SESSION = re.compile(r"(?i)\b(current_\w+|session_user|user|version)\b")


def session_functions(sql: str) -> list[tuple[str, str]] | None:
    """``[(column name, what)]`` when the statement is a SELECT of session functions only (``current_user``,
    ``session_user``, ``current_schema()``, ``current_catalog``, ``current_database()``, ``version()``), which
    the session answers itself: who logged in, not the shadow catalog's role. ``what`` is user, schema,
    database or version."""
    if not _MENTIONS_SESSION.search(sql):
        return None
    try:
        tree = sqlglot.parse_one(sql, read=DIALECT)
    except SqlglotError:
        return None
    if not isinstance(tree, exp.Select) or any(k != "expressions" and v for k, v in tree.args.items()):
        return None
    out = []
    for select in tree.selects:
        node = select.unalias()
        if isinstance(node, exp.Dot) and isinstance(node.this, exp.Identifier) and node.this.name == "pg_catalog":
            node = node.expression
        found = _SESSION_FUNCTIONS.get(type(node))
        if found is None and isinstance(node, exp.Column) and not node.table and not node.this.quoted:
            word = node.name.lower()
            found = (word, _SESSION_WORDS[word]) if word in _SESSION_WORDS else None
        if (
            found is None
            and isinstance(node, exp.Anonymous)
            and node.name.lower() == "version"
            and not node.expressions
        ):
            found = ("version", "version")
        if found is None:
            return None
        out.append((select.alias or found[0], found[1]))
    return out


# ---- bound parameters ------------------------------------------------------------------------------------


def parse_statement(sql: str) -> exp.Expr:
    try:
        tree = sqlglot.parse_one(sql, read=DIALECT)
    except (ParseError, TokenError) as exc:
        raise QuerySyntaxError(f"syntax error: {_first_line(exc)}") from None
    if tree is None:
        raise QuerySyntaxError("syntax error: empty statement")
    return tree


def parameter_count(tree: exp.Expr) -> int:
    """The highest ``$n`` in the statement (PostgreSQL counts parameters that way)."""
    numbers = [_parameter_number(node) for node in tree.find_all(exp.Parameter)]
    return max((n for n in numbers if n is not None), default=0)


def _parameter_number(node: exp.Parameter) -> int | None:
    inner = node.this
    if isinstance(inner, exp.Literal) and not inner.is_string and str(inner.this).isdigit():
        return int(inner.this)
    return None


def bind_parameters(tree: exp.Expr, values: list[Any]) -> str:
    """The statement with each ``$n`` replaced by a literal node of its value, rendered by sqlglot.

    Values never become SQL text by formatting: strings are ``exp.Literal.string`` nodes (sqlglot quotes
    them), numbers ``exp.Literal.number`` of their ``repr``, dates a CAST of a string literal.
    """
    bound = tree.copy()
    for node in list(bound.find_all(exp.Parameter)):
        n = _parameter_number(node)
        if n is None or not 1 <= n <= len(values):
            raise InvalidParameterError(f"there is no parameter ${n if n is not None else '?'}")
        node.replace(_literal(values[n - 1]))
    return bound.sql(dialect=DIALECT)


def _literal(value: Any) -> exp.Expr:
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, int):
        return _signed(exp.Literal.number(abs(value)), value < 0)
    if isinstance(value, (float, Decimal)):
        if not math.isfinite(value):
            raise InvalidParameterError("a parameter must be a finite number, not NaN or infinity")
        return _signed(exp.Literal.number(str(abs(value))), value < 0)
    if isinstance(value, dt.date):
        return exp.cast(exp.Literal.string(value.isoformat()), "date")
    return exp.Literal.string(str(value))


def _signed(literal: exp.Expr, negative: bool) -> exp.Expr:
    return exp.Paren(this=exp.Neg(this=literal)) if negative else literal


def parameter_types(tree: exp.Expr, declared: tuple[int, ...], config: Config) -> tuple[int, ...]:
    """The type of each parameter: as declared by Parse, else the type of a policy column it is compared
    with, else int8 in LIMIT/OFFSET, else text."""
    count = max(parameter_count(tree), len(declared))
    types = [declared[i] if i < len(declared) and declared[i] else 0 for i in range(count)]
    columns = {c.name.lower(): c.type for table in config.tables for c in table.columns}
    for node in tree.find_all(exp.Parameter):
        n = _parameter_number(node)
        if n is None or n > count or types[n - 1]:
            continue
        types[n - 1] = _inferred(node, columns)
    return tuple(oid or t.TEXT.oid for oid in types)


def _inferred(node: exp.Parameter, columns: Mapping[str, str]) -> int:
    parent = node.parent
    if isinstance(parent, (exp.Limit, exp.Offset)):
        return t.INT8.oid
    while isinstance(parent, (exp.Paren, exp.Neg, exp.Tuple, exp.In, exp.Between)) and parent is not None:
        for column in parent.find_all(exp.Column):
            kind = columns.get(column.name.lower())
            if kind:
                return t.POLICY_TYPES[kind].oid
        parent = parent.parent
    if isinstance(parent, exp.Binary):
        for column in parent.find_all(exp.Column):
            kind = columns.get(column.name.lower())
            if kind:
                return t.POLICY_TYPES[kind].oid
    return 0


# ---- result types ----------------------------------------------------------------------------------------

_SQLGLOT_TYPES = {
    "BOOLEAN": t.BOOL,
    "SMALLINT": t.INT2,
    "TINYINT": t.INT2,
    "INT": t.INT4,
    "BIGINT": t.INT8,
    "FLOAT": t.FLOAT4,
    "DOUBLE": t.FLOAT8,
    "DECIMAL": t.NUMERIC,
    "DATE": t.DATE,
}


def result_fields(sql: str, plan: DPPlan | None, config: Config) -> list[Field]:
    """Column names and PostgreSQL types of a query's answer, without running it.

    DP answers are typed as PostgreSQL types the same aggregate over the declared schema (where ``int`` columns
    are ``bigint``): COUNT int8; SUM, AVG, VARIANCE and STDDEV of an ``int`` column numeric, of a ``float``
    column float8; a group key the type of its policy column; other expressions as sqlglot types them over the
    policy schema (the statement is parsed and typed only for those).
    """
    if plan is not None and not plan.passthrough:
        keys = {k.name: k.expr for k in plan.group_keys}
        types: list[t.PgType | None] | None = None
        fields = []
        for i, output in enumerate(plan.outputs):
            pg = _aggregate_type(output, plan)
            if pg is None and output.kind == "key":
                pg = _key_type(keys.get(output.name), plan)
            if pg is None:
                if types is None:
                    types = _annotated(parse_statement(sql), config)
                pg = (types[i] if i < len(types) else None) or t.FLOAT8
            fields.append(Field(output.name, pg.oid, pg.length))
        return fields
    tree = parse_statement(sql)
    names = [s.alias_or_name or "?column?" for s in tree.selects] if isinstance(tree, exp.Query) else []
    fields = []
    for name, pg in zip(names, _annotated(tree, config), strict=False):
        pg = pg or t.TEXT  # an untyped NULL is text, as in PostgreSQL
        fields.append(Field(name, pg.oid, pg.length))
    return fields


def _aggregate_type(output: Output, plan: DPPlan) -> t.PgType | None:
    """PostgreSQL's result type of a DP aggregate: count(*) int8; sum/avg/var/stddev numeric over a bigint
    column, float8 over a double precision column (or an expression)."""
    if output.kind == "count":
        return t.INT8
    if output.kind not in ("sum", "avg", "var", "stddev"):
        return None
    measured = {m.name: m for m in plan.measurements}
    columns = {c.name.lower(): c.type for c in plan.table.columns} if plan.table is not None else {}
    kinds = {
        columns.get((measured[name].column or "").lower())
        for name in output.measurements
        if name in measured and measured[name].column
    }
    return t.NUMERIC if kinds == {"int"} else t.FLOAT8


def _key_type(expr: exp.Expr | None, plan: DPPlan) -> t.PgType | None:
    if isinstance(expr, exp.Column) and plan.table is not None:
        for column in plan.table.columns:
            if column.name.lower() == expr.name.lower():
                return t.POLICY_TYPES[column.type]
    if isinstance(expr, exp.Case):
        return (
            t.TEXT
            if any(
                isinstance(i.args.get("true"), exp.Literal) and i.args["true"].is_string
                for i in expr.args.get("ifs", [])
            )
            else None
        )
    return None


def _annotated(tree: exp.Expr, config: Config) -> list[t.PgType | None]:
    """sqlglot's types of the SELECT list over the policy schema (None where it cannot tell)."""
    if not isinstance(tree, exp.Query):
        return []
    schema: dict[str, object] = {
        table.name: {
            c.name: {"int": "BIGINT", "float": "DOUBLE", "str": "TEXT", "bool": "BOOLEAN", "date": "DATE"}[c.type]
            for c in table.columns
        }
        for table in config.tables
    }
    try:
        typed = annotate_types(
            qualify(
                tree.copy(), schema=schema, dialect=DIALECT, validate_qualify_columns=False, quote_identifiers=False
            ),
            schema=schema,
            dialect=DIALECT,
        )
    except (SqlglotError, KeyError, ValueError):
        return [None] * len(tree.selects)
    out: list[t.PgType | None] = []
    for select in typed.selects:  # type: ignore[attr-defined]
        kind = select.type.this.name if select.type is not None else ""
        if kind in ("TEXT", "VARCHAR", "CHAR", "NCHAR", "NVARCHAR"):
            out.append(t.TEXT)
        elif kind in ("NULL", "UNKNOWN"):
            out.append(None)
        else:
            out.append(_SQLGLOT_TYPES.get(kind))
    return out
