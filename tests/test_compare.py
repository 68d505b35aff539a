"""The peer comparison (bench/compare.py): its error metric and the dpgateway side on the PUMS workload.

The peers themselves run in their own environments only when the benchmark is run; here the parts that
decide the figures are checked: the metric (missing cells count as 100%, each cell capped at 100%), the
policy every system is configured from, and dpgateway answering the workload at the requested total ε.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

COMPARE = Path(__file__).parents[1] / "bench" / "compare.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


compare = _load()


def test_missing_cells_count_as_wrong_and_errors_are_capped() -> None:
    exact = [["a", 100], ["b", 10], ["c", 0]]
    assert compare.relative_error([["a", 110], ["b", 10]], exact, 1) == pytest.approx(0.05)
    assert compare.relative_error([["a", 110]], exact, 1) == pytest.approx((0.1 + 1.0) / 2)  # b suppressed
    assert compare.relative_error([["a", 1000], ["b", 10]], exact, 1) == pytest.approx(0.5)  # capped at 1
    assert compare.relative_error([[1.0, 5]], [[1, 4]], 1) == pytest.approx(0.25)  # keys compared as text
    assert math.isnan(compare.relative_error([], [["c", 0]], 1))


def test_dpgateway_answers_the_pums_workload_at_the_requested_epsilon() -> None:
    pums = compare.WORKLOADS["pums"]
    data = Path(__file__).parents[2] / "shared" / "data" / "pums"
    if not (data / "PUMS_dup.csv").is_file():
        pytest.skip("the shared PUMS data is not beside the repository")
    workload = compare.dataclasses.replace(pums, data_dir=str(data))
    job = {"epsilon": 1.0, "delta": 1e-5, "trials": 2}
    out = compare.run_ours(workload, job)
    assert set(out) == {q.id for q in pums.queries}
    by_sex = out["by_sex"]
    assert by_sex["epsilon"] == pytest.approx(1.0) and len(by_sex["trials"]) == 2
    exact = compare.exact_answers(workload)
    summary = compare.summarize(pums.queries[4], by_sex, exact["by_sex"])
    assert 0 <= summary["error"] < 0.2  # k = 3 keeps ~95% of the rows; the noise at ε = 1 is a few rows
