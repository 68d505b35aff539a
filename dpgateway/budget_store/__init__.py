"""The persistent privacy ledger: two-phase spending, rolling-window caps, replay cache, audit log.

>>> from dpgateway.policies.model import Budget
>>> store = open_store("sqlite:///:memory:", Budget())
>>> store.remaining("alice", ["pid"]).analyst.remaining_epsilon
4.0
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from dpgateway.budget_store.base import (
    AuditRecord,
    BudgetStore,
    Charge,
    Clock,
    Remaining,
    ReplayScope,
    Spend,
    Usage,
    scope_name,
    split_scope,
)
from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.budget_store.sql_schema import DEFAULT_LEASE_SECONDS
from dpgateway.errors import ConfigError
from dpgateway.policies.model import Budget


def open_store(
    url: str,
    budget: Budget,
    *,
    clock: Clock = time.time,
    database_clock: Clock | None = None,
    replay: ReplayScope = "analyst",
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> SQLBudgetStore:
    """Open (creating its schema if needed) the ledger at ``url``.

    ``sqlite:///path.db`` (default backend), ``sqlite:///:memory:`` (tests) or ``postgresql://...``.
    ``replay`` is who may get a free replay of a released answer: the same ``analyst``, anyone
    (``global``) or nobody (``off``). A reservation older than ``lease_seconds`` is ``abandoned``.
    Charges are stamped with the database's clock; ``clock`` is this host's, and a reservation is refused
    when the two differ by more than ``MAX_CLOCK_SKEW_SECONDS`` (``ledger_time.py``). ``database_clock``
    (tests) stands in for the database's clock, so that a fake clock drives the windows.
    """
    try:
        backend = sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:
        backend = ""
    kind: type[SQLBudgetStore]
    if backend == "sqlite":
        from dpgateway.budget_store.sqlite import SQLiteBudgetStore as kind
    elif backend == "postgresql":
        from dpgateway.budget_store.postgres import PostgresBudgetStore as kind
    else:
        raise ConfigError(
            f"ledger: unsupported URL {url!r}; use sqlite:///path.db, sqlite:///:memory: or postgresql://user@host/db"
        )
    return kind(url, budget, clock=clock, database_clock=database_clock, replay=replay, lease_seconds=lease_seconds)


__all__ = [
    "AuditRecord",
    "BudgetStore",
    "Charge",
    "Remaining",
    "Spend",
    "Usage",
    "open_store",
    "scope_name",
    "split_scope",
]
