"""The ledger's schema on both backends: the scope rows' copies of each charge stay in step with it, and a
schema-1 ledger is migrated on open without changing what it has spent."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import BUDGET, DAY, FakeClock, make_spend

from dpgateway.budget_store.sql_schema import SCHEMA_VERSION, charge_scopes, charges, meta_table
from dpgateway.errors import BudgetError, ConfigError

JOINED = (  # the schema-1 usage sums: every charge in the window, joined to its scopes
    sa.select(charge_scopes.c.scope, sa.func.sum(charges.c.epsilon), sa.func.sum(charges.c.delta))
    .select_from(charges.join(charge_scopes, charge_scopes.c.charge_id == charges.c.id))
    .where(charges.c.at > sa.bindparam("since"))
    .group_by(charge_scopes.c.scope)
)


def _copies_agree(store, now: float) -> None:
    with store.engine.connect() as conn:
        mismatched = conn.execute(
            sa.select(charge_scopes.c.charge_id)
            .select_from(charge_scopes.outerjoin(charges, charges.c.id == charge_scopes.c.charge_id))
            .where(
                sa.or_(
                    charges.c.id.is_(None),
                    charge_scopes.c.epsilon != charges.c.epsilon,
                    charge_scopes.c.delta != charges.c.delta,
                    charge_scopes.c.at != charges.c.at,
                )
            )
        ).all()
        joined = {scope: (e, d) for scope, e, d in conn.execute(JOINED, {"since": now - BUDGET.window_days * DAY})}
    assert mismatched == []
    usage = {u.scope: (u.spent_epsilon, u.spent_delta) for u in store.usage() if u.spent_epsilon or u.spent_delta}
    assert usage.keys() == joined.keys()
    for scope, spent in usage.items():
        assert spent == pytest.approx(joined[scope]), scope


def test_scope_copies_stay_in_step_with_their_charges(make_store, clock: FakeClock):
    store = make_store(lease_seconds=60)
    steps = [
        lambda: store.commit(store.reserve(make_spend(epsilon=0.5, key="a")), epsilon=0.25, delta=0.0),
        lambda: store.commit_and_remaining(
            store.reserve(make_spend(epsilon=0.4, domains=("pid", "hh"), key="b")),
            epsilon=0.4,
            delta=1e-8,
            answer={"rows": []},
            analyst="alice",
            domains=["pid", "hh"],
        ),
        lambda: store.release(store.reserve(make_spend(epsilon=0.3, key="c")), outcome="failed"),
        lambda: store.reserve(make_spend(analyst="bob", epsilon=0.2, key="d")),  # left pending, then abandoned
    ]
    for step in steps:
        step()
        clock.advance(3600)
        _copies_agree(store, clock())
    late = store.reserve(make_spend(analyst="bob", epsilon=0.6, key="e"))
    clock.advance(120)
    assert store.reap_abandoned() == 1  # "d" was reaped already, by usage() an hour after its lease
    store.commit(late, epsilon=0.1, delta=0.0)  # committed after its lease: the slow path
    _copies_agree(store, clock())
    store.reset("analyst:bob", by="admin")
    _copies_agree(store, clock())


def _downgrade_to_schema_1(store) -> None:
    """What a ledger written by schema-1 code looks like: scope rows without amounts."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX dp_charge_scopes_usage"))
        for column in ("epsilon", "delta", "at"):
            conn.execute(sa.text(f"ALTER TABLE dp_charge_scopes DROP COLUMN {column}"))
        conn.execute(sa.text("CREATE INDEX dp_charge_scopes_scope ON dp_charge_scopes (scope)"))
        conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version").values(value="1"))


def test_a_schema_1_ledger_is_migrated_on_open_and_keeps_its_spend(make_store, clock: FakeClock):
    store = make_store()
    store.commit(store.reserve(make_spend(epsilon=0.5, key="a")), epsilon=0.25, delta=1e-8)
    store.reserve(make_spend(epsilon=0.5, domains=("pid", "hh"), key="b"))  # pending
    clock.advance(DAY)
    before = store.remaining("alice", ["pid", "hh"])
    _downgrade_to_schema_1(store)
    store.close()

    migrated = make_store()
    with migrated.engine.connect() as conn:
        version = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar()
    assert version == SCHEMA_VERSION == "2"
    assert migrated.remaining("alice", ["pid", "hh"]) == before
    _copies_agree(migrated, clock())
    assert make_store().remaining("alice", ["pid", "hh"]) == before  # opening again migrates nothing

    # a scope row written by schema-1 code (no amounts) counts as everything spent: fail closed
    with migrated.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO dp_charge_scopes (charge_id, scope) VALUES ('old', 'domain:legacy')"))
    with pytest.raises(BudgetError):
        migrated.reserve(make_spend(epsilon=0.1, domains=("legacy",), key="c"))


def test_a_ledger_from_a_newer_dpgateway_is_refused(make_store):
    store = make_store()
    with store.engine.begin() as conn:
        conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version").values(value="3"))
    with pytest.raises(ConfigError, match="schema version 3, newer than this dpgateway knows"):
        make_store()
