"""The SQLite ledger holds the secret seed, analysts' SQL and released answers: only its owner may read it."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUDGET, make_spend

from dpgateway.budget_store import open_store


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


@pytest.mark.usefixtures("umask_022")
def test_a_new_sqlite_ledger_and_its_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}", BUDGET)
    store.commit(store.reserve(make_spend()), epsilon=0.5, delta=1e-7, answer={"rows": [[1]]})
    modes = _modes(tmp_path)  # while the store is open, so the -wal and -shm files exist
    store.close()
    assert set(modes) >= {"ledger.db", "ledger.db-wal", "ledger.db-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


@pytest.mark.usefixtures("umask_022")
def test_a_rollback_journal_is_0600_too(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}", BUDGET)
    store.close()
    db = tmp_path / "ledger.db"

    conn = sqlite3.connect(db, isolation_level=None)  # the ledger runs in WAL mode; an admin tool may switch
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM dp_audit")
    conn.execute("INSERT INTO dp_caps VALUES ('analyst:x', 1, 0, 0, 'x')")
    modes = _modes(tmp_path)
    conn.execute("ROLLBACK")
    conn.close()
    assert modes == {"ledger.db": 0o600, "ledger.db-journal": 0o600}


def test_an_existing_ledger_keeps_the_mode_its_admin_gave_it(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    open_store(f"sqlite:///{db}", BUDGET).close()
    db.chmod(0o640)  # shared with a group on purpose
    open_store(f"sqlite:///{db}", BUDGET).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o640
