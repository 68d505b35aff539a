"""The released noise has the scale the plan claims, end to end through ``Gateway.query``.

OpenDP samples from the operating system's CSPRNG and cannot be seeded, so every statistical assertion
here has a stated false-failure probability, derived from the exact discrete Laplace distribution
(closed forms in tests/helpers.py, themselves checked against the pmf in tests/test_mechanisms.py):

* the event A that no |Z| exceeds M has probability >= 1 - N P(|Z| > M), with M chosen so that this is
  below 1e-7;
* on A the samples equal their clamp to [-M, M], which is bounded, so Bernstein's inequality bounds the
  deviation of the empirical mean and of the empirical variance (mean of Z^2, the noise mean being 0)
  from their expectations, each with failure probability 2e-7.

Per measurement 5e-7, so each test fails by chance with probability below 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import opendp.prelude as dp
import pandas as pd
import pytest
from helpers import (
    bernstein_half_width,
    dlap_fourth_moment,
    dlap_tail,
    dlap_tail_second_moment,
    dlap_variance,
    exact_by_group,
    make_gateway,
)

from dpgateway import Gateway
from dpgateway.passes.budget import fixed_point_scale
from dpgateway.plan import DPPlan

K = 2
GROUPS = 500
PEOPLE_PER_GROUP = 60  # 120 rows per group: a released count is clamped at 0 only if Z <= -121, P < 1e-17
BOUNDS = (-10, 10)
EPSILON = 1.3
QUERIES = 100  # N = 100 * 500 = 50,000 noise samples per measurement
SQL = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM t GROUP BY g"
FAIL_EVENT_A, FAIL_BERNSTEIN = 1e-7, 2e-7


def table(seed: int) -> pd.DataFrame:
    """Every person has exactly k rows in one group and integer values in bounds: bounding keeps all."""
    rng = np.random.default_rng(seed)
    people = GROUPS * PEOPLE_PER_GROUP
    return pd.DataFrame(
        {
            "pid": np.repeat(np.arange(people), K),
            "g": np.repeat(np.arange(people) % GROUPS, K),
            "x": rng.integers(BOUNDS[0], BOUNDS[1] + 1, people * K),
        }
    )


POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        # Private keys: row bounding, so counts are noised in whole rows (with public keys the weighted
        # rewrite noises fixed-point counts and releases them rounded, hiding the integer noise).
        "g": {"type": "int"},
        "x": {"type": "int", "bounds": list(BOUNDS)},
    },
}


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, pd.DataFrame]]:
    data = table(seed=5)
    with make_gateway(tmp_path_factory.mktemp("stat"), data, POLICY, replay="off") as gw:
        yield gw, data


def _plan(gw: Gateway) -> DPPlan:
    plan = gw.explain(SQL, epsilon=EPSILON).plan
    assert plan is not None
    return plan


def test_noise_scale_is_sensitivity_over_epsilon_share(setting: tuple[Gateway, pd.DataFrame]) -> None:
    gw, _ = setting
    plan = _plan(gw)
    count, total = plan.measurements
    assert (count.kind, total.kind) == ("count", "sum")
    assert count.sensitivity == K
    assert total.sensitivity == K * math.ceil(max(map(abs, BOUNDS)) * fixed_point_scale(max(map(abs, BOUNDS))))
    # passes/split.py: shares proportional to (w r^2)^(1/3), w = 1 for a count and 1 / E[x^2] = 3 / 100 for a
    # sum of x uniform on [-10, 10], r the real-unit sensitivity (k, and k * 10)
    cost = {count.name: (1.0 * K**2) ** (1 / 3), total.name: (3 / 100 * (K * 10) ** 2) ** (1 / 3)}
    for m in plan.measurements:
        share = EPSILON * cost[m.name] / sum(cost.values())
        assert m.noise_scale == pytest.approx(m.sensitivity / share, rel=1e-9)
        # The charged epsilon is OpenDP's map of this very scale, and the shares compose to at most EPSILON.
        measurement = dp.m.make_laplace(
            dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=m.noise_scale
        )
        assert m.epsilon == measurement.map(m.sensitivity) <= share
    assert plan.spent_epsilon <= EPSILON


def _released_noise(gw: Gateway, data: pd.DataFrame) -> dict[str, np.ndarray]:
    """(released - exact) in the integer units the noise is added in, per measurement, over all queries."""
    plan = _plan(gw)
    _, total = plan.measurements
    exact = exact_by_group(gw.connector.execute(plan.bounded_sql, plan.settings), 1)
    # Bounding keeps every row here, so the bounded aggregates are the raw ones (independent check).
    raw = data.groupby("g").agg(n=("x", "size"), s=("x", "sum"))
    assert exact == {(g,): (int(r.n), int(r.s) * int(total.scale)) for g, r in raw.iterrows()}
    noise: dict[str, list[int]] = {"count": [], "sum": []}
    for _ in range(QUERIES):
        frame = gw.query(SQL, analyst="stats", epsilon=EPSILON).frame
        assert len(frame) == GROUPS
        for g, n, s in frame.itertuples(index=False):
            exact_n, exact_s = exact[(g,)]
            noise["count"].append(int(n) - exact_n)
            released_s = round(s * total.scale)
            assert released_s == pytest.approx(s * total.scale, abs=1e-6)  # a fixed-point integer
            noise["sum"].append(released_s - exact_s)
    return {kind: np.array(values, dtype=np.float64) for kind, values in noise.items()}


@pytest.mark.slow
def test_empirical_noise_matches_the_claimed_scale(setting: tuple[Gateway, pd.DataFrame]) -> None:
    """Empirical variance and mean of (released - exact) against the discrete Laplace of the plan's scale.

    False failure probability < 1e-6 (two measurements, 5e-7 each; see the module docstring).
    """
    gw, data = setting
    plan = _plan(gw)
    noise = _released_noise(gw, data)
    for m in plan.measurements:
        z = noise[m.kind]
        n, b = len(z), m.noise_scale
        # M: P(some |Z_i| > M) <= n P(|Z| >= M + 1) <= FAIL_EVENT_A.
        big_m = math.ceil(b * math.log(2 * n / FAIL_EVENT_A))
        assert n * dlap_tail(b, big_m + 1) <= FAIL_EVENT_A
        variance = dlap_variance(b)
        # On A, Z^2 = min(Z^2, M^2) in [0, M^2]; its mean is within tail2 of Var(Z), its variance <= E[Z^4] - (..)^2.
        tail2 = dlap_tail_second_moment(b, big_m + 1)
        spread = dlap_fourth_moment(b) - (variance - tail2) ** 2
        width = bernstein_half_width(n, spread, float(big_m) ** 2, FAIL_BERNSTEIN) + tail2
        empirical = float(np.mean(z * z))
        assert abs(empirical - variance) <= width, (
            f"{m.label}: empirical variance {empirical:.6g}, discrete Laplace({b:.6g}) has {variance:.6g} "
            f"(+-{width:.3g} at 2e-7)"
        )
        # Unbiased: on A, Z = clamp(Z, -M, M), symmetric with mean 0, variance <= Var(Z), |Z| <= M.
        mean_width = bernstein_half_width(n, variance, float(big_m), FAIL_BERNSTEIN)
        assert abs(float(np.mean(z))) <= mean_width, f"{m.label}: mean noise {np.mean(z):.4g} (+-{mean_width:.3g})"
        # The check has power: a scale 10% off would move the variance by ~21%, outside the band.
        assert width < 0.2 * variance
