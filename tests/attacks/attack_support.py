"""What the attack tests share: a gateway over a throwaway table, and the exact binomial confidence bounds
the statistical attacks use to state their false-failure probability (OpenDP's noise cannot be seeded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from helpers import make_gateway

from dpgateway import Gateway
from dpgateway.budget_store.base import ReplayScope

TABLE = "t"
ATTACKER = "mallory"


def attack_gateway(
    folder: Path,
    data: pd.DataFrame | Sequence[Mapping[str, Any]] | str,
    columns: Mapping[str, Any],
    *,
    unit: str | None = "pid",
    k: int = 1,
    budget: Mapping[str, Any] | None = None,
    replay: ReplayScope = "analyst",
) -> Gateway:
    """A gateway over table ``t`` holding ``data`` (rows, a DataFrame or raw CSV text) with the given
    declared ``columns``; the ledger is a SQLite file in ``folder``. ``budget`` keys replace the generous
    defaults. Close it when done."""
    policy: dict[str, Any] = {"columns": dict(columns)}
    if unit is not None:
        policy.update(privacy_unit=unit, max_rows_per_unit=k)
    return make_gateway(folder, data, policy, table=TABLE, replay=replay, **dict(budget or {}))


def binomial_tail_ge(n: int, p: float, j: int) -> float:
    """P(Binomial(n, p) >= j), summed exactly in log space."""
    if j <= 0:
        return 1.0
    if j > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    i = np.arange(j, n + 1, dtype=float)
    log_terms = _log_binomial(n)[j:] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(log_terms.max())
    return min(1.0, math.exp(top) * float(np.exp(log_terms - top).sum()))


@lru_cache(maxsize=64)
def _log_binomial(n: int) -> np.ndarray:
    """log C(n, i) for i = 0..n."""
    m = np.arange(1, n + 1, dtype=float)
    return np.concatenate(([0.0], np.cumsum(np.log((n - m + 1) / m))))


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval for a binomial proportion; each side fails w.p. <= alpha / 2.

    Lower end: the p with P(Bin(n, p) >= x) = alpha / 2; upper end: the p with P(Bin(n, p) <= x) = alpha / 2
    (found by bisection, rounded outwards).
    """

    def solve(j: int, target: float) -> tuple[float, float]:
        lo, hi = 0.0, 1.0  # P(Bin(n, p) >= j) rises with p
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if binomial_tail_ge(n, mid, j) < target else (lo, mid)
        return lo, hi

    n, x = trials, successes
    lower = 0.0 if x == 0 else solve(x, alpha / 2)[0]
    upper = 1.0 if x == n else solve(x + 1, 1 - alpha / 2)[1]
    return lower, upper


def epsilon_lower_bound(hits_d: int, hits_d2: int, trials: int, alpha: float) -> float:
    """A (1 - alpha)-confidence lower bound on epsilon from one event S: ln(P[M(D) in S] / P[M(D') in S])
    with the numerator's lower and the denominator's upper Clopper-Pearson bound (pure DP, delta = 0)."""
    p_lo, _ = clopper_pearson(hits_d, trials, alpha)
    _, q_hi = clopper_pearson(hits_d2, trials, alpha)
    if p_lo <= 0:
        return 0.0
    return math.log(p_lo / q_hi)


def hoeffding_margin(n: int, alpha: float) -> float:
    """t with P(mean of n independent [0, 1] variables >= their expected mean + t) <= alpha (Hoeffding)."""
    return math.sqrt(math.log(1 / alpha) / (2 * n))
