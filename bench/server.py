"""Wire-protocol throughput and latency: `dpgateway serve` against PostgreSQL 15 on the same machine, same run.

    python bench/server.py                      # updates the server section of bench/RESULTS.md
    python bench/server.py --runs 5 --seconds 5 --clients 1 --clients 16
    python bench/server.py --only paired --runs 3   # only the wire overhead (paired), printed; no PostgreSQL

Three statements, at 1, 16 and 64 concurrent clients, on both servers:

- ``SELECT 1``: on the gateway a literal-only statement, answered by the server itself on its event loop with the
  bytes PostgreSQL sends (docs/server.md, "Answers from memory"); other statements naming no policy table go to
  the shadow catalog;
- a replayed DP answer: the same DP aggregate text again (the gateway replays its first release, spends nothing,
  and commits the replay's audit record before answering; PostgreSQL runs the raw aggregate);
- a fresh DP aggregate: ``SELECT COUNT(*) FROM pums WHERE income > -N`` with a new ``N`` for every statement, so
  neither the replay cache nor the plan cache helps (PostgreSQL runs the same raw text).

The table is the demo's ``pums`` (1,948 rows): the gateway reads the CSV with DuckDB, PostgreSQL gets the same rows
loaded (analyzed). The gateway runs as ``dpgateway serve`` in its own process (with its shadow catalog), with a
SQLite ledger; PostgreSQL is a throwaway cluster from tests/pg_server.py.

Load generator: ``--procs`` client processes (default up to 4), each running its share of the clients as threads,
one psycopg2 connection each (libpq, simple query protocol as psql sends, autocommit; libpq releases the GIL while
it waits). psycopg2 was the cheapest client measured here (about 25 µs of CPU per ``SELECT 1``, against 100 µs or
more for psycopg 3 async and asyncpg). Each client sends its next statement as soon as the last answer is read. A cell runs
``--warmup`` seconds, then counts the statements finished in the next ``--seconds`` seconds (queries/s) and takes
their latencies (p50, p99); client CPU per statement is reported, so the load generator's own cost is visible. Every
cell is measured ``--runs`` times, interleaved (run 1 of every cell, then run 2, ...), and the medians are shown.
Wire overhead (:func:`paired`): a server in this process whose ``Gateway.query`` is timed, one psycopg2 client;
each statement's latency minus its own ``Gateway.query`` time, for ``2 x --seconds`` per statement.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import replace_section

BENCH = Path(__file__).resolve().parent
START, END = "<!-- server: start -->", "<!-- server: end -->"
PASSWORD = "bench-password-1"
BIG = {"epsilon": 1.0e9, "delta": 0.5}
QUERIES = ("SELECT 1", "replayed DP", "fresh DP")
REPLAY_SQL = "SELECT COUNT(*) AS n FROM pums WHERE income > -1"
FRESH_SQL = "SELECT COUNT(*) AS n FROM pums WHERE income > -{n}"
TARGETS = ("postgres", "gateway")


def statement(query: str, n: int) -> str:
    """The SQL of ``query`` for its ``n``-th repetition (``n`` unique across the whole run)."""
    if query == "SELECT 1":
        return "SELECT 1"
    if query == "replayed DP":
        return REPLAY_SQL
    return FRESH_SQL.format(n=n)


# ---- load generator (client processes) ----------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    dsn: str
    query: str
    clients: int
    warmup: float
    seconds: float
    first_n: int  # the fresh statements of this cell are numbered from here


def _client_process(cell: Cell, clients: int, offset: int, ready: Any, go: Any, out: Any) -> None:
    """``clients`` threads, each a psycopg2 connection (libpq releases the GIL while it waits)."""
    import psycopg2

    try:
        conns = [psycopg2.connect(cell.dsn) for _ in range(clients)]
        for conn in conns:
            conn.autocommit = True
    except Exception as exc:  # reported by the parent
        out.put(exc)
        ready.abort()
        return
    latencies: list[list[float]] = [[] for _ in conns]
    errors: list[Exception] = []
    ready.wait()
    go.wait()
    begin = time.perf_counter() + cell.warmup
    end = begin + cell.seconds

    def client(i: int) -> None:
        n = cell.first_n + (offset + i) * 1_000_000
        cur = conns[i].cursor()
        try:
            while True:
                n += 1
                sql = statement(cell.query, n)
                start = time.perf_counter()
                cur.execute(sql)
                cur.fetchall()
                del conns[i].notices[:]
                done = time.perf_counter()
                if done >= end:
                    return
                if done >= begin:  # finished in the window (a slow statement may have started before it)
                    latencies[i].append((done - start) * 1000)
        except Exception as exc:
            errors.append(exc)

    cpu = time.process_time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu
    for conn in conns:
        conn.close()
    out.put(errors[0] if errors else ([x for lat in latencies for x in lat], cpu))


def measure(cell: Cell, procs: int) -> dict[str, float]:
    """Queries/s, p50 and p99 (ms) and client CPU per statement (µs) of one cell."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, cell.clients))
    ready, go, out = ctx.Barrier(procs + 1), ctx.Barrier(procs + 1), ctx.Queue()
    shares = [cell.clients // procs + (1 if i < cell.clients % procs else 0) for i in range(procs)]
    offsets = [sum(shares[:i]) for i in range(procs)]
    workers = [
        ctx.Process(target=_client_process, args=(cell, share, offset, ready, go, out))
        for share, offset in zip(shares, offsets, strict=True)
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=120)
        go.wait(timeout=120)
    except threading.BrokenBarrierError:  # a client process could not connect: say why
        raise RuntimeError(f"a client process failed: {out.get(timeout=10)!r}") from None
    results = [out.get(timeout=cell.warmup + cell.seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(30)
    for result in results:
        if isinstance(result, Exception):
            raise result
    latencies = sorted(latency for lat, _ in results for latency in lat)
    cpu = sum(c for _, c in results)
    if not latencies:
        return {"qps": 0.0, "p50": float("nan"), "p99": float("nan"), "client_us": float("nan")}
    return {
        "qps": len(latencies) / cell.seconds,
        "p50": _quantile(latencies, 0.5),
        "p99": _quantile(latencies, 0.99),
        "client_us": cpu / len(latencies) * 1e6 * (cell.warmup + cell.seconds) / cell.seconds,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---- the two servers ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path) -> Path:
    data = resources.files("dpgateway") / "data"
    (folder / "pums.csv").write_bytes((data / "pums.csv").read_bytes())
    config = yaml.safe_load((data / "demo.yaml").read_text())
    config["budget"].update(per_subject=BIG, per_analyst=BIG, per_query={"epsilon": 10.0, "delta": 0.01})
    config.pop("admins", None)
    config["ledger"] = f"sqlite:///{folder / 'ledger.db'}"
    path = folder / "dpgateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def gateway_server(config: Path) -> Iterator[tuple[str, int]]:
    """``dpgateway serve`` in a subprocess (with its shadow catalog); yields the DSN and the server's pid."""
    from dpgateway.budget_store.users import UserStore
    from dpgateway.policies.loader import load_config

    users = UserStore.open(load_config(config).ledger)
    users.add("bench", PASSWORD)
    port = _free_port()
    exe = shutil.which("dpgateway", path=str(Path(sys.executable).parent)) or "dpgateway"
    log = (config.parent / "serve.log").open("w+")
    server = subprocess.Popen([exe, "serve", "--config", str(config), "--port", str(port)], stderr=log, stdout=log)
    try:
        deadline = time.time() + 120
        while "listening" not in (config.parent / "serve.log").read_text():
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"dpgateway serve did not start: {(config.parent / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield f"host=127.0.0.1 port={port} user=bench password={PASSWORD} dbname=dpgateway", server.pid
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@contextmanager
def postgres_server(csv: Path) -> Iterator[str]:
    """A throwaway PostgreSQL (tests/pg_server.py) holding ``pums`` as typed by the demo policy."""
    import psycopg
    from pg_server import start_postgres

    server = start_postgres(max_connections=200)
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE pums (age bigint, sex bigint, educ bigint, race bigint, income double precision, "
                "married bigint, pid bigint)"
            )
            with conn.cursor().copy("COPY pums FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
                copy.write(csv.read_bytes())
            conn.execute("VACUUM ANALYZE pums")
        url = psycopg.conninfo.conninfo_to_dict(server.url)
        yield " ".join(f"{k}={v}" for k, v in url.items())
    finally:
        server.stop()


def paired(config: Path, seconds: float, *, rate: bool = True) -> dict[str, dict[str, float]]:
    """Wire overhead per statement, exactly paired: a server in this process (in a thread, no shadow) whose
    ``Gateway.query`` is timed; one psycopg2 client, in a process of its own, sends the replayed and the fresh
    aggregate, and each statement's client-side latency minus the time its own ``Gateway.query`` call took is
    the wire's cost for that statement (protocol, session, thread hand-off, result typing and encoding, the
    loopback round trip). A replay the server answers from memory (docs/server.md, "Answers from memory")
    makes no ``Gateway.query`` call: it is paired with a ``Gateway.query`` of the same statement made after
    the client's run, in this process. (Until session 8 the client was a thread of this process, so each
    statement's figure also held the client's waits for this process's GIL, which no real client has.)
    Then (``rate``) ``Gateway.query`` alone from 16 threads: the most the server could answer, whatever the wire."""
    import asyncio

    from dpgateway import Gateway
    from dpgateway.budget_store.users import UserStore
    from dpgateway.policies.loader import load_config
    from dpgateway.server.server import Server, ServerSettings

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, ledger=f"sqlite:///{config.parent / 'api-ledger.db'}")
    results: dict[str, dict[str, float]] = {}
    with Gateway(cfg) as gw:
        calls: list[tuple[str, float]] = []  # each Gateway.query call: its SQL and its time (ms), in order
        query = gw.query

        def timed(sql: str, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return query(sql, **kwargs)
            finally:
                calls.append((sql, (time.perf_counter() - start) * 1000))

        gw.query = timed  # type: ignore[method-assign]
        users = UserStore.beside(gw.store, cfg.ledger)
        if users.get("bench") is None:  # the ledger is kept from run to run
            users.add("bench", PASSWORD)
        server = Server(gw, users, ServerSettings(port=0))
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(server.start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        started.wait(30)
        dsn = f"host=127.0.0.1 port={server.port} user=bench password={PASSWORD} dbname=dpgateway"
        ctx = mp.get_context("spawn")
        try:
            for query_name in ("replayed DP", "fresh DP"):
                n = 900_000_000 + (10_000_000 if query_name == "fresh DP" else 0)
                calls.clear()
                out = ctx.Queue()
                client = ctx.Process(target=_paired_client, args=(dsn, query_name, n, seconds + 1, out))
                client.start()
                sent = out.get(timeout=seconds + 120)
                client.join(30)
                if isinstance(sent, Exception):
                    raise sent
                wire_ms, api_ms = [], []
                server_side = iter(list(calls))
                pending = next(server_side, None)
                for sql, ms in sent:  # one client, one statement at a time: the server's calls come in its order
                    wire_ms.append(ms)
                    if pending is not None and pending[0] == sql:
                        api_ms.append(pending[1])
                        pending = next(server_side, None)
                    else:  # answered from the server's memory, without Gateway.query: time the API alone
                        timed(sql, analyst="bench")
                        api_ms.append(calls[-1][1])
                wire_ms, api_ms = wire_ms[5:], api_ms[5:]  # warm-up
                diffs = sorted(w - a for w, a in zip(wire_ms, api_ms, strict=True))
                out_stats = {
                    "pairs": len(diffs),
                    "wire_p50": statistics.median(wire_ms),
                    "api_p50": statistics.median(api_ms),
                    "diff_p50": _quantile(diffs, 0.5),
                    "diff_p25": _quantile(diffs, 0.25),
                    "diff_p75": _quantile(diffs, 0.75),
                    "diff_p90": _quantile(diffs, 0.9),
                }
                results[query_name] = out_stats
            for query_name in (
                ("replayed DP", "fresh DP") if rate else ()
            ):  # Gateway.query alone, 16 threads: the API's own rate
                results[query_name]["api_qps_16"] = _api_rate(query, query_name, seconds)
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()
    return results


def _paired_client(dsn: str, query_name: str, first_n: int, seconds: float, out: Any) -> None:
    """The client of :func:`paired`, in a process of its own as a real client would be (a psycopg2 thread in the
    server's process would wait for that process's GIL): each statement's SQL and latency (ms), in order."""
    import psycopg2

    try:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()
        sent: list[tuple[str, float]] = []
        n, end = first_n, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
            sql = statement(query_name, n)
            start = time.perf_counter()
            cur.execute(sql)
            cur.fetchall()
            sent.append((sql, (time.perf_counter() - start) * 1000))
            del conn.notices[:]
        conn.close()
    except Exception as exc:  # reported by the parent
        out.put(exc)
        return
    out.put(sent)


def _api_rate(query: Any, query_name: str, seconds: float, threads: int = 16) -> float:
    """Statements/s of ``Gateway.query`` called by ``threads`` threads at once (no wire)."""
    done: list[int] = [0] * threads
    end = time.perf_counter() + seconds

    def work(i: int) -> None:
        n = 700_000_000 + i * 1_000_000
        while time.perf_counter() < end:
            n += 1
            query(statement(query_name, n), analyst="bench")
            done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / seconds


# ---- run and report ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"cells": {}, "api": []}
    with tempfile.TemporaryDirectory(prefix="dpgateway-bench-") as tmp:
        folder = Path(tmp)
        config = write_config(folder)
        with postgres_server(folder / "pums.csv") as pg_dsn, gateway_server(config) as (gw_dsn, _pid):
            dsns = {"postgres": pg_dsn, "gateway": gw_dsn}
            first_n = 1
            for r in range(args.runs):
                for clients in args.clients:
                    for query in args.query:
                        for target in TARGETS:
                            cell = Cell(dsns[target], query, clients, args.warmup, args.seconds, first_n)
                            first_n += 100_000_000
                            figures = measure(cell, args.procs)
                            figures["load"] = os.getloadavg()[0]
                            results["cells"].setdefault(f"{target}|{query}|{clients}", []).append(figures)
                            print(
                                f"run {r + 1} {target:8} {query:12} {clients:3} clients: {figures['qps']:8.1f} q/s, "
                                f"p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms, "
                                f"client {figures['client_us']:.0f} µs/q",
                                flush=True,
                            )
                if "fresh DP" in args.query and "replayed DP" in args.query:
                    api = paired(config, 2 * args.seconds)
                    results["api"].append(api)
                    print(f"run {r + 1} wire vs Python API: {api}", flush=True)
    return results


def run_paired(args: argparse.Namespace) -> None:
    """Only :func:`paired`, ``--runs`` times (no PostgreSQL, no load generator): for iterating on the wire's
    overhead. Prints each run and the medians over runs; RESULTS.md is left as it is."""
    results: dict[str, Any] = {"cells": {}, "api": []}
    with tempfile.TemporaryDirectory(prefix="dpgateway-bench-") as tmp:
        config = write_config(Path(tmp))
        for r in range(args.runs):
            load = os.getloadavg()[0]
            api = paired(config, 2 * args.seconds, rate=False)
            results["api"].append(api)
            for query, a in api.items():
                print(
                    f"run {r + 1} {query:12} wire p50 {a['wire_p50']:.2f} ms, Gateway.query p50 {a['api_p50']:.2f} ms, "
                    f"wire - API {a['diff_p50']:+.2f} ms ({a['diff_p25']:+.2f} .. {a['diff_p75']:+.2f}, "
                    f"p90 {a['diff_p90']:+.2f}), {a['pairs']:.0f} pairs; load {load:.1f}",
                    flush=True,
                )
    m = summary(results)
    for query in ("replayed DP", "fresh DP"):
        a = m[f"api|{query}"]
        print(f"median of {args.runs} runs: {query:12} wire - API {a['diff_p50']:+.2f} ms", flush=True)


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per cell and figure, the median over runs."""
    medians: dict[str, dict[str, float]] = {}
    for key, runs in results["cells"].items():
        medians[key] = {f: statistics.median(run[f] for run in runs) for f in runs[0]}
    for query in ("replayed DP", "fresh DP") if results["api"] else ():
        medians[f"api|{query}"] = {
            f: statistics.median(run[query][f] for run in results["api"]) for f in results["api"][0][query]
        }
    return medians


def markdown(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    m = summary(results)
    loads = [run["load"] for runs in results["cells"].values() for run in runs]
    lines = [
        START,
        "## Wire protocol: `dpgateway serve` vs PostgreSQL 15 (bench/server.py)",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC). Median of "
        f"{args.runs} interleaved runs of {args.seconds:g} s (after {args.warmup:g} s warm-up) per cell; "
        f"load from up to {args.procs} client processes of psycopg2 connections in threads (simple query protocol, "
        "autocommit). Both servers on this machine (2 shared cores, other jobs running), in the same run. "
        "The demo `pums` table (1,948 rows): DuckDB over the CSV behind the gateway, the same rows loaded in PostgreSQL.",
        "",
        "| statement | clients | PostgreSQL q/s | p50 ms | p99 ms | gateway q/s | p50 ms | p99 ms | gateway / PG q/s |"
        " client µs/q (gw) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for query in args.query:
        for clients in args.clients:
            pg, gw = m[f"postgres|{query}|{clients}"], m[f"gateway|{query}|{clients}"]
            ratio = gw["qps"] / pg["qps"] if pg["qps"] else float("nan")
            lines.append(
                f"| {query} | {clients} | {pg['qps']:.0f} | {pg['p50']:.2f} | {pg['p99']:.2f} | {gw['qps']:.0f} | "
                f"{gw['p50']:.2f} | {gw['p99']:.2f} | {ratio:.2f} | {gw['client_us']:.0f} |"
            )
    if results["api"]:
        lines += [
            "",
            "Wire overhead, paired per statement: a server in the bench process whose `Gateway.query` is timed; one "
            "psycopg2 client, in a process of its own, sends the statement, and its latency minus the time its own `Gateway.query` call "
            "took is what the wire added (protocol, session, thread hand-off, result typing and encoding, loopback "
            "round trip; a replay answered from the server's memory is paired with a `Gateway.query` of the same "
            "statement made after the client's run). Median (and quartiles, 90th percentile) over the statements of a run, median over runs:",
            "",
            "| statement | statements | wire p50 ms | `Gateway.query` p50 ms | wire - API, median ms | quartiles ms |"
            " p90 ms | `Gateway.query` q/s, 16 threads |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for query in ("replayed DP", "fresh DP"):
            a = m[f"api|{query}"]
            lines.append(
                f"| {query} | {a['pairs']:.0f} | {a['wire_p50']:.2f} | {a['api_p50']:.2f} | {a['diff_p50']:+.2f} | "
                f"{a['diff_p25']:+.2f} .. {a['diff_p75']:+.2f} | {a['diff_p90']:+.2f} | {a['api_qps_16']:.0f} |"
            )
    lines.append(f"\nLoad average (1 min) during the cells: median {statistics.median(loads):.1f}.")
    lines += ["", *targets(m, args), "", END]
    return "\n".join(lines)


def targets(m: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    out = ["Targets (issue 15):", ""]
    if 16 in args.clients:
        for query in ("SELECT 1", "replayed DP"):
            if f"gateway|{query}|16" not in m:
                continue
            pg, gw = m[f"postgres|{query}|16"]["qps"], m[f"gateway|{query}|16"]["qps"]
            verdict = "met" if gw >= pg / 2 else "NOT met"
            out.append(f"- {query} at 16 clients >= half of PostgreSQL's q/s: {gw:.0f} vs {pg:.0f} / 2: {verdict}.")
    if "api|fresh DP" in m:
        for query, target in (
            ("fresh DP", "fresh DP aggregate over the wire within 1 ms of the Python API"),
            ("replayed DP", "protocol overhead below 1 ms per statement (replayed DP)"),
        ):
            diff = m[f"api|{query}"]["diff_p50"]
            verdict = "met" if diff < 1.0 else "NOT met"
            out.append(f"- {target}: wire minus API {diff:+.2f} ms (median over statements): {verdict}.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, action="append", help="concurrent clients (repeatable; 1, 16, 64)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per cell (median)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell and run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring, per cell and run")
    parser.add_argument("--procs", type=int, default=4, help="client processes (at most one per client)")
    parser.add_argument("--query", action="append", choices=QUERIES, help="statements to run (repeatable; all)")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    parser.add_argument(
        "--only", choices=("paired",), help="paired: only the wire overhead against the Python API (printed)"
    )
    args = parser.parse_args(argv)
    if args.only == "paired":
        run_paired(args)
        return 0
    args.clients = args.clients or [1, 16, 64]
    args.query = args.query or list(QUERIES)
    command = "python bench/server.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args)
    if not args.no_write:
        replace_section(args.markdown, START, END, markdown(results, args, command.strip()))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops both servers, even in a background job
    raise SystemExit(main())
