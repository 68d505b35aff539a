"""Load behaviour: many idle connections cost little server memory; a slow query blocks no other session."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PASSWORD, Running

from dpgateway import Gateway

psycopg = pytest.importorskip("psycopg")

IDLE_CONNECTIONS = 200
MEMORY_LIMIT_MB = 100


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_idle_connections_stay_within_100_mb(demo_config_path: Path) -> None:
    config = ["--config", str(demo_config_path)]
    dpgateway = [str(Path(sys.executable).parent / "dpgateway")]
    subprocess.run(
        [*dpgateway, "user", "add", "alice", "--password-stdin", *config], input=f"{PASSWORD}\n", text=True, check=True
    )
    port = _free_port()
    log = demo_config_path.parent / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen([*dpgateway, "serve", "--port", str(port), "--no-catalog", *config], stderr=sink)
    connections = []
    try:
        dsn = f"host=127.0.0.1 port={port} dbname=dpgateway user=alice password={PASSWORD}"
        for _ in range(100):  # wait for the listener
            try:
                first = psycopg.connect(dsn, autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start: {log.read_text()}")
        first.execute("SELECT COUNT(*) FROM pums").fetchone()  # warm: plan, data, noise code loaded
        connections.append(first)
        before = _rss_mb(server.pid)
        connections += [psycopg.connect(dsn, autocommit=True) for _ in range(IDLE_CONNECTIONS - 1)]
        grown = _rss_mb(server.pid) - before
        assert grown < MEMORY_LIMIT_MB, f"{IDLE_CONNECTIONS} idle connections grew the server by {grown:.1f} MB"
        assert connections[-1].execute("SELECT 1").fetchone() == (1,)  # and it still answers
    finally:
        for conn in connections:
            conn.close()
        server.terminate()
        assert server.wait(10) == 0  # SIGTERM is a clean stop (the shadow catalog, when started, is removed)


def test_a_slow_query_blocks_no_other_session(
    wire: Running, demo_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    started = threading.Event()
    query = demo_gateway.query

    def slow(sql: str, **kwargs: object) -> object:
        if "age > 77" in sql:
            started.set()
            release.wait(30)
        return query(sql, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_gateway, "query", slow)
    outcome: list[object] = []

    def run_slow() -> None:
        with psycopg.connect(wire.dsn(user="bob"), autocommit=True) as conn:
            outcome.append(conn.execute("SELECT COUNT(*) FROM pums WHERE age > 77").fetchone())

    thread = threading.Thread(target=run_slow)
    thread.start()
    try:
        assert started.wait(10)
        begun = time.monotonic()
        with psycopg.connect(wire.dsn(), autocommit=True) as conn:
            assert isinstance(conn.execute("SELECT COUNT(*) FROM pums WHERE age > 30").fetchone()[0], int)
            conn.execute("SHOW dp.budget").fetchone()
        assert time.monotonic() - begun < 5  # answered while the slow query still runs
        assert thread.is_alive() and not outcome
    finally:
        release.set()
        thread.join(30)
    assert outcome and isinstance(outcome[0][0], int)  # type: ignore[index]
