"""Discrete Gaussian noise under zCDP where the query allows a delta and it is more accurate (passes/budget.py).

Costs are OpenDP's maps (the Gaussian's rho, its zCDP -> (epsilon, delta) conversion); the mechanism is chosen
by expected error; the released noise has the planned scale. OpenDP cannot be seeded, so every statistical
assertion states its false-failure probability (derived below each test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import opendp.prelude as dp
import pandas as pd
import pytest
from helpers import bernstein_half_width, chi_square, dlap_variance, exact_by_group, make_gateway

from dpgateway import Gateway
from dpgateway.errors import ConfigError
from dpgateway.mechanisms import (
    gaussian_half_width,
    gaussian_rho_upper,
    gaussian_scale,
    noisy_vector,
    zcdp_budget,
    zcdp_to_approx,
)
from dpgateway.passes.budget import gaussian_plan, split_budget
from dpgateway.passes.split import error_weights
from dpgateway.plan import DPPlan

L2_SPACE = (dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64"))
K = 2
GROUPS = 100
COLUMNS = [f"x{i}" for i in range(16)]
WIDE = "SELECT g, " + ", ".join(f"SUM({c}) AS s{i}" for i, c in enumerate(COLUMNS)) + " FROM t GROUP BY g"
EPSILON, DELTA = 1.0, 1e-5
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "g": {"type": "int", "public_values": list(range(GROUPS))},
        "h": {"type": "int"},  # a private key
        **{c: {"type": "int", "bounds": [-10, 10]} for c in COLUMNS},
    },
}


def _data(seed: int, per_group: int = 5) -> pd.DataFrame:
    """Every person has exactly k rows in one group, so bounding keeps every row (weights are 1)."""
    rng = np.random.default_rng(seed)
    people = GROUPS * per_group
    frame = {"pid": np.repeat(np.arange(people), K), "g": np.repeat(np.arange(people) % GROUPS, K)}
    frame["h"] = frame["g"] % 3
    for c in COLUMNS:
        frame[c] = rng.integers(-10, 11, people * K)
    return pd.DataFrame(frame)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with make_gateway(tmp_path_factory.mktemp("gauss"), _data(7), POLICY, replay="off") as gateway:
        yield gateway


def _plan(gw: Gateway, sql: str = WIDE, epsilon: float = EPSILON, delta: float = DELTA) -> DPPlan:
    plan = gw.explain(sql, epsilon=epsilon, delta=delta).plan
    assert plan is not None
    return plan


# -- OpenDP: costs and conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("sensitivity", [1, 3, 2_000_000, 10**12])
@pytest.mark.parametrize("rho", [1e-4, 0.0306, 0.5, 7.0])
def test_gaussian_cost_never_exceeds_request(sensitivity: int, rho: float) -> None:
    scale, cost = gaussian_scale(sensitivity, rho)
    assert dp.m.make_gaussian(*L2_SPACE, scale=scale).map(sensitivity) == cost <= rho
    assert scale == pytest.approx(sensitivity / math.sqrt(2 * rho), rel=1e-12)


@pytest.mark.parametrize("delta", [1e-9, 1e-5, 1e-3])
@pytest.mark.parametrize("scale", [3.0, 41.5, 2.5e6])
def test_conversion_is_opendp_chain_on_the_releasing_measurement(scale: float, delta: float) -> None:
    """For one Gaussian, the debit from its rho equals OpenDP's chain on the very measurement that releases."""
    sensitivity = 7
    gauss = dp.m.make_gaussian(*L2_SPACE, scale=scale)
    chained = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(gauss), delta).map(sensitivity)
    ours = zcdp_to_approx(gauss.map(sensitivity), delta)
    assert ours[1] == chained[1] == delta
    assert ours[0] >= chained[0]
    assert ours[0] == pytest.approx(chained[0], rel=1e-9)


