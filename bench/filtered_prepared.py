"""Filtered workload after automatic preparation (bound_first) at N rows, the issue-19 target figure alone:

python bench/filtered_prepared.py ROWS REPS
"""

import statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, "bench")
import duckdb
import run as R
from dpgateway.gateway import Gateway

rows, reps = int(sys.argv[1]), int(sys.argv[2])
source = R.generate(rows)
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    raw = duckdb.connect()
    with Gateway.from_config(R.write_config(folder, source, R.AUTO, "bound-first")) as gw:
        R.compare(gw, raw, source, 2, "bc", R.FILTERED)
        gw.auto_prepare.wait()
        out = R.compare(gw, raw, source, reps, "fp", R.FILTERED)
for name, v in out.items():
    print(f"{name:30s} raw {v['raw_ms']:8.1f} ms  DP {v['dp_ms']:8.1f} ms  {v['ratio']:.2f}x  {v['rewrite']}")
print("median", round(statistics.median(v["ratio"] for v in out.values()), 2))
