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
bounds and on ``passes/budget.py``'s scales) hash to the same value. :func:`valid_copies` checks this; the
gateway runs it for every query through :class:`CopyCheck` (three ``stat`` calls per table, the manifest read
again only when one of them changed); the plan cache is keyed by the result, so a stale copy is never read. Which queries may read a copy, and why that is private: proof note in
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

# 5: also each unit's total contribution on its row of rank 1 (passes/unit_forms.py);
# 4: source inode and ctime, units on their exact identity; 3: also each row's weighted contributions;
# 2: all rows with unit row count and rank; 1: only the k kept rows
MANIFEST_VERSION = 5


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
    found = (_valid_copy(config.cache_folder, table, seed) for table in config.tables)
    return tuple(copy for copy in found if copy is not None)


def _valid_copy(folder: Path, table: Table, seed: bytes) -> PreparedCopy | None:
    if table.public or not table.privacy_unit:
        return None
    try:
        manifest = json.loads(manifest_path(folder, table).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    file = folder / str(manifest.get("file", ""))
    state = source_state(table)
    if (
        state is None
        or manifest.get("source") != state
        or manifest.get("policy") != policy_digest(table, seed)
        or not file.is_file()
    ):
        return None
    return PreparedCopy(table=table.name, path=str(file), k=table.max_rows_per_unit)


Signature = tuple[Any, ...]


def _stat(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode


class CopyCheck:
    """:func:`valid_copies` for one gateway (one config and seed), remembering each table's verdict while
    nothing it was drawn from changed: three ``stat`` calls per table and query instead of reading and
    parsing the manifest, resolving the source path and hashing the policy.

    Proof note (as safe as the full check): the verdict is a function of the manifest's content, the source
    file's state (device, inode, size, mtime, ctime: the manifest's criterion, see the module docstring),
    the policy and seed (fixed for the gateway) and whether the copy file exists. The remembered verdict is
    reused only while a ``stat`` of the manifest, of the source (following links: a re-pointed link is
    another inode) and of the copy returns exactly what it returned just *before* that verdict was drawn,
    so every change the full check can see (the manifest replaced by rename, as :func:`write_manifest`
    does, or edited: new inode, size or times; the source rewritten or replaced; the copy removed) makes the
    next query draw it again (a file edited in place twice within one tick of the file system's clock, to the
    same size, looks unchanged to a ``stat``: the limit the source check already has, see the module
    docstring). The one thing it skips is comparing the source's resolved path string: the same inode
    reached by another path is the same file. Tests: tests/test_copy_check.py.
    """

    def __init__(self, config: Config, seed: bytes) -> None:
        self.config = config
        self.seed = seed
        folder = config.cache_folder
        self._tables = [
            (table, str(manifest_path(folder, table)), str(table.source))
            for table in config.tables
            if not (table.public or not table.privacy_unit)
        ]
        self._known: dict[str, tuple[Signature, PreparedCopy | None]] = {}
        self._lock = threading.Lock()

    def valid(self) -> tuple[PreparedCopy, ...]:
        found = []
        for table, manifest, source in self._tables:
            manifest_stat = _stat(manifest)
            if manifest_stat is None:  # no manifest: no copy (the full check would fail to read it)
                continue
            known = self._known.get(table.name)
            copy_path = known[1].path if known is not None and known[1] is not None else None
            signature = (manifest_stat, _stat(source), None if copy_path is None else _stat(copy_path))
            if known is None or known[0] != signature:
                copy = _valid_copy(self.config.cache_folder, table, self.seed)
                if copy is not None and copy.path != copy_path:  # a new copy file: its stat joins the signature
                    signature = (signature[0], signature[1], _stat(copy.path))
                    if signature[2] is None:  # removed since the check: not valid, and nothing remembered
                        continue
                known = (signature, copy)
                with self._lock:
                    self._known[table.name] = known
            if known[1] is not None:
                found.append(known[1])
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
