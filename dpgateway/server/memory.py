"""Answers from memory: statements the event loop answers itself, without a worker thread.

Two kinds of simple-query (``Q``) message are answered on the loop, because nothing in them can block:

- a literal-only statement (:mod:`~dpgateway.server.literals`, e.g. ``SELECT 1``): its answer is fixed by its
  text; the encoded answer is remembered per message text;
- a DP query this analyst already had replayed, with the same text, ``dp.epsilon`` and ``dp.delta``: the worker
  that answered it the first time from the ledger's replay cache remembers the encoded answer and the audit
  record's :class:`~dpgateway.budget_store.base.Spend`. Again, the loop has the audit record written (outcome
  ``replayed``, the budget left read in the same transaction, as ``Gateway.query`` does) and sends the answer
  only once the record is committed; the write itself runs in a ledger thread (:class:`ReplayAudits`).

Proof note (a replay from memory answers as ``Gateway.query`` would). The ledger's answer for a replay key
never changes once returned (proof note in budget_store/replays.py), and only answers that ``Gateway.query``
returned as replayed (read from the ledger) are remembered here, under a key at least as fine as the ledger's:
the authenticated analyst (whatever the replay scope: ``global`` answers the same to everyone, so a per-analyst
memory only misses more), the exact message text (same text, same normalized SQL), and the session's epsilon
and delta. ``replay: off`` never replays, so nothing is remembered. The policy is fixed while ``serve`` runs,
so the plan, its executor and its spend are those of the first replay; the audit record is the one
``Gateway.query`` writes for a replay (``Gateway.replay_spend``). A replay spends nothing, so no cap is
checked on either path. Tests: tests/server/test_replay_memory.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from dataclasses import dataclass

from dpgateway.budget_store.base import BudgetStore, Remaining, Spend
from dpgateway.budget_store.replays import BoundedMap
from dpgateway.errors import InternalError

MAX_LITERALS = 256
MAX_REPLAYS = 2048
MAX_REPLAY_BYTES = 16 * 1024  # larger answers (many groups) are replayed by Gateway.query: at most 32 MiB here


@dataclass(frozen=True)
class Replay:
    """A replayed answer, ready to send again: the audit record to write and the encoded answer."""

    spend: Spend
    answer: bytes  # RowDescription, DataRows and CommandComplete, as the worker encoded them
    accuracy: dict[str, str]  # for the NOTICE


class Memory:
    """What one server process answers from memory (module docstring)."""

    def __init__(self, max_literals: int = MAX_LITERALS, max_replays: int = MAX_REPLAYS) -> None:
        self.literals: BoundedMap[bytes, bytes] = BoundedMap(max_literals)  # Q body -> the answer (no ReadyForQuery)
        self.replays: BoundedMap[tuple[str, bytes, float, float], Replay] = BoundedMap(max_replays)


class ReplayAudits:
    """Writes replays' audit records for the event loop: one thread, one transaction per batch.

    The loop queues a record and awaits its future; the writer thread takes every queued record, writes them
    with ``store.audit_replays`` in one transaction (committed like every audit record, the budget left read in
    it), and settles the batch's futures in one loop callback. Records queued while a batch is written go into
    the next one: a group commit with a single thread, so one wake-up per batch rather than a thread hand-off
    per replay. A batch that fails is written again one record at a time, so each failure is its own replay's
    error (an ErrorResponse, never an answer).
    """

    def __init__(self, store: BudgetStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._queue: list[tuple[Spend, asyncio.Future[Remaining]]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dpgateway-audit", daemon=True)
        self._thread.start()

    def write(self, spend: Spend) -> asyncio.Future[Remaining]:
        """Queue the record of one replay (from the loop); the future is the budget left once it is committed."""
        future: asyncio.Future[Remaining] = self.loop.create_future()
        with self._wake:
            if self._closed:
                raise InternalError("the server is stopping")
            self._queue.append((spend, future))
            if len(self._queue) == 1:  # the writer waits for work, or finds this after its batch
                self._wake.notify()
        return future

    def close(self) -> None:
        """Write what is queued, then stop the thread (waits for it)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            outcomes = self._write([spend for spend, _ in batch])
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.loop.call_soon_threadsafe(_settle, [future for _, future in batch], outcomes)

    def _write(self, spends: list[Spend]) -> list[Remaining | BaseException]:
        try:
            return list(self.store.audit_replays(spends))
        except Exception:
            if len(spends) == 1:
                return [sys.exc_info()[1] or InternalError("the audit record was not written")]
        outcomes: list[Remaining | BaseException] = []
        for spend in spends:
            try:
                outcomes.append(self.store.audit_replays([spend])[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def _settle(futures: list[asyncio.Future[Remaining]], outcomes: list[Remaining | BaseException]) -> None:
    for future, outcome in zip(futures, outcomes, strict=True):
        if future.done():  # its connection went away while the record was written
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
