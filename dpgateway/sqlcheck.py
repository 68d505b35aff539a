"""Round-trip verification: every statement sent to a backend is parsed back and must be the planned tree.

The parser allowlist (:mod:`dpgateway.sqlparse`) keeps analyst text out of the SQL; this is the second,
independent layer. :func:`verify` renders the tree the planner built, parses the text back with the
backend's dialect and refuses it unless

- the text is exactly one SELECT statement;
- the parsed tree equals the built tree, node by node (:func:`_canonical`, which ignores only flags the
  dialect's parser adds or drops without changing the meaning, listed in ``_IGNORED``, and the length
  of text types, which DuckDB's generator drops and DuckDB ignores);
- every relation is one of the planner's own CTEs or one of the declared source relations (compared with
  the relation the backend hooks render for the policy), every SELECT is a CTE body or the main query
  (no subquery anywhere), and every node kind is in :data:`BACKEND_NODES` (functions included). The known harmless differences: parser flags in ``_IGNORED``, text-type lengths,
the spelling of table functions and function names, and a bare ORDER BY item (the parser wraps it).

Only :func:`verify` creates a :class:`VerifiedSQL`, and connectors accept nothing else
(:meth:`dpgateway.connectors.base.Connector.execute`), so an unverified string cannot reach a backend.
A statement that fails is refused with 42501 (:class:`PrivacyViolationError`): the analyst's query is
what made the generated SQL differ from the plan, and it is not run. The check runs once per plan build
(plans are cached); its cost is in bench/RESULTS.md. Tests: tests/attacks/test_injection.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from dpgateway.errors import InternalError, PrivacyViolationError
from dpgateway.sqlparse import AGGREGATES, POST_SAFE, VALUE_SAFE

_TOKEN = object()

# Node kinds a backend statement may hold outside its source relations: the row-safe and post-processing
# expressions, the planner's query shapes (CTEs, windows, bounding arithmetic) and the aggregates a
# public-table passthrough may compute.
BACKEND_NODES: tuple[type[exp.Expr], ...] = (
    *POST_SAFE,
    *VALUE_SAFE,
    exp.Select,
    exp.With,
    exp.CTE,
    exp.TableAlias,
    exp.From,
    exp.Join,  # the joined relations of passes/relations.py (over the planner's own CTEs)
    exp.Table,
    exp.Where,
    exp.Group,
    exp.Having,
    exp.Order,
    exp.Ordered,
    exp.Limit,
    exp.Offset,
    exp.Alias,
    exp.Star,
    exp.Window,
    exp.RowNumber,
    exp.Try,
    exp.IntDiv,
    exp.Nullif,
    exp.Typeof,  # the unit rule: an integer-typed source column skips the text round trip (DuckDBHooks.unit)
    exp.Anonymous,  # only the names in ANONYMOUS_FUNCTIONS (and the backend hooks' BACKEND_FUNCTIONS)
    *AGGREGATES,
    exp.Distinct,  # COUNT(DISTINCT col) (passes/quantiles.py)
    exp.GroupingSets,  # quantile histograms beside the per-group aggregates (passes/quantiles.py)
)
ANONYMOUS_FUNCTIONS = frozenset({"HASH"})  # the keyed row hash (SQLHooks.row_hash)
# Flags a dialect's parser sets or drops on its own: they do not change what the statement computes.
_IGNORED: dict[type[exp.Expr], frozenset[str]] = {
    exp.TryCast: frozenset({"safe"}),
    exp.Count: frozenset({"big_int"}),
    exp.Window: frozenset({"over"}),
    # How a dialect's parser records ``/`` (integer or float division by operand types, NULL on zero):
    # the planner casts both operands of every ``/`` it builds to DOUBLE (passes/intervals.py; integer
    # division is IntDiv), and the text run is the text checked, so the flags change nothing it computes.
    exp.Div: frozenset({"typed", "safe"}),
}
_TEXT_TYPES = frozenset({"TEXT", "VARCHAR", "CHAR"})

VERIFIED_CACHE = 1024
"""Statement texts remembered as verified, with the allowances they passed under (oldest dropped first).

