"""The bounded SQL in PostgreSQL's dialect: total casts, total row expressions, a keyed hash, exact rounding.

PostgreSQL has neither ``TRY_CAST`` nor ``TRY``: every cast and operator that can fail raises, and a raise
decided by one row's value would be a side channel (passes/total.py). So these hooks build every row
expression from pieces that cannot raise, and refuse (0A000) analyst expressions they cannot make total.

Proof note (totality of every row expression; tests/backends/test_postgres_sql.py runs each guard on
the edge inputs against a real server and checks none raises):

- ``typed``: a column whose catalog type was checked (``check_table``) and is a widening of the declared
  type (``smallint/integer/bigint`` to ``bigint``; those or ``real/double precision`` to ``double``;
  ``boolean``; ``date``) is cast directly: such casts cannot fail. Every other column goes through its
  text form (``CAST(x AS TEXT)`` runs the type's output function, which does not fail) and a guard that
  admits only strings the cast accepts, with CASE deciding before the cast runs (PostgreSQL evaluates a
  CASE branch only when its condition holds; non-constant branches are not pre-evaluated):

  * ``int``: on PostgreSQL 16+ ``pg_input_is_valid(t, 'bigint')``, the server's own soft-error check of
    exactly the input the cast reads. Before 16: ``t ~ '^[+-]?[0-9]{1,19}$'`` (a subset of what
    ``int8in`` accepts, without whitespace or PG16 underscores), then ``CAST(t AS NUMERIC)`` (total on
    at most 20 such characters) within ``[-2^63, 2^63-1]``, then the cast;
  * ``float``: 16+ ``pg_input_is_valid(t, 'double precision')``. Before 16: ``nan``/``inf``/``infinity``
    with an optional sign (case-insensitive, as ``float8in`` spells them); or a plain decimal of at most
    255 digits before and after the point, whose magnitude is 0 or in ``[1e-255, 1e255)`` so neither
    overflows nor underflows; or a mantissa of at most 20+20 digits with a 1-3 digit exponent, checked as
    NUMERIC (total: ``|exponent| <= 999``) to be 0 or within ``[1e-307, 1e308]``. NaN becomes NULL;
  * ``bool``: no cast at all, ``lower(t)`` compared with the spellings ``boolin`` accepts;
  * ``date``: ``YYYY-MM-DD`` by regex with year 1-9999, month 1-12, day 1-31, built by
    ``make_date(y, m, 1) + (d - 1)`` (total on those ranges) and kept only if its month is still ``m``
    (so 2023-02-30 is NULL, as the cast would have raised);
  * ``str``: ``CAST(x AS TEXT)``.

- ``unit``: the privacy unit as :meth:`SQLHooks.unit` reads it (kept only where the text of the cast value
  equals the raw text), except where the checked catalog type is ``smallint/integer/bigint``: then the
  widening cast is injective and always round-trips, so the check is dropped (same rows, same ids).
  Test: tests/backends/test_postgres.py::test_unit_round_trip_only_where_the_catalog_type_needs_it.

- ``total`` (WHERE, GROUP BY keys): of the analyst nodes in sqlparse.ROW_SAFE, those that raise on
  PostgreSQL for some value are refused unless they contain no column (then PostgreSQL folds them while
  planning, from the SQL alone): ``+ - *`` and unary minus (bigint and double overflow), ``ABS`` (of the
  smallest bigint), ``DATE_TRUNC`` (a date beyond the timestamp range), ``XOR`` (absent). ``CAST`` over a
  column becomes the guard above (to bigint, double, boolean, date, text; other targets are refused);
  ``SUBSTRING`` needs literal positions with a non-negative length, ``LIKE``/``ILIKE`` a literal
  pattern that does not end in an escape, ``EXTRACT`` a field valid for every date. The rest
  (comparisons, IN, BETWEEN, IS, AND/OR/NOT, CASE, COALESCE, GREATEST/LEAST, LOWER/UPPER/LENGTH/TRIM,
  CONCAT/||, FLOOR/CEIL/ROUND) cannot raise on values of the declared types; type mismatches fail while
  planning, from the SQL and the schema alone.

- Date keys with public domains (passes/dates.py) are built by the planner, not by ``total``: ``EXTRACT``
  (cast to bigint), the cast to ``timestamp`` and ``DATE_TRUNC`` read the date clamped to its declared
  bounds, a real day of years 1 to 9999 (policies/loader.py), where none of them can raise (the timestamp
  range reaches 294276 AD). An unbounded date's ``DATE_TRUNC`` key stays refused as above.

- ``render``: ``ROUND(v)`` is half away from zero as on DuckDB (PostgreSQL's ``round(double)`` rounds
  half to even), computed exactly as ``trunc(v) + CASE WHEN abs(v - trunc(v)) >= 0.5 THEN sign(v) ELSE 0
  END`` (``v - trunc(v)`` is exact in binary floating point). The weighted rewrite's integer division is
  ``CAST(a AS BIGINT) / CAST(b AS BIGINT)``: both operands are integers by construction
  (passes/bounding.py), and PostgreSQL's bigint ``/`` truncates toward zero, as the proof there needs
  (sqlglot renders ``exp.IntDiv`` as ``DIV``, numeric, slower and returning numeric).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlglot import exp

from dpgateway.connectors.base import SQLHooks
from dpgateway.errors import UnsupportedError
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import bottom_up

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
# Catalog types a declared type is read from by a direct (widening, never failing) cast.
NATIVE: dict[str, frozenset[str]] = {
    "int": frozenset({"smallint", "integer", "bigint"}),
    "float": frozenset({"smallint", "integer", "bigint", "real", "double precision"}),
    "bool": frozenset({"boolean"}),
    "date": frozenset({"date"}),
    "str": frozenset(),  # CAST(x AS TEXT) is total for every type
}
TARGETS = {"int": "BIGINT", "float": "DOUBLE PRECISION", "str": "TEXT", "bool": "BOOLEAN", "date": "DATE"}
TRUE_SPELLINGS = ("t", "true", "y", "yes", "on", "1")
FALSE_SPELLINGS = ("f", "false", "n", "no", "off", "0")
INT_PATTERN = "^[+-]?[0-9]{1,19}$"
FLOAT_SPECIAL = "^(nan|[+-]?inf|[+-]?infinity)$"
FLOAT_PLAIN = r"^[+-]?([0-9]{1,255}(\.[0-9]{0,255})?|\.[0-9]{1,255})$"  # 255: the largest count PostgreSQL regexes take
FLOAT_EXPONENT = r"^[+-]?([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})[eE][+-]?[0-9]{1,3}$"
DATE_PATTERN = "^([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
EXTRACT_FIELDS = frozenset({"YEAR", "MONTH", "DAY", "QUARTER", "DOW", "DOY", "WEEK", "ISOYEAR", "ISODOW"})

# Nodes that can raise on PostgreSQL for some column value (refused when they read a column).
_RAISING = (exp.Add, exp.Sub, exp.Mul, exp.Neg, exp.Abs, exp.DateTrunc, exp.TimestampTrunc, exp.Xor)
_CAST_KINDS = {
    exp.DataType.Type.BIGINT: "int",
    exp.DataType.Type.INT: "int",
    exp.DataType.Type.SMALLINT: "int",
    exp.DataType.Type.DOUBLE: "float",
    exp.DataType.Type.FLOAT: "float",
    exp.DataType.Type.TEXT: "str",
    exp.DataType.Type.VARCHAR: "str",
    exp.DataType.Type.BOOLEAN: "bool",
    exp.DataType.Type.DATE: "date",
}
TOTAL_NOTE = (
    "on PostgreSQL, row expressions may use comparisons, IN, BETWEEN, IS, AND/OR/NOT, CASE, COALESCE, "
    "GREATEST/LEAST, LOWER/UPPER/LENGTH/TRIM, CONCAT/||, FLOOR/CEIL/ROUND, LIKE with a literal pattern, "
    "SUBSTRING with literal positions, EXTRACT of a date field, and CAST to BIGINT, INT, DOUBLE, TEXT, "
    "BOOLEAN or DATE; arithmetic on columns (+ - *, ABS, unary minus) and DATE_TRUNC are refused because "
    "PostgreSQL raises on overflow, which would reveal a row's value"
)


class PostgresHooks(SQLHooks):
    """PostgreSQL rendering. ``input_is_valid``: the server has ``pg_input_is_valid`` (PostgreSQL 16+)."""

    DIALECT = "postgres"
    BACKEND_NODES = (exp.RegexpLike, exp.RegexpILike, exp.Sign, exp.Trunc)  # guarded casts, exact ROUND
    BACKEND_FUNCTIONS = frozenset({"HASHTEXTEXTENDED", "ROW", "PG_INPUT_IS_VALID", "MAKE_DATE"})

    def __init__(self, *, input_is_valid: bool = False) -> None:
        self.input_is_valid = input_is_valid
        # id(policy Column) -> (that Column, its catalog type), recorded by check_table. Keyed by the very
        # object checked (kept alive here, so its id is not reused): a column of a table that was not
        # checked, or has the same name elsewhere, never takes the direct cast.
        self._catalog: dict[int, tuple[Column, str]] = {}

    def remember_type(self, column: Column, catalog_type: str) -> None:
        """Record the catalog type of a checked policy column (enables the direct cast where it widens)."""
        self._catalog[id(column)] = (column, catalog_type)

    def source(self, table: Table) -> exp.Expr:
        spec = table.source
        assert isinstance(spec, dict), "a PostgreSQL table's source is a connector mapping (policies/connections.py)"
        parts = str(spec["table"]).split(".")
        name = exp.to_identifier(parts[-1], quoted=True)
        schema = exp.to_identifier(parts[0], quoted=True) if len(parts) == 2 else None
        return exp.Table(this=name, db=schema)

    def file_source(self, path: str) -> exp.Expr:
        """A prepared copy: the table ``schema.name`` in the gateway's schema (connectors/postgres_copy.py)."""
        schema, name = path.split(".")
        return exp.Table(this=exp.to_identifier(name, quoted=True), db=exp.to_identifier(schema, quoted=True))

    def typed(self, column: Column) -> exp.Expr:
        x = exp.column(column.name, quoted=True)
        if self._catalog_type(column) in NATIVE[column.type]:
            value: exp.Expr = exp.cast(x, TARGETS[column.type])
        else:
            value = self.guarded_cast(exp.cast(x, "TEXT"), column.type)
        if column.type == "float":  # NaN is no number: treat it as missing (PostgreSQL's NaN = NaN holds)
            value = exp.Nullif(this=value, expression=exp.cast(exp.Literal.string("NaN"), "DOUBLE PRECISION"))
        return value

    def unit(self, column: Column) -> exp.Expr:
        """As :meth:`SQLHooks.unit`, without the text round trip where the catalog type is an integer type.

        A ``smallint``/``integer``/``bigint`` value is its own id: the widening cast to ``bigint`` is
        injective and its text always equals the raw value's, so the round trip would keep every row
        and only cost two text conversions per row (and a sort on an expression instead of the column).
        """
        if column.type == "int" and self._catalog_type(column) in NATIVE["int"]:
            return self.typed(column)
        return super().unit(column)

    def _catalog_type(self, column: Column) -> str | None:
        """The checked catalog type of this very policy column (None if it was not checked)."""
        known = self._catalog.get(id(column))
        return known[1] if known is not None and known[0] is column else None

    def guarded_cast(self, text: exp.Expr, kind: str) -> exp.Expr:
        """``text`` (a text expression) as ``kind``, NULL where the cast would fail; never raises (proof note)."""
        if kind == "str":
            return text
        if kind == "bool":
            lowered = exp.Lower(this=text)
            return exp.Case(
                ifs=[
                    exp.If(this=_in(lowered, TRUE_SPELLINGS), true=exp.true()),
                    exp.If(this=_in(lowered.copy(), FALSE_SPELLINGS), true=exp.false()),
                ]
            )
        if kind == "date":
            return _date(text)
        target = TARGETS[kind]
        cast = exp.cast(text.copy(), target)
        if self.input_is_valid:
            valid = exp.Anonymous(this="pg_input_is_valid", expressions=[text, exp.Literal.string(target.lower())])
            return _when(valid, cast)
        if kind == "int":
            fits = exp.Between(
                this=exp.cast(text.copy(), "NUMERIC"), low=_int(BIGINT_MIN), high=exp.Literal.number(BIGINT_MAX)
            )
            return _when(_matches(text, INT_PATTERN), _when(fits, cast))
        numeric = exp.cast(text.copy(), "NUMERIC")
        in_range = exp.or_(
            exp.EQ(this=numeric, expression=exp.Literal.number(0)),
            exp.Between(
                this=exp.Abs(this=numeric.copy()), low=exp.Literal.number("1e-307"), high=exp.Literal.number("1e308")
            ),
        )
        return exp.Case(
            ifs=[
                exp.If(this=_matches(text, FLOAT_SPECIAL, ignore_case=True), true=cast),
                exp.If(this=_matches(text, FLOAT_PLAIN), true=cast.copy()),
                exp.If(this=_matches(text, FLOAT_EXPONENT), true=_when(in_range, cast.copy())),
            ]
        )

    def total(self, expr: exp.Expr) -> exp.Expr:
        """``expr`` rewritten so it cannot raise on any row, or refused with 0A000 (proof note above)."""
        for node in expr.walk():
            _check_total(node)
        return _round_half_away(
            expr.copy().transform(lambda n: self._cast(n) if isinstance(n, (exp.Cast, exp.TryCast)) else n)
        )

    def _cast(self, node: exp.Cast) -> exp.Expr:
        if not node.this.find(exp.Column):
            return exp.Cast(this=node.this.copy(), to=node.to.copy())  # folded while planning
        kind = _CAST_KINDS.get(node.to.this) if not node.to.expressions else None
        if kind is None:
            raise UnsupportedError(f"CAST to {node.to.sql('postgres')} is not supported on PostgreSQL; {TOTAL_NOTE}")
        return self.guarded_cast(exp.cast(node.this.copy(), "TEXT"), kind)

    def row_hash(self, key: exp.Expr, columns: Sequence[exp.Expr]) -> exp.Expr:
        """``hashtextextended(key || row text, 0)``: the row's record text (every column, NULLs included,
        quoted so distinct rows differ) hashed after the secret key (:meth:`SQLHooks.row_order_key`)."""
        row = exp.cast(exp.Anonymous(this="ROW", expressions=list(columns)), "TEXT")
        keyed = exp.DPipe(this=key, expression=row, safe=True)
        return exp.Anonymous(this="hashtextextended", expressions=[keyed, exp.Literal.number(0)])

    def settings(self, k: int) -> tuple[tuple[str, Any], ...]:
        return ()

    def per_unit_settings(self) -> tuple[tuple[str, Any], ...]:
        """``enable_hashagg = off``: PostgreSQL then groups by the unit with parallel workers (a sort per
        worker, Gather Merge, partial and final GroupAggregate) instead of one process's HashAggregate over
        every row; scalar ``COUNT(*)`` at 1M rows took 0.5-0.7x the time (bench/README.md). A plan setting:
        the rows and the result are the same."""
        return (("enable_hashagg", "off"),)

    def finish(self, tree: exp.Expr) -> exp.Expr:
        """The bounded statement: DuckDB's ROUND semantics, and truncating bigint division (proof note above)."""

        def rewrite(node: exp.Expr) -> exp.Expr:
            if isinstance(node, exp.IntDiv):
                return exp.Div(
                    this=exp.cast(node.this, "BIGINT"), expression=exp.cast(node.expression, "BIGINT"), typed=True
                )
            return node

        # children first: an aggregate argument nests integer divisions and ROUNDs inside the planner's own
        return _round_half_away(bottom_up(tree.copy(), rewrite))