def test_composition_adds_rho() -> None:
    """Summing the measurements' rho is what OpenDP's make_composition does under zCDP."""
    parts = [dp.m.make_gaussian(*L2_SPACE, scale=s) for s in (3.0, 11.0, 250.0)]
    assert dp.c.make_composition(parts).map(5) == pytest.approx(sum(p.map(5) for p in parts), rel=1e-12)


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-5), (0.1, 1e-7), (3.0, 1e-6), (10.0, 1e-9)])
def test_zcdp_budget_is_tight(epsilon: float, delta: float) -> None:
    """The largest rho whose conversion fits: it fits, and 0.1% more would not."""
    rho = zcdp_budget(epsilon, delta)
    assert zcdp_to_approx(rho, delta)[0] <= epsilon
    assert zcdp_to_approx(rho * 1.001, delta)[0] > epsilon
    assert rho <= gaussian_rho_upper(epsilon, delta)


@pytest.mark.parametrize("scale", [0.4, 1.0, 2.5, 10.0, 37.2])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_gaussian_half_width_matches_the_pmf(scale: float, confidence: float) -> None:
    """P(|Z| > w) <= 1 - confidence, and w is the smallest such integer (exact sums over the pmf)."""
    xs = np.arange(-4000, 4001)
    pmf = np.exp(-(xs.astype(np.float64) ** 2) / (2 * scale * scale))
    pmf /= pmf.sum()
    w = gaussian_half_width(scale, confidence)

    def beyond(t: int) -> float:
        return float(pmf[np.abs(xs) > t].sum())

    assert beyond(w) <= 1 - confidence
    assert w == 0 or beyond(w - 1) > 1 - confidence


def test_gaussian_samples_follow_the_pmf() -> None:
    """200,000 draws of OpenDP's discrete Gaussian (scale 2.5) against its pmf: chi-square at alpha 1e-6."""
    scale = 2.5
    samples = noisy_vector([0] * 200_000, scale, "gaussian")
    support = range(-40, 41)
    weights = {z: math.exp(-z * z / (2 * scale * scale)) for z in support}
    total = sum(weights.values())
    statistic, critical = chi_square(samples, {z: w / total for z, w in weights.items()})
    assert statistic <= critical, f"chi-square {statistic:.1f} above its 1e-6 critical value {critical:.1f}"


# -- choosing the mechanism --------------------------------------------------------------------------------


def _weighted_error(plan: DPPlan) -> float:
    """sum_i w_i Var_i (real units), computed here from each measurement's mechanism and scale."""
    noisy = [m for m in plan.measurements if m.kind != "quantile"]
    weights = error_weights(plan, noisy)
    return math.fsum(
        weights[m.name]
        * ((m.noise_scale**2) if m.mechanism == "gaussian" else dlap_variance(m.noise_scale))
        / m.scale**2
        for m in noisy
    )


def test_many_measurements_take_the_gaussian(gw: Gateway) -> None:
    plan = _plan(gw)
    assert {m.mechanism for m in plan.measurements} == {"gaussian"}
    laplace = _plan(gw, delta=0.0)
    assert {m.mechanism for m in laplace.measurements} == {"laplace"}
    assert _weighted_error(plan) < _weighted_error(laplace)
    explained = gw.explain(WIDE, epsilon=EPSILON, delta=DELTA)
    assert all(m.mechanism.startswith("discrete Gaussian (zCDP rho") for m in explained.mechanisms)
    assert (explained.epsilon, explained.delta) == (plan.spent_epsilon, DELTA)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(x0) AS s FROM t",
        "SELECT g, COUNT(*) AS n FROM t GROUP BY g",
        "SELECT AVG(x0) AS a, SUM(x1) AS b FROM t",
    ],
)
def test_few_measurements_keep_laplace(gw: Gateway, sql: str) -> None:
    """At epsilon 1 and delta 1e-5 the Gaussian's rho (about 0.03) costs more than Laplace on a few measurements."""
    plan = _plan(gw, sql)
    assert {m.mechanism for m in plan.measurements} == {"laplace"}
    assert plan.delta == 0.0  # public keys and Laplace: nothing spends delta


