"""The OpenDP mechanisms: costs read from the privacy maps, minimal partition thresholds, exact CIs, saturation.

Every probabilistic assertion states its false-failure probability, derived from the exact discrete
Laplace distribution P(Z = z) = (1 - q) / (1 + q) q^|z|, q = exp(-1 / scale) (see tests/helpers.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import opendp.prelude as dp
import pytest
from helpers import (
    dlap_fourth_moment,
    dlap_q,
    dlap_tail,
    dlap_tail_second_moment,
    dlap_upper_tail,
    dlap_variance,
)

from dpgateway import Gateway
from dpgateway.connectors.base import ExactAggregates, MockConnector
from dpgateway.errors import InvalidParameterError
from dpgateway.mechanisms import (
    I64_MAX,
    laplace_half_width,
    laplace_scale,
    noisy_vector,
    partition_threshold,
    select_partitions,
)
from dpgateway.policies.loader import parse_config

I64_MIN = -I64_MAX - 1
VECTOR_SPACE = (dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"))
MAP_SPACE = (
    dp.map_domain(dp.atom_domain(T="i64"), dp.atom_domain(T="i64")),
    dp.l01inf_distance(dp.absolute_distance(T="i64")),
)


def _random_requests(seed: int, n: int) -> list[tuple[int, float]]:
    """Log-uniform sensitivities in [1, 1e12] and epsilons in [1e-3, 20], plus awkward decimal epsilons."""
    rng = np.random.default_rng(seed)
    sens = np.rint(10 ** rng.uniform(0, 12, n)).astype(np.int64)
    eps = 10 ** rng.uniform(-3, math.log10(20), n)
    requests = [(int(s), float(e)) for s, e in zip(sens, eps, strict=True)]
    return requests + [(k, e / 3) for k in (1, 3, 7, 750000) for e in (0.1, 0.3, 0.7, 1.0, 1.3)]


def test_laplace_cost_never_exceeds_request() -> None:
    for sensitivity, epsilon in _random_requests(seed=20240601, n=300):
        scale, cost = laplace_scale(sensitivity, epsilon)
        # The cost is what OpenDP's own map says for this scale, rebuilt independently here.
        assert dp.m.make_laplace(*VECTOR_SPACE, scale=scale).map(sensitivity) == cost
        assert cost <= epsilon
        # ... and the scale is the closed form sensitivity / epsilon up to a few float steps (nothing wasted).
        assert scale == pytest.approx(sensitivity / epsilon, rel=1e-12)
        assert cost == pytest.approx(epsilon, rel=1e-12)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf, math.nan])
def test_laplace_scale_refuses_bad_epsilon(epsilon: float) -> None:
    with pytest.raises(InvalidParameterError, match="epsilon must be a positive finite number"):
        laplace_scale(1, epsilon)


def _threshold_map(scale: float, threshold: int, k: int) -> tuple[float, float]:
    measurement = dp.m.make_laplace_threshold(*MAP_SPACE, scale=scale, threshold=threshold)
    eps, delta = measurement.map((k, k, k))
    return float(eps), float(delta)


THRESHOLD_CASES = [
    # (noise scale, rows per unit k, requested delta)
    (1.0, 1, 1e-6),
    (3.0, 3, 1e-5),
    (3.0, 3, 1e-10),
    (6.0, 3, 1e-7),
    (2.5, 2, 1e-12),
    (0.4, 1, 1e-9),
    (40.0, 10, 1e-6),
    (1234.5, 7, 1e-8),
]


@pytest.mark.parametrize(("scale", "k", "delta"), THRESHOLD_CASES)
def test_threshold_cost_and_minimality(scale: float, k: int, delta: float) -> None:
    """OpenDP keeps noisy counts >= t but its map for t bounds P(noise > t - k) (opendp/opendp#2922), so
    releasing at ``threshold`` costs what OpenDP's map says for ``threshold - 1``."""
    threshold, eps, cost = partition_threshold(scale, k, delta)
    assert (eps, cost) == _threshold_map(scale, threshold - 1, k)  # read from OpenDP's map
    assert cost <= delta
    assert _threshold_map(scale, threshold - 2, k)[1] > delta  # minimal: one lower would cost too much
    # The exact cost, independently of OpenDP: a partition that exists only because of one unit has
    # count <= k and is released when the noise reaches threshold - k; over at most k such partitions
    # the probability that any is released is at most 1 - (1 - P(Z >= threshold - k))^k, within delta.
    p = dlap_upper_tail(scale, threshold - k)
    assert -math.expm1(k * math.log1p(-p)) <= cost * (1 + 1e-9)
    # ... and one lower would release such a partition more often than delta allows.
    assert -math.expm1(k * math.log1p(-dlap_upper_tail(scale, threshold - 1 - k))) > delta


@pytest.mark.parametrize(("scale", "k", "delta"), [(1.0, 1, 1e-11), (3.0, 3, 1e-10), (6.0, 3, 1e-11)])
def test_threshold_cost_and_suppression(scale: float, k: int, delta: float) -> None:
    """Partitions with count <= k are essentially never released; large ones always are.

    Each trial is one partition of count k (the worst case), released with probability
    p = P(Z >= threshold - k) exactly. With n trials, P(any release) <= n p <= 1e-6 by the union bound.
    """
    threshold, _, _ = partition_threshold(scale, k, delta)
    p = dlap_upper_tail(scale, threshold - k)
    trials = min(50_000, math.floor(1e-6 / p))
    assert trials >= 10_000 and trials * p <= 1e-6
    rng = np.random.default_rng(7)
    small = {i: int(c) for i, c in enumerate(rng.integers(1, k + 1, trials - 1))} | {trials - 1: k}
    assert select_partitions(small, scale, threshold) == {}
    # Power: a count of threshold + m drops below threshold with probability P(Z <= -m - 1) per partition;
    # m = scale * ln(1e9) makes that < 1e-9, so 1000 partitions are all kept except with prob. < 1e-6.
    m = math.ceil(scale * math.log(1e9))
    assert 1000 * dlap_upper_tail(scale, m + 1) < 1e-6
    large = {i: threshold + m for i in range(1000)}
    kept = select_partitions(large, scale, threshold)
    assert set(kept) == set(large) and min(kept.values()) >= threshold


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-9])
def test_partition_threshold_needs_delta(delta: float) -> None:
    with pytest.raises(InvalidParameterError, match=r"needs delta in \(0, 1\)"):
        partition_threshold(2.0, 1, delta)


