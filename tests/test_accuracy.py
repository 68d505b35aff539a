"""Accuracy against SmartNoise SQL on its own PUMS_dup data (issue 2 acceptance).

The comparison, its queries and SmartNoise's figures (parsed from SMARTNOISE_BASELINE.md) live in
``bench/accuracy.py``, which also writes docs/accuracy.md. Here: median over 15 trials of the mean relative
error over matched cells, against DuckDB on the raw rows, must be no worse than SmartNoise's for the same
query. Checked at equal total epsilon (SmartNoise's ``epsilon=1`` charges 2 for a person-level COUNT and 3
for AVG), and for COUNT and SUM also at our total epsilon 1.

AVG(income) by sex at total epsilon 1 (a third of what SmartNoise spent) is on a par with SmartNoise
(about 7% each, see docs/accuracy.md) and is not asserted: it would fail about half the time. Every
asserted case has an expected error at least 3x below SmartNoise's figure, so a false failure needs most
of the 15 trials to come out several standard deviations high.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dpgateway import Gateway

BENCH = Path(__file__).parents[1] / "bench" / "accuracy.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
TRIALS = 15

if not bench.DATA.is_file():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"{bench.DATA} is missing: CI must clone the shared data beside the repository")
    pytest.skip(f"the shared PUMS data is not beside the repository ({bench.DATA})", allow_module_level=True)

SEX_COUNT, _SEX_SUM, SEX_AVG, EDUC_COUNT, *_ = bench.CORE
ALL_COUNT, ALL_SUM, *_ = bench.OTHERS
# (query, educ declared public?, compare at our total epsilon 1 as well as at SmartNoise's total)
CASES = [
    (SEX_COUNT, False, True),
    (EDUC_COUNT, False, True),
    (EDUC_COUNT, True, True),
    (SEX_AVG, False, False),
    (ALL_COUNT, False, True),
    (ALL_SUM, False, True),
]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, Gateway]]:
    opened = {p: bench.open_gateway(tmp_path_factory.mktemp(f"pums{int(p)}"), educ_public=p) for p in (False, True)}
    yield opened
    for gw in opened.values():
        gw.close()


def _cases() -> list[Any]:
    params = []
    for query, educ_public, at_one in CASES:
        label = query.sql.split(" FROM")[0] + (" [educ public]" if educ_public else "")
        epsilons = ["smartnoise", 1.0] if at_one else ["smartnoise"]
        params += [pytest.param(query, educ_public, eps, id=f"{label} @ {eps}") for eps in epsilons]
    return params


@pytest.mark.slow
@pytest.mark.parametrize(("query", "educ_public", "epsilon"), _cases())
def test_no_worse_than_smartnoise(
    gateways: dict[bool, Gateway], query: Any, educ_public: bool, epsilon: float | str
) -> None:
    baseline = bench.smartnoise_baseline()[query.sql]
    eps = baseline.epsilon if epsilon == "smartnoise" else epsilon
    gw = gateways[educ_public]
    errors, spent = bench.trial_errors(lambda sql: gw.query(sql, epsilon=eps, delta=bench.DELTA), query, TRIALS)
    assert spent <= eps
    ours = statistics.median(errors)
    assert ours <= baseline.error, (
        f"{query.sql} at total epsilon {eps:g}: median relative error {ours:.1%} vs SmartNoise's "
        f"{baseline.error:.1%} at total epsilon {baseline.epsilon:g}"
    )


def test_baseline_covers_the_compared_queries() -> None:
    """The parser finds SmartNoise's figure for every compared query (a renamed query would fail here)."""
    baseline = bench.smartnoise_baseline()
    for query, _, _ in CASES:
        assert baseline[query.sql].epsilon >= 1 and 0 < baseline[query.sql].error < 1


def test_relative_error_matches_cells_by_key() -> None:
    released = [{"k": 1, "v": 110.0}, {"k": 2, "v": 50.0}, {"k": 9, "v": 1.0}]
    exact = [{"k": 1, "v": 100}, {"k": 2, "v": 40}, {"k": 3, "v": 7}]
    assert bench.relative_error(released, exact, ["k"]) == pytest.approx((0.1 + 0.25) / 2)
