"""SQLite ledger (the default): WAL mode, every write transaction ``BEGIN IMMEDIATE``.

``BEGIN IMMEDIATE`` takes the database's single write lock before the transaction reads anything, so
a reservation's cap check and its insert are atomic against every other process (proof note in
``sql.py``). Readers are not blocked (WAL). Waiting writers use SQLite's busy timeout, and
``SQLBudgetStore._run`` retries the rare "database is locked" that outlives it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from dpgateway.budget_store.sql import SQLBudgetStore

BUSY_TIMEOUT_SECONDS = 30.0


class SQLiteBudgetStore(SQLBudgetStore):
    """The ledger in one SQLite file (or in memory, for tests)."""

    DIALECT = "sqlite"

    def _create_engine(self, url: str) -> Engine:
        parsed = sa.make_url(url)
        in_memory = parsed.database in (None, "", ":memory:")
        engine = sa.create_engine(
            parsed,
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
        with self.engine.connect().execution_options(dp_begin=begin) as conn, conn.begin():
            yield conn

    def _is_transient(self, exc: sa.exc.DBAPIError) -> bool:
        return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)
