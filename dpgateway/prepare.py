"""Prepared copies: a materialized copy of a table that later unfiltered (and ``bound_first`` filtered) queries read.

``dpgateway prepare TABLE`` writes every row with a privacy unit, typed and clustered by unit, with the
unit's row count, each row's keyed-hash rank within its unit and each row's weighted contribution to
every measurement a weighted query can make of the table (what the weighted and row-bounding rewrites
compute on the fly for an unfiltered query; SQL:
:func:`dpgateway.passes.bounding.prepared_copy_tree`), as Parquet in the config's ``cache_dir``, with a
manifest beside it::

    <cache_dir>/<table>.json      {"version", "table", "file", "source", "policy", "rows"}
    <cache_dir>/<table>-<policy hash>.parquet

A copy is *valid* only while the source file has the same path, device, inode, size, mtime and ctime as
when the copy was taken (captured *before* it was read, so a change during ``prepare`` invalidates it;
``os.utime`` can restore an mtime but sets the ctime to now, and a file replaced by rename has a new
inode, so a rewrite is always seen; a content hash would read the whole file per query) and the table's
policy, the ledger's secret seed and the fixed-point constants (the stored contributions depend on the
bounds and on ``passes/budget.py``'s scales) hash to the same value. :func:`valid_copies` checks this for every
query (a ``stat`` and a small JSON read per prepared table); the plan cache is keyed by the result, so
a stale copy is never read. Which queries may read a copy, and why that is private: proof note in
``dpgateway/passes/prepared.py``. The copy holds person-level rows: the gateway creates ``cache_dir``
0700 and the copy and its manifest 0600 whatever the umask (written in a private scratch folder, then
moved into place).

Automatic preparation (:class:`AutoPreparer`, config ``prepare: {auto, after_queries}``): after a table has
been queried ``after_queries`` times without a valid copy, the gateway builds the copy in a background
thread, exactly as ``dpgateway prepare`` does (same validity rules, same private files). The query that
triggers it only starts the thread; queries keep bounding on the fly until the copy is valid, and a copy is
read only when :func:`valid_copies` accepts it, so a source rewritten while the copy is built leaves an
invalid copy (its manifest records the state captured before the read) that is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpgateway.passes.budget import COUNT_SCALE, FIXED_POINT_DIGITS
from dpgateway.passes.context import PreparedCopy
from dpgateway.policies.model import Config, PartySources, PrepareConfig, Table

# 4: source inode and ctime, units on their exact identity; 3: also each row's weighted contributions;
# 2: all rows with unit row count and rank; 1: only the k kept rows
MANIFEST_VERSION = 4


def policy_digest(table: Table, seed: bytes) -> str:
    """Hash of the table's whole policy, the secret seed's identity (never the seed itself) and the
    fixed-point constants the stored contributions were computed with."""
    seed_id = hashlib.sha256(b"dpgateway-seed-id" + seed).hexdigest()
    scales = f"{FIXED_POINT_DIGITS},{COUNT_SCALE}"
    return hashlib.sha256(f"{MANIFEST_VERSION}\x1f{table!r}\x1f{seed_id}\x1f{scales}".encode()).hexdigest()


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 (whatever the umask) when the gateway creates it."""
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    return folder


# Why a table on a backend other than DuckDB cannot be prepared (``dpgateway prepare`` refuses with 0A000).
# A copy is safe only if the gateway can keep it private and tell, without reading rows, that its
# source changed since it was taken (a file's stat); neither backend offers both today.
CONNECTOR_REFUSALS = {
    "postgres": (
        "a prepared copy would have to be written into the database, but the gateway's role only reads and "
        "every transaction is READ ONLY (docs/backends.md), and PostgreSQL gives no catalog signal that a "
        "table's rows changed, so a copy could go stale unnoticed. Queries bound on the fly instead"
    ),
    "spark": (
        "the copy would hold person-level rows at a path every Spark executor can read, which the gateway "
        "cannot keep private, and a folder, object-store path or catalog table has no stat that shows its "
        "rows changed, so a copy could go stale unnoticed. Queries bound on the fly instead"
    ),
}


