"""The weighted rewrite's two forms of ``n_u`` give the same exact aggregates.

``SQLHooks.unit_count_by_join`` picks how each row learns its unit's row count: a
``COUNT(*) OVER (PARTITION BY unit)`` window, or a ``GROUP BY unit`` joined back on the unit
(passes/bounding.py, proof note "weighted"). Both are run here on DuckDB on the same Parquet data: persons with
many rows, negative and NULL values, NULL units, integer and text units, filtered (``filter_first`` and
``bound_first``) or not, scalar and grouped, and every exact aggregate must be identical. The conformance
suite (tests/backends/) compares the join form on DuckDB with the window form on PostgreSQL and Spark.
CSV sources keep the window on DuckDB (connectors/duckdb.py: its CSV reader may drop a record with an
unparsable value depending on the plan).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
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


def _write(frame: pd.DataFrame, source: Path) -> None:
    if source.suffix == ".csv":
        frame.to_csv(source, index=False)
        return
    con = duckdb.connect()
    con.register("frame", frame.astype({"pid": "string"}))
    pid = "CAST(pid AS BIGINT)" if "int" in source.stem else "pid"
    con.execute(f"COPY (SELECT {pid} AS pid, age, income, sex FROM frame) TO '{source}' (FORMAT parquet)")
    con.close()


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
    source = tmp_path / f"t_{unit_type}.parquet"
    _write(_frame(seed), source)
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


def test_csv_sources_keep_the_window(tmp_path: Path) -> None:
    """Over a CSV with unparsable values, DuckDB keeps the window form; its answers match the Parquet join form."""
    frame = _frame(0)
    frame["income"] = frame["income"].astype(object)
    frame.loc[frame.index % 17 == 0, "income"] = "oops"  # unparsable: NULL under TRY_CAST, the row stays
    csv, parquet = tmp_path / "t.csv", tmp_path / "t_int.parquet"
    _write(frame, csv)
    _write(frame.assign(income=pd.to_numeric(frame["income"], errors="coerce")), parquet)
    sql = "SELECT sex, SUM(income), COUNT(*), COUNT(income) FROM t GROUP BY sex"
    from_csv = build_plan(sql, epsilon=1.0, delta=0.0, ctx=_ctx(csv, "int", "filter_first", DuckDBHooks()))
    from_parquet = build_plan(sql, epsilon=1.0, delta=0.0, ctx=_ctx(parquet, "int", "filter_first", DuckDBHooks()))
    assert "OVER (PARTITION BY" in from_csv.bounded_sql and "JOIN" not in from_csv.bounded_sql
    assert "JOIN per_unit" in from_parquet.bounded_sql
    assert _exact(from_csv) == _exact(from_parquet)


@pytest.mark.parametrize("filtered", ["filter_first", "bound_first"])
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT sex, SUM(income), COUNT(*), COUNT(income) FROM t GROUP BY sex",
        "SELECT sex, COUNT(*), SUM(income), VAR_POP(income) FROM t WHERE age > 40 OR income < 0 GROUP BY sex",
    ],
)
def test_one_person_with_many_rows_moves_the_join_form_by_at_most_its_sensitivity(
    tmp_path: Path, filtered: str, sql: str
) -> None:
    """The join form over Parquet on D and on D plus one person with 1000 rows (negative and NULL values)."""
    base = _frame(5)
    rng = np.random.default_rng(2)
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "age": pd.array(rng.integers(-10, 120, size=1000), dtype="Int64"),
            "income": rng.uniform(-1e6, 1e6, size=1000),
            "sex": rng.integers(0, 2, size=1000),
        }
    )
    big.loc[rng.random(1000) < 0.2, "income"] = None
    results = []
    for i, frame in enumerate([base, pd.concat([base, big], ignore_index=True)]):
        source = tmp_path / f"d{i}_int.parquet"
        _write(frame, source)
        plan = build_plan(sql, epsilon=1.0, delta=1e-6, ctx=_ctx(source, "int", filtered, DuckDBHooks()))
        assert plan.rewrite == "weighted" and "JOIN per_unit" in plan.bounded_sql
        n_keys = len(plan.group_keys)
        results.append((plan, {row[:n_keys]: row[n_keys:] for row in _exact(plan)}))
    (plan, before), (_, after) = results
    for j, m in enumerate(plan.measurements):
        moved = sum(
            abs((after.get(k, (0,) * 9)[j] or 0) - (before.get(k, (0,) * 9)[j] or 0)) for k in {*before, *after}
        )
        assert 0 < moved <= m.sensitivity, (m.label, moved, m.sensitivity)
