"""Helpers shared by the privacy and accuracy tests: a gateway over a throwaway CSV, and the exact
distribution of the discrete Laplace noise that OpenDP adds (so tests derive bounds, never tune slack).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pandas as pd
import yaml

from dpgateway import Gateway
from dpgateway.budget_store import open_store
from dpgateway.budget_store.base import ReplayScope
from dpgateway.connectors.base import ExactAggregates
from dpgateway.policies.loader import load_config
from dpgateway.sqlcheck import _TOKEN, VerifiedSQL

TABLE = "t"
GENEROUS_BUDGET: dict[str, Any] = {
    "per_subject": {"epsilon": 1e6, "delta": 0.5},
    "per_analyst": {"epsilon": 1e6, "delta": 0.5},
    "per_query": {"epsilon": 1e3, "delta": 0.4},
    "default_query_epsilon": 1.0,
    "default_query_delta": 1e-6,
}


def make_gateway(
    folder: Path,
    data: pd.DataFrame | Sequence[Mapping[str, Any]] | str | Path,
    policy: Mapping[str, Any],
    *,
    table: str = TABLE,
    replay: ReplayScope = "analyst",
    **budget: Any,
) -> Gateway:
    """A gateway over one table: ``data`` (rows, a DataFrame, raw CSV text, or an existing CSV path)
    under ``policy`` (the table's mapping in ``dpgateway.yaml`` without ``source``), with a SQLite ledger
    in ``folder`` and a budget no test exhausts (``budget`` keys override it). ``replay="off"`` answers a
    repeated query afresh (statistical tests). Close it when done.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        source = data.resolve()
    else:
        source = folder / f"{table}.csv"
        write_csv(source, data)
    config = {
        "tables": {table: {"source": str(source), **policy}},
        "budget": {**GENEROUS_BUDGET, **budget},
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
    }
    path = folder / "dpgateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load_config(path)
    return Gateway(loaded, store=open_store(loaded.ledger, loaded.budget, replay=replay))


def write_csv(path: Path, data: pd.DataFrame | Sequence[Mapping[str, Any]] | str) -> None:
    """Write rows, a DataFrame, or CSV text (kept verbatim, for values pandas would normalize)."""
    if isinstance(data, str):
        path.write_text(data)
    else:
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
        frame.to_csv(path, index=False)


def exact_by_group(exact: ExactAggregates, n_keys: int) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Exact bounded aggregates keyed by group (a missing or empty aggregate counts zero)."""
    return {tuple(row[:n_keys]): tuple(int(v or 0) for v in row[n_keys:]) for row in exact.rows}


# -- the discrete Laplace distribution, P(Z = z) = (1 - q) / (1 + q) * q^|z| with q = exp(-1/b) ------------
# Closed forms, with 1 - q computed as -expm1(-1/b) so that they stay exact for scales in the millions.


def dlap_q(scale: float) -> float:
    return math.exp(-1.0 / scale)


def _one_minus_q(scale: float) -> float:
    return -math.expm1(-1.0 / scale)


def dlap_variance(scale: float) -> float:
    """Var(Z) = E[Z^2] = 2q / (1 - q)^2."""
    return 2 * dlap_q(scale) / _one_minus_q(scale) ** 2


def dlap_fourth_moment(scale: float) -> float:
    """E[Z^4] = 2q (1 + 11q + 11q^2 + q^3) / ((1 + q) (1 - q)^4)."""
    q = dlap_q(scale)
    return 2 * q * (1 + 11 * q + 11 * q * q + q**3) / ((1 + q) * _one_minus_q(scale) ** 4)


def dlap_tail(scale: float, m: int) -> float:
    """P(|Z| >= m) = 2 q^m / (1 + q) for m >= 1 (and 1 for m <= 0)."""
    if m <= 0:
        return 1.0
    q = dlap_q(scale)
    return 2 * q**m / (1 + q)


def dlap_upper_tail(scale: float, m: int) -> float:
    """P(Z >= m) = q^m / (1 + q) for m >= 1."""
    q = dlap_q(scale)
    return q**m / (1 + q) if m >= 1 else 1 - dlap_upper_tail(scale, 1 - m)


def dlap_tail_second_moment(scale: float, m: int) -> float:
    """E[Z^2; |Z| >= m] = 2 (1 - q)/(1 + q) q^m (m^2 / (1 - q) + 2m q / (1 - q)^2 + q (1 + q) / (1 - q)^3), m >= 1."""
    q, r = dlap_q(scale), _one_minus_q(scale)
    return 2 * r / (1 + q) * q**m * (m * m / r + 2 * m * q / r**2 + q * (1 + q) / r**3)


# -- concentration bounds -------------------------------------------------------------------------------


def bernstein_half_width(n: int, variance: float, radius: float, failure: float) -> float:
    """t with P(|mean of n i.i.d. - mu| >= t) <= failure, for |X - mu| <= radius, Var(X) = variance.

    Bernstein: P(|mean - mu| >= t) <= 2 exp(-n t^2 / (2 (variance + radius t / 3))); solved for t.
    """
    log_term = math.log(2 / failure)
    a = radius * log_term / (3 * n)
    return a + math.sqrt(a * a + 2 * variance * log_term / n)


def binomial_tail_ge(n: int, p: float, j: int) -> float:
    """P(Binomial(n, p) >= j), summed exactly in log space."""
    if j <= 0:
        return 1.0
    if j > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(j, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def run_concurrently(work: Callable[[int], Any], workers: int) -> list[Any]:
    """``work(0) ... work(workers - 1)``, each on its own thread at once; their results, and their errors raised."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, range(workers)))


def trusted_sql(text: str) -> VerifiedSQL:
    """Test-only: hand-written SQL marked as verified, to drive a connector directly (the package never does this)."""
    return VerifiedSQL(text, _TOKEN)


def dlap_pmf(scale: float, z: int) -> float:
    """P(Z = z) for OpenDP's discrete Laplace of ``scale``."""
    q = math.exp(-1 / scale)
    return (1 - q) / (1 + q) * q ** abs(z)


def chi_square(samples: list[int], pmf: dict[int, float]) -> tuple[float, float]:
    """Chi-square statistic and its critical value at alpha = 1e-6.

    OpenDP cannot be seeded, so every test on its draws is random: alpha = 1e-6 keeps the suite's chance of a
    false failure negligible (0.001 failed a correct HE executor once in CI), and the tests that use this have
    hundreds to thousands of draws, so a wrong scale or shape still exceeds the critical value by far.

    Bins are the integers ``-m..m``, with everything beyond folded into the two end bins; ``m`` is the
    largest value whose expected count is still at least 5 (the chi-square approximation needs that;
    sparse bins would inflate the statistic without any difference in distribution).
    """
    n = len(samples)
    m = max(z for z, p in pmf.items() if n * p >= 5)
    inner = {z: pmf[z] for z in range(-m + 1, m)}
    tail = (1 - sum(inner.values())) / 2  # symmetric: each end bin holds half of the rest
    expected = {**inner, -m: tail, m: tail}
    observed: dict[int, int] = {}
    for s in samples:
        b = min(m, max(-m, s))
        observed[b] = observed.get(b, 0) + 1
    stat = sum((observed.get(b, 0) - n * p) ** 2 / (n * p) for b, p in expected.items())
    df = len(expected) - 1
    # Wilson-Hilferty approximation of the chi-square quantile from the one-sided normal quantile; checked
    # against the exact tail exp(-x/2) sum_{k<df/2} (x/2)^k / k! at even df 10..100: 6.3e-7..9.4e-7 (conservative)
    z = NormalDist().inv_cdf(1 - 1e-6)
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical
