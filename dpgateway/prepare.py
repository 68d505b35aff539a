"""Prepared copies: a materialized copy of a table that later unfiltered (and ``bound_first`` filtered) queries read.

``dpgateway prepare TABLE`` writes every row with a privacy unit, typed and clustered by unit, with the
unit's row count, each row's keyed-hash rank within its unit and each row's weighted contribution to
every measurement a weighted query can make of the table (what the weighted and row-bounding rewrites
compute on the fly for an unfiltered query; SQL:
:func:`dpgateway.passes.bounding.prepared_copy_tree`), as Parquet in the config's ``cache_dir``, with a
manifest beside it::

    <cache_dir>/<table>.json      {"version", "table", "file", "source", "policy", "rows"}
    <cache_dir>/<table>-<policy hash>.parquet            (DuckDB: one file)
    <cache_dir>/<table>-<policy hash>-<token>.parquet/   (Spark: a folder of part files, a new one per copy)

A copy is taken of a source the gateway can ``stat``: a file source (DuckDB), or the local file or folder a
connector reads a table from (``Connector.copy_source``: Spark on a local master, connectors/spark.py; other
sources are refused with the reason). A copy is *valid* only while that source has the same state as when
the copy was taken (:func:`path_state`, captured *before* it was read, so a change during ``prepare``
invalidates it) and the table's policy, the ledger's secret seed and the fixed-point constants (the stored
contributions depend on the bounds and on ``passes/budget.py``'s scales) hash to the same value. A file's
state is its path, device, inode, size, mtime and ctime (``os.utime`` can restore an mtime but sets the
ctime to now, and a file replaced by rename has a new inode, so a rewrite is always seen; a content hash
would read the whole file per query). A folder's state is its own and, sorted by relative path, every file
and folder under it (following links, as Spark lists them) with the same fields: a file rewritten, added,
removed or renamed changes an entry or the list, and also the mtime and ctime of the folder holding it.
:func:`valid_copies` checks this; the gateway runs it for every query through :class:`CopyCheck` (a few
``stat`` calls per table, the manifest read again only when one of them changed); the plan cache is keyed
by the result, so a stale copy is never read. Which queries may read a copy, and why that is private: proof
note in ``dpgateway/passes/prepared.py``. The copy holds person-level rows: the gateway creates
``cache_dir`` 0700, and the copy (every file 0600, every folder 0700, whatever the umask or the engine
that wrote it) and its manifest (0600) are written in a private scratch folder, then moved into place
(:func:`install_copy`); the manifest is written last, so the switch to a new copy is one rename. A
folder copy goes to a new name each time, so a query planned on the previous copy still finds its files;
older ones are removed after the switch (:func:`prune_copies`).

Automatic preparation (:class:`AutoPreparer`, config ``prepare: {auto, after_queries}``): after a table has
been queried ``after_queries`` times without a valid copy, the gateway builds the copy in a background
thread, exactly as ``dpgateway prepare`` does (same validity rules, same private files). The query that
triggers it only starts the thread; queries keep bounding on the fly until the copy is valid, and a copy is
read only when :func:`valid_copies` accepts it, so a source rewritten while the copy is built leaves an
invalid copy (its manifest records the state captured before the read) that is never used.

Copies a backend keeps in its own database (``Connector.copies``: PostgreSQL, connectors/postgres_copy.py)
have the same manifest, naming the copy's relation as ``file`` and the catalog state the build recorded as
``source``; :class:`DatabaseCopies` reads that state again before every plan (one round trip per such
table) and offers the copy only while it is equal (the proof that equal means unchanged rows is in
connectors/postgres_copy.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat as stats
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dpgateway.connectors.base import CopyStore
from dpgateway.errors import UnsupportedError
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


NO_SOURCES: Mapping[str, str] = MappingProxyType({})


def local_source(table: Table, sources: Mapping[str, str] = NO_SOURCES) -> str | None:
    """The local file or folder holding ``table``'s rows: what its connector reads (``sources``, from
    ``Connector.copy_source``), or a file source's path; None for sources the gateway cannot stat."""
    if table.name in sources:
        return sources[table.name]
    if isinstance(table.source, (dict, PartySources)):  # a party-split table is read by its parties only
        return None
    return str(table.source)


def connector_sources(config: Config, copy_source: Callable[[Table], str]) -> dict[str, str]:
    """The local file or folder of each connector table a copy can be taken of (``Connector.copy_source``);
    tables it refuses are left out (``dpgateway prepare`` then says why)."""
    found = {}
    for table in config.tables:
        spec = table.source
        if table.public or not table.privacy_unit or table.executor != "plain" or not isinstance(spec, dict):
            continue
        try:
            found[table.name] = copy_source(table)
        except UnsupportedError:
            continue
    return found


def source_state(table: Table, sources: Mapping[str, str] = NO_SOURCES) -> dict[str, Any] | None:
    """:func:`path_state` of the table's :func:`local_source`; None where there is none."""
    path = local_source(table, sources)
    return None if path is None else path_state(path)


