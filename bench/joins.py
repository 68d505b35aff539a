"""DP/raw median ratio of joined and per-person queries on DuckDB, on the TPC-H-like data of tests/tpch.py.

    python bench/joins.py --customers 100000 --reps 5

For each query, the raw query (the same SQL run by DuckDB directly over the Parquet files, exact, no
bounding) and the DP query through ``Gateway.query`` alternate, median of ``--reps`` after one warm-up;
the replay and plan caches are defeated by a varying output alias. Prints one Markdown table; nothing is
written (no claim in the docs rests on it yet).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tpch

QUERIES = {
    "customer JOIN orders, public key": "SELECT c_mktsegment, COUNT(*) AS {a}, SUM(o_totalprice) FROM customer "
    "JOIN orders ON c_custkey = o_custkey GROUP BY c_mktsegment",
    "lineitem (unit through orders)": "SELECT l_returnflag, COUNT(*) AS {a}, SUM(l_quantity) FROM lineitem "
    "JOIN orders ON l_orderkey = o_orderkey GROUP BY l_returnflag",
    "4-way join with lookups": "SELECT o_orderpriority, SUM(l_extendedprice) AS {a} FROM customer "
    "JOIN orders ON c_custkey = o_custkey JOIN lineitem ON l_orderkey = o_orderkey "
    "JOIN nation ON c_nationkey = n_nationkey WHERE n_regionkey = 1 GROUP BY o_orderpriority",
    "per-person subquery": "SELECT COUNT(*) AS {a}, AVG(t) FROM (SELECT o_custkey, SUM(o_totalprice) AS t "
    "FROM orders GROUP BY o_custkey) AS s WHERE t >= 1000000",
}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        frames = tpch.generate(args.customers, orphans=0)
        gateway = tpch.gateway(folder, frames)
        raw = duckdb.connect()
        for name in frames:
            raw.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{folder / name}.parquet')")
        print(f"{args.customers} customers, {len(frames['orders'])} orders, {len(frames['lineitem'])} lines")
        print("| query | raw ms | DP ms | DP/raw |\n|---|---|---|---|")
        for label, sql in QUERIES.items():
            raws, dps = [], []
            for i in range(args.reps + 1):
                text = sql.format(a=f"n{i}")
                r = timed(lambda text=text: raw.execute(text).fetchall())
                d = timed(lambda text=text: gateway.query(text, epsilon=1.0))
                if i:
                    raws.append(r)
                    dps.append(d)
            r, d = statistics.median(raws), statistics.median(dps)
            print(f"| {label} | {r:.0f} | {d:.0f} | {d / r:.1f}x |")
        gateway.close()


if __name__ == "__main__":
    main()
