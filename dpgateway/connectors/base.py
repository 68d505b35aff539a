"""The connector interface: run a bounded plan, return exact (not yet noisy) aggregates.

A connector is one method plus a mock. It also supplies the few SQL hooks where engines differ
(how to read a source, how to cast safely, the keyed row hash); everything else is rendered by the
sqlglot dialect named in ``DIALECT``.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from dpgateway.errors import UnsupportedError
from dpgateway.policies.model import Column, Table
from dpgateway.sqlcheck import VerifiedSQL, require_verified

SQL_TYPES = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "bool": "BOOLEAN", "date": "DATE"}
_DATA_TYPES = {kind: exp.DataType.build(name) for kind, name in SQL_TYPES.items()}  # built (parsed) once


@dataclass(frozen=True)
class ExactAggregates:
    """Exact bounded aggregates per group: never released, only noised."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


class SQLHooks:
    """Engine-specific pieces of the bounded SQL. Subclasses override a few methods, never the planner."""

    DIALECT = "duckdb"
    BACKEND_NODES: tuple[type[exp.Expr], ...] = ()
    """Node kinds these hooks build beyond :data:`dpgateway.sqlcheck.BACKEND_NODES` (allowed in verified SQL)."""
    BACKEND_FUNCTIONS: frozenset[str] = frozenset()
    """Names of untyped (anonymous) functions these hooks call besides ``HASH`` (allowed in verified SQL)."""
    UNIT_COUNT_BY_JOIN = False
    """Weighted rewrite: each unit's row count ``n_u`` by ``GROUP BY unit`` joined back to its rows, instead of
    a ``COUNT(*) OVER (PARTITION BY unit)`` window (the same ``n_u`` on every row; passes/bounding.py).
    Set where the join measured faster (bench/README.md)."""
    UNIT_TOTALS_AS_DOUBLE = True
    """Per-unit pre-aggregation (passes/unit_forms.py): each unit's total of BIGINT fixed-point values summed
    as DOUBLE (exact below 2^53, never an overflow), or as the engine's own integer SUM where that is exact
    and cheaper. DuckDB's integer SUM (a 128-bit accumulator) was faster at 1M rows and slower at 10M
    (2.27x vs 2.00x the per-person floor, bench/README.md, session 7), so every backend sums as DOUBLE."""

    def source(self, table: Table) -> exp.Expr:
        """The relation to read ``table`` from."""
        return exp.to_table(table.name)

    def typed(self, column: Column) -> exp.Expr:
        """The column cast to its declared type; values that do not fit become NULL, never an error."""
        value: exp.Expr = exp.TryCast(this=exp.column(column.name, quoted=True), to=_DATA_TYPES[column.type].copy())
        if column.type == "float":  # NaN is no number: treat it as missing
            value = exp.Nullif(this=value, expression=exp.cast(exp.Literal.string("NaN"), "DOUBLE"))
        return value

    def total(self, expr: exp.Expr) -> exp.Expr:
        """``expr`` over one raw row, never failing: where it would raise it yields NULL (passes/total.py)."""
        if isinstance(expr, exp.Column):  # a typed column cannot fail
            return expr.copy()
        safe = expr.copy().transform(lambda n: exp.TryCast(**n.args) if type(n) is exp.Cast else n)
        return exp.Try(this=safe)

    def date_part(self, part: str, value: exp.Expr) -> exp.Expr:
        """``EXTRACT(part FROM value)`` of a DATE as a BIGINT with PostgreSQL's meaning (passes/dates.py):
        ``part`` is YEAR, QUARTER, MONTH, DAY or DOW (0 = Sunday)."""
        return exp.cast(exp.Extract(this=exp.var(part), expression=value), "BIGINT")

    def date_trunc(self, unit: str, value: exp.Expr) -> exp.Expr:
        """``date_trunc(unit, value)`` of a DATE as a TIMESTAMP (no time zone) at midnight of the first day of
        its YEAR, QUARTER or MONTH (passes/dates.py)."""
        truncated = exp.TimestampTrunc(this=exp.cast(value, "TIMESTAMP"), unit=exp.var(unit))
        return exp.cast(truncated, "TIMESTAMP")

    def unit(self, column: Column) -> exp.Expr:
        """The privacy unit on its exact identity: NULL (the row is then dropped) unless it round-trips.

        Proof note: casting first would merge distinct raw ids into one unit ('7', '07', '7.0', ' 7',
        '0x10' and '1_0' all cast to an int), so one person's rows could be bounded as another's and
        the real sensitivity double. An int unit is kept only where the text of the cast value equals
        the raw value's text (so exactly one raw spelling maps to each id; a typed integer source
        always passes); a str unit is the text itself. The rule reads the row's own value only.
        Tests: tests/test_sources.py::test_near_equal_ids_stay_two_people.
        """
        value = self.typed(column)
        if column.type == "str":
            return value
        raw = exp.cast(exp.column(column.name, quoted=True), "VARCHAR")
        same = exp.EQ(this=exp.cast(value.copy(), "VARCHAR"), expression=raw)
        return exp.Case(ifs=[exp.If(this=same, true=value)])

    def row_order_key(self, seed: bytes) -> str:
        """The secret key of :meth:`row_hash`, derived from the ledger's seed (never shown by ``explain``)."""
        return hashlib.sha256(b"dpgateway-row-order" + seed).hexdigest()[:32]

    def row_hash(self, key: exp.Expr, columns: Sequence[exp.Expr]) -> exp.Expr:
        """A keyed, deterministic hash of a row's content (orders each unit's rows data-independently)."""
        return exp.func("hash", key, *columns)

    def settings(self, k: int) -> tuple[tuple[str, Any], ...]:
        """Per-query engine settings for a plan that keeps ``k`` rows per unit."""
        return ()

    def unit_count_by_join(self, table: Table) -> bool:
        """Whether the weighted rewrite over ``table`` (a single source) takes ``n_u`` by the join form."""
        return self.UNIT_COUNT_BY_JOIN

    def per_unit_settings(self) -> tuple[tuple[str, Any], ...]:
        """Per-query engine settings for the scalar ``COUNT(*)`` pre-aggregation (one ``GROUP BY unit``)."""
        return ()

    def file_source(self, path: str) -> exp.Expr:
        """The relation reading a Parquet file written by the gateway (a prepared copy)."""
        return exp.to_table(path)

    def finish(self, tree: exp.Expr) -> exp.Expr:
        """The bounded statement as this engine must run it: a backend may replace a node by one with the
        semantics the planner assumes (PostgreSQL: DuckDB's ROUND, truncating integer division). The
        result is what is rendered and verified (dpgateway/sqlcheck.py); the default changes nothing."""
        return tree