def _check_total(node: exp.Expr) -> None:
    if isinstance(node, _RAISING) and node.find(exp.Column):
        name = node.sql_name() if isinstance(node, exp.Func) else node.key.upper()
        raise UnsupportedError(f"{name} over a column can fail on PostgreSQL and is not supported; {TOTAL_NOTE}")
    if isinstance(node, exp.Substring):
        for arg in (node.args.get("start"), node.args.get("length")):
            if arg is not None and not (isinstance(arg, exp.Literal) and arg.is_int and int(arg.this) >= 0):
                raise UnsupportedError(f"SUBSTRING positions must be non-negative integer literals; {TOTAL_NOTE}")
    if isinstance(node, (exp.Like, exp.ILike)):
        pattern = node.expression
        trailing = len(pattern.this) - len(pattern.this.rstrip("\\")) if isinstance(pattern, exp.Literal) else 1
        if not (isinstance(pattern, exp.Literal) and pattern.is_string) or trailing % 2 or node.args.get("escape"):
            raise UnsupportedError(f"LIKE needs a literal pattern that does not end in a backslash; {TOTAL_NOTE}")
    if isinstance(node, exp.Extract) and node.name.upper() not in EXTRACT_FIELDS:
        raise UnsupportedError(f"EXTRACT({node.name}) is not supported; fields: {', '.join(sorted(EXTRACT_FIELDS))}")


