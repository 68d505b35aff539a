"""PostgreSQL: the bounded SQL runs where the data lives, read-only, with a statement timeout.

Each query takes a pooled connection, runs in one READ ONLY transaction whose settings are ``SET LOCAL``
(``set_config(name, value, true)``: they end with the transaction), and rolls back. The gateway's role
should hold only SELECT on the declared tables (docs/backends.md).

Proof note (errors carry no data): a server error message can quote a row's value, so neither it nor
the exception text is ever shown; a failure is a BackendError (58000) naming only the error class, and
the connection is discarded. Test: tests/backends/test_postgres.py::test_backend_error_hides_values.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from dpgateway.connectors.base import Connector, ExactAggregates, Interrupts
from dpgateway.connectors.postgres_copy import PostgresCopies
from dpgateway.connectors.postgres_sql import PostgresHooks
from dpgateway.errors import BackendError, ConfigError, QueryCanceledError
from dpgateway.policies.connections import Secret
from dpgateway.policies.model import Table
from dpgateway.sqlcheck import VerifiedSQL, require_verified

POOL_SIZE = 4
# Settings a plan may SET LOCAL (SQLHooks.settings); anything else is a bug, refused.
ALLOWED_SETTINGS = frozenset({"work_mem", "jit", "max_parallel_workers_per_gather", "enable_hashagg"})
# Every transaction: dates read one way whatever the server's default; no JIT compilation (it costs
# 100+ ms on a 1M-row scan, more than it saves for these one-pass aggregates); and work_mem for the
# per-unit hash table (1M rows, 320k persons: 45 MB in one batch instead of 21 spilled batches at the
# server's default 4MB). A larger value buys nothing measurable: the window's sort of 1M rows used as much
# CPU in memory (256MB) as spilling a few runs (backend CPU time per query, bench/backends.py table).
# work_mem bounds each sort or hash node of the one running query: a gateway uses a few times pool x 64MB.
WORK_MEM = "64MB"
TRANSACTION_SETTINGS: tuple[tuple[str, str], ...] = (("DateStyle", "ISO, MDY"), ("jit", "off"), ("work_mem", WORK_MEM))
_WITHHELD = "details are withheld because they may contain data values"


class PostgresConnector(Connector):
    """A small pool of connections to one PostgreSQL database, each query in a READ ONLY transaction."""

    hooks: PostgresHooks
    interrupts: Interrupts
    copies: PostgresCopies

    def __init__(self, url: Secret | str, *, statement_timeout_ms: int = 60_000, pool_size: int = POOL_SIZE) -> None:
        dsn = url.reveal() if isinstance(url, Secret) else url
        self._origin = f"the database of {url}" if isinstance(url, Secret) and url.name else "the database URL"
        self._timeout = str(int(statement_timeout_ms))
        try:
            self._pool = psycopg2.pool.ThreadedConnectionPool(1, pool_size, dsn)
        except psycopg2.Error as exc:
            raise ConfigError(
                f"cannot connect to {self._origin} ({type(exc).__name__}); {_WITHHELD}. Check the URL, that the "
                "server runs, and that the gateway's role may log in"
            ) from None
        self._slots = threading.BoundedSemaphore(pool_size)  # wait for a free connection, never fail for one
        self.interrupts = Interrupts(lambda conn: conn.cancel())
        with self._connection() as conn:
            version = int(conn.server_version)
        self.hooks = PostgresHooks(input_is_valid=version >= 160000)
        self.copies = PostgresCopies(self, dsn, self._timeout, TRANSACTION_SETTINGS)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection in a fresh READ ONLY transaction; discarded after any error."""
        with self._slots:
            conn = self._pool.getconn()
            broken = True
            try:
                if conn.autocommit or not conn.readonly:
                    conn.set_session(readonly=True, autocommit=False)
                yield conn
                broken = False
            finally:
                if not broken:
                    try:
                        conn.rollback()  # nothing to keep: the transaction only read
                    except psycopg2.Error:
                        broken = True
                self._pool.putconn(conn, close=broken)

    def _execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        unknown = [name for name, _ in settings if name not in ALLOWED_SETTINGS]
        if unknown:
            raise BackendError(f"setting {unknown[0]!r} is not one the PostgreSQL backend applies (this is a bug)")
        running = None
        try:
            with self._connection() as conn, conn.cursor() as cursor:
                local = [("statement_timeout", self._timeout), *TRANSACTION_SETTINGS, *settings]
                for name, value in local:
                    cursor.execute("SELECT set_config(%s, %s, true)", (name, str(value)))
                with self.interrupts.running(conn) as running:
                    cursor.execute(sql)
                    columns = tuple(d[0] for d in cursor.description or ())
                    rows = tuple(tuple(_plain(v) for v in row) for row in cursor.fetchall())
                if running.cancelled:  # discard the connection: a late cancel must not reach its next statement
                    raise psycopg2.extensions.QueryCanceledError("canceled")
        except psycopg2.Error as exc:
            if running is not None and running.cancelled:
                raise QueryCanceledError("canceling statement due to user request") from None
            raise BackendError(
                f"the backend could not run the bounded query ({_kind(exc)}); {_WITHHELD}. Check that the "
                "policy's tables and columns match the database and the statement timeout suffices"
            ) from None
        return ExactAggregates(columns=columns, rows=rows)

    def read_catalog(self, sql: VerifiedSQL) -> ExactAggregates:
        """One verified statement in a READ ONLY transaction without per-query settings: a single round trip
        (a prepared copy's catalog check, connectors/postgres_copy.py)."""
        try:
            with self._connection() as conn, conn.cursor() as cursor:
                cursor.execute(require_verified(sql))
                columns = tuple(d[0] for d in cursor.description or ())
                return ExactAggregates(columns=columns, rows=tuple(tuple(map(_plain, r)) for r in cursor.fetchall()))
        except psycopg2.Error as exc:
            raise BackendError(f"the backend could not read its catalog ({_kind(exc)}); {_WITHHELD}") from None

    def check_table(self, table: Table) -> None:
        """The table exists, the gateway may SELECT it, and every declared column is there (catalog only)."""
        where = f"tables.{table.name}"
        if not isinstance(table.source, dict) or table.source.get("connector") != "postgres":
            raise ConfigError(f"{where}.source: this gateway reads PostgreSQL; give the table a postgres source")
        relation = self.hooks.source(table).sql(dialect="postgres")
        try:
            with self._connection() as conn, conn.cursor() as cursor:
                cursor.execute(
                    "SELECT to_regclass(%s) IS NOT NULL, "
                    "coalesce(has_table_privilege(to_regclass(%s), 'SELECT'), false)",
                    (relation, relation),
                )
                exists, readable = cursor.fetchone()
                cursor.execute(
                    "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                    "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                    (relation,),
                )
                found = dict(cursor.fetchall())
        except psycopg2.Error as exc:
            raise ConfigError(f"{where}.source: cannot read the catalog ({_kind(exc)}); {_WITHHELD}") from None
        if not exists:
            raise ConfigError(f"{where}.source.table: {table.source['table']} does not exist in {self._origin}")
        if not readable:
            raise ConfigError(
                f"{where}.source.table: the gateway's role has no SELECT on {table.source['table']}; "
                f"GRANT SELECT ON {relation} TO the gateway's role"
            )
        missing = [c.name for c in table.columns if c.name not in found]
        if missing:
            raise ConfigError(
                f"{where}.columns: {', '.join(missing)} not found in {table.source['table']}; "
                f"it has: {', '.join(sorted(found))}"
            )
        for column in table.columns:
            self.hooks.remember_type(column, found[column.name])

    def close(self) -> None:
        self._pool.closeall()


def _kind(exc: psycopg2.Error) -> str:
    """The error's class and SQLSTATE (a code, never text from the server)."""
    code = getattr(exc, "pgcode", None)
    return f"{type(exc).__name__}, SQLSTATE {code}" if code else type(exc).__name__


def _plain(value: Any) -> Any:
    """NUMERIC results (``SUM(bigint)``, ``DIV``) as Python ints when integral, as DuckDB returns them."""
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)
    return value