class CopyStore(ABC):
    """Prepared copies a backend keeps inside its database (PostgreSQL), for sources that are not files.

    The gateway asks :meth:`state` before planning (one round trip) and uses a copy only while it equals
    the state :meth:`build` recorded in the manifest (dpgateway/prepare.py); the backend's module proves
    that equal states mean equal rows (connectors/postgres_copy.py)."""

    @abstractmethod
    def relation(self, table: Table, digest: str) -> str:
        """The copy's relation (``schema.name``) for ``table`` under the policy digest ``digest``."""

    @abstractmethod
    def state(self, table: Table, digest: str, *, version: bool = True) -> dict[str, Any] | None:
        """Everything the copy's validity depends on, read now (None: unreadable, no copy is valid).
        ``version=False`` reads the catalog only (whether a build could succeed)."""

    @abstractmethod
    def build(self, table: Table, select: VerifiedSQL, digest: str) -> tuple[dict[str, Any], int]:
        """Materialize ``select`` as the copy; return the state it was built at and its row count."""


@dataclass
class Running:
    """A statement one thread runs on ``handle`` (a cursor, a connection); ``cancelled`` once interrupted."""

    handle: Any
    cancelled: bool = False


class Interrupts:
    """Which handle each thread is running a statement on, so a CancelRequest from another thread can stop it.

    ``cancel`` is called under the lock that the running thread takes to unregister, so it only ever reaches
    a statement of the thread named; the connector discards a handle that was cancelled (a late cancel must
    not reach a later statement on it).
    """

    def __init__(self, cancel: Callable[[Any], None]) -> None:
        self._cancel = cancel
        self._lock = threading.Lock()
        self._by_thread: dict[int, Running] = {}

    @contextmanager
    def running(self, handle: Any) -> Iterator[Running]:
        entry = Running(handle)
        thread = threading.get_ident()
        with self._lock:
            self._by_thread[thread] = entry
        try:
            yield entry
        finally:
            with self._lock:
                self._by_thread.pop(thread, None)

    def interrupt(self, thread: int) -> None:
        with self._lock:
            entry = self._by_thread.get(thread)
            if entry is not None and not entry.cancelled:
                entry.cancelled = True
                self._cancel(entry.handle)


