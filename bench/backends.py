"""DP/raw median ratio per backend (DuckDB, PostgreSQL, Spark local) on the same person table.

    python bench/backends.py --rows 1000000              # all three; updates the backends section of bench/RESULTS.md
    python bench/backends.py --rows 100000 --reps 3 --backend spark
    python bench/backends.py --rows 1000000 --reps 5 --backend postgres --markdown /tmp/results.md

The table is bench/run.py's ``people_<rows>.parquet`` (generated once). DuckDB reads the file; PostgreSQL
gets it loaded into ``bench.people`` (native bigint/double columns, analyzed) on the server of
``$DPGATEWAY_BENCH_PG_URL``, or on a throwaway server (tests/pg_server.py) when it is unset; Spark reads
the Parquet file on ``local[*]``. DuckDB, PostgreSQL and Spark prepare a copy automatically after two queries
(``prepare.auto``; on PostgreSQL the bench first runs the setup SQL of docs/backends.md, which installs
the change trigger the copy's validity check needs); the bench waits for the build and reports its time. For each backend and each query shape of bench/run.py, the raw aggregate
on the same engine and the DP query through ``Gateway.query`` alternate, median of ``--reps``, after one
warm-up of each; the replay and plan caches are defeated by a varying output alias (as in run.py).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from run import BACKENDS_END as END
from run import BACKENDS_START as START
from run import BIG, POLICY, SHAPES, generate, replace_section
from sqlglot import exp

from dpgateway import Gateway
from dpgateway.connectors.postgres_copy import setup_sql
from dpgateway.policies.loader import parse_config

BENCH = Path(__file__).resolve().parent
PG_ENV = "DPGATEWAY_BENCH_PG_URL"
DUCKDB_NOTE = (
    "The DuckDB, PostgreSQL and Spark (local master) gateways prepare a copy by themselves after two queries "
    "of a table (`prepare.auto`, on by default; on PostgreSQL a table in the gateway's schema `dpgateway`, after "
    "the bench ran the setup SQL of docs/backends.md that installs the change trigger; Spark's copy is a folder "
    "of Parquet part files in the gateway's private cache_dir); the bench waits for that build (its time is above) "
    "and then times every shape over the copy, the steady state of a table queried repeatedly (until session 7 "
    "the first shapes ran while the build did); a PostgreSQL query that reads the copy first checks the "
    "trigger's change count (one catalog round trip)."
)
Raw = Callable[[str], Any]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def gateway(folder: Path, source: Any, spark: Any = None) -> Gateway:
    raw = {
        "tables": {"people": {"source": source, **POLICY}},
        "budget": {"per_subject": BIG, "per_analyst": BIG, "per_query": BIG, "default_query_epsilon": 1.0},
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
    }
    config = parse_config(raw, base_dir=folder)
    if spark is None:
        return Gateway(config)
    from dpgateway.connectors.spark import SparkConnector

    connector = SparkConnector(spark, config.tables)
    connector.check_table(config.tables[0])
    return Gateway(config, connector=connector)


def compare(gw: Gateway, raw: Raw, relation: str, reps: int, tag: str) -> dict[str, Any]:
    """Per shape: raw and DP alternate; medians (ms) and their ratio."""
    out: dict[str, Any] = {}
    first = next(iter(SHAPES.values()))[0]
    start = time.perf_counter()
    for i in range(2):  # automatic preparation starts after the second query of the table (prepare.auto)
        gw.query(first.format(alias=f"p{tag}{i}"), analyst="bench", epsilon=1.0)
    gw.auto_prepare.wait()  # every shape is then timed over the copy: the steady state
    out["build_s"] = time.perf_counter() - start
    print(f"  automatic preparation: two queries and the background build {out['build_s']:.1f} s", flush=True)
    for name, (dp_sql, raw_sql) in SHAPES.items():
        raw_query = raw_sql.format(src=relation)
        raw(raw_query)
        gw.query(dp_sql.format(alias=f"w{tag}"), analyst="bench", epsilon=1.0)  # warm-up of both
        dp_ms, raw_ms = [], []
        for i in range(reps):
            raw_ms.append(timed(lambda q=raw_query: raw(q)))
            sql = dp_sql.format(alias=f"v{tag}{i}")
            dp_ms.append(timed(lambda s=sql: gw.query(s, analyst="bench", epsilon=1.0)))
        raw_p50, dp_p50 = statistics.median(raw_ms), statistics.median(dp_ms)
        plan = gw.explain(dp_sql.format(alias="x")).plan
        out[name] = {
            "raw_ms": raw_p50,
            "dp_ms": dp_p50,
            "ratio": dp_p50 / raw_p50,
            "rewrite": plan.rewrite if plan else "",
        }
        print(f"  {name}: raw {raw_p50:.1f} ms, DP {dp_p50:.1f} ms, {dp_p50 / raw_p50:.1f}x", flush=True)
    return out


def run_duckdb(path: Path, folder: Path, reps: int) -> dict[str, Any]:
    con = duckdb.connect()
    with gateway(folder, str(path)) as gw:
        return compare(gw, lambda q: con.execute(q).fetchall(), f"read_parquet('{path}')", reps, "d")


@contextmanager
def postgres_url() -> Iterator[str]:
    """``$DPGATEWAY_BENCH_PG_URL``, else a throwaway server (the test suite's)."""
    if os.environ.get(PG_ENV):
        yield os.environ[PG_ENV]
        return
    from pg_server import start_postgres  # tests/pg_server.py

    server = start_postgres()
    try:
        yield server.url
    finally:
        server.stop()


def run_postgres(path: Path, folder: Path, reps: int) -> dict[str, Any]:
    import psycopg2

    with postgres_url() as url:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE SCHEMA IF NOT EXISTS bench")
            cur.execute("DROP TABLE IF EXISTS bench.people")
            cur.execute("CREATE TABLE bench.people (pid bigint, region bigint, age bigint, income double precision)")
            frame = duckdb.connect().execute(f"SELECT pid, region, age, income FROM read_parquet('{path}')").df()
            buffer = io.StringIO()
            frame.to_csv(buffer, index=False, header=False)
            buffer.seek(0)
            cur.copy_expert("COPY bench.people FROM STDIN WITH (FORMAT csv)", buffer)
            cur.execute("VACUUM ANALYZE bench.people")
            cur.execute("SELECT current_user")
            role = cur.fetchone()[0]
            # the DBA's one-time setup (docs/backends.md): the gateway's schema, change log and trigger
            cur.execute(setup_sql("dpgateway", exp.to_table("bench.people"), f'"{role}"'))

        def raw(q: str) -> Any:
            with conn.cursor() as cur:
                cur.execute(q)
                return cur.fetchall()

        os.environ["DPGATEWAY_BENCH_PG_SOURCE_URL"] = url
        source = {"connector": "postgres", "url": {"$env": "DPGATEWAY_BENCH_PG_SOURCE_URL"}, "table": "bench.people"}
        with gateway(folder, source) as gw:
            result = compare(gw, raw, "bench.people", reps, "p")
        conn.close()
        return result


def run_spark(path: Path, folder: Path, reps: int) -> dict[str, Any]:
    from dpgateway.connectors.spark import spark_session

    session = spark_session("local[*]", {"spark.sql.shuffle.partitions": "4"})
    session.sparkContext.setLogLevel("ERROR")
    raw_session = session.newSession()
    source = {"connector": "spark", "path": str(path), "format": "parquet"}
    with gateway(folder, source, spark=session) as gw:
        return compare(gw, lambda q: raw_session.sql(q).collect(), f"parquet.`{path}`", reps, "s")


RUNNERS = {"duckdb": run_duckdb, "postgres": run_postgres, "spark": run_spark}


def markdown(rows: int, reps: int, results: dict[str, dict[str, Any]], command: str) -> str:
    lines = [
        START,
        f"## Backends: DP/raw on {rows:,} rows",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC); median of {reps}, "
        "raw aggregate and DP query alternating on the same engine in the same run (bench/backends.py).",
        "",
        "| query | " + " | ".join(f"{b} raw ms | {b} DP ms | {b} ratio" for b in results) + " |",
        "|---|" + "---:|---:|---:|" * len(results),
    ]
    for shape in SHAPES:
        cells = [
            f"{r[shape]['raw_ms']:.1f} | {r[shape]['dp_ms']:.1f} | {r[shape]['ratio']:.1f}x" for r in results.values()
        ]
        lines.append(f"| {shape} ({next(iter(results.values()))[shape]['rewrite']}) | " + " | ".join(cells) + " |")
    medians = [f" | | **{statistics.median(r[s]['ratio'] for s in SHAPES):.1f}x**" for r in results.values()]
    lines += ["| **median** |" + " |".join(medians) + " |", ""]
    lines += [
        f"Load average (1 min) on the machine's {os.cpu_count()} cores when each backend finished: "
        + ", ".join(f"{b} {r['load']:.1f}" for b, r in results.items())
        + ". Automatic preparation (two queries, then the background build the bench waits for): "
        + ", ".join(f"{b} {r['build_s']:.1f} s" for b, r in results.items())
        + ". On PostgreSQL the raw aggregates run with parallel workers and the weighted rewrite's per-person "
        "window in one process (scalar COUNT(*) groups by person with parallel workers), so under load the raw "
        "query takes a larger share of the CPU and the ratio overstates the quiet-machine one.",
        "",
        DUCKDB_NOTE,
        "",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", action="append", choices=sorted(RUNNERS), help="repeatable; default all")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    path = generate(args.rows)
    results: dict[str, dict[str, Any]] = {}
    for name in args.backend or list(RUNNERS):
        print(f"{name}:", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            results[name] = RUNNERS[name](path, Path(folder), args.reps)
        results[name]["load"] = os.getloadavg()[0]
    command = "python bench/backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(args.rows, args.reps, results, command.strip())
    replace_section(args.markdown, START, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
