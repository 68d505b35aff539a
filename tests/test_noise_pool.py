"""Noise drawn ahead of need (dpgateway/noise_pool.py): pooled noise has the configured scale, no draw is handed
out twice, a forked child starts empty, memory is bounded, and the saturation branch gives OpenDP's law.

OpenDP cannot be seeded, so each statistical test states its false-failure probability instead.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dpgateway import Gateway, mechanisms, noise
from dpgateway.errors import InternalError
from dpgateway.mechanisms import I64_MAX, I64_MIN, noisy_vector
from dpgateway.noise_pool import NoisePool, enabled_by_environment

ROOT = Path(__file__).resolve().parents[1]


class Sentinels:
    """A fake sampler: every draw a distinct large integer tagged with the drawing process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count(1)
        self.issued = 0

    def __call__(self, mechanism: str, scale: float, n: int) -> list[int]:
        with self._lock:
            self.issued += n
            return [os.getpid() * 10**12 + next(self._next) for _ in range(n)]


@pytest.fixture
def real_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[NoisePool]:
    """A fresh pool on OpenDP's sampler, installed as the one noisy_vector uses."""
    pool = NoisePool(mechanisms._zero_draws, capacity=30_000, batch=4096)
    monkeypatch.setattr(mechanisms, "NOISE_POOL", pool)
    yield pool
    pool.close()


def discrete_laplace_moments(scale: float) -> tuple[float, float]:
    """Variance 2q / (1 - q)^2 and mean absolute value 2q / (1 - q^2) of discrete Laplace, q = exp(-1 / scale)."""
    q = math.exp(-1 / scale)
    return 2 * q / (1 - q) ** 2, 2 * q / (1 - q * q)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_pooled_noise_has_the_configured_scale(real_pool: NoisePool, mechanism: str) -> None:
    scale, n = 20.0, 20_000
    real_pool.expect(mechanism, scale, 30_000)
    assert real_pool.wait_full(60)
    held = real_pool.held()[(mechanism, scale)]
    assert held == 30_000  # the take below is served from the pool (drawn before the exact values existed)
    exact = [random.Random(7).randrange(-(10**6), 10**6) for _ in range(n)]
    draws = np.array(noisy_vector(exact, scale, mechanism)) - np.array(exact)
    assert real_pool.held()[(mechanism, scale)] <= held - n + 4096  # they came out of the pool
    if mechanism == "laplace":
        var, mean_abs = discrete_laplace_moments(scale)
        kurtosis = 6.0
    else:  # the discrete Gaussian's variance is scale^2 to within exp(-2 pi^2 scale^2) at this scale
        var, mean_abs, kurtosis = scale**2, scale * math.sqrt(2 / math.pi), 3.0
    # Each statistic within 5 standard errors: each fails with chance < 1e-6 (normal approximation at n = 20000).
    assert abs(draws.mean()) < 5 * math.sqrt(var / n)
    assert abs(draws.var() - var) < 5 * var * math.sqrt((kurtosis - 1) / n)
    assert abs(np.abs(draws).mean() - mean_abs) < 5 * math.sqrt(var / n)


