"""The replay map: a per-process memory of released answers, in front of the ledger's ``dp_answers``.

A replayed answer used to cost a ledger read per query (the lookup, then parsing the stored JSON). The map
keeps what those reads returned, so a repeated query finds its answer without a round trip.

Proof note (the map answers exactly as the ledger would). The ledger's answer for a key is the *first*
committed answer stored under it (``CACHED_ANSWER``: oldest ``at`` first, ties broken by charge id), and
answers are never updated or deleted (no operation of the ledger, admin commands included, touches a stored
answer). So once the ledger has returned an answer for a key, it returns that same answer for good, and the
map stores only answers the ledger returned (never one this process merely committed: a concurrent
duplicate commit of the same query may lose the "first" race). The map's key is what the lookup filters
on: the analyst (scope ``analyst``; empty for ``global``) and the query key (normalized SQL, epsilon,
delta); with ``replay: off`` the store never consults it. So the map returns an answer only where the
ledger would have returned that answer, to the same analysts; another process sharing the ledger reads
the ledger itself and gets the same answer. One exception, documented: two answers of one key committed
with the same ledger stamp (a concurrent duplicate within the clock's resolution) are ordered by their
random charge ids, so a later one can sort first; both were released, under the same key and scope.

The map is bounded (:data:`MAX_ENTRIES` answers, least recently used dropped first); a dropped answer is
read from the ledger again. Tests: tests/ledger/test_replays.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

MAX_ENTRIES = 4096
K = TypeVar("K")
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    """A small LRU map shared by threads: at most ``max_entries``, the least recently used dropped first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

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


class ReplayMap(BoundedMap[tuple[str, str], Any]):
    """``(analyst or "", query_key)`` -> the released answer the ledger returned for it (read-only: shared)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        super().__init__(max_entries)

    def remember(self, slot: tuple[str, str], answer: Any) -> None:
        """Keep an answer the ledger returned for ``slot`` (it never changes afterwards: module docstring)."""
        self.put(slot, answer)
