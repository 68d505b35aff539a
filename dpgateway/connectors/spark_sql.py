"""The bounded SQL in Spark's dialect: total row expressions, a keyed xxhash64, DuckDB's rounding and division.

Proof note (every row expression is total, so no row's value can make a query fail):

- The gateway's Spark session runs with ``spark.sql.ansi.enabled=false`` (connectors/spark.py sets it on
  its own session and checks it before every query; a config may not set it). In that mode Spark's
  operators do not raise on values: an invalid cast is NULL, integer overflow wraps, division by zero
  is NULL, invalid dates are NULL. On top of that, :meth:`SparkHooks.total` makes the results match
  DuckDB's ``TRY``: every cast becomes ``TRY_CAST`` and ``+ - * /`` become ``try_add``,
  ``try_subtract``, ``try_multiply``, ``try_divide`` (NULL on overflow, as ``TRY`` gives, instead of
  a wrapped value). Test: tests/backends/test_conformance.py::test_row_expressions_that_could_raise_are_total_or_refused.
- Every cast is rendered ``TRY_CAST`` (:meth:`SparkHooks.finish`), NULL where it would fail in any
  ANSI mode; casts of the source columns are ``SQLHooks.typed``'s, NaN is NULL, and the unit rule
  is :meth:`SQLHooks.unit` (the text of the cast value must equal the raw text), skipped as on DuckDB
  where the source column is an integer type (``typeof`` is the column's type, folded by Spark).
- ``ROUND(v)``: Spark rounds a double HALF_UP on its shortest decimal text, which is half away from zero
  on the exact binary value too (a double's shortest text lies on the same side of every ``n + 0.5``,
  itself a double), as DuckDB does. ``a DIV b`` (sqlglot's rendering of ``exp.IntDiv``) truncates toward
  zero as the weighted rewrite's proof needs (passes/bounding.py); its divisor is ``GREATEST(n_u, k) >= 1``.
  ``GREATEST``/``LEAST`` skip NULLs as on DuckDB. Tests: the conformance suite's identical aggregates.
- ``SUM`` of BIGINT is BIGINT on Spark (HUGEINT on DuckDB): every summed per-row value is at most
  ``10**6 + 1`` in magnitude (passes/budget.py's fixed-point scale; weighted values are smaller), so a
  sum overflows only past 9e12 rows, beyond any table a gateway serves.
- ``EXTRACT(DOW)`` is 1 (Sunday) to 7 on Spark, so :meth:`SparkHooks.total` (WHERE, private keys) and
  :meth:`SparkHooks.date_part` (date keys, passes/dates.py) take one off (PostgreSQL's 0 to 6). A date key's
  truncation is cast to ``TIMESTAMP_NTZ`` (midnight, no zone, as on DuckDB and PostgreSQL); its clamped
  date lies in years 1 to 9999, Spark's range.
- The row hash is ``xxhash64(key, c1, c1 IS NULL, ..., cn, cn IS NULL)``: Spark's hash skips NULL
  arguments, so the flags keep ``(1, NULL)`` and ``(NULL, 1)`` apart; the secret key comes first as in
  ``SQLHooks.row_hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from sqlglot import exp

from dpgateway.connectors.base import SQLHooks
from dpgateway.policies.model import Column, Table
from dpgateway.sqlparse import bottom_up

INTEGER_TYPES = ("tinyint", "smallint", "int", "bigint")  # typeof() names; Spark has no unsigned integers
_SAFE: dict[type[exp.Expr], type[exp.Expr]] = {
    exp.Add: exp.SafeAdd,
    exp.Sub: exp.SafeSubtract,
    exp.Mul: exp.SafeMultiply,
    exp.Div: exp.SafeDivide,
}


class SparkHooks(SQLHooks):
    """Spark rendering. ``views``: the temp view a CSV source is registered as (connectors/spark.py)."""

    DIALECT = "spark"
    BACKEND_NODES = (exp.SafeAdd, exp.SafeSubtract, exp.SafeMultiply, exp.SafeDivide)
    BACKEND_FUNCTIONS = frozenset({"XXHASH64"})

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def view(self, table: Table) -> str:
        """The temp view name of a CSV source: this connector's prefix and a digest of the table name."""
        return f"dpgateway_{self.prefix}_{hashlib.sha256(table.name.encode()).hexdigest()[:12]}"

    def source(self, table: Table) -> exp.Expr:
        spec = table.source
        assert isinstance(spec, dict), "a Spark table's source is a connector mapping (policies/connections.py)"
        if "table" in spec:
            parts = str(spec["table"]).split(".")
            db = exp.to_identifier(parts[0], quoted=True) if len(parts) == 2 else None
            return exp.Table(this=exp.to_identifier(parts[-1], quoted=True), db=db)
        if spec["format"] == "csv":
            return exp.Table(this=exp.to_identifier(self.view(table), quoted=True))
        return exp.Table(this=exp.to_identifier(spec["path"], quoted=True), db=exp.to_identifier("parquet"))

    def unit(self, column: Column) -> exp.Expr:
        """As :meth:`SQLHooks.unit`, skipping the text round trip where the source column is an integer type."""
        exact = super().unit(column)
        if column.type != "int":
            return exact
        kind = exp.func("typeof", exp.column(column.name, quoted=True))
        integer = exp.In(this=kind, expressions=[exp.Literal.string(t) for t in INTEGER_TYPES])
        return exp.Case(ifs=[exp.If(this=integer, true=self.typed(column))], default=exact)

    def total(self, expr: exp.Expr) -> exp.Expr:
        """``expr`` with TRY_CAST and try_ arithmetic (NULL where DuckDB's TRY gives NULL); proof note above."""
        if isinstance(expr, exp.Column):
            return expr.copy()

        def safe(node: exp.Expr) -> exp.Expr:
            if type(node) is exp.Cast:
                return exp.TryCast(**node.args)
            wrapper = _SAFE.get(type(node))
            if wrapper is not None:
                return wrapper(this=node.this, expression=node.expression)
            if isinstance(node, exp.Extract) and node.name.upper() == "DOW":  # PostgreSQL's 0 (Sunday) to 6
                return exp.Paren(this=exp.Sub(this=node.copy(), expression=exp.Literal.number(1)))
            return node

        return bottom_up(expr.copy(), safe)

    def date_part(self, part: str, value: exp.Expr) -> exp.Expr:
        """As :meth:`SQLHooks.date_part`; Spark's DOW counts 1 (Sunday) to 7, so one is taken off."""
        extracted = super().date_part(part, value)
        return exp.Sub(this=extracted, expression=exp.Literal.number(1)) if part == "DOW" else extracted

    def date_trunc(self, unit: str, value: exp.Expr) -> exp.Expr:
        """As :meth:`SQLHooks.date_trunc`, as a ``TIMESTAMP_NTZ`` (Spark's TIMESTAMP carries the session's
        time zone; midnight without a zone is what DuckDB and PostgreSQL return)."""
        return exp.cast(exp.TimestampTrunc(this=value, unit=exp.var(unit)), "TIMESTAMPNTZ")

    def row_hash(self, key: exp.Expr, columns: Sequence[exp.Expr]) -> exp.Expr:
        flagged: list[exp.Expr] = []
        for column in columns:
            flagged += [column, exp.Is(this=column.copy(), expression=exp.Null())]
        return exp.Anonymous(this="xxhash64", expressions=[key, *flagged])

    def finish(self, tree: exp.Expr) -> exp.Expr:
        """Every cast as ``TRY_CAST`` (total in any ANSI mode). sqlglot's Spark generator writes a TryCast
        without ``safe`` as a plain ``CAST`` (and its parser reads ``CAST`` as such a TryCast), so ``safe``
        is set on every one. A statement's own ``ORDER BY`` items (a prepared copy's clustering) are marked
        ``NULLS FIRST``, what Spark does for an ascending key and what its parser reads back, so the text
        verifies (dpgateway/sqlcheck.py); window orderings read back as built."""

        def safe(node: exp.Expr) -> exp.Expr:
            if isinstance(node, (exp.Cast, exp.TryCast)):
                return exp.TryCast(**{**node.args, "safe": True})
            if isinstance(node, exp.Order) and isinstance(node.parent, exp.Select):
                items = [
                    i if isinstance(i, exp.Ordered) else exp.Ordered(this=i, nulls_first=True) for i in node.expressions
                ]
                return exp.Order(expressions=items)
            return node

        return bottom_up(tree.copy(), safe)

    def file_source(self, path: str) -> exp.Expr:
        return exp.Table(this=exp.to_identifier(path, quoted=True), db=exp.to_identifier("parquet"))
