"""The budget split that minimises the expected error (passes/split.py): closed form, data independence,
total charge, and a seeded simulation showing it beats equal shares for AVG and VARIANCE.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import opendp.prelude as dp
import pandas as pd
import pytest
from helpers import make_gateway

from dpgateway import Gateway
from dpgateway.mechanisms import laplace_scale
from dpgateway.plan import DPPlan, Measurement

K = 2
LO, HI = 0.0, 100.0
VECTOR_SPACE = (dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"))
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "g": {"type": "int", "public_values": [1, 2, 3]},
        "h": {"type": "int"},  # private key
        "x": {"type": "float", "bounds": [LO, HI]},
        "y": {"type": "int", "bounds": [-5, 20]},
    },
}
QUERIES = (
    "SELECT AVG(x) AS a FROM t",
    "SELECT VAR_POP(x) AS v FROM t",
    "SELECT g, COUNT(*) AS n, SUM(y) AS s, AVG(x) AS a, STDDEV(y) AS sd FROM t GROUP BY g",
    "SELECT h, AVG(x) AS a FROM t GROUP BY h",
    "SELECT AVG(x) AS a, MEDIAN(y) AS m, COUNT(DISTINCT pid) AS people FROM t",
    "SELECT g, SUM(x) AS s FROM t GROUP BY g HAVING COUNT(*) > 3",
)


def _data(seed: int, people: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = people * K
    return pd.DataFrame(
        {
            "pid": np.repeat(np.arange(people), K),
            "g": rng.integers(1, 4, rows),
            "h": rng.integers(0, 3, rows),
            "x": rng.uniform(LO, HI, rows).round(3),
            "y": rng.integers(-5, 21, rows),
        }
    )


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways, same policy, different data (one skewed to the top of the bounds)."""
    skewed = _data(2)
    skewed["x"] = (HI - (skewed["x"] - LO) / 10).round(3)
    with (
        make_gateway(tmp_path_factory.mktemp("a"), _data(1), POLICY) as first,
        make_gateway(tmp_path_factory.mktemp("b"), skewed, POLICY) as second,
    ):
        yield first, second


def _plan(gw: Gateway, sql: str, epsilon: float = 1.0, delta: float = 1e-6) -> DPPlan:
    plan = gw.explain(sql, epsilon=epsilon, delta=delta).plan
    assert plan is not None
    return plan


def _by_kind(plan: DPPlan) -> dict[str, Measurement]:
    return {("sum2" if m.squared else m.kind): m for m in plan.measurements}


@pytest.mark.parametrize("sql", QUERIES)
def test_split_depends_on_the_plan_only(gateways: tuple[Gateway, Gateway], sql: str) -> None:
    """The same query over different data gets the same shares, scales and thresholds (nothing data-dependent)."""
    first, second = gateways
    a, b = _plan(first, sql), _plan(second, sql)
    shape = [(m.name, m.epsilon, m.noise_scale, m.threshold, m.mechanism, m.rho) for m in a.measurements]
    assert shape == [(m.name, m.epsilon, m.noise_scale, m.threshold, m.mechanism, m.rho) for m in b.measurements]
    assert (a.zcdp_epsilon, a.delta) == (b.zcdp_epsilon, b.delta)


@pytest.mark.parametrize("sql", QUERIES)
@pytest.mark.parametrize("epsilon", [0.1, 1.0, 1 / 3, 7.5])
def test_total_charge_is_the_epsilon_asked(gateways: tuple[Gateway, Gateway], sql: str, epsilon: float) -> None:
    """Each Laplace measurement is charged OpenDP's map at its own scale, and the charges sum to (at most, and
    within 1e-9 of) the epsilon asked: sequential composition, nothing wasted."""
    plan = _plan(gateways[0], sql, epsilon)
    for m in plan.measurements:
        if m.kind == "quantile" or m.mechanism != "laplace":
            continue
        opendp_cost = dp.m.make_laplace(*VECTOR_SPACE, scale=m.noise_scale).map(m.sensitivity)
        if m.threshold is None:
            assert m.epsilon == opendp_cost
    assert plan.spent_epsilon <= epsilon
    assert plan.spent_epsilon >= epsilon * (1 - 1e-9)


def test_avg_split_is_the_closed_form(gateways: tuple[Gateway, Gateway]) -> None:
    """AVG over [lo, hi]: eps_sum / eps_count = (w_S r_S^2 / (w_N r_N^2))^(1/3) = (h^2 / (h^2 / 3))^(1/3) = 3^(1/3)."""
    plan = _plan(gateways[0], "SELECT AVG(x) AS a FROM t")
    parts = _by_kind(plan)
    assert parts["sum"].epsilon / parts["count"].epsilon == pytest.approx(3 ** (1 / 3), rel=1e-6)


def test_variance_split_is_the_closed_form(gateways: tuple[Gateway, Gateway]) -> None:
    """VAR: eps proportional to (w_i r_i^2)^(1/3) = (9 k^2, 12 k^2, 0.8 k^2)^(1/3) for the squares, sum, count."""
    plan = _plan(gateways[0], "SELECT VAR_POP(x) AS v FROM t")
    parts = _by_kind(plan)
    total = sum(c ** (1 / 3) for c in (9, 12, 0.8))
    for kind, c in (("sum2", 9), ("sum", 12), ("count", 0.8)):
        # the real-unit sensitivities round up to the fixed-point grid: equal to 1e-6
        assert parts[kind].epsilon == pytest.approx(c ** (1 / 3) / total, rel=1e-5)