What a backend runs is the text, and whether a text passes depends only on the text, the dialect and the
allowances (sources, node kinds, functions): a text that passed once is safe to run again without parsing
it back. Plans differing only in output aliases (post-processing) share one bounded statement."""
_verified: dict[tuple[object, ...], None] = {}
_verified_lock = threading.Lock()


class VerifiedSQL(str):
    """SQL text that :func:`verify` parsed back and found to be the planned tree; nothing else creates one."""

    __slots__ = ()

    def __new__(cls, text: str, token: object = None) -> VerifiedSQL:
        if token is not _TOKEN:
            raise InternalError("VerifiedSQL is created only by dpgateway.sqlcheck.verify; this is a bug")
        return super().__new__(cls, text)


def require_verified(sql: object) -> VerifiedSQL:
    """``sql`` if it was verified; an unverified string never reaches a backend (raises XX000: a bug)."""
    if not isinstance(sql, VerifiedSQL):
        raise InternalError("a backend was given SQL that was not verified (dpgateway.sqlcheck); this is a bug")
    return sql


def verify(
    built: exp.Expr,
    dialect: str,
    *,
    sources: Sequence[exp.Expr],
    nodes: tuple[type[exp.Expr], ...] = (),
    functions: frozenset[str] = frozenset(),
) -> VerifiedSQL:
    """Render ``built`` for ``dialect`` and return it verified, or refuse (see the module docstring).

    ``sources`` are the relations the statement may read (the backend hooks' rendering of the one
    declared source, or of a prepared copy's file); ``nodes`` and ``functions`` are the node kinds and
    function names the backend's hooks build besides :data:`BACKEND_NODES` (``SQLHooks.BACKEND_NODES``,
    ``SQLHooks.BACKEND_FUNCTIONS``: never analyst input, which the parser allowlist has already checked).
    """
    text = built.sql(dialect=dialect)
    key = (text, dialect, tuple(s.sql(dialect=dialect) for s in sources), nodes, functions)
    if key in _verified:  # this very text already passed with the same allowances
        return VerifiedSQL(text, _TOKEN)
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except SqlglotError:
        _refuse("it does not parse back")
    if len(statements) != 1 or not isinstance(statements[0], exp.Select):
        _refuse("it is not exactly one SELECT statement")
    parsed = statements[0]
    if _canonical(parsed, dialect) != _canonical(built, dialect):
        _refuse("it parses back to a different statement")
    _check_relations(parsed, dialect, sources, (*BACKEND_NODES, *nodes), ANONYMOUS_FUNCTIONS | functions)
    with _verified_lock:
        _verified[key] = None
        while len(_verified) > VERIFIED_CACHE:
            _verified.pop(next(iter(_verified)))
    return VerifiedSQL(text, _TOKEN)


MAINTENANCE_KINDS: tuple[type[exp.Expr], ...] = (exp.Select, exp.Create, exp.Drop, exp.Alter, exp.Revoke, exp.Analyze)
"""Statements the gateway runs to build and check its own prepared copies (connectors/postgres_copy.py)."""


def verify_statement(
    built: exp.Expr, dialect: str, *, kinds: tuple[type[exp.Expr], ...] = MAINTENANCE_KINDS
) -> VerifiedSQL:
    """Render a statement the gateway builds from the policy and config alone (never analyst text: a prepared
    copy's catalog check and its build, whose SELECT passed :func:`verify` first) and return it verified.

    Refused (42501) unless the text is exactly one statement of one of ``kinds`` and parses back to the tree
    built, node by node: an identifier or literal from the config that would change the statement's shape
    (a quote, a semicolon) makes the parsed tree differ, so it never runs.
    """
    if not isinstance(built, kinds):
        _refuse(f"a {type(built).__name__} statement is not one the gateway runs")
    text = built.sql(dialect=dialect)
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except SqlglotError:
        _refuse("it does not parse back")
    if len(statements) != 1 or type(statements[0]) is not type(built):
        _refuse("it is not exactly one statement of the kind built")
    if _canonical(statements[0], dialect) != _canonical(built, dialect):
        _refuse("it parses back to a different statement")
    return VerifiedSQL(text, _TOKEN)


def _refuse(why: str) -> Any:
    raise PrivacyViolationError(
        f"refused: the SQL generated for this query failed verification ({why}), so it was not run and "
        "nothing was charged; simplify the query, and report it if it is an ordinary query"
    )


def _check_relations(
    parsed: exp.Expr,
    dialect: str,
    sources: Sequence[exp.Expr],
    allowed: tuple[type[exp.Expr], ...],
    functions: frozenset[str],
) -> None:
    """Only the planner's CTEs and the declared sources; only CTE bodies and the main query; allowed nodes."""
    with_ = parsed.args.get("with_") or parsed.args.get("with")
    ctes = {cte.alias for cte in with_.expressions} if with_ is not None else set()
    allowed_sources = {_canonical(s, dialect) for s in sources}
    selects = 0
    for node in parsed.walk(prune=lambda n: isinstance(n, exp.Table) and isinstance(n.this, exp.Func)):
        if isinstance(node, exp.Table):
            if _relation(node, dialect) not in allowed_sources and not (
                isinstance(node.this, exp.Identifier) and not node.args.get("db") and node.name in ctes
            ):
                _refuse(f"it reads a relation that is neither the declared source nor the plan's own: {node.name!r}")
            continue
        if isinstance(node, exp.Select):
            selects += 1
            if not (node is parsed or isinstance(node.parent, exp.CTE)):
                _refuse("it holds a subquery")
        if not isinstance(node, allowed) or (isinstance(node, exp.Anonymous) and node.name.upper() not in functions):
            name = (
                node.name
                if isinstance(node, exp.Anonymous)
                else node.sql_name()
                if isinstance(node, exp.Func)
                else node.key
            )
            _refuse(f"it uses {name.upper()}")
    if selects != len(ctes) + 1:
        _refuse("it holds a subquery")


def _relation(table: exp.Table, dialect: str) -> Any:
    """A relation without its alias, as the sources are compared."""
    return _canonical(table, dialect, skip=frozenset({"alias"}))


def _canonical(node: Any, dialect: str, *, skip: frozenset[str] = frozenset(), bare: bool = False) -> Any:
    """A comparable value of a tree: node kind and every argument, less the ``_IGNORED`` flags (and ``skip``)."""
    if isinstance(node, list):
        return tuple(_canonical(v, dialect) for v in node)
    if not isinstance(node, exp.Expr):
        return node
    if not bare and not isinstance(node, exp.Ordered) and isinstance(node.parent, exp.Order):
        return ("Ordered", (("this", _canonical(node, dialect, bare=True)),))  # the builder's bare ORDER BY item
    if isinstance(node, exp.Table) and isinstance(node.this, exp.Func):
        # A table function (the source reader): sqlglot parses some into typed nodes (read_csv ->
        # ReadCSV) that render the same text; it must equal a declared source (_check_relations).
        alias = None if "alias" in skip else _canonical(node.args.get("alias"), dialect)
        return ("relation", node.this.sql(dialect=dialect), alias)
    if isinstance(node, exp.DataType):
        name = _type_name(node.this, dialect)
        params = () if name in _TEXT_TYPES else _canonical(node.expressions, dialect)
        return ("type", name, params)
    ignored = _IGNORED.get(type(node), frozenset()) | skip
    items = tuple(
        (key, _canonical(value, dialect))
        for key, value in sorted(node.args.items())
        if key not in ignored and value is not None and value is not False and value != []
    )
    if isinstance(node, exp.Anonymous):  # function names are case-insensitive; the parser keeps the case
        items = tuple((k, v.upper() if k == "this" and isinstance(v, str) else v) for k, v in items)
    return (type(node).__name__, items)


@lru_cache(maxsize=256)
def _type_name(kind: Any, dialect: str) -> str:
    """How ``dialect`` writes a type without parameters (the parser may read it back as another alias)."""
    return exp.DataType(this=kind).sql(dialect=dialect)
