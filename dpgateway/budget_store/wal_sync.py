"""Force a SQLite ledger's write-ahead log to disk while the backend runs (``SQLiteBudgetStore``).

A reservation commits with ``synchronous=NORMAL``: SQLite writes its frames to the ``-wal`` file at commit
but does not fsync them. :meth:`WalSync.start` then fsyncs that file on a background thread while the
query's backend runs, and :meth:`WalSync.wait` tells the debit whether it did; if so the debit commits
relaxed too, so no fsync is left on the path between the backend's answer and its release.

Proof note (a debit that may be lost, a reservation that may not). The fsync starts after the reservation's
commit wrote its frames, and the debit waits for it to finish before it commits, so when the answer leaves the
reservation is on disk: after a power loss or operating-system crash it counts at its reserved amount, which
bounds the debit (``sql.py``, proof note, point 2), until it leaves the window, and is marked ``abandoned``
after its lease (proof note, crashes). What such a crash can lose is the debit's own record, never the charge:
its stored answer (a repeat of the query then runs and is charged again) and its audit outcome (the audit log
shows the reservation, with its analyst and SQL, ``abandoned`` instead of ``released``). The next fsync of the
log, this class's or SQLite's, makes the debit durable too. Why an fsync of another descriptor suffices: POSIX
fsync transfers all of the file's written data, whichever descriptor wrote it; a log restarted by a
checkpoint meanwhile held frames that SQLite copied into the database file and synced before the restart. A
new log file's directory entry is synced once as well (as SQLite does for a new log). A reservation is
registered after its commit returned, so an fsync that began after its registration covers it: under
concurrent queries one fsync serves every reservation registered before it began. Whenever the fsync fails
or was not started (not in WAL mode, a forked child, too many pending), :meth:`wait` says so and the debit
commits with ``synchronous=FULL`` as before, which forces the reservation to disk with everything logged
before it. Tests: tests/ledger/test_wal_sync.py.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

MAX_PENDING = 1024  # reservations awaiting their debit; beyond, the oldest's debit syncs itself


class WalSync:
    """Background fsyncs of one SQLite database's ``-wal`` file, one per reservation, awaited by its debit."""

    def __init__(self, database: str) -> None:
        self.wal = f"{database}-wal"
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Future[None]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._directory_synced: tuple[int, int] | None = None  # the log file (device, inode) whose entry is synced
        self._registered = 0  # reservations registered so far (a sequence number each)
        self._durable = 0  # every reservation up to this number is on disk (an fsync that began after it ended)

    def start(self, charge_id: str) -> None:
        """Begin forcing everything logged so far (the reservation ``charge_id`` just committed) to disk."""
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: the parent's worker thread does not exist here
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpgateway-wal-sync")
            self._registered += 1
            self._pending[charge_id] = self._pool.submit(self._sync, self._registered)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def wait(self, charge_id: str) -> bool:
        """Whether the log was on disk after ``charge_id``'s reservation (False: its debit must sync itself)."""
        with self._lock:
            future = self._pending.pop(charge_id, None)
        if future is None:
            return False
        try:
            future.result()
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Finish the fsyncs under way and stop the worker thread."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._pending.clear()
        if pool is not None and os.getpid() == self._pid:
            pool.shutdown(wait=True)

    def _sync(self, number: int) -> None:
        """Force the log to disk for reservation ``number``, unless an fsync that began after it already did
        (under concurrent queries one fsync covers every reservation registered before it began)."""
        with self._lock:
            if self._durable >= number:
                return
            covers = self._registered
        fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        if self._directory_synced != (stat.st_dev, stat.st_ino):
            folder = os.open(os.path.dirname(os.path.abspath(self.wal)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._directory_synced = (stat.st_dev, stat.st_ino)
        with self._lock:
            self._durable = max(self._durable, covers)
