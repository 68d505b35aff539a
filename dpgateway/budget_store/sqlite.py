"""SQLite ledger (the default): WAL mode, every write transaction ``BEGIN IMMEDIATE``.

``BEGIN IMMEDIATE`` takes the database's single write lock before the transaction reads anything, so
a reservation's cap check and its insert are atomic against every other process (proof note in
``sql.py``). Readers are not blocked (WAL). Waiting writers use SQLite's busy timeout, and
``SQLBudgetStore._run`` retries the rare "database is locked" that outlives it.

The hot path (``_run_prebuilt``: reserve, commit, replay lookup, remaining) runs the prebuilt statements
on one sqlite3 connection of the store, held under a lock, as the SQL text SQLAlchemy compiled for them
(:class:`DriverStatements`); SQLAlchemy's per-execution work was most of a query's ledger time. Its reads
that need no transaction (the replay lookup, the budget left) run on a second such connection under a lock of
its own, so that they do not queue behind a write transaction's fsync; in WAL mode they see every committed
transaction (an in-memory ledger has one connection for everything). A reservation commits relaxed and is
forced to disk by a background fsync of the log while the backend runs (``wal_sync.py``), so its debit can
commit relaxed too.

A new ledger file is created with mode 0600 whatever the umask (it holds the secret seed, analysts' SQL
and released answers); SQLite gives its ``-wal``, ``-shm`` and ``-journal`` files the database file's
mode. An existing file keeps its mode, so an admin may share a ledger with a group on purpose.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.pool import PoolProxiedConnection, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.budget_store.sql_schema import PREBUILT
from dpgateway.budget_store.wal_sync import WalSync
from dpgateway.errors import InternalError

BUSY_TIMEOUT_SECONDS = 30.0


def _flatten(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with each list (an expanding ``IN``) spread as SQLAlchemy names them: ``name_1``, ``name_2`` ..."""
    flat = {}
    for name, value in parameters.items():
        if isinstance(value, list):
            flat.update({f"{name}_{i}": item for i, item in enumerate(value, 1)})
        else:
            flat[name] = value
    return flat


class DriverStatements:
    """Runs the :data:`~dpgateway.budget_store.sql_schema.PREBUILT` statements on the sqlite3 connection itself.

    Each is compiled by the engine's dialect once per shape of its parameters (their names, and how many
    values an expanding ``IN`` gets; SQLAlchemy also compiles per shape), so the SQL text and its bound
    values are what SQLAlchemy would execute; rows come back as plain tuples.
    """

    def __init__(self, db: sqlite3.Connection, dialect: Dialect) -> None:
        self.db = db
        self.dialect = dialect
        self._prepared: dict[tuple[Any, ...], tuple[str, tuple[str, ...], dict[str, Any]]] = {}

    def execute(self, statement: sa.Executable, parameters: Any = None, /) -> sqlite3.Cursor:
        if isinstance(parameters, list):  # several rows, as SQLAlchemy's executemany
            text, names, constants = self._prepare(statement, parameters[0], many=True)
            rows = [[{**constants, **row}[name] for name in names] for row in parameters]
            return self.db.executemany(text, rows)
        parameters = parameters or {}
        text, names, constants = self._prepare(statement, parameters, many=False)
        values = {**constants, **_flatten(parameters)}
        return self.db.execute(text, [values[name] for name in names])

    def _prepare(
        self, statement: sa.Executable, parameters: Mapping[str, Any], *, many: bool
    ) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """The SQL text, its parameter names in order, and the values it binds itself (literals, LIMIT 1)."""
        shape = (id(statement), many, *((k, len(v) if isinstance(v, list) else -1) for k, v in parameters.items()))
        prepared = self._prepared.get(shape)
        if prepared is None:
            known = next((known for known in PREBUILT if known is statement), None)
            if known is None:
                raise InternalError(f"the ledger ran a statement that is not prebuilt: {statement}; this is a bug")
            compiled = cast(
                SQLCompiler, known.compile(dialect=self.dialect, column_keys=sorted(parameters), for_executemany=many)
            )
            constants = {name: bind.effective_value for bind, name in compiled.bind_names.items() if not bind.required}
            expanded = compiled.construct_expanded_state(parameters)
            values = {**constants, **_flatten(parameters)}
            if expanded.positiontup is None or not all(
                name in values and values[name] == expanded.parameters[name] for name in expanded.positiontup
            ):
                raise InternalError(f"SQLite compiled {statement} with parameters we do not name; this is a bug")
            prepared = self._prepared[shape] = (expanded.statement, tuple(expanded.positiontup), constants)
        return prepared


