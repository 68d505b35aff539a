"""Qrlew (pyqrlew) on a workload: ``python runner_qrlew.py JOB OUT``.

Runs in its own virtual environment (bench/peers/requirements-qrlew.txt) against the throwaway PostgreSQL
the orchestrator loaded with the workload (``job["pg_url"]``): Qrlew rewrites each query into a DP query,
which PostgreSQL runs (the noise comes from PostgreSQL's ``random()`` in Qrlew's SQL). Configured from the
workload: the privacy unit as Qrlew's foreign-key paths to the person table, the value bounds as ranges,
public key domains as possible values, ``max_multiplicity`` = the largest rows-per-person bound among the
query's tables, and the query's total (epsilon, delta).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, Workload

SCHEMA = "public"


def privacy_unit(workload: Workload) -> list[tuple[str, list[tuple[str, str, str]], str]]:
    """Qrlew's privacy unit: for each private table, the foreign-key path to the person table's key."""
    unit = []
    for table in workload.tables:
        if table.public:
            continue
        if table.name == workload.unit_table:
            unit.append((table.name, [], workload.unit_key))
            continue
        path = [*table.path]
        last = workload.tables[[t.name for t in workload.tables].index(path[-1][1])] if path else table
        assert last.unit is not None
        path.append((last.unit, workload.unit_table, workload.unit_key))
        unit.append((table.name, path, workload.unit_key))
    return unit


def run(job: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd
    import sqlalchemy as sa
    from pyqrlew import Dataset

    workload: Workload = replace(WORKLOADS[job["workload"]], data_dir=job["data_dir"])
    engine = sa.create_engine(job["pg_url"].replace("postgresql://", "postgresql+pg8000://"))
    dataset = Dataset.from_database(workload.name, engine, SCHEMA)
    for table in workload.tables:
        for column in table.columns:
            if column.bounds is not None:
                dataset = dataset.with_range(SCHEMA, table.name, column.name, *map(float, column.bounds))
            elif column.public_values is not None and column.type == "str":
                dataset = dataset.with_possible_values(SCHEMA, table.name, column.name, column.public_values)
    unit = privacy_unit(workload)
    out: dict[str, Any] = {}
    for query in workload.queries:
        k = max(t.k for t in workload.tables if f" {t.name}" in query.sql)
        try:
            relation = dataset.relation(query.sql)
            trials, wall = [], []
            for _ in range(job["trials"]):
                start = time.perf_counter()
                dp = relation.rewrite_with_differential_privacy(
                    dataset, unit, {"epsilon": job["epsilon"], "delta": job["delta"]}, max_multiplicity=float(k)
                )
                with engine.connect() as connection:
                    frame = pd.read_sql(sa.text(dp.relation().to_query()), connection)
                wall.append(time.perf_counter() - start)
                trials.append({"columns": list(frame.columns), "rows": frame.astype(object).values.tolist()})
            out[query.id] = {"trials": trials, "epsilon": job["epsilon"], "seconds": sorted(wall)[len(wall) // 2]}
        except BaseException as error:  # a refusal (Qrlew's Rust panics are BaseExceptions): its own message
            out[query.id] = {"refused": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return out


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(job), default=str))
