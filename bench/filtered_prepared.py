"""The filtered workload after automatic preparation (``bound_first``) at one size, the issue-19 target alone:

    python bench/filtered_prepared.py ROWS REPS

Same shapes, data, filters and A/B method as bench/run.py (``FILTERED``); prints DP/raw per shape and the median.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import duckdb
from run import AUTO, FILTERED, compare, generate, write_config

from dpgateway import Gateway


def main(rows: int, reps: int) -> None:
    source = generate(rows)
    with tempfile.TemporaryDirectory() as tmp:
        raw = duckdb.connect()
        with Gateway.from_config(write_config(Path(tmp), source, AUTO, "bound-first")) as gw:
            compare(gw, raw, source, 2, "bc", FILTERED)  # the second query starts the background build
            gw.auto_prepare.wait()
            out = compare(gw, raw, source, reps, "fp", FILTERED)
    for name, v in out.items():
        print(f"{name:24s} raw {v['raw_ms']:8.1f} ms  DP {v['dp_ms']:8.1f} ms  {v['ratio']:5.2f}x  {v['rewrite']}")
    print(f"median DP/raw {statistics.median(v['ratio'] for v in out.values()):.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
