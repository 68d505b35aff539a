"""OpenDP's quantile mechanism over a candidate grid, fed by a per-group histogram instead of raw rows.

A quantile of column ``x`` with declared bounds ``[lo, hi]`` is released as one of the candidates of a
public grid (:class:`Grid`, from the bounds only). The backend snaps each kept row's clamped value to its
nearest candidate and returns, per group, how many rows fell on each candidate (a histogram); here the
histogram is scored exactly as OpenDP's ``make_quantile_score_candidates`` scores the snapped values, and
OpenDP's ``make_noisy_max`` picks the candidate (report noisy max; under pure DP OpenDP adds exponential
noise, i.e. permute-and-flip [MS20]), exactly what OpenDP's ``make_private_quantile`` does with the raw values.

Proof note (the score from the histogram is OpenDP's score on the data). Let the data be the multiset
``D`` of snapped values: each kept row's ``x``, clamped to ``[lo, hi]`` and moved to its nearest candidate
(a per-row map, so it neither adds nor removes rows). Every element of ``D`` is a candidate, so with
``h[j]`` the number of elements equal to candidate ``c_j`` (what the backend returns),
``#(D < c_j) = h[0] + ... + h[j-1]`` and ``#(D > c_j) = h[j+1] + ... + h[m-1]`` exactly. OpenDP 0.16 scores
candidate ``c_j`` as ``|(den - num) * min(#(D < c_j), L) - num * min(#(D > c_j), L)|`` where
``num / den`` is its fraction for ``alpha`` and ``L = (2**64 - 1) // den``; :func:`alpha_fraction` reads
``num`` and ``den`` back from OpenDP's own transformation (the scores of one value below and one above a
single candidate), and :func:`scores` computes that formula from the cumulative sums. So the score vector
is exactly OpenDP's on ``D``. Test: tests/test_quantiles.py::test_histogram_scores_equal_opendp_scores.

Proof note (sensitivity with ``k`` rows per unit). Row bounding keeps at most ``k`` rows per privacy unit
(passes/bounding.py), so adding or removing a unit changes ``D`` of each group by at most ``d_g`` elements
with ``sum_g d_g <= k`` (each kept row lies in one group). OpenDP's stability map of the score
transformation under the symmetric distance gives the score vector's L-infinity sensitivity
``map(d) = d * max(num, den - num)``, and the noisy max's privacy map is ``2 * d_score / scale``: both linear,
so the groups together lose ``sum_g eps(d_g) = eps(k)``, which is what :func:`calibrate` charges (read
from OpenDP's maps at ``d_in = k``). Tests: tests/test_quantiles.py::test_charge_is_opendp_chained_map,
tests/test_quantiles.py::test_one_person_moves_each_histogram_by_at_most_k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import opendp.prelude as dp

from dpgateway import mechanisms  # noqa: F401 - enables OpenDP's contrib features in one audited place
from dpgateway.errors import InternalError, InvalidParameterError

GRID_STEPS = 1000  # a float column's grid: 1001 candidates, one step is 0.1% of the declared range
U64_MAX = 2**64 - 1
_SCORE_SPACE = (dp.vector_domain(dp.atom_domain(T="u64")), dp.linf_distance(T="u64"))
_DATA_SPACE = (dp.vector_domain(dp.atom_domain(T="f64", nan=False)), dp.symmetric_distance())


@dataclass(frozen=True)
class Grid:
    """Public candidates ``lo + i * step`` for ``i`` in ``0 .. size - 1``, from the declared bounds only."""

    lo: float
    step: float
    size: int
    integer: bool = False  # an int column on a whole-number grid: candidates are released as ints

    def value(self, index: int) -> float | int:
        """The candidate at ``index`` (an int for integer grids)."""
        if self.integer:
            return int(self.lo) + index * int(self.step)
        return float(f"{self.lo + index * self.step:.12g}")  # 0.30000000000000004 shown as 0.3

    @property
    def per_unit(self) -> float:
        """Grid steps per unit of the column (the bin index multiplies by it)."""
        return 1.0 / self.step

    def values(self) -> list[float]:
        return [float(self.value(i)) for i in range(self.size)]


def grid_for(lo: float, hi: float, integer: bool) -> Grid:
    """The candidate grid of a column: every integer for small int ranges, else ``GRID_STEPS`` equal steps."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise InternalError("quantile bounds must be finite and ordered; the policy loader checks this, so it is a bug")
    if integer and float(lo).is_integer():
        step = max(1, math.ceil((hi - lo) / GRID_STEPS))
        return Grid(lo=float(lo), step=float(step), size=int((hi - lo) // step) + 1, integer=True)
    if hi == lo:
        return Grid(lo=float(lo), step=1.0, size=1)
    return Grid(lo=float(lo), step=(hi - lo) / GRID_STEPS, size=GRID_STEPS + 1)


@lru_cache(maxsize=256)
def alpha_fraction(alpha: float) -> tuple[int, int]:
    """OpenDP's integer fraction ``(num, den)`` for ``alpha``, read back from its score transformation."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"a quantile's fraction must be between 0 and 1, not {alpha!r}")
    probe = dp.t.make_quantile_score_candidates(*_DATA_SPACE, [0.0], alpha)
    below, above = probe([-1.0])[0], probe([1.0])[0]  # (den - num) * 1 and num * 1
    return int(above), int(below) + int(above)


def scores(histogram: Sequence[int], alpha: float) -> list[int]:
    """OpenDP's score of each candidate on the snapped data whose counts per candidate are ``histogram``."""
    num, den = alpha_fraction(alpha)
    limit = U64_MAX // den
    n = sum(histogram)
    out = []
    below = 0
    for count in histogram:
        above = n - below - count
        out.append(abs((den - num) * min(below, limit) - num * min(above, limit)))
        below += count
    return out


@lru_cache(maxsize=1024)
def _score_transformation(alpha: float, size: int) -> dp.Transformation:
    return dp.t.make_quantile_score_candidates(*_DATA_SPACE, [float(i) for i in range(size)], alpha)


@lru_cache(maxsize=1024)
def _noisy_max(scale: float) -> dp.Measurement:
    return dp.m.make_noisy_max(*_SCORE_SPACE, dp.max_divergence(), scale=scale, negate=True)


@lru_cache(maxsize=1024)
def calibrate(k: int, alpha: float, size: int, epsilon: float) -> tuple[int, float, float]:
    """(score sensitivity, noise scale, epsilon charged) for ``k`` rows per unit, read from OpenDP's maps.

    The charge is the chained map of the score transformation and the noisy max at ``d_in = k``
    (proof note above); the scale starts at the closed form and is nudged up until the map confirms it.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidParameterError(f"epsilon must be a positive finite number, not {epsilon!r}")
    sensitivity = int(_score_transformation(alpha, size).map(k))
    scale = sensitivity / epsilon
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidParameterError(f"epsilon {epsilon!r} is too small for a quantile; ask for a larger epsilon")
    cost = float(_noisy_max(scale).map(sensitivity))
    if cost > epsilon:  # the map is linear in 1 / scale (2 * d / scale for OpenDP 0.16): rescale once, then nudge
        scale *= cost / epsilon
    for _ in range(64):
        cost = float(_noisy_max(scale).map(sensitivity))
        if cost <= epsilon:
            return sensitivity, scale, cost
        scale = math.nextafter(scale, math.inf)
    raise InternalError(f"could not calibrate the quantile mechanism at epsilon {epsilon}")


def noisy_index(histogram: Sequence[int], alpha: float, scale: float) -> int:
    """The index of the candidate OpenDP's noisy max picks (lowest noisy score) for this histogram."""
    if not histogram:
        raise InternalError("a quantile histogram has no candidates; this is a bug")
    return int(_noisy_max(scale)(scores(histogram, alpha)))


def rank_half_width(scale: float, alpha: float, size: int, confidence: float = 0.95) -> float:
    """Rows R such that, with probability ``confidence``, the released candidate's score is within R of the best.

    Report noisy max with exponential (or Gumbel) noise of ``scale`` picks a candidate whose score exceeds the
    best by ``t`` only if that candidate's noise exceeds ``t``: probability at most ``exp(-t / scale)`` each,
    ``size * exp(-t / scale)`` for all; a score in rows is the score divided by ``den``, and moving one row
    from above a candidate to below it changes ``(1 - alpha) * #below - alpha * #above`` by exactly 1,
    so this is a rank error in rows.
    """
    _, den = alpha_fraction(alpha)
    return scale * math.log(size / (1 - confidence)) / den