def test_closed_forms_match_the_pmf() -> None:
    """The closed forms the statistical tests rely on agree with direct sums of the pmf."""
    for scale in (0.3, 1.0, 3.0, 17.5):
        q = dlap_q(scale)
        pmf = {z: (1 - q) / (1 + q) * q ** abs(z) for z in range(-4000, 4001)}
        assert sum(pmf.values()) == pytest.approx(1.0, rel=1e-12)
        assert dlap_variance(scale) == pytest.approx(sum(z * z * p for z, p in pmf.items()), rel=1e-9)
        assert dlap_fourth_moment(scale) == pytest.approx(sum(z**4 * p for z, p in pmf.items()), rel=1e-9)
        for m in (1, 2, 5, 20):
            assert dlap_tail(scale, m) == pytest.approx(sum(p for z, p in pmf.items() if abs(z) >= m), rel=1e-9)
            assert dlap_upper_tail(scale, m) == pytest.approx(sum(p for z, p in pmf.items() if z >= m), rel=1e-9)
            tail2 = sum(z * z * p for z, p in pmf.items() if abs(z) >= m)
            assert dlap_tail_second_moment(scale, m) == pytest.approx(tail2, rel=1e-9)


def _log_tail(scale: float, m: int) -> float:
    """log P(|Z| >= m), computed without losing precision for large scales."""
    return math.log(2) - m / scale - math.log1p(dlap_q(scale))


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 0.999999])
def test_half_width_matches_discrete_laplace_cdf(confidence: float) -> None:
    alpha = 1 - confidence
    scales = [0.05, 0.3, 1.0, 1 / 0.3, 3.0, 6.0, 10.0, 1500.0, 1.5e6, 4.2e9, *10 ** np.linspace(-1, 8, 60)]
    for scale in map(float, scales):
        w = laplace_half_width(scale, confidence)
        assert w >= 0
        # P(|Z| > w) <= alpha: the interval +-w holds at least `confidence` of the mass ...
        assert _log_tail(scale, w + 1) <= math.log(alpha) + 1e-12
        # ... and is the shortest such interval.
        if w >= 1:
            assert _log_tail(scale, w) > math.log(alpha) - 1e-12


def test_half_width_of_no_noise_is_zero() -> None:
    assert laplace_half_width(0.0) == 0


def test_saturation_keeps_huge_values_in_64_bits() -> None:
    """Aggregates beyond 64 bits saturate (1-Lipschitz, so sensitivity is kept) rather than fail."""
    released = noisy_vector([2**70, -(2**70), I64_MAX, 10**30], 1.0)
    # P(|Z| >= 60) = 2 e^-60 / (1 + e^-1) < 1e-25 per value: the noise cannot move a value further.
    assert all(I64_MIN <= v <= I64_MAX for v in released)
    for value, saturated in zip(released, [I64_MAX, -I64_MAX, I64_MAX, I64_MAX], strict=True):
        assert abs(value - saturated) < 60
    kept = select_partitions({0: 2**80, 1: -(2**80)}, 1.0, 10)
    assert list(kept) == [0] and I64_MAX - 60 < kept[0] <= I64_MAX


def test_saturation_end_to_end(tmp_path: Path) -> None:
    """A backend that returns an aggregate beyond 64 bits gets a saturated, released answer, not an error."""
    (tmp_path / "t.csv").write_text("pid,x\n1,1\n")
    config = parse_config(
        {
            "tables": {
                "t": {
                    "source": "t.csv",
                    "privacy_unit": "pid",
                    "columns": {"pid": {"type": "int"}, "x": {"type": "int"}},
                }
            },
            "ledger": "sqlite:///:memory:",
        },
        base_dir=tmp_path,
    )
    huge = MockConnector(lambda sql: ExactAggregates(columns=("__m0",), rows=((10**40,),)))
    with Gateway(config, connector=huge) as gw:
        res = gw.query("SELECT COUNT(*) AS n FROM t", analyst="sat", epsilon=1.0)
    (n,) = res.rows[0]
    assert I64_MAX - 60 < n <= I64_MAX  # noise scale 1: P(|Z| >= 60) < 1e-25


def test_tiny_epsilon_is_a_parameter_error_not_a_crash() -> None:
    """Defence in depth under Gateway's MIN_EPSILON: OpenDP would fail (XX000) on an infinite scale or an
    i64 overflow of the partition-selection threshold."""
    with pytest.raises(InvalidParameterError, match="noise scale for sensitivity 3 would be infinite"):
        laplace_scale(3, 5e-324)
    with pytest.raises(InvalidParameterError, match="threshold would not fit in 64 bits"):
        partition_threshold(3e30, 3, 1e-7)
