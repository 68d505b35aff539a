"""Replays through ``Gateway.query`` with the store's replay map (budget_store/replays.py): audited before they are
returned, never served to another analyst under scope ``analyst``, never served for a query the current policy
refuses, and the same answers a process without the map (another process on the ledger) gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpgateway import Gateway
from dpgateway.budget_store import open_store
from dpgateway.errors import DPGatewayError
from dpgateway.policies.loader import load_config

SQL = "SELECT sex, COUNT(*) AS n, AVG(income) AS i FROM pums GROUP BY sex"


def test_a_replay_is_audited_and_committed_before_it_is_returned(demo_gateway: Gateway) -> None:
    first = demo_gateway.query(SQL, analyst="ann", epsilon=0.5)
    other_process = open_store(demo_gateway.config.ledger, demo_gateway.config.budget)
    for n in range(1, 4):
        again = demo_gateway.query(SQL, analyst="ann", epsilon=0.5)
        assert again.replayed and again.rows == first.rows and again.epsilon == 0.0
        assert again.accuracy == first.accuracy and again.half_width == first.half_width
        # committed when query() returned: another connection sees the record
        log = other_process.audit_log(analyst="ann", limit=None)
        assert [r.outcome for r in log] == ["replayed"] * n + ["released"]
        assert again.remaining == other_process.remaining("ann", ["pid"]).as_dict()
    other_process.close()


def test_the_replayed_result_does_not_share_the_remembered_answer(demo_gateway: Gateway) -> None:
    first = demo_gateway.query(SQL, analyst="ann", epsilon=0.5)
    again = demo_gateway.query(SQL, analyst="ann", epsilon=0.5)
    again.accuracy.clear()  # a caller changing its result ...
    again.rows.clear()
    third = demo_gateway.query(SQL, analyst="ann", epsilon=0.5)
    assert third.rows == first.rows and third.accuracy == first.accuracy  # ... changes no later replay


def test_another_analyst_never_gets_a_replay_under_analyst_scope(demo_gateway: Gateway) -> None:
    assert demo_gateway.store.replay == "analyst"  # type: ignore[attr-defined]
    alice = demo_gateway.query(SQL, analyst="alice", epsilon=0.5)
    assert demo_gateway.query(SQL, analyst="alice", epsilon=0.5).replayed  # alice's answer is now remembered
    bob = demo_gateway.query(SQL, analyst="bob", epsilon=0.5)
    assert not bob.replayed and bob.epsilon > 0  # charged, freshly noised
    assert demo_gateway.query(SQL, analyst="alice", epsilon=0.5).rows == alice.rows
    assert demo_gateway.query(SQL, analyst="bob", epsilon=0.5).rows == bob.rows


def test_replay_off_charges_every_repeat(demo_config_path: Path) -> None:
    config = load_config(demo_config_path)
    config = dataclasses.replace(config, budget=dataclasses.replace(config.budget, replay="off"))
    with Gateway(config) as gw:
        spent = [gw.query(SQL, analyst="ann", epsilon=0.5) for _ in range(3)]
    assert [r.replayed for r in spent] == [False, False, False]
    assert all(r.epsilon > 0 for r in spent)


def test_a_query_the_new_policy_refuses_is_never_replayed(demo_config_path: Path) -> None:
    """The map belongs to the ledger connection, which outlives a policy here (one store, two gateways): the
    query is planned under the current policy before any replay lookup, so a refused query is refused."""
    config = load_config(demo_config_path)
    store = open_store(config.ledger, config.budget)
    with Gateway(config, store=store) as gw:
        first = gw.query(SQL, analyst="ann", epsilon=0.5)
        assert gw.query(SQL, analyst="ann", epsilon=0.5).replayed  # remembered
    table = config.tables[0]
    narrower = dataclasses.replace(table, columns=tuple(c for c in table.columns if c.name != "income"))
    with (
        Gateway(dataclasses.replace(config, tables=(narrower,)), store=store) as gw,
        pytest.raises(DPGatewayError, match="income"),
    ):
        gw.query(SQL, analyst="ann", epsilon=0.5)
    # a policy under which the query still plans: replayed, as the ledger itself replays (key: SQL, epsilon, delta)
    k4 = dataclasses.replace(table, max_rows_per_unit=4)
    with Gateway(dataclasses.replace(config, tables=(k4,)), store=store) as gw:
        mapped = gw.query(SQL, analyst="ann", epsilon=0.5)
    fresh_store = open_store(config.ledger, config.budget)  # another process: no map
    with Gateway(dataclasses.replace(config, tables=(k4,)), store=fresh_store) as gw:
        from_ledger = gw.query(SQL, analyst="ann", epsilon=0.5)
    assert mapped.replayed and from_ledger.replayed and mapped.rows == from_ledger.rows == first.rows
    store.close()
    fresh_store.close()