def test_the_choice_is_the_smaller_expected_error(gw: Gateway) -> None:
    """Across query widths the chosen mechanism is the one with the smaller weighted variance of the two."""
    seen: set[str] = set()
    for width in (1, 4, 8, 12, 16):
        sql = "SELECT " + ", ".join(f"SUM({c}) AS s{i}" for i, c in enumerate(COLUMNS[:width])) + " FROM t"
        plan, laplace = _plan(gw, sql), _plan(gw, sql, delta=0.0)
        chosen = {m.mechanism for m in plan.measurements}
        assert len(chosen) == 1
        if chosen == {"gaussian"}:
            assert _weighted_error(plan) < _weighted_error(laplace)
        else:  # the Gaussian alternative, planned as the pass would, is no better
            noisy = list(plan.measurements)
            weights = error_weights(plan, noisy)
            real = {m.name: m.sensitivity / m.scale for m in noisy}
            alternative = gaussian_plan(noisy, weights, real, EPSILON, DELTA)
            assert alternative is not None
            assert _weighted_error(plan.with_(measurements=tuple(alternative[0]))) >= _weighted_error(plan)
        seen.add(chosen.pop())
    assert seen == {"laplace", "gaussian"}  # the widths cover both choices


def test_private_keys_keep_laplace(gw: Gateway) -> None:
    """Partition selection spends the delta: Laplace, whatever the width."""
    sql = WIDE.replace("SELECT g,", "SELECT h,").replace("GROUP BY g", "GROUP BY h")
    plan = _plan(gw, sql)
    assert plan.selects_partitions
    assert {m.mechanism for m in plan.measurements} == {"laplace"}


@pytest.mark.parametrize(("executor", "allowed"), [("mpc", ()), ("plain", ("mpc",))])
def test_tables_mpc_may_run_keep_laplace(gw: Gateway, executor: str, allowed: tuple[str, ...]) -> None:
    """mpc parties add discrete Laplace themselves: a table that may run there is planned with Laplace."""
    plan = _plan(gw)
    assert plan.table is not None
    table = replace(plan.table, executor=executor, executors_allowed=allowed)
    replanned = split_budget(plan.with_(table=table, zcdp_rho=0.0, zcdp_epsilon=0.0), ctx=gw._context())
    assert {m.mechanism for m in replanned.measurements} == {"laplace"}
    assert replanned.delta == 0.0


# -- accounting and the released noise ---------------------------------------------------------------------


def test_debit_is_the_opendp_map(gw: Gateway) -> None:
    """The ledger debits OpenDP's (epsilon, delta) of the composed Gaussians, at most what was asked."""
    plan = _plan(gw)
    sensitivities = {m.sensitivity for m in plan.measurements}
    assert len(sensitivities) == 1  # equal bounds: one d_in, so OpenDP can compose the releasing measurements
    (d_in,) = sensitivities
    composed = dp.c.make_composition([dp.m.make_gaussian(*L2_SPACE, scale=m.noise_scale) for m in plan.measurements])
    for m in plan.measurements:
        assert m.rho == dp.m.make_gaussian(*L2_SPACE, scale=m.noise_scale).map(d_in)
    chained = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(composed), DELTA).map(d_in)
    assert plan.zcdp_rho == pytest.approx(composed.map(d_in), rel=1e-12)
    assert plan.zcdp_epsilon == pytest.approx(chained[0], rel=1e-8)
    assert chained[0] <= plan.zcdp_epsilon <= EPSILON
    assert plan.zcdp_epsilon >= EPSILON * (1 - 1e-3)  # the search leaves at most 0.1% unspent
    before = gw.store.remaining("ledger-check", ["table:t"])
    result = gw.query(WIDE, analyst="ledger-check", epsilon=EPSILON, delta=DELTA)
    assert (result.epsilon, result.delta) == (plan.zcdp_epsilon, DELTA)
    charge = gw.store.history("analyst:ledger-check")[-1]
    assert (charge.epsilon, charge.delta, charge.state) == (plan.zcdp_epsilon, DELTA, "committed")
    after = result.remaining["analyst"]
    assert after["epsilon"] == pytest.approx(before.as_dict()["analyst"]["epsilon"] - plan.zcdp_epsilon)


FAIL = 1e-7  # per bound below; five bounds, so the test fails by chance with probability below 1e-6
QUERIES = 20  # 20 queries x 100 groups x 16 measurements = 32,000 draws


