"""Accuracy against the peers at equal total epsilon: dpgateway, SmartNoise SQL, Qrlew, Tumult Analytics.

    python bench/compare.py                      # both workloads, every peer, writes bench/ACCURACY.md
    python bench/compare.py --workload pums --peers smartnoise --trials 3 --out -

One command does everything: each peer gets its own virtual environment under ``~/.cache/dpgateway-bench``
(pinned in bench/peers/requirements-*.txt, created once), TPC-H is generated locally by ``tpchgen-cli``,
a throwaway PostgreSQL (tests/pg_server.py) holds the data Qrlew's SQL runs on, and every system answers
the same queries (bench/peers/workloads.py) at the same total (epsilon, delta) per query, configured with
the same privacy unit, rows per person, value bounds and public key domains. Error: per trial, the mean
relative error min(1, |released - exact| / |exact|) over the exact answer's cells (every numeric output
column; a cell a system does not release counts as 1), exact = DuckDB on the raw rows; the median over
trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import yaml

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "bench" / "peers"
sys.path.insert(0, str(PEERS_DIR))
from workloads import WORKLOADS, Query, Workload  # noqa: E402

CACHE = Path(os.environ.get("DPGATEWAY_BENCH_CACHE", Path.home() / ".cache" / "dpgateway-bench"))
PUMS_DATA = ROOT.parent / "shared" / "data" / "pums"
PEERS = ("smartnoise", "qrlew", "tumult")
SYSTEMS = ("dpgateway", *PEERS)
PEER_TIMEOUT_S = 3 * 3600
PG_TYPES = {"int": "bigint", "float": "double precision", "str": "text", "date": "date", "bool": "boolean"}


# -- environments and data ---------------------------------------------------------------------------------


def venv(name: str) -> Path:
    """The Python of a peer's own virtual environment, created (once per requirements file) on demand."""
    requirements = PEERS_DIR / f"requirements-{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    home = CACHE / "venvs" / f"{name}-{digest}"
    python = home / "bin" / "python"
    if not (home / ".complete").exists():
        shutil.rmtree(home, ignore_errors=True)
        _log(f"creating the {name} environment in {home} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
        (home / ".complete").write_text(digest)
    return python


def prepare_data(workload: Workload, scale: float) -> Workload:
    """The workload's tables as CSV files holding exactly the declared columns (what every system reads)."""
    folder = CACHE / "data" / (f"{workload.name}-sf{scale:g}" if workload.name == "tpch" else workload.name)
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        raw = folder / "raw"
        raw.mkdir(parents=True)
        if workload.name == "tpch":
            tool = venv("tools").parent / "tpchgen-cli"
            _log(f"generating TPC-H at scale factor {scale:g} with tpchgen-cli")
            subprocess.run([str(tool), "csv", "-s", str(scale), f"--output-dir={raw}"], check=True)
        else:
            for table in workload.tables:
                shutil.copy(PUMS_DATA / table.file, raw / table.file)
        con = duckdb.connect()
        for table in workload.tables:
            columns = ", ".join(c.name for c in table.columns)
            source = (raw / table.file).as_posix().replace("'", "''")
            target = (folder / table.file).as_posix().replace("'", "''")
            con.execute(f"COPY (SELECT {columns} FROM read_csv('{source}', header=true)) TO '{target}' (HEADER)")
        con.close()
        shutil.rmtree(raw)
        (folder / ".complete").write_text("ok")
    return dataclasses.replace(workload, data_dir=str(folder))


def exact_answers(workload: Workload) -> dict[str, list[list[Any]]]:
    """Each query on the raw rows (DuckDB)."""
    con = duckdb.connect()
    for table in workload.tables:
        path = (Path(workload.data_dir) / table.file).as_posix().replace("'", "''")
        con.execute(f"CREATE VIEW {table.name} AS SELECT * FROM read_csv('{path}', header=true)")
    answers = {q.id: [list(r) for r in con.execute(q.sql).fetchall()] for q in workload.queries}
    con.close()
    return answers


def load_postgres(workload: Workload, url: str) -> None:
    """The workload's CSV files into tables of the same names (for Qrlew)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        for table in workload.tables:
            columns = ", ".join(f"{c.name} {PG_TYPES[c.type]}" for c in table.columns)
            con.execute(f"DROP TABLE IF EXISTS {table.name}")
            con.execute(f"CREATE TABLE {table.name} ({columns})")
            statement = f"COPY {table.name} FROM STDIN WITH (FORMAT csv, HEADER true)"
            with (
                (Path(workload.data_dir) / table.file).open("rb") as source,
                con.cursor() as cur,
                cur.copy(statement) as copy,
            ):
                while chunk := source.read(1 << 20):
                    copy.write(chunk)
            con.execute(f"ANALYZE {table.name}")


# -- the systems ---------------------------------------------------------------------------------------


def policy(workload: Workload) -> dict[str, Any]:
    """dpgateway's configuration for the workload: one subject domain, the same bounds as every peer."""
    tables: dict[str, Any] = {}
    for table in workload.tables:
        columns: dict[str, Any] = {}
        for column in table.columns:
            spec: dict[str, Any] = {"type": column.type}
            if column.bounds is not None:
                spec["bounds"] = list(column.bounds)
            if column.public_values is not None:
                spec["public_values"] = list(column.public_values)
            columns[column.name] = spec
        entry: dict[str, Any] = {"source": str(Path(workload.data_dir) / table.file), "columns": columns}
        if table.public:
            entry["public"] = True
        else:
            unit: Any = table.unit
            if table.path:
                unit = {"column": table.unit, "path": [{"from": f, "table": t, "to": to} for f, t, to in table.path]}
            entry.update(privacy_unit=unit, max_rows_per_unit=table.k, domain="person")
        tables[table.name] = entry
    budget = {
        "per_subject": {"epsilon": 1e9, "delta": 0.5},
        "per_analyst": {"epsilon": 1e9, "delta": 0.5},
        "per_query": {"epsilon": 1e3, "delta": 0.4},
    }
    return {"tables": tables, "budget": budget}


def run_ours(workload: Workload, job: dict[str, Any]) -> dict[str, Any]:
    from dpgateway import Gateway
    from dpgateway.budget_store import open_store
    from dpgateway.errors import ConfigError, DPGatewayError
    from dpgateway.policies.loader import load_config

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = {**policy(workload), "ledger": f"sqlite:///{Path(tmp) / 'ledger.db'}"}
        path = Path(tmp) / "dpgateway.yaml"
        dropped: dict[str, str] = {}  # a table whose declaration this version refuses, and why
        while True:
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            try:
                loaded = load_config(path)
                break
            except ConfigError as error:
                name = next((t for t in config["tables"] if f"tables.{t}." in str(error)), None)
                if name is None:
                    raise
                dropped[name] = f"{error.sqlstate}: {error}"
                del config["tables"][name]
        gateway = Gateway(loaded, store=open_store(loaded.ledger, loaded.budget, replay="off"))
        try:
            for query in workload.queries:
                refused = [reason for name, reason in dropped.items() if f" {name}" in query.sql]
                if refused:
                    out[query.id] = {"refused": refused[0][:160]}
                    continue
                try:
                    trials, wall, spent = [], [], 0.0
                    for _ in range(job["trials"]):
                        start = time.perf_counter()
                        result = gateway.query(query.sql, epsilon=job["epsilon"], delta=job["delta"])
                        wall.append(time.perf_counter() - start)
                        spent = result.epsilon
                        frame = result.frame
                        trials.append({"columns": list(frame.columns), "rows": frame.astype(object).values.tolist()})
                    out[query.id] = {"trials": trials, "epsilon": spent, "seconds": statistics.median(wall)}
                except DPGatewayError as error:
                    out[query.id] = {"refused": f"{error.sqlstate}: {str(error).splitlines()[0][:160]}"}
        finally:
            gateway.close()
    return out


def run_peer(name: str, workload: Workload, job: dict[str, Any]) -> dict[str, Any]:
    python = venv(name)
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps({**job, "workload": workload.name, "data_dir": workload.data_dir}))
        runner = PEERS_DIR / f"runner_{name}.py"
        done = subprocess.run(
            [str(python), str(runner), str(job_file), str(out_file)],
            capture_output=True,
            text=True,
            timeout=PEER_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0 or not out_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {q.id: {"refused": f"{name} failed: {tail[0][:160]}"} for q in workload.queries}
        return dict(json.loads(out_file.read_text()))


# -- errors and the report -------------------------------------------------------------------------------


def relative_error(released: list[list[Any]], exact: list[list[Any]], n_keys: int) -> float:
    """Mean over the exact answer's cells and numeric columns of min(1, |released - exact| / |exact|).

    A cell the system does not release (suppressed by its partition selection, or missing) counts as 1,
    the same as an answer off by 100% or more, so a system is never scored on fewer, larger cells than
    another; capping at 1 keeps one wild cell from deciding the mean. Exact zeros are skipped.
    """
    given = {tuple(_key(v) for v in row[:n_keys]): row[n_keys:] for row in released}
    errors = []
    for row in exact:
        got_row = given.get(tuple(_key(v) for v in row[:n_keys]))
        for i, want in enumerate(row[n_keys:]):
            if want is None or float(want) == 0:
                continue
            got = got_row[i] if got_row is not None and i < len(got_row) else None
            if got is None or (isinstance(got, float) and math.isnan(got)):
                errors.append(1.0)
            else:
                errors.append(min(1.0, abs(float(got) - float(want)) / abs(float(want))))
    return statistics.fmean(errors) if errors else math.nan


def _key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def summarize(query: Query, answer: dict[str, Any], exact: list[list[Any]]) -> dict[str, Any]:
    if "refused" in answer:
        return {"refused": answer["refused"]}
    errors = [relative_error(t["rows"], exact, len(query.keys)) for t in answer["trials"]]
    errors = [e for e in errors if not math.isnan(e)]
    if not errors:
        return {"refused": "no released cell matches the exact answer"}
    return {"error": statistics.median(errors), "epsilon": answer["epsilon"], "seconds": answer.get("seconds")}


def compare(workloads: list[Workload], peers: list[str], job: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    server = None
    try:
        for workload in workloads:
            exact = exact_answers(workload)
            raw: dict[str, dict[str, Any]] = {}
            _log(f"{workload.name}: dpgateway")
            raw["dpgateway"] = run_ours(workload, job)
            for peer in peers:
                if peer == "qrlew":
                    if server is None:
                        sys.path.insert(0, str(ROOT / "tests"))
                        from pg_server import start_postgres

                        server = start_postgres()
                    load_postgres(workload, server.url)
                _log(f"{workload.name}: {peer}")
                peer_job = {**job, "pg_url": server.url if server is not None else ""}
                if peer == "tumult":
                    peer_job["trials"] = min(job["trials"], job["tumult_trials"])
                raw[peer] = run_peer(peer, workload, peer_job)
            results[workload.name] = {
                q.id: {s: summarize(q, raw[s][q.id], exact[q.id]) for s in raw if q.id in raw[s]}
                for q in workload.queries
            }
    finally:
        if server is not None:
            server.stop()
    return results


def report(workloads: list[Workload], results: dict[str, Any], job: dict[str, Any], peers: list[str]) -> str:
    systems = ["dpgateway", *peers]
    lines = [
        "# Accuracy against the peers at equal total epsilon",
        "",
        f"Generated by `python bench/compare.py` on {time.strftime('%Y-%m-%d')}: total ε = {job['epsilon']:g} and "
        f"δ = {job['delta']:g} per query for every system, {job['trials']} trials per query "
        f"(Tumult {min(job['trials'], job['tumult_trials'])}: each of its trials runs a Spark job). Cells: median "
        "over trials of the mean relative error against the exact answer on the raw rows, over the exact "
        "answer's cells, each cell's error capped at 100% and a cell the system does not release counted as "
        "100% (so suppressing small groups is not rewarded); a refusal shows the system's own message. "
        "Every system gets the same privacy unit, rows per person, value bounds and public key domains; how "
        "each peer is configured: bench/peers/runner_*.py.",
        "",
    ]
    ratios: list[float] = []
    answered = {s: 0 for s in systems}
    total = 0
    for workload in workloads:
        lines += [f"## {workload.name}", "", workload.description, ""]
        lines += ["| query | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
        for query in workload.queries:
            total += 1
            cells = results[workload.name][query.id]
            row = [f"`{query.sql}`"]
            for system in systems:
                cell = cells.get(system, {"refused": "not run"})
                if "error" in cell:
                    answered[system] += 1
                    row.append(f"{cell['error']:.2%}")
                else:
                    row.append(f"refused: {cell['refused']}".replace("|", "/"))
            lines.append("| " + " | ".join(row) + " |")
            ours = cells.get("dpgateway", {})
            best = [cells[p]["error"] for p in peers if "error" in cells.get(p, {})]
            if "error" in ours and best:
                ratios.append(ours["error"] / max(min(best), 1e-12))
        lines.append("")
    lines += ["## Summary", ""]
    lines += [f"- {s}: answers {answered[s]} of {total} queries" for s in systems]
    if ratios:
        lines.append(
            f"- On the {len(ratios)} queries dpgateway and at least one peer answer, the median of "
            f"(our error / the best peer's error) is {statistics.median(ratios):.2f} (target: at most 0.5)"
        )
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="tpch,pums", help="comma-separated: tpch, pums")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated: " + ", ".join(PEERS))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--tumult-trials", type=int, default=3, help="Tumult runs a Spark job per trial")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--scale", type=float, default=0.1, help="TPC-H scale factor")
    parser.add_argument("--out", default=str(ROOT / "bench" / "ACCURACY.md"), help="markdown file, or - for stdout")
    args = parser.parse_args(argv)
    names = [w for w in args.workload.split(",") if w]
    peers = [p for p in args.peers.split(",") if p]
    unknown = [n for n in names if n not in WORKLOADS] + [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown workload or peer: {', '.join(unknown)}")
    workloads = [prepare_data(WORKLOADS[n], args.scale) for n in names]
    job = {"epsilon": args.epsilon, "delta": args.delta, "trials": args.trials, "tumult_trials": args.tumult_trials}
    results = compare(workloads, peers, job)
    text = report(workloads, results, job, peers)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=1, default=str))
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
