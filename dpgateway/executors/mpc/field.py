"""Additive secret sharing over the prime field GF(2^127 - 1), shares from the OS CSPRNG (``secrets``).

Proof note: for a value y and K shares where the first K - 1 are independent uniform field elements and
the last is y minus their sum, any K - 1 shares are uniform and independent of y; only all K together
determine y. Values are signed integers below 2^126 in magnitude (i64 aggregates plus i64 noise, summed
over at most 2^60 parties), so decoding the sum mod P is exact. Test: tests/executors/test_mpc.py::test_shares.

A share travels masked (:func:`pad`): element n of the share party i sends party j for query q is
``share + HMAC-SHA256(k_ij, "q|i|j|n") mod P``, k_ij their pair key. HMAC-SHA256 is a PRF, and a 256-bit
output reduced mod P is within 2^-129 of uniform, so to anyone without k_ij the masked share is uniform
and independent of the share (a one-time pad per (q, i, j, n)); if a query id were reused the two pads
would hide two fresh uniform shares, which reveals nothing either. Test:
tests/executors/test_mpc.py::test_shares_cross_the_network_masked.
"""

from __future__ import annotations

import hashlib
import hmac
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


def pad(key: bytes, qid: str, sender: int, receiver: int, n: int) -> list[int]:
    """The ``n`` field elements that mask the share ``sender`` sends ``receiver`` for query ``qid``."""
    return [
        int.from_bytes(hmac.new(key, f"{qid}|{sender}|{receiver}|{i}".encode(), hashlib.sha256).digest(), "big") % PRIME
        for i in range(n)
    ]
