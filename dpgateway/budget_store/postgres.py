"""PostgreSQL ledger: per-scope transaction-level advisory locks.

``reserve`` takes ``pg_advisory_xact_lock`` on every scope it touches, in sorted key order (no
deadlock), before reading the sums; the locks are held until its transaction commits. At READ
COMMITTED each later statement sees every transaction that held the lock before, so a cap check and
its insert are atomic against every other reservation sharing a scope (proof note in ``sql.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.budget_store.sql_schema import Executor

TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})  # serialization failure, deadlock, lock timeout


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a scope or lock name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class PostgresBudgetStore(SQLBudgetStore):
    """The ledger in a PostgreSQL database."""

    DIALECT = "postgresql"

    def _create_engine(self, url: str) -> Engine:
        parsed = sa.make_url(url)
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; dpgateway depends on psycopg2 and takes whichever is installed.
            has_psycopg2 = importlib.util.find_spec("psycopg2") is not None
            parsed = parsed.set(drivername="postgresql+psycopg2" if has_psycopg2 else "postgresql+psycopg")
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=4)

    def _lock(self, conn: Executor, keys: Sequence[str]) -> None:
        for key in sorted({lock_key(k) for k in keys}):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))

    def _is_transient(self, exc: sa.exc.DBAPIError) -> bool:
        return getattr(exc.orig, "pgcode", None) in TRANSIENT_SQLSTATES
