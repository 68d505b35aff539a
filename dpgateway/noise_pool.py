"""Additive noise drawn ahead of need: a bounded, process-local pool of OpenDP draws per (mechanism, scale).

OpenDP's exact integer samplers cost about 15-25 µs per value, so a query releasing 150 values spends 3-4 ms
sampling. :class:`NoisePool` moves that work off the query's path: ``expect`` (``noise.draw_ahead``, called by
the plain executor before its backend call where the vector lengths are public) has one daemon thread draw a
query's noise while its backend runs, ``take`` hands out those draws and draws only the shortfall
synchronously. Nothing is drawn in the background otherwise: a refill after each take (tried first) ran
while the query's ledger transactions ran, and the GIL hand-offs between the two threads made each debit
3-4 ms slower instead of 1 ms (bench/README.md, session 8). The pool knows
nothing of OpenDP: its ``sampler`` (``mechanisms._zero_draws``) is OpenDP's vector measurement applied to a
vector of zeros, and ``mechanisms.noisy_vector`` adds the draws to the exact aggregates. OpenDP's calls go
through ``ctypes.cdll``, which releases the GIL while Rust samples, so the refill runs on another core
(measured: a Python loop ran at the same speed beside a refilling thread). The sampling still costs CPU:
on a machine whose cores are all busy it competes with the query's own threads (docs/privacy.md#noise).

Proof note (the release has exactly OpenDP's distribution). OpenDP's integer vector mechanism
(``make_laplace`` / ``make_gaussian`` on ``vector_domain(atom_domain(T="i64"))``) maps x to
``sat(x_i + Z_i)``, where the ``Z_i`` are independent draws of discrete Laplace (or discrete Gaussian) of the
scale, drawn as unbounded integers independently of x, and ``sat`` clamps to [-2^63, 2^63 - 1]
(OpenDP: ``make_int_to_bigint >> noise >> then_saturating_cast``). Applied to zeros it returns
``W_i = sat(Z_i)``. For any x, given draws ``W_i`` that are independent of x and of each other and are each
handed to exactly one coordinate of one release, ``mechanisms.noisy_vector`` releases ``x_i + W_i`` clamped
to the same range whenever ``W_i`` is not at a bound (then ``W_i = Z_i``: identical), ``sat(x_i + W_i)``
when ``W_i`` is at the bound of the sign of ``x_i`` (or x_i = 0; both sides saturate: identical), and
otherwise (``W_i`` at the opposite bound, probability below exp(-2000) per draw at the scales pooled,
``mechanisms.POOL_MAX_SCALE``) a draw of ``sat(x_i + Z) | Z beyond that bound`` by rejection from OpenDP
applied to ``x_i``: the law of the release given ``W_i``. So each coordinate has OpenDP's law, and
coordinates are independent because their draws are. This holds because, and only while:
- a draw is used once and only once: ``take`` removes what it hands out under the pool's lock, and which
  draws it hands out depends on their count and order only, never their values (no filtering, no sorting;
  evicting a scale drops its draws unseen, which leaves the rest independent);
- a pool is never shared across ``fork``: ``os.register_at_fork(after_in_child=...)`` empties the child's
  pools and thread, so a child never releases noise its parent also holds (``spawn``ed processes start
  empty); a pool refuses to be pickled or copied;
- draws never leave the process and are never logged: no ``repr``, audit record, error or metric shows one;
- memory is bounded: at most ``scales`` (mechanism, scale) pairs, least recently used evicted, each holding
  at most ``capacity`` draws, and draws only what ``expect`` asked for and no take has used yet;
- only additive noise is pooled: partition selection (``make_laplace_threshold``) releases which keys pass,
  which depends on the data through more than an added term, so it is sampled per query as before.
Tests: tests/test_noise_pool.py (scale of pooled noise, no draw handed out twice under threads, a forked child
starts empty, the saturation branch, bounded memory).

Switch: ``DPGATEWAY_NOISE_POOL=off`` (read at import) makes ``noisy_vector`` call OpenDP on the aggregates
directly, as before the pool. It is a process setting, not a policy key: it changes no release's
distribution and no cost, only where the sampling time is spent (and it must also hold in the executor
processes, which read no config).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from dpgateway.errors import InternalError

Key = tuple[str, float]  # (mechanism, scale)
Sampler = Callable[[str, float, int], list[int]]  # n independent draws of (mechanism, scale), each in 64 bits


@dataclass(eq=False)
class _Stock:
    """Draws of one (mechanism, scale), handed out from the end; ``target``: how many the refill keeps (what
    ``expect`` asked for, less what was taken since)."""

    draws: array = field(default_factory=lambda: array("q"))
    target: int = 0


class NoisePool:
    """Pre-drawn noise per (mechanism, scale), refilled by one daemon thread; see the module's proof note."""

    def __init__(self, sampler: Sampler, *, capacity: int = 2048, scales: int = 32, batch: int = 256):
        if min(capacity, scales, batch) < 1:
            raise InternalError("a noise pool needs positive bounds; this is a bug")
        self._sampler = sampler
        self.capacity, self.scales, self.batch = capacity, scales, batch
        self._start_empty()
        os.register_at_fork(after_in_child=_emptier(weakref.ref(self)))

    def _start_empty(self) -> None:
        """No draws, no thread (at construction, and in a forked child: its parent's draws are never used)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stocks: OrderedDict[Key, _Stock] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self, mechanism: str, scale: float, n: int) -> list[int]:
        """``n`` independent draws of ``mechanism`` at ``scale``, each handed out to this caller only."""
        if n <= 0:
            return []
        key = (mechanism, scale)
        with self._lock:
            stock = self._stocks.get(key)
            pooled = array("q")
            if stock is not None:
                self._stocks.move_to_end(key)
                start = max(0, len(stock.draws) - n)
                pooled = stock.draws[start:]
                del stock.draws[start:]
        fresh = self._sampler(mechanism, scale, n - len(pooled)) if len(pooled) < n else []
        with self._lock:  # served: the refill draws no more of it
            stock = self._stocks.get(key)
            if stock is not None:
                stock.target = max(0, stock.target - n)
        return pooled.tolist() + fresh

    def expect(self, mechanism: str, scale: float, n: int) -> None:
        """Start drawing ``n`` draws of ``mechanism`` at ``scale`` now, for a take expected soon (a query's
        noise while its backend runs): the first query of a scale need not draw on its own path."""
        if n <= 0:
            return
        with self._lock:
            stock = self._stock((mechanism, scale))
            stock.target = min(self.capacity, stock.target + n)
            self._wake_refill()

    def _stock(self, key: Key) -> _Stock:
        """``key``'s stock, marked most recently used (created if new, evicting the least recent scale)."""
        stock = self._stocks.get(key)
        if stock is None:
            stock = self._stocks[key] = _Stock()
            while len(self._stocks) > self.scales:
                self._stocks.popitem(last=False)
        self._stocks.move_to_end(key)
        return stock

    def _wake_refill(self) -> None:
        """Start the refill thread if needed, and wake it (under the lock)."""
        if self._closed:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._refill, name="dpgateway-noise-pool", daemon=True)
            self._thread.start()
        self._wake.notify()

    def _job(self) -> tuple[Key, _Stock, int] | None:
        """The most recently used scale below its target, and how many to draw for it (one batch at most)."""
        for key in reversed(self._stocks):
            stock = self._stocks[key]
            if len(stock.draws) < stock.target:
                return key, stock, min(self.batch, stock.target - len(stock.draws))
        return None

    def _refill(self) -> None:
        """The refill thread: one OpenDP call per batch, outside the lock."""
        while True:
            with self._lock:
                while not self._closed and (job := self._job()) is None:
                    self._wake.wait()
                if self._closed:
                    return
                assert job is not None
                key, stock, count = job
            try:
                draws = self._sampler(key[0], key[1], count)
            except Exception:  # whatever failed, the query path draws synchronously instead; nothing is logged
                with self._lock:
                    if self._stocks.get(key) is stock:
                        del self._stocks[key]
                continue
            with self._lock:
                if self._stocks.get(key) is stock:  # not evicted, not emptied by a fork meanwhile
                    stock.draws.extend(draws[: max(0, self.capacity - len(stock.draws))])

    def held(self) -> dict[Key, int]:
        """How many draws each (mechanism, scale) holds (counts only, never the draws)."""
        with self._lock:
            return {key: len(stock.draws) for key, stock in self._stocks.items()}

    def wait_full(self, timeout: float) -> bool:
        """Whether every recently used scale reached its target within ``timeout`` seconds (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._job() is None:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        """Stop the refill thread and drop every draw."""
        with self._lock:
            self._closed = True
            self._stocks.clear()
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def __repr__(self) -> str:
        return f"NoisePool(scales={len(self._stocks)}, capacity={self.capacity})"

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise InternalError("a noise pool never leaves its process (pickle, copy): its draws would be used twice")


def _emptier(pool: weakref.ref[NoisePool]) -> Callable[[], None]:
    """The after-fork hook of ``pool`` (held weakly: a closed, dropped pool is not kept alive by it)."""

    def empty_in_child() -> None:
        alive = pool()
        if alive is not None:
            alive._start_empty()

    return empty_in_child


def enabled_by_environment(environ: Any = os.environ) -> bool:
    """Whether ``$DPGATEWAY_NOISE_POOL`` leaves the pool on (anything but off / 0 / false / no)."""
    return str(environ.get("DPGATEWAY_NOISE_POOL", "on")).strip().lower() not in ("off", "0", "false", "no")
