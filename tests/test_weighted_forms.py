"""The weighted rewrite's two forms of ``n_u`` give the same exact aggregates.

``SQLHooks.UNIT_COUNT_BY_JOIN`` picks how each row learns its unit's row count: a
``COUNT(*) OVER (PARTITION BY unit)`` window, or a ``GROUP BY unit`` joined back on the unit
(passes/bounding.py, proof note "weighted"). Both are run here on DuckDB on the same data: persons with
many rows, negative and NULL values, NULL units, integer and text units, filtered (``filter_first`` and
``bound_first``) or not, scalar and grouped, and every exact aggregate must be identical. The conformance
suite (tests/backends/) compares the join form on DuckDB with the window form on PostgreSQL and Spark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpgateway.connectors.duckdb import DuckDBConnector, DuckDBHooks
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.planner import build_plan
from dpgateway.policies.loader import parse_config


class WindowHooks(DuckDBHooks):
    """DuckDB rendering with the window form of ``n_u`` (what PostgreSQL and Spark run)."""

    UNIT_COUNT_BY_JOIN = False


def _frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = np.concatenate([rng.integers(1, 8, size=150), [400, 60, 25]])  # three persons with many rows
    pid = np.repeat(np.arange(len(counts)), counts).astype(object)
    n = len(pid)
    pid[rng.random(n) < 0.03] = None
    frame = pd.DataFrame(
        {
            "pid": pid,
            "age": pd.array(rng.integers(-10, 120, size=n), dtype="Int64"),
            "income": rng.uniform(-2000, 2000, size=n).round(2),
            "sex": rng.integers(0, 2, size=n),
        }
    )
    frame.loc[rng.random(n) < 0.15, "income"] = None
    frame.loc[rng.random(n) < 0.05, "age"] = None
    return frame


def _ctx(source: Path, unit_type: str, filtered: str, hooks: DuckDBHooks) -> PlanContext:
    policy = {
        "tables": {
            "t": {
                "source": str(source),
                "privacy_unit": "pid",
                "max_rows_per_unit": 3,
                "columns": {
                    "pid": {"type": unit_type},
                    "age": {"type": "int", "bounds": [0, 100]},
                    "income": {"type": "float", "bounds": [-500, 1000]},
                    "sex": {"type": "int", "public_values": [0, 1]},
                },
            }
        },
        "budget": {"per_subject": {"epsilon": 1e6, "delta": 0.5}, "per_analyst": {"epsilon": 1e6, "delta": 0.5}},
        "ledger": "sqlite:///:memory:",
        "prepare": {"auto": False, "filtered": filtered},
    }
    return PlanContext(config=parse_config(policy, base_dir=source.parent), hooks=hooks, seed=b"forms")


def _exact(plan: DPPlan) -> list[tuple]:
    assert plan.table is not None and plan.bounded_sql is not None
    with DuckDBConnector(allowed_paths=[plan.table.source]) as con:
        return sorted(con.execute(plan.bounded_sql).rows, key=repr)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("unit_type", ["int", "str"])
@pytest.mark.parametrize("filtered", ["filter_first", "bound_first"])
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(income), COUNT(*), COUNT(income) FROM t",
        "SELECT sex, COUNT(*), SUM(income), AVG(age) FROM t GROUP BY sex",
        "SELECT sex, VAR_POP(income), COUNT(age) FROM t WHERE age > 40 OR income < 0 GROUP BY sex",
        "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, COUNT(*), SUM(income) FROM t "
        "WHERE income BETWEEN -300 AND 900 GROUP BY 1",
        "SELECT SUM(income), COUNT(*) FROM t WHERE sex = 1",
    ],
)
def test_join_and_window_forms_give_identical_aggregates(
    tmp_path: Path, seed: int, unit_type: str, filtered: str, sql: str
) -> None:
    source = tmp_path / "t.csv"
    _frame(seed).to_csv(source, index=False)
    plans = []
    for hooks in (DuckDBHooks(), WindowHooks()):
        plan = build_plan(sql, epsilon=1.0, delta=1e-6, ctx=_ctx(source, unit_type, filtered, hooks))
        plans.append(plan)
    join, window = plans
    if join.rewrite != "weighted":  # filter_first scalar queries pre-aggregate per unit (unit_weighted)
        assert join.rewrite == window.rewrite and join.bounded_sql == window.bounded_sql
        return
    assert "JOIN per_unit" in join.bounded_sql and "OVER" not in join.bounded_sql
    assert "OVER (PARTITION BY" in window.bounded_sql and "JOIN" not in window.bounded_sql
    got, expected = _exact(join), _exact(window)
    assert got == expected
    assert any(v not in (None, 0) for row in got for v in row)  # the comparison is not vacuous
