"""The one module that talks to OpenDP: every random number dpgateway releases comes from here.

All released statistics are integers (counts, and sums of values in fixed point), noised with OpenDP's
discrete Laplace (``make_laplace`` over an integer domain): exact sampling from a CSPRNG, no floating-point
attack surface. Partition selection uses ``make_laplace_threshold``. Costs are read from each
measurement's privacy map, never from our own arithmetic; noise scales come from the closed form
``scale = sensitivity / epsilon`` and are nudged up until the map confirms the cost.

OpenDP samples from the operating system's CSPRNG and cannot be seeded, by design.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import opendp.prelude as dp

from dpgateway.errors import InternalError, InvalidParameterError

dp.enable_features("contrib")

_INT = "i64"
I64_MAX = 2**63 - 1
_VECTOR_SPACE = (dp.vector_domain(dp.atom_domain(T=_INT)), dp.l1_distance(T=_INT))
_MAP_SPACE = (
    dp.map_domain(dp.atom_domain(T=_INT), dp.atom_domain(T=_INT)),
    dp.l01inf_distance(dp.absolute_distance(T=_INT)),
)


@lru_cache(maxsize=4096)
def _vector_laplace(scale: float) -> dp.Measurement:
    return dp.m.make_laplace(*_VECTOR_SPACE, scale=scale)


@lru_cache(maxsize=1024)
def _threshold_laplace(scale: float, threshold: int) -> dp.Measurement:
    return dp.m.make_laplace_threshold(*_MAP_SPACE, scale=scale, threshold=threshold)


@lru_cache(maxsize=4096)
def laplace_scale(sensitivity: int, epsilon: float) -> tuple[float, float]:
    """Smallest float scale whose OpenDP privacy map gives at most ``epsilon``; returns (scale, cost).

    Proof note: the vector discrete Laplace with scale b is (d/b)-DP for L1 sensitivity d (OpenDP's map);
    we only ever release with a scale whose map we evaluated, and charge that map's value.
    Test: tests/test_mechanisms.py::test_laplace_cost_never_exceeds_request.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidParameterError(f"epsilon must be a positive finite number, not {epsilon!r}")
    scale = sensitivity / epsilon
    if not math.isfinite(scale):  # e.g. epsilon 5e-324: no noise distribution exists, so nothing to release
        raise InvalidParameterError(
            f"epsilon {epsilon!r} is too small: the noise scale for sensitivity {sensitivity} would be infinite; "
            "ask for a larger epsilon"
        )
    for _ in range(64):
        cost = _vector_laplace(scale).map(sensitivity)
        if cost <= epsilon:
            return scale, cost
        scale = math.nextafter(scale, math.inf)
    raise InternalError(f"could not calibrate a Laplace scale for sensitivity {sensitivity} at epsilon {epsilon}")


@lru_cache(maxsize=1024)
def partition_threshold(scale: float, k: int, delta: float) -> tuple[int, float, float]:
    """Smallest integer release threshold so that partition selection costs at most ``delta``.

    A privacy unit changes at most ``k`` partitions (l0), each by at most ``k`` rows (linf), ``k`` in
    total (l1). Returns (threshold, epsilon, delta), epsilon and delta read from OpenDP's privacy map.
    Proof note: a partition present only with the unit has count <= k, so it is released (noisy count
    >= threshold) only when the noise reaches ``threshold - k``. OpenDP 0.16's map for threshold ``t``
    bounds P(noise > t - k) while its function keeps counts >= t (opendp/opendp#2922: the charged delta
    misses the mass at exactly ``t``), so we release with ``t + 1`` and charge the map of ``t``: then the
    map bounds exactly the release probability, over the ``k`` partitions, by ``delta``.
    Tests: tests/test_mechanisms.py::test_threshold_cost_and_suppression and ::test_threshold_cost_and_minimality.
    """
    if not 0 < delta < 1:
        raise InvalidParameterError(
            f"a query with private group keys needs delta in (0, 1) for partition selection, not {delta!r}"
        )
    d_in = (k, k, k)
    # Discrete Laplace tail: P(Z >= t) <= exp(-(t - 1) / scale); the union over k partitions gives this start.
    guess = k + max(1, math.ceil(scale * (math.log(k) - math.log(delta))))
    lo, hi = max(k + 1, guess // 2), guess
    previous = math.inf
    while hi >= I64_MAX or (reached := _threshold_laplace(scale, hi).map(d_in)[1]) > delta:
        if hi >= I64_MAX:  # the counts are i64: a threshold this large could never be reached
            raise InvalidParameterError(
                f"epsilon is too small for partition selection (noise scale {scale:.3g}): the release threshold "
                "would not fit in 64 bits; ask for a larger epsilon, or declare public_values for the group keys"
            )
        if reached >= previous:  # the map's delta stopped falling: it cannot certify one this small
            raise InvalidParameterError(
                f"delta {delta!r} is below the smallest delta partition selection can certify ({reached:.3g}); "
                "ask for a larger delta"
            )
        previous = reached
        lo, hi = hi, hi * 2
    while lo < hi:  # smallest passing threshold in [lo, hi]; the map's delta falls as the threshold rises
        mid = (lo + hi) // 2
        if _threshold_laplace(scale, mid).map(d_in)[1] <= delta:
            hi = mid
        else:
            lo = mid + 1
    eps, cost = _threshold_laplace(scale, hi).map(d_in)
    return hi + 1, float(eps), float(cost)  # release at hi + 1: see the proof note (opendp/opendp#2922)


def noisy_vector(values: Sequence[int], scale: float) -> list[int]:
    """Add discrete Laplace noise of ``scale`` (integer units) to each value."""
    if not values:
        return []
    return list(_vector_laplace(scale)([_saturate(v) for v in values]))


def select_partitions(counts: Mapping[int, int], scale: float, threshold: int) -> dict[int, int]:
    """Noisy counts of the partitions (by index) whose noisy count reaches ``threshold``."""
    if not counts:
        return {}
    return dict(_threshold_laplace(scale, threshold)({key: _saturate(v) for key, v in counts.items()}))


def laplace_half_width(scale: float, confidence: float = 0.95) -> int:
    """Integer half-width w with P(|Z| > w) <= 1 - confidence for discrete Laplace of ``scale``.

    P(|Z| >= m) = 2 exp(-m/b) / (1 + exp(-1/b)) for m >= 1.
    """
    if scale <= 0:
        return 0
    alpha = 1 - confidence
    q = math.exp(-1 / scale)
    # smallest w with P(|Z| >= w + 1) <= alpha
    w = math.ceil(-scale * math.log(alpha * (1 + q) / 2)) - 1
    return max(0, w)


def _saturate(value: int) -> int:
    """Clamp an exact aggregate into 64 bits.

    Saturation is 1-Lipschitz, so it keeps the sensitivity; raising an error instead would reveal
    something about the data that the noisy answer does not.
    """
    return min(I64_MAX, max(-I64_MAX, int(value)))
