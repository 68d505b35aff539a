"""``python bench/run.py --only cold``: the cold path alone, as planned now and as planned before session 9.

Per query shape (unfiltered and filtered, bench/run.py's workloads), each repetition times the raw aggregate,
the per-person floor, the DP query as planned now and the DP query as planned before (the same policy without its
``per_unit`` declarations: grouped queries by ``region`` weighted per row, with ``n_u`` joined back, instead of
pre-aggregated per person; the other shapes plan alike in both, so their two columns show the run's noise),
alternating, so the machine's load moves all four alike. Printed only: RESULTS.md and results.json keep the full
run's figures.
"""

from __future__ import annotations

import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table as RichTable
from run import FILTERED, FLOOR_SQL, SHAPES, generate, timed, write_config

from dpgateway import Gateway


def cold_run(rows: int, reps: int) -> dict[str, Any]:
    """``--only cold``: the cold path alone (no copy), unfiltered and filtered, now and as before, with the
    floor; per repetition raw, floor, DP now and DP before alternate (the machine's load moves all four)."""
    source = generate(rows)
    src = f"read_parquet('{source}')"
    floor_sql = FLOOR_SQL.format(src=src)
    out: dict[str, Any] = {"rows": rows}
    floors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = duckdb.connect()
        (Path(tmp) / "before").mkdir()
        with (
            Gateway.from_config(write_config(Path(tmp), source)) as gw,
            Gateway.from_config(write_config(Path(tmp) / "before", source, per_unit=False)) as old,
        ):
            for label, shapes in (("unfiltered", SHAPES), ("filtered", FILTERED)):
                now: dict[str, Any] = {}
                before: dict[str, Any] = {}
                for name, (dp_sql, raw_sql) in shapes.items():
                    raw.execute(raw_sql.format(src=src, n=0)).fetchall()
                    times: dict[str, list[float]] = defaultdict(list)
                    for i in range(reps):
                        n = 1 + i
                        raw_query = raw_sql.format(src=src, n=n)
                        times["raw"].append(timed(lambda q=raw_query: raw.execute(q).fetchall()))
                        times["floor"].append(timed(lambda: raw.execute(floor_sql).fetchall()))
                        sql = dp_sql.format(alias=f"v{label[0]}n{i}", n=n)
                        times["now"].append(timed(lambda s=sql: gw.query(s, analyst="bench", epsilon=1.0)))
                        sql = dp_sql.format(alias=f"v{label[0]}b{i}", n=n + 1000)
                        times["before"].append(timed(lambda s=sql: old.query(s, analyst="bench", epsilon=1.0)))
                    floor = statistics.median(times["floor"])
                    floors.append(floor)
                    for which, into, gateway in (("now", now, gw), ("before", before, old)):
                        plan = gateway.explain(dp_sql.format(alias="v", n=0), epsilon=1.0).plan
                        dp = statistics.median(times[which])
                        into[name] = {
                            "dp_ms": dp,
                            "raw_ms": statistics.median(times["raw"]),
                            "floor_ms": floor,
                            "dp_floor_ratio": dp / floor,
                            "rewrite": plan.rewrite if plan else "",
                        }
                out[label], out[label + " (before)"] = now, before
    out["floor_ms"] = statistics.median(floors)
    for label in ("unfiltered", "filtered", "unfiltered (before)", "filtered (before)"):
        out[f"median_dp_floor {label}"] = statistics.median(v["dp_floor_ratio"] for v in out[label].values())
    return out


def print_cold(results: list[dict[str, Any]]) -> None:
    console = Console(width=160)
    for run in results:
        table = RichTable(title=f"cold path, {run['rows']:,} rows (floor {run['floor_ms']:.0f} ms)")
        columns = ("query", "workload", "raw ms", "DP ms", "DP/floor", "rewrite", "before ms", "before/floor", "before")
        for column in columns:
            table.add_column(column)
        for label in ("unfiltered", "filtered"):
            for name, now in run[label].items():
                before = run[label + " (before)"][name]
                table.add_row(
                    name, label, f"{now['raw_ms']:.1f}", f"{now['dp_ms']:.1f}", f"{now['dp_floor_ratio']:.2f}x",
                    now["rewrite"], f"{before['dp_ms']:.1f}", f"{before['dp_floor_ratio']:.2f}x", before["rewrite"],
                )  # fmt: skip
            table.add_row(
                "median", label, "", "", f"{run[f'median_dp_floor {label}']:.2f}x", "", "",
                f"{run[f'median_dp_floor {label} (before)']:.2f}x", "",
            )  # fmt: skip
        console.print(table)
