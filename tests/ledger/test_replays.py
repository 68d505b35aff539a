"""The replay map (``budget_store/replays.py``) and the replay's one-transaction ledger work: a remembered answer
is exactly what the ledger returns, to the same analysts (the relaxed reservation and debit: test_wal_sync.py)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_spend

from dpgateway.budget_store.replays import ReplayMap


def commit_answer(store: Any, answer: Any, *, analyst: str = "alice", key: str = "k") -> None:
    store.commit(store.reserve(make_spend(analyst=analyst, key=key)), epsilon=0.1, delta=0.0, answer=answer)


def test_the_first_released_answer_is_the_answer_for_good_in_every_process(make_store, clock):
    """Two processes race the same query and both release (a duplicate commit): every store, with or without
    its map, replays the first release, before and after the second commit."""
    store, other = make_store(), make_store()  # two processes sharing the ledger
    commit_answer(store, {"rows": [[1]]})
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}  # now remembered by store
    clock.advance(0.01)  # (a commit stamped the same instant is ordered by charge id: replays.py)
    commit_answer(other, {"rows": [[2]]})  # the loser of the race commits later
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}
    assert other.cached_answer("alice", "k") == {"rows": [[1]]}  # read from the ledger
    assert make_store().cached_answer("alice", "k") == {"rows": [[1]]}  # a fresh process


def test_the_map_only_holds_what_the_ledger_returned(make_store):
    store = make_store()
    commit_answer(store, {"rows": [[1]]})
    assert len(store._replays) == 0  # a commit alone is not remembered (it may not be the first release)
    assert store.cached_answer("alice", "missing") is None
    assert len(store._replays) == 0  # nor is a miss: another process may release it next
    store.cached_answer("alice", "k")
    assert len(store._replays) == 1


def test_a_remembered_answer_is_served_without_the_ledger(make_store):
    store = make_store()
    commit_answer(store, {"rows": [[1]]})
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}

    def no_ledger(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the ledger was read")

    store._run_prebuilt = no_ledger  # type: ignore[method-assign]
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}


@pytest.mark.parametrize(("replay", "bob_gets_it"), [("analyst", False), ("global", True)])
def test_another_analyst_gets_a_remembered_answer_only_under_global_scope(make_store, replay, bob_gets_it):
    store = make_store(replay=replay)
    commit_answer(store, {"rows": [[1]]}, analyst="alice")
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}  # remembered for alice
    assert (store.cached_answer("bob", "k") == {"rows": [[1]]}) is bob_gets_it
    assert store.cached_answer("alice", "k") == {"rows": [[1]]}
    assert (store.cached_answer("bob", "k") is None) is not bob_gets_it


def test_replay_off_never_answers_from_the_map(make_store):
    on = make_store(replay="analyst")
    commit_answer(on, {"rows": [[1]]})
    assert on.cached_answer("alice", "k") == {"rows": [[1]]}
    off = make_store(replay="off")
    commit_answer(off, {"rows": [[2]]})
    off._replays.remember(("alice", "k"), {"rows": [[3]]})  # even a (planted) entry is never read
    assert off.cached_answer("alice", "k") is None


def test_audit_and_remaining_commits_the_record_and_reads_the_budget_left_after_it(make_store):
    store = make_store()
    store.commit(store.reserve(make_spend(epsilon=0.5, domains=("pid", "hh"))), epsilon=0.5, delta=1e-7)
    left = store.audit_and_remaining(make_spend(epsilon=0.0, key="k"), outcome="replayed", domains=("pid", "hh"))
    assert left == store.remaining("alice", ["pid", "hh"])
    assert left.analyst.spent_epsilon == pytest.approx(0.5)
    assert [r.outcome for r in store.audit_log()] == ["replayed", "released"]


def test_the_map_is_bounded():
    replays = ReplayMap(max_entries=3)
    for i in range(5):
        replays.remember(("a", str(i)), [i])
    replays.get(("a", "2"))  # recently used: kept
    replays.remember(("a", "5"), [5])
    assert len(replays) == 3
    assert [replays.get(("a", k)) for k in "012345"] == [None, None, [2], None, [4], [5]]