def source_state(table: Table) -> dict[str, Any] | None:
    """Path, device, inode, size, mtime and ctime of a file source; None for sources that are not files."""
    if isinstance(table.source, (dict, PartySources)):  # a party-split table is read by its parties only
        return None
    path = Path(table.source).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    return {
        "path": str(path),
        "device": stat.st_dev,
        "inode": stat.st_ino,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
    }


def manifest_path(folder: Path, table: Table) -> Path:
    return folder / f"{table.name}.json"


def write_manifest(folder: Path, table: Table, *, file: Path, source: dict[str, Any], policy: str, rows: int) -> None:
    """Write the manifest atomically (after the Parquet file is complete), readable by the owner only."""
    document = {"version": MANIFEST_VERSION, "table": table.name, "file": file.name, "source": source}
    document |= {"policy": policy, "rows": rows}
    target = manifest_path(folder, table)
    temporary = target.with_suffix(".json.tmp")
    temporary.unlink(missing_ok=True)  # a leftover could carry another mode
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode is reduced by the umask; fchmod is not
        handle.write(json.dumps(document, sort_keys=True))
    os.replace(temporary, target)


def valid_copies(config: Config, seed: bytes) -> tuple[PreparedCopy, ...]:
    """The prepared copies that match their source file and policy right now."""
    folder = config.cache_folder
    found = []
    for table in config.tables:
        if table.public or not table.privacy_unit:
            continue
        try:
            manifest = json.loads(manifest_path(folder, table).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            continue
        file = folder / str(manifest.get("file", ""))
        state = source_state(table)
        if (
            state is None
            or manifest.get("source") != state
            or manifest.get("policy") != policy_digest(table, seed)
            or not file.is_file()
        ):
            continue
        found.append(PreparedCopy(table=table.name, path=str(file), k=table.max_rows_per_unit))
    return tuple(found)


class AutoPreparer:
    """Builds prepared copies in the background for tables that are queried repeatedly.

    ``build(table_name)`` is :meth:`dpgateway.Gateway.prepare`. :meth:`queried` is called by the query path
    and never waits: it counts, and at most starts one thread per table. A build that fails (e.g. a
    read-only ``cache_dir``) is not retried until the source file changes.
    """

    def __init__(self, settings: PrepareConfig, build: Callable[[str], object]):
        self._settings = settings
        self._build = build
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._failed: dict[str, dict[str, Any]] = {}  # table -> source state of the failed build
        self._closed = False

    def queried(self, table: Table) -> None:
        """Count a query of ``table`` that could have read a copy but found none valid."""
        if not self._settings.auto or table.public or not table.privacy_unit or table.executor != "plain":
            return  # a confidential executor's table is never read by the gateway
        with self._lock:
            running = self._threads.get(table.name)
            if self._closed or (running is not None and running.is_alive()):
                return
            self._counts[table.name] = count = self._counts.get(table.name, 0) + 1
            if count < self._settings.after_queries:
                return
            state = source_state(table)
            if state is None or self._failed.get(table.name) == state:
                return
            self._counts[table.name] = 0
            thread = threading.Thread(
                target=self._run, args=(table.name, state), name=f"dpgateway-prepare-{table.name}", daemon=True
            )
            self._threads[table.name] = thread
            thread.start()

    def _run(self, table: str, state: dict[str, Any]) -> None:
        try:
            self._build(table)
        except Exception:  # the copy is only an optimization: queries keep bounding on the fly
            with self._lock:
                self._failed[table] = state

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the builds running now (tests, benchmarks and :meth:`close`)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    def close(self) -> None:
        """Start no more builds and wait for the running ones (before the backend closes)."""
        with self._lock:
            self._closed = True
        self.wait()
