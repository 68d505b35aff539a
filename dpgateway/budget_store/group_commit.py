"""Group commit: rows that concurrent callers hand in are written together, each caller returning once its own is.

A caller appends its row to a queue. If no batch is being written, it becomes the writer: it takes the whole
queue (its own row and every row queued while the last batch was written) and writes it in one transaction.
Otherwise it waits; when the batch in flight ends, the writer wakes the callers of that batch (their rows are
written) and hands the queue to the first caller waiting in it, which writes it as the next batch. So under
load one transaction, and one fsync, commits many callers' rows, and a lone caller writes its row at once.

Guarantees. A caller returns only after the transaction holding its row committed (nothing is acknowledged
before it is durable); a caller has one row in flight at a time, and a batch keeps the queue's order, so each
caller's rows are written in the order it made them. A batch that fails is written again one row per
transaction, so a row that cannot be written (e.g. text PostgreSQL rejects) fails only its own caller, with its
own error, and the others' rows are written; a failure that is not about one row (the database is down) fails
every caller of the batch with its own error. No caller returns without either its row committed or an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from dpgateway.errors import InternalError

R = TypeVar("R")


@dataclass(eq=False)
class _Pending(Generic[R]):
    row: R
    wake: threading.Condition  # on the batcher's lock: only this caller waits on it
    done: bool = False
    committed: bool = False
    lead: bool = False  # handed the queue by the last writer: this caller writes the next batch
    error: BaseException | None = None


class GroupCommit(Generic[R]):
    """Writes rows with ``write`` (one transaction per call, committed when it returns), batching concurrent callers.

    Each waiting caller sleeps on a condition of its own: a writer that finishes wakes exactly the callers of its
    batch, and hands the queue to the first caller waiting in it, so no caller is woken to find nothing to do
    (with 16 callers, waking all of them for every batch was most of the batching's CPU).
    """

    def __init__(self, write: Callable[[Sequence[R]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._queue: list[_Pending[R]] = []
        self._writing = False

    def submit(self, row: R) -> None:
        """Return once ``row`` is committed; raise the error that kept it from being written."""
        mine = _Pending(row, threading.Condition(self._lock))
        batch: list[_Pending[R]] = []
        with self._lock:
            self._queue.append(mine)
            try:
                while self._writing and not mine.done and not mine.lead:
                    mine.wake.wait()
            except BaseException:  # interrupted while waiting: leave the queue, and pass the lead on if we had it
                if not mine.done:
                    self._queue.remove(mine)
                    if mine.lead:
                        self._hand_over()
                raise
            if not mine.done:  # no batch in flight (or handed the queue) and ours not written: we write the queue
                batch, self._queue = self._queue, []
                self._writing = True
        if batch:
            try:
                self._flush(batch)
            finally:
                with self._lock:
                    for pending in batch:  # (done is set by _flush, whatever happened)
                        pending.wake.notify()
                    self._hand_over()
        if mine.error is not None:
            raise mine.error

    def _hand_over(self) -> None:
        """The batch in flight ended (the lock is held): the first queued caller writes the queue next."""
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].wake.notify()
        else:
            self._writing = False

    def _flush(self, batch: list[_Pending[R]]) -> None:
        """Write ``batch`` in one transaction; if that fails, each row in its own; every member ends done."""
        try:
            try:
                self._write([pending.row for pending in batch])
                for pending in batch:
                    pending.committed = True
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                for pending in batch:
                    try:
                        self._write([pending.row])
                        pending.committed = True
                    except Exception as own:
                        pending.error = own
        finally:
            with self._lock:
                for pending in batch:
                    if not pending.committed and pending.error is None:  # the writer was interrupted
                        pending.error = InternalError(
                            "an audit record may not have been written: the thread writing its batch was interrupted"
                        )
                    pending.done = True
