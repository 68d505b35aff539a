"""The reservation's background fsync (``budget_store/wal_sync.py``): the log is on disk after the reservation
and before its debit commits; only then does the debit commit relaxed; any failure falls back to a fully
synced debit; the connection is always back to ``synchronous=FULL``."""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

import pytest
from conftest import BUDGET, make_spend

from dpgateway.budget_store import open_store, wal_sync
from dpgateway.errors import BudgetError


def traced_store(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> tuple[Any, list[str]]:
    """A file ledger whose hot connection's statements and the log's fsyncs land, in order, in one trace."""
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}", BUDGET)
    store.remaining("alice", [])
    db: sqlite3.Connection = store._hot_connection(False).db
    trace: list[str] = []
    db.set_trace_callback(trace.append)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fail:
            raise OSError(5, "Input/output error")
        real_fsync(fd)
        trace.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")

    monkeypatch.setattr(wal_sync.os, "fsync", fsync)
    return store, trace


def control(trace: list[str]) -> list[str]:
    return [s for s in trace if s.startswith(("PRAGMA", "BEGIN", "COMMIT", "fsync"))]


def test_the_log_is_on_disk_after_the_reservation_and_before_its_relaxed_debit(tmp_path, monkeypatch):
    store, trace = traced_store(tmp_path, monkeypatch)
    rid = store.reserve(make_spend(epsilon=1.0))
    store.commit(rid, epsilon=1.0, delta=0.0, answer=[1])
    steps = control(trace)
    wal = str(tmp_path / "ledger.db-wal")
    reservation = ["PRAGMA synchronous=NORMAL", "BEGIN IMMEDIATE", "COMMIT", "PRAGMA synchronous=FULL"]
    assert steps[:4] == reservation
    assert steps[4] == f"fsync {wal}"  # after the reservation's commit wrote its frames ...
    assert steps[-4:] == reservation  # ... before the debit began, which then commits relaxed
    assert steps.count(f"fsync {wal}") == 1
    assert int(store._hot_connection(False).db.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    store.close()


def test_a_failed_fsync_leaves_the_debit_fully_synced(tmp_path, monkeypatch):
    store, trace = traced_store(tmp_path, monkeypatch, fail=True)
    rid = store.reserve(make_spend(epsilon=1.0))
    trace.clear()
    store.commit(rid, epsilon=1.0, delta=0.0, answer=[1])
    assert control(trace) == ["BEGIN IMMEDIATE", "COMMIT"]  # synchronous=FULL: forces the reservation too
    assert store.cached_answer("alice", "q1") == [1]
    store.close()


def test_a_debit_without_a_started_fsync_is_fully_synced(tmp_path, monkeypatch):
    """A forked child's store (the parent's worker thread does not exist there) and a reservation pushed out of
    the pending list both sync their debit themselves."""
    store, trace = traced_store(tmp_path, monkeypatch)
    monkeypatch.setattr(wal_sync.os, "getpid", lambda: -1)  # as in a forked child
    rid = store.reserve(make_spend(epsilon=1.0))
    trace.clear()
    store.commit(rid, epsilon=1.0, delta=0.0)
    assert control(trace) == ["BEGIN IMMEDIATE", "COMMIT"]
    monkeypatch.undo()
    monkeypatch.setattr(wal_sync, "MAX_PENDING", 1)
    first = store.reserve(make_spend(epsilon=0.5, key="a"))
    second = store.reserve(make_spend(epsilon=0.5, key="b"))
    assert not store._reservation_on_disk(first)  # dropped from the pending list: its debit syncs
    assert store._reservation_on_disk(second)
    store.close()


def test_refusals_and_releases_leave_the_connection_fully_synced(tmp_path, monkeypatch):
    store, trace = traced_store(tmp_path, monkeypatch)
    store.reserve(make_spend(epsilon=1.0))
    rid = store.reserve(make_spend(epsilon=1.0, key="b"))  # alice's cap is 2: 1 more fits
    with pytest.raises(BudgetError):
        store.reserve(make_spend(epsilon=1.0, key="c"))
    store.release(rid, outcome="error", message="test")
    db = store._hot_connection(False).db
    assert int(db.execute("PRAGMA synchronous").fetchone()[0]) == 2
    assert trace.count("PRAGMA synchronous=NORMAL") == trace.count("PRAGMA synchronous=FULL") >= 2
    assert rid not in store._wal_sync._pending and len(store._wal_sync._pending) == 1  # released: forgotten
    store.close()


def test_an_in_memory_ledger_has_no_background_fsync():
    store = open_store("sqlite://", BUDGET)
    assert store._wal_sync is None
    store.commit(store.reserve(make_spend(epsilon=1.0)), epsilon=1.0, delta=0.0)
    store.close()


def test_one_fsync_covers_every_reservation_registered_before_it_began(tmp_path, monkeypatch):
    """Reservations queued behind a running fsync share the next one; none is covered by an fsync that began
    before it was registered."""
    store, _ = traced_store(tmp_path, monkeypatch)
    store.commit(store.reserve(make_spend(epsilon=0.1, key="w")), epsilon=0.1, delta=0.0)  # the folder synced
    gate, entered = threading.Event(), threading.Event()
    real = wal_sync.os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        gate.wait(5)
        real(fd)

    monkeypatch.setattr(wal_sync.os, "fsync", slow_fsync)
    first = store.reserve(make_spend(epsilon=0.1, key="a"))
    entered.wait(5)  # the first fsync has begun: it does not cover the reservations below
    later = [store.reserve(make_spend(epsilon=0.1, key=f"b{i}")) for i in range(5)]
    calls: list[int] = []
    monkeypatch.setattr(wal_sync.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    gate.set()
    assert store._reservation_on_disk(first)
    assert all(store._reservation_on_disk(r) for r in later)
    assert len(calls) == 1  # one more fsync, begun after all five were registered, covered them
    store.close()