def _round_half_away(tree: exp.Expr) -> exp.Expr:
    """``ROUND(v)`` as ``trunc(v) + CASE WHEN abs(v - trunc(v)) >= 0.5 THEN sign(v) ELSE 0 END``."""

    def rewrite(node: exp.Expr) -> exp.Expr:
        if not isinstance(node, exp.Round) or node.args.get("decimals") is not None:
            return node
        v = node.this
        whole = exp.Trunc(this=v.copy())
        fraction = exp.Abs(this=exp.Sub(this=exp.Paren(this=v.copy()), expression=whole.copy()))
        step = exp.Case(
            ifs=[
                exp.If(this=exp.GTE(this=fraction, expression=exp.Literal.number("0.5")), true=exp.Sign(this=v.copy()))
            ],
            default=exp.Literal.number(0),
        )
        return exp.Paren(this=exp.Add(this=whole, expression=step))

    return bottom_up(tree, rewrite)


def _when(condition: exp.Expr, value: exp.Expr) -> exp.Expr:
    return exp.Case(ifs=[exp.If(this=condition, true=value)])


def _matches(text: exp.Expr, pattern: str, *, ignore_case: bool = False) -> exp.Expr:
    node = exp.RegexpILike if ignore_case else exp.RegexpLike
    return node(this=text.copy(), expression=exp.Literal.string(pattern))


