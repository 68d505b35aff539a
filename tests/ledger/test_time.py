"""Ledger time: charges are stamped by the database's clock, never before their scopes' latest charge,
and a host whose clock is far from the database's is refused (proof note in budget_store/ledger_time.py)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from conftest import BUDGET, DAY, FakeClock, make_spend

from dpgateway.budget_store import open_store
from dpgateway.budget_store.ledger_time import MAX_CLOCK_SKEW_SECONDS, ClockSkewError, database_now
from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.errors import BackendError, BudgetError
from dpgateway.policies.model import Budget, Cap

WINDOW = BUDGET.window_days * DAY


class SkewedClock:
    """This host's clock: the real time plus a fixed skew."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def __call__(self) -> float:
        return time.time() + self.skew


def database_time(store: SQLBudgetStore) -> float:
    with store.engine.connect() as conn:
        return float(conn.execute(sa.select(database_now())).scalar_one())


def test_charges_are_stamped_with_the_database_clock_not_the_hosts(ledger_url: str) -> None:
    ahead = MAX_CLOCK_SKEW_SECONDS * 0.8  # off, but within the tolerance
    store = open_store(ledger_url, BUDGET, clock=SkewedClock(ahead))
    before = database_time(store)
    reserved = store.reserve(make_spend(key="pending"))
    store.commit(store.reserve(make_spend()), epsilon=0.5, delta=1e-7)
    after = database_time(store)
    charges = store.history()
    records = store.audit_log()
    store.close()
    assert len(charges) == 2 and reserved in {c.id for c in charges}
    assert all(before <= c.at <= after for c in charges), (before, [c.at for c in charges], after)
    assert [r.outcome for r in records] == ["released"] and before <= records[0].at <= after
    assert after < time.time() + ahead / 2  # the host's clock was not used


@pytest.mark.parametrize("skew", [MAX_CLOCK_SKEW_SECONDS + 60, -(MAX_CLOCK_SKEW_SECONDS + 60)])
def test_a_host_clock_far_from_the_databases_is_refused_and_nothing_is_charged(ledger_url: str, skew: float) -> None:
    store = open_store(ledger_url, BUDGET, clock=SkewedClock(skew))
    with pytest.raises(ClockSkewError, match="ahead of" if skew > 0 else "behind") as refused:
        store.reserve(make_spend(epsilon=0.5))
    assert isinstance(refused.value, BackendError) and refused.value.sqlstate == "58000"
    assert "nothing was charged" in refused.value.message and "Synchronize this host's clock" in refused.value.message
    assert store.history() == [] and store.remaining("alice", ["pid"]).analyst.spent_epsilon == 0.0
    assert [(r.outcome, r.message) for r in store.audit_log()] == [("refused", refused.value.message)]
    store.close()
    synced = open_store(ledger_url, BUDGET)  # the same ledger from a host in sync
    synced.commit(synced.reserve(make_spend(epsilon=0.5)), epsilon=0.5, delta=1e-7)
    assert synced.remaining("alice", ["pid"]).analyst.spent_epsilon == 0.5
    synced.close()


@pytest.mark.postgres
def test_two_writers_with_skewed_clocks_on_one_postgres_ledger_cannot_exceed_the_subject_cap(
    postgres_url: str,
) -> None:
    """Writer A's clock lags by more than the window: with its own clock it would stamp its charges as
    already expired, and writer B would spend the people's whole budget a second time."""
    budget = Budget(window_days=10, per_subject=Cap(1.0, 1e-6), per_analyst=Cap(5.0, 1e-6), per_query=Cap(1.0, 1e-6))
    lagging = open_store(postgres_url, budget, clock=SkewedClock(-11 * DAY))
    near = open_store(postgres_url, budget, clock=SkewedClock(-MAX_CLOCK_SKEW_SECONDS * 0.8))
    synced = open_store(postgres_url, budget, clock=SkewedClock(MAX_CLOCK_SKEW_SECONDS * 0.8))
    spent = 0.0
    for writer, analyst in ((lagging, "a"), (near, "b"), (synced, "c"), (lagging, "a"), (near, "b")):
        try:
            rid = writer.reserve(make_spend(analyst=analyst, epsilon=0.5, delta=0.0, key=analyst))
        except (BudgetError, ClockSkewError):
            continue
        writer.commit(rid, epsilon=0.5, delta=0.0)
        spent += 0.5
    usage = {u.scope: u.spent_epsilon for u in synced.usage()}
    charges = synced.history("domain:pid")
    for store in (lagging, near, synced):
        store.close()
    assert spent == 1.0 and usage["domain:pid"] == 1.0  # exactly the cap: b then c, the lagging writer refused
    assert [c.analyst for c in charges] == ["b", "c"] and charges[0].at <= charges[1].at


def test_a_charge_is_never_stamped_before_the_latest_charge_of_its_scopes(make_store, clock: FakeClock) -> None:
    """The database's clock steps back an hour (NTP) between two charges: the second is stamped at the
    first's time, so both leave the window together and the cap holds over every window."""
    store = make_store()
    first_at = clock()
    store.commit(store.reserve(make_spend(epsilon=1.0, delta=0.0)), epsilon=1.0, delta=0.0)
    clock.advance(-3600)
    store.commit(store.reserve(make_spend(epsilon=1.0, delta=0.0)), epsilon=1.0, delta=0.0)
    assert [c.at for c in store.history()] == [first_at, first_at]
    clock.advance(WINDOW + 1800)  # half an hour before the first charge leaves the window
    with pytest.raises(BudgetError, match="analyst 'alice'"):  # stamped an hour early, one would have left it
        store.reserve(make_spend(epsilon=1.0, delta=0.0))
    clock.advance(1800)
    store.reserve(make_spend(epsilon=1.0, delta=0.0))


def test_a_debit_is_never_stamped_before_its_reservation_or_a_later_charge_of_its_scopes(
    make_store, clock: FakeClock
) -> None:
    store = make_store()
    pending = store.reserve(make_spend(analyst="alice", epsilon=0.5, delta=0.0))
    clock.advance(100)
    store.commit(store.reserve(make_spend(analyst="bob", epsilon=0.5, delta=0.0)), epsilon=0.5, delta=0.0)
    bobs_at = clock()
    clock.advance(-3600)  # the database's clock steps back before alice's debit
    store.commit(pending, epsilon=0.5, delta=0.0)
    stamps = {c.analyst: c.at for c in store.history()}
    assert stamps == {"alice": bobs_at, "bob": bobs_at}
    assert [r.at for r in store.audit_log(analyst="alice")] == [bobs_at]