def path_state(path: str) -> dict[str, Any] | None:
    """Path, device, inode, size, mtime and ctime of a file; of a folder also ``files``: those of every file
    and folder under it, by relative path (see the module docstring). None if it cannot be read."""
    resolved = Path(path).resolve()
    entries = _tree(str(resolved))
    if entries is None:
        return None
    (_, root), *inside = entries
    state: dict[str, Any] = {"path": str(resolved), **_fields(root)}
    if stats.S_ISDIR(root.st_mode):
        state["files"] = [[name, *_fields(st).values()] for name, st in inside]
    return state


def _fields(st: os.stat_result) -> dict[str, int]:
    return {
        "device": st.st_dev,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _tree(path: str) -> list[tuple[str, os.stat_result]] | None:
    """``path`` (as ``"."``) and, for a folder, every entry under it, sorted by relative path; each ``stat``
    follows links (a linked folder is entered once: a cycle is not followed). None if any cannot be read."""
    try:
        root = os.stat(path)
        found: list[tuple[str, os.stat_result]] = []
        pending = [("", path)] if stats.S_ISDIR(root.st_mode) else []
        seen = {(root.st_dev, root.st_ino)}
        while pending:
            relative, folder = pending.pop()
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)  # the same walk every time
            for entry in entries:
                st = os.stat(entry.path)
                name = f"{relative}{entry.name}"
                found.append((name, st))
                if stats.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    pending.append((f"{name}/", entry.path))
    except OSError:
        return None
    return [(".", root), *sorted(found, key=lambda item: item[0])]


def install_copy(written: Path, target: Path) -> Path:
    """Make the copy an engine wrote in the private scratch folder private (every file 0600, every folder
    0700) and move it into place at ``target``; a folder goes to a new name beside it, returned."""
    for folder, _, files in os.walk(written):  # a file: no walk; Spark: part files, checksums, _SUCCESS
        os.chmod(folder, 0o700)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o600)
    if written.is_dir():
        target = target.with_name(f"{target.name.removesuffix('.parquet')}-{secrets.token_hex(6)}.parquet")
    else:
        os.chmod(written, 0o600)  # DuckDB creates it with the umask; private before it is moved into place
    os.replace(written, target)
    return target


def copy_name(folder: Path, table: Table) -> str | None:
    """The copy file or folder the table's manifest names now, if any (valid or not)."""
    try:
        manifest = json.loads(manifest_path(folder, table).read_text())
    except (OSError, ValueError):
        return None
    return str(manifest.get("file")) if isinstance(manifest, dict) else None


def prune_copies(folder: Path, table: Table, keep: set[str | None]) -> None:
    """Remove the table's copy folders other than ``keep`` (the new copy and the one it replaced, which a
    query planned just before the switch may still read; removed at the next build)."""
    pattern = re.compile(rf"{re.escape(table.name)}-[0-9a-f]{{16}}-[0-9a-f]{{12}}\.parquet")
    for path in folder.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep and path.is_dir() and not path.is_symlink():
            for inner, _, files in os.walk(path, topdown=False):
                for name in files:
                    os.unlink(os.path.join(inner, name))
                os.rmdir(inner)


def manifest_path(folder: Path, table: Table) -> Path:
    return folder / f"{table.name}.json"


def write_manifest(
    folder: Path, table: Table, *, file: Path | str, source: dict[str, Any], policy: str, rows: int
) -> None:
    """Write the manifest atomically (after the copy is complete), readable by the owner only. ``file``: the
    Parquet file, or the relation of a copy kept in the database (:class:`DatabaseCopies`)."""
    name = file.name if isinstance(file, Path) else file
    document = {"version": MANIFEST_VERSION, "table": table.name, "file": name, "source": source}
    document |= {"policy": policy, "rows": rows}
    target = manifest_path(folder, table)
    temporary = target.with_suffix(".json.tmp")
    temporary.unlink(missing_ok=True)  # a leftover could carry another mode
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode is reduced by the umask; fchmod is not
        handle.write(json.dumps(document, sort_keys=True))
    os.replace(temporary, target)


def valid_copies(config: Config, seed: bytes, sources: Mapping[str, str] = NO_SOURCES) -> tuple[PreparedCopy, ...]:
    """The prepared copies that match their source (file or folder, see :func:`local_source`) and policy now."""
    found = (_valid_copy(config.cache_folder, table, seed, sources) for table in config.tables)
    return tuple(copy for copy in found if copy is not None)


