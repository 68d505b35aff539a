"""Answers from memory: statements the event loop answers itself, without a worker thread.

Two kinds of simple-query (``Q``) message are answered on the loop, because nothing in them can block:

- a literal-only statement (:mod:`~dpgateway.server.literals`, e.g. ``SELECT 1``): its answer is fixed by its
  text; the encoded answer is remembered per message text;
- a DP query this analyst already had replayed, with the same text, ``dp.epsilon`` and ``dp.delta``: the worker
  that answered it the first time from the ledger's replay cache remembers the encoded answer and the audit
  record's :class:`~dpgateway.budget_store.base.Spend`. Again, the loop writes the audit record (outcome
  ``replayed``, the budget left read in the same group-committed transaction, as ``Gateway.query`` does) and
  sends the answer only once the record is committed: the write itself runs in a ledger thread.

Proof note (a replay from memory answers as ``Gateway.query`` would). The ledger's answer for a replay key
never changes once returned (proof note in budget_store/replays.py), and only answers that ``Gateway.query``
returned as replayed (read from the ledger) are remembered here, under a key at least as fine as the ledger's:
the authenticated analyst (whatever the replay scope: ``global`` answers the same to everyone, so a per-analyst
memory only misses more), the exact message text (same text, same normalized SQL), and the session's epsilon
and delta. ``replay: off`` never replays, so nothing is remembered. The policy is fixed while ``serve`` runs,
so the plan, its executor and its spend are those of the first replay; the audit record is the one
``Gateway.query`` writes for a replay (``Gateway.replay_spend``). A replay spends nothing, so no cap is
checked on either path. Tests: tests/server/test_fastpath.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Generic, TypeVar

from dpgateway.budget_store.base import Spend

K = TypeVar("K")
V = TypeVar("V")
MAX_LITERALS = 256
MAX_REPLAYS = 4096


@dataclass(frozen=True)
class Replay:
    """A replayed answer, ready to send again: the audit record to write and the encoded answer."""

    spend: Spend
    answer: bytes  # RowDescription, DataRows and CommandComplete, as the worker encoded them
    accuracy: dict[str, str]  # for the NOTICE


class _Bounded(Generic[K, V]):
    """A small LRU map, shared by the loop (reads) and worker threads (writes)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Memory:
    """What one server process answers from memory (module docstring)."""

    def __init__(self, max_literals: int = MAX_LITERALS, max_replays: int = MAX_REPLAYS) -> None:
        self.literals: _Bounded[bytes, bytes] = _Bounded(max_literals)  # Q body -> the answer (no ReadyForQuery)
        self.replays: _Bounded[tuple[str, bytes, float, float], Replay] = _Bounded(max_replays)