# -- simulation: the expected error of the new split against equal shares ----------------------------------


def _dlap(rng: np.random.Generator, scale: float, size: int) -> np.ndarray:
    """Discrete Laplace of ``scale``: the difference of two geometric variables with p = 1 - exp(-1/scale)."""
    p = -math.expm1(-1 / scale)
    return (rng.geometric(p, size) - rng.geometric(p, size)).astype(np.float64)


def _relative_errors(
    plan: DPPlan, scales: dict[str, float], rng: np.random.Generator, trials: int, people: int
) -> np.ndarray:
    """Squared relative error of the released AVG or VAR_POP per trial, each trial a fresh dataset from the prior
    (its mean uniform over the bounds, spread up to the bounds' width) and fresh noise at ``scales``."""
    kinds = _by_kind(plan)
    mid, half = (LO + HI) / 2, (HI - LO) / 2
    n = K * people
    means = rng.uniform(LO, HI, trials)
    spreads = rng.uniform(0.05, 0.5, trials) * (HI - LO)
    values = np.clip(means[:, None] + spreads[:, None] * rng.standard_normal((trials, n)), LO, HI)
    centred = values - mid
    noisy: dict[str, np.ndarray] = {}
    exact = {"count": np.full(trials, float(n)), "sum": centred.sum(1), "sum2": (centred**2).sum(1)}
    for kind, m in kinds.items():
        noisy[kind] = exact[kind] + _dlap(rng, scales[m.name], trials) / m.scale
    count = np.maximum(noisy["count"], 1.0)
    if "sum2" in kinds:  # VAR_POP, as passes/aggregates.py releases it
        truth = values.var(1)
        released = np.clip(noisy["sum2"] / count - (noisy["sum"] / count) ** 2, 0, half * half)
    else:
        truth = values.mean(1)
        released = np.clip(mid + noisy["sum"] / count, LO, HI)
    return ((released - truth) / truth) ** 2


@pytest.mark.parametrize("sql", ["SELECT AVG(x) AS a FROM t", "SELECT VAR_POP(x) AS v FROM t"])
def test_split_beats_equal_shares_for_avg_and_variance(gateways: tuple[Gateway, Gateway], sql: str) -> None:
    """Seeded simulation, 20,000 datasets from the prior of passes/split.py, each noised once with the planned
    scales and once with equal shares (the split before): the mean squared relative error is lower with the
    planned split. Paired one-sided z-test at confidence 99.9% (z = 3.09; 20,000 pairs, so the normal
    approximation of the mean difference is sound); the gain is reported in the assertion message.
    """
    plan = _plan(gateways[0], sql, epsilon=1.0)
    people, trials = 40, 20_000
    planned = {m.name: m.noise_scale for m in plan.measurements}
    equal = {m.name: laplace_scale(m.sensitivity, 1.0 / len(plan.measurements))[0] for m in plan.measurements}
    assert planned != equal
    new = _relative_errors(plan, planned, np.random.default_rng(17), trials, people)
    old = _relative_errors(plan, equal, np.random.default_rng(17), trials, people)  # same datasets
    diff = old - new
    z = float(diff.mean()) / (float(diff.std(ddof=1)) / math.sqrt(trials))
    gain = 1 - float(new.mean()) / float(old.mean())
    assert z > 3.09, f"{sql}: planned split MSE {new.mean():.4g} vs equal {old.mean():.4g} (z = {z:.2f})"
    assert gain > 0.02, f"{sql}: only {gain:.1%} lower mean squared relative error"


def test_pums_avg_age_split_beats_equal_shares(tmp_path: Path) -> None:
    """The same comparison on SmartNoise's PUMS_dup ages (a fixed dataset, noise only), 99.9% one-sided."""
    shared = Path(os.environ.get("DPGATEWAY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    source = shared / "pums" / "PUMS_dup.csv"  # the shared data beside the repository, as tests/test_compare.py
    if not source.exists():
        pytest.skip("PUMS_dup.csv is not available")
    pums = pd.read_csv(source)
    policy = {
        "privacy_unit": "pid",
        "max_rows_per_unit": 3,
        "columns": {"pid": {"type": "int"}, "age": {"type": "int", "bounds": [0, 100]}},
    }
    with make_gateway(tmp_path, pums[["pid", "age"]], policy) as gw:
        plan = _plan(gw, "SELECT AVG(age) AS a FROM t")
    parts = _by_kind(plan)
    rng = np.random.default_rng(3)
    trials = 20_000
    n = float(len(pums))  # every person has at most 3 rows here except 93 with 4: close enough for the check
    centred = float((pums["age"] - 50).sum())
    truth = 50 + centred / n

    def errors(scales: dict[str, float]) -> np.ndarray:
        s = centred + _dlap(rng, scales[parts["sum"].name], trials) / parts["sum"].scale
        c = n + _dlap(rng, scales[parts["count"].name], trials) / parts["count"].scale
        return (np.clip(50 + s / np.maximum(c, 1), 0, 100) - truth) ** 2

    new = errors({m.name: m.noise_scale for m in plan.measurements})
    old = errors({m.name: laplace_scale(m.sensitivity, 0.5)[0] for m in plan.measurements})
    z = (old.mean() - new.mean()) / math.sqrt(old.var(ddof=1) / trials + new.var(ddof=1) / trials)
    assert z > 3.09, f"planned {new.mean():.4g} vs equal {old.mean():.4g} (z = {z:.2f})"