def _manifest(folder: Path, table: Table) -> dict[str, Any] | None:
    """The table's manifest, if it can be read and has this version's layout."""
    try:
        manifest = json.loads(manifest_path(folder, table).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION else None


def _valid_copy(folder: Path, table: Table, seed: bytes, sources: Mapping[str, str]) -> PreparedCopy | None:
    if table.public or not table.privacy_unit:
        return None
    manifest = _manifest(folder, table)
    if manifest is None:
        return None
    file = folder / str(manifest.get("file", ""))
    state = source_state(table, sources)
    if (
        state is None
        or manifest.get("source") != state
        or manifest.get("policy") != policy_digest(table, seed)
        or not file.exists()  # the Parquet file, or (Spark) the folder of part files
    ):
        return None
    return PreparedCopy(table=table.name, path=str(file), k=table.max_rows_per_unit)


class DatabaseCopies:
    """:func:`valid_copies` for tables whose copy the backend keeps in its database (``Connector.copies``).

    A copy is valid while its manifest (written by :meth:`dpgateway.Gateway.prepare` after the build
    committed) names this policy digest and copy relation, and the store's state read now (one round trip
    per table with such a manifest, before every plan) equals the state recorded at the build; the store's
    module proves that equal states mean the copy's rows are the source's (connectors/postgres_copy.py).
    """

    def __init__(self, config: Config, seed: bytes, store: CopyStore) -> None:
        self.config = config
        self.store = store
        self.digests = {
            table.name: policy_digest(table, seed)
            for table in config.tables
            if isinstance(table.source, dict) and table.privacy_unit and not table.public and table.executor == "plain"
        }

    def valid(self) -> tuple[PreparedCopy, ...]:
        found = []
        for name, digest in self.digests.items():
            table = self.config.table(name)
            assert table is not None
            manifest = _manifest(self.config.cache_folder, table)
            relation = self.store.relation(table, digest)
            if manifest is None or manifest.get("policy") != digest or manifest.get("file") != relation:
                continue
            state = self.store.state(table, digest)
            if state is not None and manifest.get("source") == state:
                found.append(PreparedCopy(table=table.name, path=relation, k=table.max_rows_per_unit))
        return tuple(found)

    def catalog_state(self, table: Table) -> dict[str, Any] | None:
        """Whether a build could succeed, as a state (:class:`AutoPreparer` retries a failed build once it changes)."""
        digest = self.digests.get(table.name)
        return None if digest is None else self.store.state(table, digest, version=False)


Signature = tuple[Any, ...]


def _stat(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode


def _source_signature(path: str | None) -> Signature | None:
    """The ``stat`` of a file source; of a folder, of it and every entry under it (:func:`_tree`)."""
    entries = None if path is None else _tree(path)
    if entries is None:
        return None
    return tuple(
        (name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode) for name, st in entries
    )


class CopyCheck:
    """:func:`valid_copies` for one gateway (one config and seed), remembering each table's verdict while
    nothing it was drawn from changed: three ``stat`` calls per table and query (for a folder source, one
    per entry under it) instead of reading and parsing the manifest, resolving the source path and hashing
    the policy.

    Proof note (as safe as the full check): the verdict is a function of the manifest's content, the source's
    state (device, inode, size, mtime, ctime of the file, or of the folder and of every file and folder under
    it: the manifest's criterion, see the module docstring), the policy and seed (fixed for the gateway) and
    whether the copy exists. The remembered verdict is reused only while a ``stat`` of the manifest, of the
    source (following links: a re-pointed link is another inode; for a folder, of every entry under it, by
    relative path, walked exactly as :func:`path_state` walks it) and of the copy (file or folder) returns
    exactly what it returned just *before* that verdict was drawn, so every change the full check can see
    (the manifest replaced by rename, as :func:`write_manifest` does, or edited: new inode, size or times;
    the source rewritten or replaced; in a folder, a file rewritten, added, removed or renamed: another entry
    list or another stat of an entry; the copy removed) makes the next query draw it again (a file edited in
    place twice within one tick of the file system's clock, to the same size, looks unchanged to a ``stat``:
    the limit the source check already has, see the module docstring). The one thing it skips is comparing
    the source's resolved path string: the same inode reached by another path is the same file (and a
    folder's entries are compared by path relative to it). Tests: tests/test_copy_check.py.
    """

    def __init__(self, config: Config, seed: bytes, sources: Mapping[str, str] = NO_SOURCES) -> None:
        self.config = config
        self.seed = seed
        self.sources = sources
        folder = config.cache_folder
        self._tables = [
            (table, str(manifest_path(folder, table)), local_source(table, sources))
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
            signature = (manifest_stat, _source_signature(source), None if copy_path is None else _stat(copy_path))
            if known is None or known[0] != signature:
                copy = _valid_copy(self.config.cache_folder, table, self.seed, self.sources)
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
    read-only ``cache_dir``, or a PostgreSQL table without its change trigger) is not retried until the
    source's state (``state``: a file's or folder's stat, a PostgreSQL table's catalog) changes.
    """

    def __init__(
        self,
        settings: PrepareConfig,
        build: Callable[[str], object],
        state: Callable[[Table], dict[str, Any] | None] = source_state,
    ):
        self._settings = settings
        self._build = build
        self._state = state  # the source's state (None: it cannot be prepared); a failed build waits for a change
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
            state = self._state(table)
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
