"""Fixed overhead per query on a 1,000-row table, stage by stage (``python bench/run.py --only overhead``).

Each stage is timed by wrapping the function that does it where the gateway looks it up at call time (a
module global or an instance attribute), with **exclusive** time: a stage timed inside another (parsing
inside the plan cache, the backend call inside the executor) is taken out of the outer one, so the stages
and "other" add up to the query's mean time. "other" is what no stage covers: ``Gateway.query``'s own
lines, spend and audit text, executor choice, the result object.

Standalone (for A/B runs of two builds with one harness; prints JSON)::

    python bench/overhead.py --queries 200 [--label distinct] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
from run import generate, write_config

from dpgateway import Gateway, gateway, planner, sqlparse
from dpgateway.budget_store import open_store
from dpgateway.executors import plain
from dpgateway.policies.loader import load_config
from dpgateway.policies.model import Config

SQL = "SELECT region, COUNT(*) AS n{i}, AVG(income) AS a FROM people GROUP BY region"
LABELS = ("distinct", "repeated, replay cache off")
PASS_STAGES = {  # passes timed apart from "plan": bounded SQL, post-processing (rendered and bound), verification
    "bound_contributions": "rewrite + SQL generation",
    "render_post_processing": "post-processing render + bind",
    "verify_backend_sql": "verify (round trip)",
}
STORE_METHODS = (
    "cached_answer",
    "reserve",
    "commit",
    "commit_and_remaining",
    "audit_and_remaining",
    "remaining",
    "audit_event",
)
OTHER = "other (query glue, spend, executor choice, result)"


class StageClock:
    """Exclusive wall time per stage: a timed call nested in another is subtracted from the outer one."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # time.process_time: CPU time of the process (all its threads), steadier under load
        self.times: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open call: time spent in timed calls nested in it

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                nested = self._inner.pop()
                self.times[stage] += (elapsed - nested) * 1000
                if self._inner:
                    self._inner[-1] += elapsed

        return timed_call


@contextmanager
def stage_timers(gw: Gateway, clock: StageClock) -> Iterator[StageClock]:
    """Wrap each stage of ``Gateway.query`` with ``clock``'s exclusive timer (ms, summed); restore afterwards."""
    patches: list[tuple[object, str, Any]] = []

    def patch(owner: object, name: str, stage: str) -> None:
        if not hasattr(owner, name):  # another build of the gateway (A/B runs): that stage is not there
            return
        fn = getattr(owner, name)
        patches.append((owner, name, fn))
        setattr(owner, name, clock.wrap(stage, fn))

    patch(planner, "parse", "parse")  # alias_free and build_plan
    patch(sqlparse, "parse", "parse")  # normalize and the replay key
    patch(gw, "_plan", "plan (cache lookup, alias swap)")
    saved_passes = planner.PASSES
    planner.PASSES = tuple(clock.wrap(PASS_STAGES.get(p.__name__, "plan passes"), p) for p in saved_passes)
    patch(gateway, "accuracies", "accuracy statements")
    patch(plain, "noisy_integers", "noise (OpenDP)")
    patch(gateway, "add_noise", "noise (OpenDP)")
    patch(gateway, "accept", "noise (OpenDP)")  # the executor's result checked against the noise plan
    patch(gateway, "release", "post-process")  # fixed point to real units
    patch(gateway, "post_process", "post-process")
    patch(gateway, "avg_warnings", "post-process")
    patch(gw.connector, "execute", "backend")
    for method in STORE_METHODS:
        patch(gw.store, method, "ledger")
    try:
        yield clock
    finally:
        planner.PASSES = saved_passes
        for owner, name, fn in reversed(patches):
            if owner is gw.connector or owner is gw.store or owner is gw:
                delattr(owner, name)  # the instance attribute goes; the class's method shows again
            else:
                setattr(owner, name, fn)


def measure(label: str, n_queries: int, source: Path, config: Config, *, cpu: bool = False) -> dict[str, Any]:
    """One gateway, ``n_queries`` timed queries alternating with the raw aggregate; stage means and p50s
    (``cpu``: in CPU time of this process instead of wall time)."""
    now = time.process_time if cpu else time.perf_counter

    def timed(fn: Callable[[], Any]) -> float:
        start = now()
        fn()
        return (now() - start) * 1000

    raw = duckdb.connect()
    raw_sql = f"SELECT region, COUNT(*), AVG(income) FROM read_parquet('{source}') GROUP BY region"
    store = open_store(config.ledger, config.budget, replay="analyst" if label == "distinct" else "off")
    with Gateway(config, store=store) as gw:
        for i in range(10):  # warm-up
            gw.query(SQL.format(i=f"w{i}"), analyst="bench")
        totals, raws, backend = [], [], []
        with stage_timers(gw, StageClock(now)) as clock:
            for i in range(n_queries):
                text = SQL.format(i=i if label == "distinct" else "")
                raws.append(timed(lambda: raw.execute(raw_sql).fetchall()))
                before = clock.times["backend"]
                totals.append(timed(lambda t=text: gw.query(t, analyst="bench")))
                backend.append(clock.times["backend"] - before)
    breakdown = {stage: ms / n_queries for stage, ms in clock.times.items()}
    breakdown[OTHER] = max(0.0, statistics.mean(totals) - sum(breakdown.values()))
    total = statistics.median(totals)
    return {
        "p50_ms": total,
        "p90_ms": statistics.quantiles(totals, n=10)[-1],
        "raw_p50_ms": statistics.median(raws),
        "overhead_p50_ms": total - statistics.median(raws),
        # the issue-19 definition: each query's time outside its own backend call (parse, plan, ledger, noise,
        # post-processing, glue), p50 over the queries
        "outside_backend_p50_ms": statistics.median(t - b for t, b in zip(totals, backend, strict=True)),
        "mean_ms_by_stage": breakdown,
    }


def overhead_run(n_queries: int) -> dict[str, Any]:
    """Distinct queries (alias varies) and one repeated query with the replay cache off; then queries/s."""
    source = generate(1000)
    result: dict[str, Any] = {"query": SQL.format(i=""), "rows": 1000}
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(write_config(Path(tmp), source))
        for label in LABELS:
            result[label] = measure(label, n_queries, source, config)
        with Gateway(config) as gw:
            gw.query(SQL.format(i="r"), analyst="bench")
            start = time.perf_counter()
            for _ in range(n_queries):
                gw.query(SQL.format(i="r"), analyst="bench")
            result["replayed_qps"] = n_queries / (time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(n_queries):
                gw.query(SQL.format(i=f"d{i}"), analyst="bench")
            result["distinct_qps"] = n_queries / (time.perf_counter() - start)
    return result


def measure_labels(n_queries: int, labels: tuple[str, ...] = LABELS, *, cpu: bool = False) -> dict[str, Any]:
    """:func:`measure` for each of ``labels`` on one ledger, in a temporary folder."""
    source = generate(1000)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(write_config(Path(tmp), source))
        return {label: measure(label, n_queries, source, config, cpu=cpu) for label in labels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--label", choices=LABELS, action="append", help="default: both")
    parser.add_argument("--cpu", action="store_true", help="CPU time of the process instead of wall time")
    args = parser.parse_args(argv)
    print(json.dumps(measure_labels(args.queries, tuple(args.label or LABELS), cpu=args.cpu), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
