"""The he executor's costs: owner encryption, gateway-side aggregation, key holder, end to end vs plain and raw.

    python bench/he.py --rows 100000 --rows 1000000      # about 3 minutes on 2 cores (encryption dominates)
    python bench/he.py --rows 100000 --reps 3

Workload (issue 18): COUNT(*) and SUM(x) with 10 public groups, ``x`` in [0, 100], 1-3 rows per person,
``k = 3``. For each size: the owner's step (``Gateway.prepare`` plus ``cube.encrypt_table``, as
``dpgateway he encrypt people --sum x --group-by g``), the gateway's aggregation (sum of every ciphertext
from the memory map, in batches, plus the rotate-and-sum fold: what the 5 s target is about), and the
median of ``--reps`` end-to-end queries through ``Gateway.query`` on the he table, on the same rows with
the plain executor, and the raw GROUP BY on DuckDB. Writes ``bench/he_results.json`` and prints a
Markdown table. Other benchmarks call :func:`measure` (one size; returns the figures as a dict).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import duckdb

from dpgateway import Gateway
from dpgateway.executors.he import cube, scheme
from dpgateway.policies.loader import parse_config

BENCH = Path(__file__).resolve().parent
SQL = "SELECT g, COUNT(*) AS n{i}, SUM(x) AS s FROM {table} GROUP BY g"
RAW = "SELECT g, COUNT(*), SUM(x) FROM read_parquet(?) GROUP BY g"


def _data(path: Path, rows: int) -> None:
    con = duckdb.connect()
    con.execute(
        "COPY (SELECT i // 2 + (i % 7 = 0)::INT AS pid, (hash(i) % 10)::INT AS g, (hash(i * 31) % 101)::INT AS x "
        "FROM range(?) t(i)) TO '" + str(path) + "' (FORMAT parquet)",
        [rows],
    )
    con.close()


def _config() -> dict[str, Any]:
    columns = {"pid": {"type": "int"}, "g": {"type": "int", "public_values": list(range(10))},
               "x": {"type": "int", "bounds": [0, 100]}}  # fmt: skip
    table = {"source": "people.parquet", "privacy_unit": "pid", "max_rows_per_unit": 3, "columns": columns}
    return {
        "tables": {"people": {**table, "executor": "he"}, "people_plain": table},
        "ledger": "sqlite:///ledger.db",
        "budget": {"per_subject": {"epsilon": 1e9}, "per_analyst": {"epsilon": 1e9}, "per_query": {"epsilon": 10}},
        "prepare": {"auto": False},
    }


def measure(rows: int, folder: Path, reps: int = 3) -> dict[str, Any]:
    """Every figure for one table size, in a scratch ``folder`` (data, keys, ciphertexts, ledger)."""
    _data(folder / "people.parquet", rows)
    keys = scheme.generate()
    scheme.write_keys(
        keys, folder / "keys" / "holder.key", folder / "keys" / "public.key", folder / "keys" / "gateway.key"
    )
    public_key = folder / "keys" / "public.key"
    config = parse_config(_config(), base_dir=folder)
    table = config.table("people")
    assert table is not None
    with Gateway(config) as gw:
        started = time.perf_counter()
        fields = cube.plan_fields(table, sums=["x"], avgs=[], variances=[], groupings=["g"])
        encrypted = cube.encrypt_table(
            table, cube.owner_copy(config, "people"), scheme.read_keys(public_key), folder / "he-data" / "people",
            fields=fields, key_digest=cube.key_id(public_key),
        )  # fmt: skip
        encrypt_s = time.perf_counter() - started
        evaluator = scheme.Evaluator(scheme.read_keys(public_key))
        aggregate = []
        for _ in range(reps):
            started = time.perf_counter()
            total = scheme.sum_raw(encrypted.batches(1024), evaluator.keys.primes)
            evaluator.fold(evaluator.from_raw(total), encrypted.period)
            aggregate.append(time.perf_counter() - started)
        tracemalloc.start()  # the aggregation's peak heap (numpy registers its buffers; the memory map is page cache)
        scheme.sum_raw(encrypted.batches(1024), evaluator.keys.primes)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        timings: dict[str, list[float]] = {"he": [], "plain": [], "raw": []}
        raw = duckdb.connect()
        for i in range(reps + 1):  # the first round warms up (key holder start, page cache)
            for name in ("he", "plain", "raw"):
                started = time.perf_counter()
                if name == "raw":
                    raw.execute(RAW, [str(folder / "people.parquet")]).fetchall()
                else:  # a new alias per round: the answer is computed, not replayed
                    target = "people" if name == "he" else "people_plain"
                    gw.query(SQL.format(i=i, table=target), analyst="bench", epsilon=1.0)
                if i:
                    timings[name].append(time.perf_counter() - started)
        raw.close()
        assert gw.store.history()[-1].epsilon == gw.store.history()[-2].epsilon  # he and plain debit alike
    size = (folder / "he-data" / "people" / cube.CIPHERTEXTS).stat().st_size
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "rows": rows,
        "fields_per_row": len(fields),
        "period": encrypted.period,
        "ciphertexts": encrypted.ciphertexts,
        "ciphertext_mb": round(size / 2**20, 1),
        "owner_encrypt_s": round(encrypt_s, 2),
        "gateway_aggregate_s": round(statistics.median(aggregate), 3),
        "gateway_aggregate_peak_mb": round(peak / 2**20),
        "he_query_s": round(medians["he"], 3),
        "plain_query_s": round(medians["plain"], 3),
        "raw_query_s": round(medians["raw"], 4),
        "he_over_plain": round(medians["he"] / medians["plain"], 1),
        "he_over_raw": round(medians["he"] / medians["raw"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="table size (repeatable; default 100000, 1000000)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=BENCH / "he_results.json")
    args = parser.parse_args(argv)
    results = []
    for rows in args.rows or [100_000, 1_000_000]:
        with tempfile.TemporaryDirectory(prefix="dpgateway-bench-he-") as scratch:
            results.append(measure(rows, Path(scratch), args.reps))
        print(json.dumps(results[-1]), file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