def _in(value: exp.Expr, spellings: tuple[str, ...]) -> exp.Expr:
    return exp.In(this=value, expressions=[exp.Literal.string(s) for s in spellings])


def _int(value: int) -> exp.Expr:
    literal = exp.Literal.number(abs(value))
    return exp.Paren(this=exp.Neg(this=literal)) if value < 0 else literal


def _date(text: exp.Expr) -> exp.Expr:
    """``YYYY-MM-DD`` as a date, NULL unless it is a real calendar day in years 1-9999 (proof note above)."""

    def part(start: int, length: int) -> exp.Expr:
        piece = exp.Substring(this=text.copy(), start=exp.Literal.number(start), length=exp.Literal.number(length))
        return exp.cast(piece, "INT")

    year, month, day = part(1, 4), part(6, 2), part(9, 2)
    first = exp.Anonymous(this="make_date", expressions=[year, month, exp.Literal.number(1)])
    built = exp.Add(this=first, expression=exp.Paren(this=exp.Sub(this=day, expression=exp.Literal.number(1))))
    same_month = exp.EQ(this=exp.Extract(this=exp.var("MONTH"), expression=built.copy()), expression=month.copy())
    year_ok = exp.GTE(this=year.copy(), expression=exp.Literal.number(1))
    return _when(_matches(text, DATE_PATTERN), _when(year_ok, _when(same_month, built)))