def test_no_draw_is_handed_out_twice_under_threads() -> None:
    sampler = Sentinels()
    pool = NoisePool(sampler, capacity=64, scales=3, batch=16)  # small: pooled, synchronous, evicted draws mix
    handed: list[list[int]] = []
    start = threading.Barrier(16)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[int] = []
        start.wait()
        for _ in range(300):
            mine += pool.take("laplace", float(rng.randrange(5)), rng.randrange(1, 50))
        handed.append(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    everything = [v for mine in handed for v in mine]
    assert len(everything) > 16 * 300
    assert len(set(everything)) == len(everything)  # each draw to one caller, once
    assert len(everything) <= sampler.issued  # and every one of them was drawn


def test_take_serves_pooled_draws_first_then_draws_the_rest() -> None:
    sampler = Sentinels()
    pool = NoisePool(sampler, capacity=100)
    first = pool.take("laplace", 1.0, 30)  # nothing pooled: all synchronous
    first += pool.take("laplace", 1.0, 30)
    assert pool.wait_full(10) and pool.held() == {}  # takes alone never draw ahead
    pool.expect("laplace", 1.0, 40)
    assert pool.wait_full(10) and pool.held() == {("laplace", 1.0): 40}
    last_pooled = os.getpid() * 10**12 + sampler.issued
    second = pool.take("laplace", 1.0, 50)
    assert len(second) == 50 and not set(first) & set(second)
    assert sum(v <= last_pooled for v in second) == 40  # the 40 pooled first, then 10 drawn on the spot
    assert pool.wait_full(10) and pool.held() == {("laplace", 1.0): 0}  # served: nothing drawn after it
    pool.close()


def test_expects_add_up_and_takes_use_them_up() -> None:
    """Two queries of one scale in flight get draws for both; once both took theirs the refill stops."""
    pool = NoisePool(Sentinels(), capacity=100)
    pool.expect("laplace", 2.0, 30)
    pool.expect("laplace", 2.0, 30)
    assert pool.wait_full(10) and pool.held() == {("laplace", 2.0): 60}
    pool.take("laplace", 2.0, 30)
    pool.take("laplace", 2.0, 30)
    assert pool.wait_full(10) and pool.held() == {("laplace", 2.0): 0}
    pool.close()


def test_a_forked_child_starts_with_an_empty_pool() -> None:
    sampler = Sentinels()
    pool = NoisePool(sampler, capacity=200)
    pool.expect("laplace", 2.0, 200)
    assert pool.wait_full(10) and pool.held()[("laplace", 2.0)] == 200
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, use of fork()": the point here
        pid = os.fork()
    if pid == 0:  # the child: report what it holds and what it hands out, then leave without pytest's teardown
        try:
            drawn = pool.take("laplace", 2.0, 50)
            from_parent = sum(1 for v in drawn if v // 10**12 != os.getpid())
            os.write(write, f"{from_parent} {len(drawn)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        from_parent, drawn = map(int, pipe.read().split())
    assert drawn == 50 and from_parent == 0  # the child drew its own; never one its parent holds
    assert pool.held()[("laplace", 2.0)] == 200  # the parent's draws are untouched (and still only its own)
    pool.close()


def test_fork_empties_the_pool_before_the_child_runs() -> None:
    pool = NoisePool(Sentinels(), capacity=50)
    pool.expect("gaussian", 3.0, 10)
    assert pool.wait_full(10) and pool.held()
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.write(write, repr(pool.held()).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "{}"
    pool.close()


def test_memory_is_bounded_over_many_scales() -> None:
    pool = NoisePool(Sentinels(), capacity=40, scales=8, batch=40)
    for i in range(500):
        pool.expect("laplace", 1.0 + i, 60)
    assert pool.wait_full(10)
    held = pool.held()
    assert len(held) == 8 and all(count <= 40 for count in held.values())
    assert set(held) == {("laplace", 1.0 + i) for i in range(492, 500)}  # the most recently used
    pool.close()


def test_expect_draws_ahead_for_the_next_take() -> None:
    sampler = Sentinels()
    pool = NoisePool(sampler, capacity=100)
    pool.expect("laplace", 5.0, 150)  # capped at the capacity
    assert pool.wait_full(10) and pool.held() == {("laplace", 5.0): 100}
    last_pooled = os.getpid() * 10**12 + sampler.issued
    drawn = pool.take("laplace", 5.0, 80)
    assert max(drawn) <= last_pooled  # all drawn before the take
    assert pool.wait_full(10) and pool.held() == {("laplace", 5.0): 20}  # what was asked for, less what was taken
    pool.close()


def test_draw_ahead_asks_for_public_cells_only(demo_gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain executor asks for the plan's vector lengths before its backend runs, where they are public."""
    asked: list[tuple[str, float, int]] = []
    monkeypatch.setattr(mechanisms, "draw_ahead", lambda mechanism, scale, n: asked.append((mechanism, scale, n)))
    sql = "SELECT sex, married, COUNT(*) AS n, SUM(age) AS s, AVG(income) AS a FROM pums GROUP BY sex, married"
    public = demo_gateway.explain(sql, epsilon=1.0).plan
    noise.draw_ahead(public)
    per_scale = Counter((m.mechanism, m.noise_scale) for m in public.measurements)
    assert sorted(asked) == sorted((mech, scale, 4 * count) for (mech, scale), count in per_scale.items())
    asked.clear()
    demo_gateway.query(sql, epsilon=1.0)  # the executor asks before its backend call
    assert sorted(asked) == sorted((mech, scale, 4 * count) for (mech, scale), count in per_scale.items())
    asked.clear()
    private = demo_gateway.explain("SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ", epsilon=1.0).plan
    noise.draw_ahead(private)  # how many groups pass the threshold depends on the data: nothing asked
    assert asked == []


def test_a_pool_never_leaves_its_process() -> None:
    pool = NoisePool(Sentinels())
    for leave in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(InternalError, match="never leaves its process"):
            leave(pool)
    assert "draws" not in repr(pool) and str(os.getpid()) not in repr(pool)
    pool.close()


def test_a_scale_opendp_refuses_is_not_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = NoisePool(mechanisms._zero_draws)
    monkeypatch.setattr(mechanisms, "NOISE_POOL", pool)
    with pytest.raises(Exception, match="scale"):
        noisy_vector([1, 2], -1.0)
    assert pool.held() == {}
    pool.close()


def test_the_switch_reads_the_environment() -> None:
    assert enabled_by_environment({}) and enabled_by_environment({"DPGATEWAY_NOISE_POOL": "on"})
    for off in ("off", "0", "false", "No "):
        assert not enabled_by_environment({"DPGATEWAY_NOISE_POOL": off})
    assert (mechanisms.NOISE_POOL is None) == (not enabled_by_environment())


class FakeMeasurement:
    """OpenDP's measurement on x, replayed: a fixed noise sequence; records the inputs it got."""

    def __init__(self, noise: list[int]) -> None:
        self.noise = iter(noise)
        self.inputs: list[list[int]] = []

    def __call__(self, xs: list[int]) -> list[int]:
        self.inputs.append(xs)
        return [min(I64_MAX, max(I64_MIN, x + next(self.noise))) for x in xs]


def test_saturated_draws_release_what_opendp_would(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inside the range: x + Z, saturated to OpenDP's bounds.
    assert mechanisms._released(5, -7, 1.0, "laplace") == -2
    assert mechanisms._released(I64_MAX, 10, 1.0, "laplace") == I64_MAX
    assert mechanisms._released(-I64_MAX, -10, 1.0, "laplace") == I64_MIN
    # At the bound on x's side (or x = 0): x + Z is beyond it.
    assert mechanisms._released(3, I64_MAX, 1.0, "laplace") == I64_MAX
    assert mechanisms._released(0, I64_MIN, 1.0, "gaussian") == I64_MIN
    # At the other bound: rejection from the measurement on x; the first sample with Z beyond the bound wins.
    x = -(2**62)
    fake = FakeMeasurement([0, 5, I64_MAX - 1, I64_MAX + 3, I64_MAX + 9] + [0] * 2000)
    monkeypatch.setattr(mechanisms, "_vector_laplace", lambda scale: fake)
    assert mechanisms._released(x, I64_MAX, 1.0, "laplace") == x + I64_MAX + 3
    assert fake.inputs[0][0] == x
    fake = FakeMeasurement([-(2**64)] + [0] * 2000)
    monkeypatch.setattr(mechanisms, "_vector_gaussian", lambda scale: fake)
    assert mechanisms._released(7, I64_MIN, 1.0, "gaussian") == I64_MIN


@pytest.mark.slow
def test_saturation_branch_has_opendps_law(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a scale where draws often saturate (pooling allowed there for this test only), pooled releases and
    OpenDP's own releases of the same x have the same law: compared on the events the branch decides."""
    scale, n, x = 1e19, 5000, -(2**62)  # P(Z >= I64_MAX) is about 0.2: the rejection branch runs often
    monkeypatch.setattr(mechanisms, "POOL_MAX_SCALE", math.inf)
    pool = NoisePool(mechanisms._zero_draws, capacity=n)
    monkeypatch.setattr(mechanisms, "NOISE_POOL", pool)
    pooled = np.array(noisy_vector([x] * n, scale), dtype=object)
    pool.close()
    direct = np.array(mechanisms._vector_laplace(scale)([x] * n), dtype=object)
    # Two-sample comparison of proportions within 5 standard errors: each fails with chance < 1e-6.
    for event in (lambda r: r == I64_MAX, lambda r: r >= x + I64_MAX, lambda r: r == I64_MIN, lambda r: r > 0):
        p1, p2 = np.mean([event(r) for r in pooled]), np.mean([event(r) for r in direct])
        p = (p1 + p2) / 2
        assert abs(p1 - p2) <= 5 * math.sqrt(max(p * (1 - p), 1 / n) * 2 / n)


@pytest.mark.slow
def test_the_noise_tests_pass_with_the_pool_off() -> None:
    """The quick noise, scale and sensitivity tests also pass with ``DPGATEWAY_NOISE_POOL=off`` (direct calls to
    OpenDP: the path every release took before the pool, whose slow statistical tests ran for sessions)."""
    files = [
        "tests/test_mechanisms.py",
        "tests/test_gaussian.py",
        "tests/test_noise_batching.py",
        "tests/test_noise_pool.py",
        "tests/test_sensitivity.py",
    ]
    env = {**os.environ, "DPGATEWAY_NOISE_POOL": "off"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "-k",
            "not pool_off",
            *files,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:]
