"""The one module that talks to OpenDP: every random number dpgateway releases comes from here.

All released statistics are integers (counts, and sums of values in fixed point), noised with OpenDP's
discrete Laplace (``make_laplace`` over an integer domain) or, where the query allows a delta and it is
more accurate (passes/budget.py), OpenDP's discrete Gaussian (``make_gaussian`` over an integer domain,
under zero-concentrated DP): exact sampling from a CSPRNG, no floating-point attack surface. Partition
selection uses ``make_laplace_threshold``. Costs are read from each measurement's privacy map, never from
our own arithmetic; noise scales come from the closed forms ``scale = sensitivity / epsilon`` (Laplace)
and ``scale = sensitivity / sqrt(2 rho)`` (Gaussian) and are nudged up until the map confirms the cost.
A Gaussian plan's total rho is turned into the (epsilon, delta) the ledger debits by OpenDP's
``make_zCDP_to_approxDP`` and ``make_fix_delta`` (:func:`zcdp_to_approx`).

OpenDP samples from the operating system's CSPRNG and cannot be seeded, by design. The additive noise of
:func:`noisy_vector` is drawn ahead of need (OpenDP's measurement applied to zeros, kept in a process-local
:class:`~dpgateway.noise_pool.NoisePool`) and added to the exact aggregates; its proof note says why each
release has exactly the distribution of the measurement applied to the aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import opendp.prelude as dp

from dpgateway.errors import InternalError, InvalidParameterError
from dpgateway.noise_pool import NoisePool, enabled_by_environment

dp.enable_features("contrib")

_INT = "i64"
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)  # OpenDP saturates a noisy i64 to [I64_MIN, I64_MAX]; our inputs to [-I64_MAX, I64_MAX]
# Scales above this are noised directly, unpooled: a draw at the i64 bound (the rejection branch of
# _released) has probability below exp(-2000) at or under it, and a release at a larger scale is noise anyway.
POOL_MAX_SCALE = 2.0**52
_VECTOR_SPACE = (dp.vector_domain(dp.atom_domain(T=_INT)), dp.l1_distance(T=_INT))
_L2_SPACE = (dp.vector_domain(dp.atom_domain(T=_INT)), dp.l2_distance(T=_INT))
# zCDP -> (epsilon, delta) is a function of rho alone: read it from OpenDP's conversion of a Gaussian whose map
# at d_in is d_in^2 / 2 = rho (scale 1 on the reals); see zcdp_to_approx.
_REFERENCE_SPACE = (dp.atom_domain(T="f64", nan=False), dp.absolute_distance(T="f64"))
Mechanism = Literal["laplace", "gaussian"]
OPENDP_ACCURACY_SCALE = 1e4  # gaussian_half_width: OpenDP's accuracy helper up to this scale (3 ms), a bound above
_MAP_SPACE = (
    dp.map_domain(dp.atom_domain(T=_INT), dp.atom_domain(T=_INT)),
    dp.l01inf_distance(dp.absolute_distance(T=_INT)),
)


@lru_cache(maxsize=4096)
def _vector_laplace(scale: float) -> dp.Measurement:
    return dp.m.make_laplace(*_VECTOR_SPACE, scale=scale)


@lru_cache(maxsize=4096)
def _vector_gaussian(scale: float) -> dp.Measurement:
    return dp.m.make_gaussian(*_L2_SPACE, scale=scale)


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
    return _calibrated(_vector_laplace, scale, sensitivity, epsilon, "a Laplace scale", "epsilon")


@lru_cache(maxsize=4096)
def gaussian_scale(sensitivity: int, rho: float) -> tuple[float, float]:
    """Smallest float scale whose OpenDP privacy map gives at most ``rho`` (zCDP); returns (scale, cost).

    Proof note: the vector discrete Gaussian with scale s is (d^2 / (2 s^2))-zCDP for L2 sensitivity d
    (OpenDP's map); we only release with a scale whose map we evaluated, at an L2 sensitivity ``sensitivity``
    that bounds the measurement's L2 change (passes/budget.py uses its L1 sensitivity: ``|v|_2 <= |v|_1``).
    Test: tests/test_gaussian.py::test_gaussian_cost_never_exceeds_request.
    """
    if not (rho > 0 and math.isfinite(rho)):
        raise InvalidParameterError(f"rho must be a positive finite number, not {rho!r}")
    scale = sensitivity / math.sqrt(2 * rho)
    if not math.isfinite(scale):
        raise InvalidParameterError(f"the budget is too small for a Gaussian of sensitivity {sensitivity}")
    return _calibrated(_vector_gaussian, scale, sensitivity, rho, "a Gaussian scale", "rho")


def _calibrated(
    measurement: Callable[[float], Any], scale: float, sensitivity: int, budget: float, what: str, unit: str
) -> tuple[float, float]:
    """From ``scale`` upwards, the first float scale whose OpenDP map at ``sensitivity`` is within ``budget``."""
    for _ in range(64):
        cost = measurement(scale).map(sensitivity)
        if cost <= budget:
            return scale, cost
        scale = math.nextafter(scale, math.inf)
    raise InternalError(f"could not calibrate {what} for sensitivity {sensitivity} at {unit} {budget}")


@lru_cache(maxsize=1024)
def zcdp_to_approx(rho: float, delta: float) -> tuple[float, float]:
    """The (epsilon, delta) that ``rho``-zCDP implies at ``delta``, read from OpenDP's conversion.

    OpenDP's ``make_zCDP_to_approxDP`` turns a zCDP measurement's map into a privacy profile that depends on
    its rho only, and ``make_fix_delta`` fixes delta. The measurement converted is a real-valued Gaussian of
    scale 1 evaluated at ``d_in = sqrt(2 rho)`` (its map, d_in^2 / 2, is rho rounded up by OpenDP), so the
    result is OpenDP's conversion of (at least) ``rho``. Test:
    tests/test_gaussian.py::test_conversion_is_opendp_chain_on_the_releasing_measurement.
    """
    d_in = math.sqrt(2 * rho)
    while d_in * d_in / 2 < rho:  # never convert less than rho
        d_in = math.nextafter(d_in, math.inf)
    chain = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(_reference_gaussian()), delta)
    epsilon, charged = chain.map(d_in)
    return float(epsilon), float(charged)


@lru_cache(maxsize=1)
def _reference_gaussian() -> dp.Measurement:
    return dp.m.make_gaussian(*_REFERENCE_SPACE, scale=1.0)


@lru_cache(maxsize=256)
def zcdp_budget(epsilon: float, delta: float) -> float:
    """The largest rho (to about 1e-4 relative) whose OpenDP conversion at ``delta`` costs at most ``epsilon``.

    Bisection on rho between the classical bound ``epsilon = rho + 2 sqrt(rho ln(1/delta))`` (Bun and Steinke
    2016, Prop. 1.3; OpenDP's conversion is never looser) and the exact (epsilon, delta) curve of a
    Gaussian with that rho (no conversion valid for every rho-zCDP mechanism is tighter): about 15 OpenDP
    conversions (3 ms each), cached. Returns 0.0 when not even the lower end fits.
    """
    if not (0 < delta < 1 and epsilon > 0 and math.isfinite(epsilon)):
        return 0.0
    log_inv = math.log(1 / delta)
    lo = (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2
    hi = max(lo, gaussian_rho_upper(epsilon, delta))
    if zcdp_to_approx(lo, delta)[0] > epsilon:
        lo *= 0.5
        if zcdp_to_approx(lo, delta)[0] > epsilon:
            return 0.0
    while hi - lo > 1e-4 * lo:
        mid = (lo + hi) / 2
        if zcdp_to_approx(mid, delta)[0] <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_rho_upper(epsilon: float, delta: float) -> float:
    """An upper bound on the rho any zCDP-to-(epsilon, delta) conversion allows: the rho of the Gaussian whose
    exact privacy curve (Balle and Wang 2018, Thm. 8) passes through (epsilon, delta). Used to bracket and to
    skip the Gaussian when it cannot win; never to account."""

    def exact_delta(mu: float) -> float:  # a Gaussian with sensitivity / scale = mu
        phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
        tail = math.exp(epsilon) * phi(-epsilon / mu - mu / 2) if epsilon < 700 else 0.0
        return phi(-epsilon / mu + mu / 2) - tail

    lo, hi = 1e-9, 1.0
    while exact_delta(hi) < delta and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if exact_delta(mid) < delta:
            lo = mid
        else:
            hi = mid
    return hi * hi / 2


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


def noisy_vector(values: Sequence[int], scale: float, mechanism: Mechanism = "laplace") -> list[int]:
    """Add discrete Laplace (or discrete Gaussian) noise of ``scale`` (integer units) to each value.

    The noise comes from :data:`NOISE_POOL` (drawn ahead of need; see dpgateway/noise_pool.py for why the
    release has exactly the distribution of OpenDP's measurement applied to ``values``), or, with the pool
    off or above ``POOL_MAX_SCALE``, from that measurement itself.
    """
    if not values:
        return []
    if set(map(type, values)) == {int} and min(values) >= -I64_MAX and max(values) <= I64_MAX:
        inputs = list(values)  # already in 64 bits: what _saturate gives, without a call per value
    else:
        inputs = [_saturate(v) for v in values]
    if mechanism not in ("laplace", "gaussian"):
        raise InternalError(f"unknown noise mechanism {mechanism!r}; this is a bug")
    pool = NOISE_POOL
    if pool is None or not scale <= POOL_MAX_SCALE:
        return list(_vector(mechanism, scale)(inputs))
    draws = pool.take(mechanism, scale, len(inputs))
    released = [x + z for x, z in zip(inputs, draws, strict=True)]
    if min(draws) > I64_MIN and max(draws) < I64_MAX and min(released) >= I64_MIN and max(released) <= I64_MAX:
        return released  # no draw at a bound, no sum out of 64 bits: OpenDP's sat(x + Z) is x + Z
    return [_released(x, z, scale, mechanism) for x, z in zip(inputs, draws, strict=True)]


def draw_ahead(mechanism: Mechanism, scale: float, n: int) -> None:
    """Have the noise pool start drawing ``n`` values of ``mechanism`` at ``scale`` for a release expected soon
    (nothing with the pool off, or where :func:`noisy_vector` would not pool)."""
    pool = NOISE_POOL
    if pool is not None and scale <= POOL_MAX_SCALE:
        pool.expect(mechanism, scale, n)


def _vector(mechanism: Mechanism, scale: float) -> dp.Measurement:
    return _vector_gaussian(scale) if mechanism == "gaussian" else _vector_laplace(scale)


def _zero_draws(mechanism: str, scale: float, n: int) -> list[int]:
    """``n`` independent draws ``sat(Z)`` of ``mechanism`` at ``scale``: OpenDP's measurement applied to zeros.

    The zeros go in as a NumPy int64 array: OpenDP then copies them in C instead of checking each value in
    Python (1.5 ms of the GIL per 256 values), so the refill thread holds the GIL briefly. NumPy makes no noise.
    """
    measurement = _vector("gaussian" if mechanism == "gaussian" else "laplace", scale)
    return list(measurement(np.zeros(n, dtype=np.int64)))


def _released(x: int, w: int, scale: float, mechanism: Mechanism) -> int:
    """OpenDP's release ``sat(x + Z)`` given the pooled draw ``w = sat(Z)`` (noise_pool.py's proof note).

    ``w`` strictly inside the i64 range is Z itself. ``w`` at the bound on the side of ``x`` (or x = 0) means
    x + Z is beyond that bound: the release saturates there. ``w`` at the other bound (probability below
    exp(-2000) at pooled scales) leaves x + Z unknown: draw it from the law of sat(x + Z') given Z' beyond
    the bound, by rejection from OpenDP's measurement applied to x (for x < 0: sat(x + Z') >= x + I64_MAX
    exactly when Z' >= I64_MAX; symmetrically below).
    """
    if I64_MIN < w < I64_MAX:
        return min(I64_MAX, max(I64_MIN, x + w))
    if (w == I64_MAX and x >= 0) or (w == I64_MIN and x <= 0):
        return w
    measurement, batch = _vector(mechanism, scale), 8
    while True:  # expected OpenDP draws over all releases: P(reaching here) / P(accepting) <= 1 per value
        for y in measurement([x] * batch):  # the first acceptance of an independent sequence: batching is exact
            if (w == I64_MAX and y >= x + I64_MAX) or (w == I64_MIN and y <= x + I64_MIN):
                return int(y)
        batch = min(2 * batch, 1024)


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


@lru_cache(maxsize=4096)
def gaussian_half_width(scale: float, confidence: float = 0.95) -> int:
    """Integer half-width w with P(|Z| > w) <= 1 - confidence for the discrete Gaussian of ``scale``.

    Up to ``OPENDP_ACCURACY_SCALE``: OpenDP's ``discrete_gaussian_scale_to_accuracy`` gives the accuracy a
    with P(|Z| >= a) <= alpha (its proof document), so w = a - 1. OpenDP sums the pmf, in time linear in
    the scale (30 s at 3e7, a fixed-point sum's), so above that: each pmf term ``exp(-z^2 / 2s^2)`` for
    ``z >= t`` is at most the integral over ``[z - 1, z]`` and the normaliser is at least ``sqrt(2 pi) s``
    (Poisson summation), so P(|Z| >= t) <= 2 P(N(0, s^2) >= t - 1) and w = ceil(s z_(1 - alpha / 2))
    (which equals OpenDP's at the scales both compute). Test:
    tests/test_gaussian.py::test_gaussian_half_width_matches_the_pmf and ::test_large_scale_half_width.
    """
    if scale <= 0:
        return 0
    if scale <= OPENDP_ACCURACY_SCALE:
        accuracy = dp.discrete_gaussian_scale_to_accuracy(scale, 1 - confidence)
        return max(0, math.ceil(accuracy) - 1)
    return math.ceil(scale * NormalDist().inv_cdf(1 - (1 - confidence) / 2) * (1 + 1e-12))


def noise_half_width(scale: float, confidence: float = 0.95, mechanism: Mechanism = "laplace") -> int:
    """The 95% (``confidence``) integer half-width of ``mechanism``'s noise of ``scale``."""
    if mechanism == "gaussian":
        return gaussian_half_width(scale, confidence)
    return laplace_half_width(scale, confidence)


def _saturate(value: int) -> int:
    """Clamp an exact aggregate into 64 bits.

    Saturation is 1-Lipschitz, so it keeps the sensitivity; raising an error instead would reveal
    something about the data that the noisy answer does not.
    """
    return min(I64_MAX, max(-I64_MAX, int(value)))


NOISE_POOL: NoisePool | None = NoisePool(_zero_draws) if enabled_by_environment() else None
