"""Bias of the two estimators for filtered queries (``prepare.filtered``), before noise.

    python bench/estimators.py --rows 100000        # prints a table; about a minute

Both estimators have the same sensitivity and the same noise, so they differ only in their exact bounded
aggregates. For each filter this prints the true value (no bounding), the exact bounded aggregate under
``filter_first`` (each person bounded over their matching rows) and under ``bound_first`` (over all their
rows, then filtered), as a fraction of the truth; also the same figures restricted to the persons with
more than ``k`` rows, the only ones whose contribution the two treat differently. Data: bench/run.py's
person table (1-10 rows per person, k = 3). The filters range from "all rows" to "a minority of each
heavy person's rows" (``income > 50000``: about one row in ten, independent of the person); the last
one selects whole persons (``age < 30``, age is nearly constant per person).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import duckdb

from dpgateway import Gateway

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import K, generate, write_config

FILTERS = ["income > -1", "income > 20000", "income > 50000", "age < 30"]
# label -> (the DP query's aggregate, each row's value: clamped to the policy's bounds as the gateway does)
MEASURES = {"COUNT(*)": ("COUNT(*)", "1"), "SUM(income)": ("SUM(income)", "LEAST(GREATEST(income, 0), 500000)")}


def exact(gw: Gateway, sql: str) -> float:
    """The exact bounded aggregate of a one-value query, in real units (before noise)."""
    plan = gw.explain(sql, epsilon=1.0).plan
    assert plan is not None and plan.bounded_sql is not None and len(plan.measurements) == 1
    (row,) = gw.connector.execute(plan.bounded_sql).rows
    return float(row[0] or 0) / plan.measurements[0].scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    source = generate(args.rows)
    raw = duckdb.connect()
    src = f"read_parquet('{source}')"
    heavy = f"pid IN (SELECT pid FROM {src} GROUP BY pid HAVING COUNT(*) > {K})"
    print(f"{args.rows:,} rows, k = {K}; exact bounded aggregate / true value (before noise)")
    print(f"{'filter':<18} {'measure':<12} {'filter_first':>12} {'bound_first':>12}   heavy persons only: ff, bf")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gateways = {
            order: Gateway.from_config(write_config(folder, source, {"auto": False, "filtered": order}, order))
            for order in ("filter_first", "bound_first")
        }
        try:
            for where in FILTERS:
                for label, (aggregate, value) in MEASURES.items():
                    truth = raw.execute(f"SELECT SUM({value}) FROM {src} WHERE {where}").fetchone()[0] or 1
                    sql = f"SELECT {aggregate} AS v FROM people WHERE {where}"
                    ratios = [exact(gw, sql) / float(truth) for gw in gateways.values()]
                    heavy_ratios = [_heavy(raw, src, heavy, where, value, order) for order in gateways]
                    print(
                        f"{where:<18} {label:<12} {ratios[0]:>12.3f} {ratios[1]:>12.3f}   "
                        f"{heavy_ratios[0]:.3f}, {heavy_ratios[1]:.3f}"
                    )
        finally:
            for gw in gateways.values():
                gw.close()
    return 0


def _heavy(raw: duckdb.DuckDBPyConnection, src: str, heavy: str, where: str, value: str, order: str) -> float:
    """The weighted estimator over the persons with more than k rows only, as a fraction of their truth
    (computed directly in DuckDB, without truncation: ``sum w_u v``, ``w_u = k / max(n, k)``)."""
    n = "COUNT(*) OVER (PARTITION BY pid)"
    rows = (
        f"SELECT *, {n} AS n FROM {src} WHERE {heavy} AND {where}"
        if order == "filter_first"
        else f"SELECT * FROM (SELECT *, {n} AS n FROM {src} WHERE {heavy}) WHERE {where}"
    )
    weighted, truth = raw.execute(
        f"SELECT SUM({value} * {K} / GREATEST(n, {K})), SUM({value}) FROM ({rows})"
    ).fetchone()
    return float(weighted or 0) / float(truth or 1)


if __name__ == "__main__":
    sys.exit(main())