class Connector(ABC):
    """Runs bounded SQL on one backend. Use as a context manager to close it.

    :meth:`execute` and :meth:`materialize` accept only :class:`~dpgateway.sqlcheck.VerifiedSQL` (checked
    at run time too), so no string the round-trip check has not seen reaches a backend; subclasses
    implement :meth:`_execute` and :meth:`_materialize`.
    """

    hooks: SQLHooks = SQLHooks()
    interrupts: Interrupts | None = None
    """Set by a backend whose running statements can be cancelled (:meth:`interrupt`)."""
    copies: CopyStore | None = None
    """Set by a backend that keeps prepared copies of its (non-file) sources in its own database."""

    def execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        """Run the verified bounded SQL and return its rows exactly."""
        return self._execute(require_verified(sql), settings)

    def materialize(self, sql: VerifiedSQL, path: str) -> int:
        """Write the rows of verified ``sql`` to the Parquet file ``path``; return how many (``dpgateway prepare``)."""
        return self._materialize(require_verified(sql), path)

    @abstractmethod
    def _execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...]) -> ExactAggregates:
        """Run the bounded SQL and return its rows exactly."""

    def _materialize(self, sql: VerifiedSQL, path: str) -> int:
        raise UnsupportedError(f"the {type(self).__name__} backend cannot write prepared copies")

    def copy_source(self, table: Table) -> str:
        """The local file or folder this backend reads connector table ``table`` from, against which a prepared
        copy's validity is checked (dpgateway/prepare.py); UnsupportedError (0A000) naming the reason where a
        copy cannot be kept private or checked. File sources are the gateway's own and never reach this."""
        raise UnsupportedError(
            f"table {table.name} cannot be prepared: the {type(self).__name__} backend writes no copies"
        )

    def interrupt(self, thread: int) -> None:
        """Cancel the statement that thread ``thread`` (a ``threading.get_ident()``) runs on this backend now,
        if any: its :meth:`execute` then raises QueryCanceledError (57014). A CancelRequest over the wire calls
        this; a backend without :attr:`interrupts` lets the statement finish."""
        if self.interrupts is not None:
            self.interrupts.interrupt(thread)

    def check_table(self, table: Table) -> None:  # noqa: B027 - optional hook
        """Verify the declared columns exist in the source (a schema check, no data read)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MockConnector(Connector):
    """Answers from a function of the SQL text; records every statement (for unit tests)."""

    def __init__(self, answer: Callable[[str], ExactAggregates]) -> None:
        self.answer = answer
        self.statements: list[VerifiedSQL] = []

    def _execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        self.statements.append(sql)
        return self.answer(sql)
