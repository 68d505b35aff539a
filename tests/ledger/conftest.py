"""Ledger fixtures: an injectable clock, a small budget, SQLite and a database on the throwaway PostgreSQL
server (``postgres_server``, tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pg_server import SystemPostgres, WheelPostgres

from dpgateway.budget_store import Spend, open_store
from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.policies.model import Budget, Cap

BUDGET = Budget(
    window_days=10,
    per_subject=Cap(3.0, 1e-6),
    per_analyst=Cap(2.0, 1e-6),
    per_query=Cap(1.0, 5e-7),
)
DAY = 86400.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_spend(
    analyst: str = "alice",
    epsilon: float = 0.5,
    delta: float = 1e-7,
    domains: tuple[str, ...] = ("pid",),
    key: str = "q1",
    sql: str = "SELECT COUNT(*) FROM pums",
) -> Spend:
    return Spend(analyst, domains, epsilon, delta, key, sql, "ab" * 32)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def postgres_url(postgres_server: SystemPostgres | WheelPostgres) -> str:
    """A fresh, empty database on the session's server."""
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = sa.make_url(postgres_server.url).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name)))
    engine.dispose()
    return sa.make_url(postgres_server.url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The URL of an empty ledger, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_store(ledger_url: str, clock: FakeClock) -> Iterator[Callable[..., SQLBudgetStore]]:
    """Open the test's ledger (again): ``make_store(budget=..., replay=..., lease_seconds=...)``."""
    stores: list[SQLBudgetStore] = []

    def make(budget: Budget = BUDGET, **options: Any) -> SQLBudgetStore:
        store = open_store(ledger_url, budget, clock=clock, database_clock=clock, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
