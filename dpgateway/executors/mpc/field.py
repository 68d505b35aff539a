"""Additive secret sharing over the prime field GF(2^127 - 1), shares from the OS CSPRNG (``secrets``).

Proof note: for a value y and K shares where the first K - 1 are independent uniform field elements and
the last is y minus their sum, any K - 1 shares are uniform and independent of y; only all K together
determine y. Values are signed integers below 2^126 in magnitude (i64 aggregates plus i64 noise, summed
over at most 2^60 parties), so decoding the sum mod P is exact. Test: tests/executors/test_mpc.py::test_shares.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**127 - 1


def share(values: Sequence[int], k: int) -> list[list[int]]:
    """``k`` share vectors of ``values`` (each share j goes to party j)."""
    shares = [[secrets.randbelow(PRIME) for _ in values] for _ in range(k - 1)]
    last = [(v - sum(s[i] for s in shares)) % PRIME for i, v in enumerate(values)]
    return [*shares, last]


def add(vectors: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise sum mod PRIME."""
    return [sum(column) % PRIME for column in zip(*vectors, strict=True)]


def decode(value: int) -> int:
    """A field element as a signed integer."""
    value %= PRIME
    return value - PRIME if value > PRIME // 2 else value