def create_private(path: str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (the umask can only remove bits); SQLite reads an
    empty file as an empty database."""
    with suppress(OSError):  # it exists; or e.g. its folder is missing, which SQLite's open reports as a BackendError
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


class SQLiteBudgetStore(SQLBudgetStore):
    """The ledger in one SQLite file (or in memory, for tests)."""

    DIALECT = "sqlite"

    def __init__(self, url: str, *args: Any, **options: Any) -> None:
        self._in_memory = sa.make_url(url).database in (None, "", ":memory:")
        self._mutex = threading.Lock()  # guards the hot path's connection (in memory: the only connection)
        self._read_mutex = threading.Lock()  # guards its reading connection (single read statements)
        self._drivers: dict[bool, tuple[PoolProxiedConnection, DriverStatements]] = {}  # by "reads only"
        self._wal_sync: WalSync | None = None
        super().__init__(url, *args, **options)
        if not self._in_memory:
            with self._mutex:
                db = self._hot_connection(False).db
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
                path = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")
            if str(mode).lower() == "wal" and path:
                self._wal_sync = WalSync(path)

    def _reserved(self, charge_id: str) -> None:
        if self._wal_sync is not None:
            self._wal_sync.start(charge_id)

    def _reservation_on_disk(self, charge_id: str) -> bool:
        return self._wal_sync is not None and self._wal_sync.wait(charge_id)

    def _create_engine(self, url: str) -> Engine:
        in_memory = self._in_memory
        parsed = sa.make_url(url)
        if not in_memory and not parsed.query.get("uri") and parsed.database:
            create_private(parsed.database)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            # one shared connection keeps an in-memory database alive across calls
            poolclass=StaticPool if in_memory else None,
        )

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            if not in_memory:
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA synchronous=FULL")  # a committed debit survives power loss

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            begin = conn.get_execution_options().get("dp_begin", "BEGIN")
            if begin:  # "" for a single statement: SQLite runs it in a transaction of its own
                conn.exec_driver_sql(begin)

        return engine

    @contextmanager
    def _transaction(self, *, write: bool | None) -> Iterator[Connection]:
        begin = "BEGIN IMMEDIATE" if write else "" if write is None else "BEGIN"
        with (
            self._mutex if self._in_memory else nullcontext(),  # one connection, shared with the hot path
            self.engine.connect().execution_options(dp_begin=begin) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def _prebuilt_transaction(self, *, write: bool | None, synced: bool = True) -> Iterator[DriverStatements]:
        # a single read statement (write=None) runs on a second connection, so that it does not wait for a
        # write transaction's fsync (WAL readers see every committed transaction); in memory there is one
        reader = write is None and not self._in_memory
        relaxed = not synced and bool(write) and not self._in_memory
        with self._read_mutex if reader else self._mutex:
            statements = self._hot_connection(reader)
            db = statements.db
            try:
                if relaxed:  # only outside a transaction; set back below, whatever happens
                    db.execute("PRAGMA synchronous=NORMAL")
                if write is not None:
                    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield statements
                if db.in_transaction:
                    db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):  # as SQLAlchemy wraps it, for _run's retry and error mapping
                    raise sa.exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
                raise
            finally:
                if relaxed:
                    self._restore_full_sync(db)

    def _restore_full_sync(self, db: sqlite3.Connection) -> None:
        """Back to ``synchronous=FULL`` after a relaxed transaction; a connection that cannot be set back is
        closed (the next transaction opens a new one, with FULL), so no later commit runs relaxed."""
        try:
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            held = self._drivers.pop(False, None)
            if held is not None:
                with suppress(sqlite3.Error, sa.exc.SQLAlchemyError):
                    held[0].invalidate()
            # not retried: the transaction committed (a reservation stands, and is charged if never committed)
            raise InternalError(f"the SQLite ledger could not restore synchronous=FULL ({exc})") from None

    def _hot_connection(self, reader: bool) -> DriverStatements:
        """The hot path's writing (or reading) connection, opened on first use; its mutex is held."""
        held = self._drivers.get(reader)
        if held is None:
            pooled = self.engine.raw_connection()
            driver = pooled.driver_connection
            if not isinstance(driver, sqlite3.Connection):
                raise InternalError(f"the SQLite ledger's driver connection is a {type(driver).__name__}")
            held = self._drivers[reader] = pooled, DriverStatements(driver, self.engine.dialect)
        return held[1]

    def close(self) -> None:
        if self._wal_sync is not None:
            self._wal_sync.close()
        with self._mutex, self._read_mutex:
            for pooled, _ in self._drivers.values():
                pooled.close()
            self._drivers.clear()
        super().close()

    def _is_transient(self, exc: sa.exc.DBAPIError) -> bool:
        return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)
