"""Measurements of one noise scale and mechanism are noised in one OpenDP call (noise.py ``_noised_by_scale``): each keeps its
own values, its own scale's spread, and its noise is independent of the others' (no draw shared or reused)."""

from __future__ import annotations

import math

import numpy as np

from dpgateway import noise
from dpgateway.plan import Measurement

N = 20_000  # values per measurement


def discrete_laplace_variance(scale: float) -> float:
    q = math.exp(-1 / scale)
    return 2 * q / (1 - q) ** 2


def test_same_scale_measurements_share_a_call_but_not_their_noise(monkeypatch) -> None:
    calls: list[tuple[int, float, str]] = []
    real = noise.noisy_vector

    def counting(values, scale, mechanism):
        calls.append((len(values), scale, mechanism))
        return real(values, scale, mechanism)

    monkeypatch.setattr(noise, "noisy_vector", counting)
    ms = [
        Measurement("a", "count", None, noise_scale=20.0),
        Measurement("b", "count", None, noise_scale=20.0),
        Measurement("c", "sum", None, noise_scale=5.0),
        Measurement("d", "sum", None, noise_scale=20.0, mechanism="gaussian"),  # same scale, other mechanism
    ]
    values = {"a": [1000] * N, "b": [-7] * N, "c": [0] * N, "d": [0] * N}
    out = noise._noised_by_scale(noise._by_scale(ms), values)
    # one call per (scale, mechanism)
    assert sorted(calls) == [(N, 5.0, "laplace"), (N, 20.0, "gaussian"), (2 * N, 20.0, "laplace")]
    a, b, c = (np.array(out[name]) - values[name][0] for name in "abc")
    assert len(a) == len(b) == len(c) == N
    # Each measurement's noise has its own scale's variance: the sample variance of N draws is within 5
    # standard errors (for the Laplace's kurtosis 6: se = var * sqrt((6 + 2) / N)); fails with chance < 1e-6.
    for draws, scale in ((a, 20.0), (b, 20.0), (c, 5.0)):
        var = discrete_laplace_variance(scale)
        assert abs(draws.var() - var) < 5 * var * math.sqrt(8 / N)
    # Independent draws: the correlation of a's and b's noise is within 5 / sqrt(N) of 0 (chance < 1e-6 to fail).
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(N)
    assert not np.array_equal(a, b)
