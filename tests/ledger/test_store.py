"""Unit tests of the ledger on both backends: caps, window, two-phase spending, replay, admin, audit."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest
from conftest import BUDGET, DAY, FakeClock, make_spend

from dpgateway.budget_store import open_store
from dpgateway.errors import (
    BackendError,
    BudgetError,
    ConfigError,
    InternalError,
    InvalidParameterError,
    QueryCapError,
)
from dpgateway.policies.model import Budget, Cap

WINDOW = BUDGET.window_days * DAY


def test_commit_debits_what_was_consumed_not_what_was_reserved(make_store):
    store = make_store()
    rid = store.reserve(make_spend(epsilon=0.5, delta=2e-7))
    store.commit(rid, epsilon=0.3, delta=1e-7, answer={"columns": ["n"], "rows": [[7]]})
    left = store.remaining("alice", ["pid"])
    assert left.analyst.remaining_epsilon == pytest.approx(1.7)
    assert left.analyst.remaining_delta == pytest.approx(9e-7)
    assert left.domains["pid"].remaining_epsilon == pytest.approx(2.7)
    assert left.as_dict()["domains"]["pid"]["delta"] == pytest.approx(9e-7)


def test_analyst_cap_refusal_names_scope_ask_remaining_and_next_expiry(make_store, clock):
    store = make_store()
    first_at = clock()
    for _ in range(4):
        clock.advance(60)
        store.commit(store.reserve(make_spend(epsilon=0.5)), epsilon=0.5, delta=1e-7)
    with pytest.raises(
        BudgetError, match=r"analyst 'alice'.*asks epsilon=0\.5.*only epsilon=0, .*next frees up"
    ) as info:
        store.reserve(make_spend(epsilon=0.5))
    assert info.value.sqlstate == "53000"
    expiry = first_at + 60 + WINDOW  # the first charge leaves the window
    assert datetime.fromtimestamp(expiry, tz=timezone.utc).strftime("at %Y-%m-%d %H:%M:%S UTC") in info.value.message
    assert store.remaining("alice", []).analyst.next_expiry == expiry
    assert store.audit_log(outcome="refused")[0].message == info.value.message


def test_domain_cap_is_shared_by_all_analysts(make_store):
    store = make_store()
    for analyst in ("alice", "bob", "carol"):
        for _ in range(2):
            store.commit(store.reserve(make_spend(analyst=analyst)), epsilon=0.5, delta=1e-7)
    assert store.remaining("dave", ["pid"]).analyst.remaining_epsilon == 2.0
    with pytest.raises(BudgetError, match=r"subject domain 'pid' \(everyone in it, all analysts together\)"):
        store.reserve(make_spend(analyst="dave"))
    store.commit(store.reserve(make_spend(analyst="dave", domains=("other",))), epsilon=0.5, delta=0)


def test_per_query_cap_raises_query_cap_error_for_epsilon_and_delta(make_store):
    store = make_store()
    with pytest.raises(
        QueryCapError, match=r"asks epsilon=1\.5.*at most epsilon=1, delta=5e-07 \(budget\.per_query\)"
    ) as info:
        store.reserve(make_spend(epsilon=1.5))
    assert info.value.sqlstate == "53400"
    with pytest.raises(QueryCapError, match=r"delta=6e-07"):
        store.reserve(make_spend(epsilon=0.1, delta=6e-7))
    assert [r.outcome for r in store.audit_log()] == ["refused", "refused"]
    assert store.remaining("alice", ["pid"]).analyst.spent_epsilon == 0


def test_delta_cap_is_enforced(make_store):
    store = make_store()
    for _ in range(2):
        store.commit(store.reserve(make_spend(epsilon=0.1, delta=5e-7)), epsilon=0.1, delta=5e-7)
    with pytest.raises(BudgetError, match=r"asks epsilon=0\.1, delta=1e-07 but only epsilon=1\.8, delta=0 remain"):
        store.reserve(make_spend(epsilon=0.1, delta=1e-7))


def test_ten_tenths_fit_a_cap_of_one(make_store):
    budget = Budget(window_days=1, per_subject=Cap(1.0, 0.0), per_analyst=Cap(1.0, 0.0), per_query=Cap(1.0, 0.0))
    store = make_store(budget)
    for _ in range(10):
        store.commit(store.reserve(make_spend(epsilon=0.1, delta=0.0)), epsilon=0.1, delta=0.0)
    assert sum([0.1] * 10) != 1.0  # the float sum really is off
    with pytest.raises(BudgetError, match="would be exceeded"):
        store.reserve(make_spend(epsilon=1e-9, delta=0.0))


def test_pending_reservations_count_until_released(make_store):
    store = make_store()
    held = [store.reserve(make_spend(epsilon=1.0)) for _ in range(2)]
    with pytest.raises(BudgetError, match="analyst 'alice'"):
        store.reserve(make_spend(epsilon=0.5))
    store.release(held[0], outcome="error", message="backend timed out")
    store.commit(store.reserve(make_spend(epsilon=0.5)), epsilon=0.5, delta=0)
    error = store.audit_log(outcome="error")
    assert [(r.message, r.epsilon) for r in error] == [("not charged, reservation released: backend timed out", 1.0)]


def test_a_charge_stops_counting_when_it_leaves_the_window(make_store, clock: FakeClock):
    store = make_store()
    for _ in range(4):
        store.commit(store.reserve(make_spend()), epsilon=0.5, delta=1e-7)
    clock.advance(WINDOW - 1)
    with pytest.raises(BudgetError, match=r"in 1\.16e-05 days"):
        store.reserve(make_spend())
    clock.advance(1)
    assert store.remaining("alice", ["pid"]).analyst.spent_epsilon == 0
    store.reserve(make_spend(epsilon=1.0))


def test_commit_counts_from_commit_time(make_store, clock: FakeClock):
    store = make_store()
    rid = store.reserve(make_spend(epsilon=2.0 * 0.5))
    clock.advance(DAY)
    store.commit(rid, epsilon=1.0, delta=0)
    clock.advance(WINDOW - DAY)
    assert store.remaining("alice", []).analyst.spent_epsilon == 1.0
    clock.advance(DAY)
    assert store.remaining("alice", []).analyst.spent_epsilon == 0


def test_commit_above_the_reservation_is_an_internal_error(make_store):
    store = make_store()
    rid = store.reserve(make_spend(epsilon=0.5, delta=1e-7))
    with pytest.raises(InternalError, match=r"debits epsilon=0\.6.*more than it reserved") as info:
        store.commit(rid, epsilon=0.6, delta=1e-7)
    assert info.value.sqlstate == "XX000"
    with pytest.raises(InternalError, match="more than it reserved"):
        store.commit(rid, epsilon=0.5, delta=2e-7)
    store.commit(rid, epsilon=0.5, delta=1e-7)
    with pytest.raises(InternalError, match="already committed"):
        store.commit(rid, epsilon=0.5, delta=1e-7)
    with pytest.raises(InternalError, match="its debit stands"):
        store.release(rid, outcome="error")
    with pytest.raises(InternalError, match="which is unknown"):
        store.commit("nope", epsilon=0.1, delta=0)
    with pytest.raises(InternalError, match="not JSON-serializable"):
        store.commit(store.reserve(make_spend()), epsilon=0.1, delta=0, answer={"x": object()})


def test_commit_of_a_reservation_older_than_the_window_is_refused(make_store, clock: FakeClock):
    store = make_store()
    rid = store.reserve(make_spend())
    clock.advance(WINDOW)
    with pytest.raises(BudgetError, match="has expired; the answer must not be released"):
        store.commit(rid, epsilon=0.5, delta=0)


@pytest.mark.parametrize(
    ("replay", "same_analyst", "other_analyst"),
    [("analyst", True, False), ("global", True, True), ("off", False, False)],
)
def test_replay_scopes(make_store, replay, same_analyst, other_analyst):
    store = make_store(replay=replay)
    answer = {"columns": ["sex", "n"], "rows": [[1, 10.5], [2, 11.25]]}
    store.commit(store.reserve(make_spend(key="k")), epsilon=0.5, delta=0, answer=answer)
    assert (store.cached_answer("alice", "k") == answer) is same_analyst
    assert (store.cached_answer("bob", "k") == answer) is other_analyst
    assert store.cached_answer("alice", "other") is None


def test_grant_set_cap_and_reset_persist_across_reopen(make_store):
    store = make_store()
    for _ in range(4):
        store.commit(store.reserve(make_spend()), epsilon=0.5, delta=1e-7)
    with pytest.raises(BudgetError, match="analyst 'alice'"):
        store.reserve(make_spend(epsilon=1.0, delta=0))
    assert store.grant("analyst:alice", epsilon=1.0, by="boss") == Cap(3.0, 1e-6)
    reopened = make_store()
    assert reopened.cap("analyst:alice") == Cap(3.0, 1e-6)
    reopened.commit(reopened.reserve(make_spend(epsilon=1.0, delta=0)), epsilon=1.0, delta=0)
    with pytest.raises(BudgetError, match="subject domain 'pid'"):
        reopened.reserve(make_spend(analyst="bob", epsilon=1.0, delta=0))
    assert reopened.set_cap("domain:pid", epsilon=10.0, by="boss") == Cap(10.0, 1e-6)
    reopened.commit(reopened.reserve(make_spend(analyst="bob", epsilon=1.0, delta=0)), epsilon=1.0, delta=0)
    assert make_store().cap("domain:pid") == Cap(10.0, 1e-6)
    assert reopened.reset("analyst:alice", by="boss") == 5
    after = make_store().remaining("alice", ["pid"])
    assert after.analyst.spent_epsilon == 0
    assert after.domains["pid"].spent_epsilon == pytest.approx(4.0)  # the people's budget is not reset
    assert [r.message.split(":")[0] for r in store.audit_log(outcome="admin")] == [
        "reset analyst",
        "set-cap domain",
        "grant analyst",
    ]


def test_usage_lists_charged_and_overridden_scopes(make_store):
    store = make_store()
    store.commit(store.reserve(make_spend(domains=("pid", "hh"))), epsilon=0.5, delta=0)
    store.set_cap("analyst:bob", epsilon=1.0, by="boss")
    assert [u.scope for u in store.usage()] == ["analyst:alice", "analyst:bob", "domain:hh", "domain:pid"]
    assert [u.scope for u in store.usage("domain")] == ["domain:hh", "domain:pid"]
    bob = store.usage("analyst")[1]
    assert (bob.cap, bob.spent_epsilon, bob.next_expiry) == (Cap(1.0, 1e-6), 0.0, None)


def test_history_is_a_time_series_by_scope(make_store, clock: FakeClock):
    store = make_store()
    for analyst in ("alice", "bob", "alice"):
        clock.advance(3600)
        store.commit(store.reserve(make_spend(analyst=analyst)), epsilon=0.25, delta=0)
    clock.advance(3600)
    pending = store.reserve(make_spend(analyst="bob", domains=()))
    everything = store.history()
    assert [(c.analyst, c.state) for c in everything] == [
        ("alice", "committed"),
        ("bob", "committed"),
        ("alice", "committed"),
        ("bob", "reserved"),
    ]
    assert everything[-1].id == pending
    assert everything[0].scopes == ("analyst:alice", "domain:pid")
    assert [c.analyst for c in store.history("analyst:alice")] == ["alice", "alice"]
    assert len(store.history("domain:pid", since=clock() - 5400)) == 1


def test_audit_log_records_every_outcome_and_filters(make_store, clock: FakeClock):
    store = make_store()
    store.commit(store.reserve(make_spend(key="k", sql="SELECT 1")), epsilon=0.4, delta=1e-7)
    clock.advance(10)
    store.audit_event(make_spend(analyst="bob", epsilon=0, key="k"), outcome="replayed")
    clock.advance(10)
    store.audit_event(make_spend(analyst="bob", sql="SELECT pid FROM pums"), outcome="refused", message="raw rows")
    clock.advance(10)
    store.release(store.reserve(make_spend()), outcome="error", message="backend down")
    records = store.audit_log()
    assert [r.outcome for r in records] == ["error", "refused", "replayed", "released"]
    released = records[-1]
    assert (released.analyst, released.sql, released.rewritten_sha256) == ("alice", "SELECT 1", "ab" * 32)
    assert (released.epsilon, released.delta) == (0.4, 1e-7)
    assert [r.outcome for r in store.audit_log(analyst="bob")] == ["refused", "replayed"]
    assert [r.message for r in store.audit_log(outcome="refused")] == ["raw rows"]
    assert len(store.audit_log(since=clock() - 15)) == 2
    assert len(store.audit_log(limit=1)) == 1


def test_secret_seed_is_created_once_per_ledger(make_store, tmp_path):
    seed = make_store().secret_seed()
    assert len(seed) == 32
    assert make_store().secret_seed() == seed
    other = open_store(f"sqlite:///{tmp_path / 'other.db'}", BUDGET)
    assert other.secret_seed() != seed
    other.close()


def test_abandoned_reservation_is_charged_after_the_lease(make_store, clock: FakeClock):
    store = make_store(lease_seconds=60)
    store.reserve(make_spend(epsilon=1.0))
    clock.advance(61)
    restarted = make_store(lease_seconds=60)  # opening reaps
    assert [c.state for c in restarted.history()] == ["abandoned"]
    abandoned = restarted.audit_log(outcome="abandoned")
    assert len(abandoned) == 1 and "charged in full" in abandoned[0].message
    assert restarted.remaining("alice", ["pid"]).analyst.spent_epsilon == 1.0
    restarted.reserve(make_spend(epsilon=1.0, delta=0))
    with pytest.raises(BudgetError, match="only epsilon=0, "):
        restarted.reserve(make_spend(epsilon=0.1, delta=0))
    assert restarted.reap_abandoned() == 0
    clock.advance(WINDOW)
    restarted.reserve(make_spend(epsilon=1.0))


def test_commit_audits_the_reservation_and_a_late_commit_says_so(make_store, clock: FakeClock):
    store = make_store(lease_seconds=60)
    spend = make_spend(epsilon=0.5, delta=1e-7, key="k1", sql="SELECT 1")
    store.commit(store.reserve(spend), epsilon=0.25, delta=0.0, answer={"rows": [[1]]})
    late = store.reserve(make_spend(epsilon=0.5, key="k2", sql="SELECT 2"))
    clock.advance(61)
    assert store.reap_abandoned() == 1
    store.commit(late, epsilon=0.5, delta=1e-7, answer={"rows": [[2]]})
    released = store.audit_log(outcome="released")
    assert [(r.analyst, r.sql, r.rewritten_sha256, r.epsilon, r.delta, r.message) for r in released] == [
        ("alice", "SELECT 2", "ab" * 32, 0.5, 1e-7, "committed after its lease had run out"),
        ("alice", "SELECT 1", "ab" * 32, 0.25, 0.0, ""),
    ]
    assert released[0].at == clock() and [c.state for c in store.history()] == ["committed", "committed"]
    assert store.cached_answer("alice", "k1") == {"rows": [[1]]}
    assert store.cached_answer("alice", "k2") == {"rows": [[2]]}
    assert store.remaining("alice", []).analyst.spent_epsilon == 0.75


@pytest.mark.parametrize(
    ("epsilon", "delta", "match"),
    [(0.0, 0.0, "epsilon must be positive"), (-1.0, 0.0, "epsilon must be a finite"), (math.nan, 0.0, "finite")],
)
def test_invalid_spend_is_a_parameter_error(make_store, epsilon, delta, match):
    with pytest.raises(InvalidParameterError, match=match):
        make_store().reserve(make_spend(epsilon=epsilon, delta=delta))


def test_invalid_admin_and_open_arguments(make_store, clock):
    store = make_store()
    with pytest.raises(InvalidParameterError, match="a grant adds epsilon, delta >= 0"):
        store.grant("analyst:alice", epsilon=-1, by="boss")
    with pytest.raises(InvalidParameterError, match=r"delta in \[0, 1\]"):
        store.set_cap("analyst:alice", delta=2.0, by="boss")
    with pytest.raises(InternalError, match="use commit"):
        store.release(store.reserve(make_spend()), outcome="released")
    with pytest.raises(InvalidParameterError, match="replay scope 'everyone' is unknown"):
        make_store(replay="everyone")
    with pytest.raises(InvalidParameterError, match="lease_seconds must be positive"):
        make_store(lease_seconds=0)
    with pytest.raises(ConfigError, match="unsupported URL 'mysql://x'"):
        open_store("mysql://x", BUDGET)


def test_in_memory_sqlite_keeps_its_data_across_calls():
    store = open_store("sqlite:///:memory:", BUDGET)
    store.commit(store.reserve(make_spend()), epsilon=0.5, delta=0, answer=[1])
    assert store.remaining("alice", ["pid"]).analyst.spent_epsilon == 0.5
    assert store.cached_answer("alice", "q1") == [1]
    store.close()


def test_an_unreachable_ledger_is_a_backend_error_without_traceback_details():
    with pytest.raises(
        BackendError, match=r"Ledger database postgresql://nobody:\*\*\*@127\.0\.0\.1:1/x failed"
    ) as info:
        open_store("postgresql://nobody:secret@127.0.0.1:1/x", BUDGET)
    assert "secret" not in info.value.message
    assert info.value.sqlstate == "58000"


def test_a_charged_failure_is_audited_as_error_and_stores_no_answer(make_store):
    store = make_store()
    why = "the query failed after the backend ran (SQLSTATE 58000)"
    store.commit(store.reserve(make_spend(epsilon=0.5, key="k")), epsilon=0.5, delta=1e-7, outcome="error", message=why)
    assert [(r.outcome, r.epsilon, r.delta, r.message) for r in store.audit_log()] == [
        ("error", 0.5, 1e-7, f"charged, no answer released: {why}")
    ]
    assert [c.state for c in store.history()] == ["committed"]
    assert store.remaining("alice", ["pid"]).analyst.spent_epsilon == 0.5
    assert store.cached_answer("alice", "k") is None
    with pytest.raises(InternalError, match="outcome 'error' and an answer, which a failed query does not release"):
        store.commit(store.reserve(make_spend()), epsilon=0.5, delta=0, answer={"rows": [[1]]}, outcome="error")
    with pytest.raises(InternalError, match="outcome 'refused': this is a bug"):
        store.commit(store.reserve(make_spend()), epsilon=0.5, delta=0, outcome="refused")  # type: ignore[arg-type]