@pytest.mark.slow
def test_released_noise_has_the_claimed_gaussian_scale(gw: Gateway) -> None:
    """(released - exact) / sigma over 32,000 draws: mean 0, variance 1 and P(|Z| > 1.96 sigma) = 0.05.

    For sigma in the millions (fixed-point sums) the discrete Gaussian's moments equal the continuous ones up
    to exp(-2 pi^2 sigma^2) (Poisson summation; Canonne, Kamath, Steinke 2020, Sec. 2), and it is
    sub-Gaussian: P(|Z| >= t) <= 2 exp(-t^2 / (2 sigma^2)). Event A: no |Z| / sigma exceeds M, M chosen so
    that n 2 exp(-M^2 / 2) <= 1e-7. On A, Bernstein bounds the empirical mean (variance 1, radius M), mean
    of Z^2 (variance E Z^4 - 1 = 2, radius M^2) and the tail fraction (a Bernoulli), each at 1e-7. A Laplace
    of the same variance has P(|L| > 1.96 sigma) = 0.063, outside the band: the test tells the two apart.
    """
    plan = _plan(gw)
    assert plan.bounded_sql is not None
    exact = exact_by_group(gw.connector.execute(plan.bounded_sql, plan.settings), 1)
    draws: list[float] = []
    for _ in range(QUERIES):
        frame = gw.query(WIDE, analyst="stats", epsilon=EPSILON, delta=DELTA).frame
        assert len(frame) == GROUPS
        for row in frame.itertuples(index=False):
            for i, m in enumerate(plan.measurements):
                released = round(row[1 + i] * m.scale)
                draws.append((released - exact[(row[0],)][i]) / m.noise_scale)
    z = np.array(draws)
    n = len(z)
    big_m = math.sqrt(2 * math.log(2 * n / FAIL))
    assert np.all(np.abs(z) <= big_m)  # event A (fails with probability <= 1e-7)
    mean_width = bernstein_half_width(n, 1.0, big_m, FAIL)
    assert abs(float(z.mean())) <= mean_width
    var_width = bernstein_half_width(n, 2.0, big_m**2, FAIL)
    assert abs(float((z * z).mean()) - 1.0) <= var_width
    assert var_width < 0.1  # power: a scale 5% off moves the variance by 10%
    tail = float(np.mean(np.abs(z) > 1.959963984540054))
    p = 0.05
    assert abs(tail - p) <= bernstein_half_width(n, p * (1 - p), 1.0, FAIL)
    assert abs(0.0627 - p) > bernstein_half_width(n, p * (1 - p), 1.0, FAIL)


@pytest.mark.parametrize("scale", [1e4, 1.0001e4, 3.7e5, 2.9e7])
@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_large_scale_half_width(scale: float, confidence: float) -> None:
    """Above OpenDP's practical range the bound is used: it agrees with OpenDP's helper at 1e4 (where both
    run) and is the continuous Gaussian's quantile rounded up (at most one unit wider than the pmf's)."""
    from statistics import NormalDist

    quantile = scale * NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    w = gaussian_half_width(scale, confidence)
    assert quantile <= w + 1 and w <= quantile + 2
    if scale == 1e4:
        assert w == math.ceil(dp.discrete_gaussian_scale_to_accuracy(scale, 1 - confidence)) - 1


@pytest.mark.parametrize(
    ("noise", "sql", "expected"),
    [
        ("laplace", WIDE, "laplace"),
        ("gaussian", "SELECT SUM(x0) AS s FROM t", "gaussian"),
        ("auto", "SELECT SUM(x0) AS s FROM t", "laplace"),
    ],
)
def test_budget_noise_setting(tmp_path: Any, noise: str, sql: str, expected: str) -> None:
    """``budget.noise``: laplace keeps pure DP for wide queries; gaussian takes it even where Laplace is better."""
    with make_gateway(tmp_path, _data(3, per_group=1), POLICY, noise=noise) as gateway:
        plan = _plan(gateway, sql)
        assert {m.mechanism for m in plan.measurements} == {expected}
        assert plan.delta == (DELTA if expected == "gaussian" else 0.0)
        assert plan.spent_epsilon <= EPSILON


def test_budget_noise_setting_is_checked(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"budget\.noise: must be one of auto, laplace, gaussian"):
        make_gateway(tmp_path, _data(3, per_group=1), POLICY, noise="normal")
