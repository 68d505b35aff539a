"""SmartNoise SQL on a workload, at a given total epsilon per query: ``python runner_smartnoise.py JOB OUT``.

Runs in its own virtual environment (bench/peers/requirements-smartnoise.txt). SmartNoise's ``epsilon``
setting applies per noisy measurement, so its odometer charges a multiple of it for one query; the runner
reads that multiple with ``get_privacy_cost`` and sets ``epsilon = total / multiple`` so that every system
spends the same total epsilon on the query. Each table is configured from the workload: ``max_ids`` = the
workload's rows per person, the same value bounds; group keys are strings (SmartNoise's categorical type),
and ``censor_dims`` is off where the workload declares the key domains public (SmartNoise then releases every
group present in the data, the closest it comes to a public domain; with it on, it would drop small groups
through partition selection and be scored on fewer, larger cells than the other systems).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, Table, Workload, csv_path

SCHEMA = "S"


def metadata(table: Table) -> dict[str, Any]:
    # Group keys with a public domain in the workload: SmartNoise's way to say so is censor_dims off
    public_keys = any(c.public_values is not None for c in table.columns)
    meta: dict[str, Any] = {"max_ids": table.k, "row_privacy": False, "censor_dims": not public_keys}
    for column in table.columns:
        if column.name == table.unit:
            meta[column.name] = {"type": "int", "private_id": True}
        elif column.bounds is not None:
            lo, hi = column.bounds
            meta[column.name] = {"type": "float" if column.type == "float" else "int", "lower": lo, "upper": hi}
        else:  # group keys and other columns: SmartNoise's categorical type
            meta[column.name] = {"type": "string"}
    return meta


def run(job: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd
    import snsql
    from snsql import Privacy

    workload: Workload = replace(WORKLOADS[job["workload"]], data_dir=job["data_dir"])
    out: dict[str, Any] = {}
    for query in workload.queries:
        names = {m.lower() for m in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", query.sql, re.IGNORECASE)}
        if len(names) != 1 or "JOIN" in query.sql.upper():
            out[query.id] = {"refused": "one table per query (SmartNoise SQL has no joins)"}
            continue
        table = next((t for t in workload.tables if t.name in names), None)
        if table is None:
            out[query.id] = {"refused": "a query over a subquery (SmartNoise SQL reads tables)"}
            continue
        if table.path:
            out[query.id] = {"refused": "the privacy unit is reached through a foreign key (not expressible)"}
            continue
        frame = pd.read_csv(csv_path(workload, table.name))
        meta = {"": {SCHEMA: {table.name: metadata(table)}}}
        # SmartNoise spells the sample variance VAR
        sql = query.sql.replace(f" {table.name}", f" {SCHEMA}.{table.name}").replace("VAR_SAMP(", "VAR(")
        try:
            probe = snsql.from_df(frame, privacy=Privacy(epsilon=1.0, delta=job["delta"]), metadata=meta)
            multiple, _ = probe.get_privacy_cost(sql)
            privacy = Privacy(epsilon=job["epsilon"] / multiple, delta=job["delta"])
            trials, spent, wall = [], 0.0, []
            for _ in range(job["trials"]):
                reader = snsql.from_df(frame, privacy=privacy, metadata=meta)
                start = time.perf_counter()
                result = reader.execute(sql)
                wall.append(time.perf_counter() - start)
                spent = reader.odometer.spent[0]
                header, *rows = result
                trials.append({"columns": [str(h) for h in header], "rows": [list(map(_plain, r)) for r in rows]})
            out[query.id] = {"trials": trials, "epsilon": spent, "seconds": sorted(wall)[len(wall) // 2]}
        except Exception as error:  # a refusal: record SmartNoise's own message
            out[query.id] = {"refused": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(job), default=str))
