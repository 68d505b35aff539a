"""The mpc executor: same answers and debits as plain, only noisy totals cross to the gateway, drop-outs abort."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest
from helpers import chi_square, dlap_pmf

from dpgateway.errors import BackendError, PrivacyViolationError, UnsupportedError
from dpgateway.executors.mpc import executor as mpc_executor
from dpgateway.executors.mpc import field
from dpgateway.executors.mpc.party import Party
from dpgateway.executors.mpc.wire import MessageServer
from dpgateway.gateway import Gateway
from dpgateway.policies.loader import parse_config

K = 3
GROUPS = ["a", "b"]
SQL = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM {t} GROUP BY g"


def _write(path: Path, rows: list[tuple[int, str, int]]) -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (pid BIGINT, g VARCHAR, x BIGINT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    con.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    con.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[tuple[int, str, int]]]]:
    folder = tmp_path_factory.mktemp("mpc")
    parts = [[(1000 * i + j, GROUPS[j % 2], (7 * j + i) % 50) for j in range(200 + 50 * i)] for i in range(K)]
    for i, rows in enumerate(parts):
        _write(folder / f"site{i}.parquet", rows)
    _write(folder / "all.parquet", [r for rows in parts for r in rows])
    return folder, parts


def _config(folder: Path, **mpc: Any) -> dict[str, Any]:
    columns = {
        "pid": {"type": "int"},
        "g": {"type": "str", "public_values": GROUPS},
        "x": {"type": "int", "bounds": [0, 50]},
    }
    return {
        "tables": {
            "trial": {
                "source": {"parties": [f"site{i}.parquet" for i in range(K)]},
                "executor": "mpc",
                "privacy_unit": "pid",
                "columns": columns,
            },
            "pooled": {"source": "all.parquet", "privacy_unit": "pid", "columns": columns},
        },
        "executors": {"mpc": {"units_disjoint": True, "timeout_s": 5, **mpc}},
        "ledger": "sqlite:///ledger.db",
        "budget": {"per_subject": {"epsilon": 100}, "per_analyst": {"epsilon": 100}, "per_query": {"epsilon": 5}},
    }


def _gateway(folder: Path, **mpc: Any) -> Gateway:
    return Gateway(parse_config(_config(folder, **mpc), base_dir=folder))


def test_mpc_answers_within_noise_and_debits_like_plain(data: Any) -> None:
    folder, parts = data
    rows = [r for p in parts for r in p]
    exact = {g: (sum(1 for r in rows if r[1] == g), sum(r[2] for r in rows if r[1] == g)) for g in GROUPS}
    with _gateway(folder) as gw:
        mpc = gw.query(SQL.format(t="trial"), analyst="m", epsilon=2.0)
        plain = gw.query(SQL.format(t="pooled"), analyst="p", epsilon=2.0)
        assert mpc.epsilon == plain.epsilon and mpc.delta == plain.delta
        assert gw.remaining("m") == gw.remaining("p") | {"analyst": gw.remaining("m")["analyst"]}
        spent = {c.analyst: (c.epsilon, c.delta) for c in gw.store.history()}
        assert spent["m"] == spent["p"]
        for g, n, s in mpc.rows:
            assert abs(n - exact[g][0]) <= mpc.half_width["n"]
            assert abs(s - exact[g][1]) <= mpc.half_width["s"]
        assert "executor: mpc (3 parties" in " ".join(gw.explain(SQL.format(t="trial")).notes)


def test_sensitivity_counts_every_party(data: Any) -> None:
    folder, _ = data
    with _gateway(folder, units_disjoint=False) as gw:
        split = {m.measurement: m.sensitivity for m in gw.explain(SQL.format(t="trial")).mechanisms}
        pooled = {m.measurement: m.sensitivity for m in gw.explain(SQL.format(t="pooled")).mechanisms}
    assert split == {name: K * value for name, value in pooled.items()}


def test_gateway_receives_only_shares_and_the_noisy_total(data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = data
    crossed: list[dict[str, Any]] = []
    real = mpc_executor.wire.request

    def tap(address: tuple[str, int], message: dict[str, Any], timeout: float) -> dict[str, Any]:
        crossed.append(message)
        reply = real(address, message, timeout)
        crossed.append(reply)
        return reply

    monkeypatch.setattr(mpc_executor.wire, "request", tap)
    with _gateway(folder) as gw:
        gw.query(SQL.format(t="trial"), analyst="tap", epsilon=1.0)
    replies = [m for m in crossed if "partial" in m]
    assert len(replies) == K
    # each partial is a sum of uniform field elements: a plaintext aggregate (fixed point, all below 2^40 here) would be
    # small; P(a uniform element decodes below 2^100) = 2^-26 per value
    assert all(abs(field.decode(v)) > 2**100 for r in replies for v in r["partial"])
    total = [field.decode(v) for v in field.add([r["partial"] for r in replies])]
    assert all(abs(v) < 2**40 for v in total)  # only the sum of all partials is the (noisy) total
    sent = [m for m in crossed if m.get("type") == "query"]
    assert all(
        set(m) == {"type", "qid", "sql", "noise", "fingerprint", "collusion_threshold", "peers", "index"} for m in sent
    )


def test_a_party_drop_out_aborts_and_is_charged(data: Any) -> None:
    folder, _ = data
    with _gateway(folder) as gw:
        gw.query(SQL.format(t="trial"), analyst="d", epsilon=0.5)  # starts the parties
        runner = gw.executors._mpc["trial"]
        assert isinstance(runner, mpc_executor.MpcExecutor)
        runner._processes[2].kill()
        runner._processes[2].wait()
        with pytest.raises(BackendError, match=r"mpc party \d aborted"):
            gw.query(SQL.format(t="trial") + " -- again", analyst="d", epsilon=0.5)
        charges = [c for c in gw.store.history() if c.analyst == "d"]
        assert [c.state for c in charges] == ["committed", "committed"]


@pytest.mark.parametrize("aggregate", ["MEDIAN(x)", "MAX(x)", "COUNT(DISTINCT pid)"])
def test_quantiles_and_distinct_counts_are_refused(data: Any, aggregate: str) -> None:
    folder, _ = data
    with _gateway(folder) as gw, pytest.raises(UnsupportedError, match="run on the plain executor") as info:
        gw.explain(f"SELECT g, {aggregate} FROM trial GROUP BY g")
    assert info.value.sqlstate == "0A000" and "--executor plain" in info.value.message


def test_executor_override_needs_the_policy(data: Any) -> None:
    folder, _ = data
    with _gateway(folder) as gw, pytest.raises(PrivacyViolationError, match="does not allow mpc"):
        gw.query(SQL.format(t="pooled"), analyst="o", executor="mpc")


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0, 1])
def test_released_noise_is_the_central_distribution(data: Any, threshold: int) -> None:
    """t = 0: the release minus the exact total is exactly OpenDP's discrete Laplace; t = 1: two such draws.

    Seeded by construction (OpenDP cannot be seeded): the test fails with probability 0.001 per case.
    """
    folder, parts = data
    servers, parties = [], []
    for i in range(K):
        party = Party(folder / f"site{i}.parquet", collusion_threshold=threshold, timeout=5)
        parties.append(party)
        server = MessageServer(("127.0.0.1", 0), party.handle)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    peers = [f"tcp://127.0.0.1:{s.server_address[1]}" for s in servers]
    config = parse_config(_config(folder, collusion_threshold=threshold), base_dir=folder)
    try:
        with Gateway(config) as gw:
            plan = gw.explain("SELECT COUNT(*) AS n FROM trial", epsilon=0.5).plan
            assert plan is not None
            runner = gw.executors.choose(plan)
            assert isinstance(runner, mpc_executor.MpcExecutor)
            runner._addresses = peers
            from dpgateway.executors.base import NoisePlan, accept

            noise = NoisePlan.from_plan(plan)
            scale = noise.measurements[0].scale
            exact = sum(len(p) for p in parts)
            draws = []
            for _ in range(800):
                result = runner.execute(plan, noise)
                accept(noise, result)
                draws.append(result.values[noise.measurements[0].name][0] - exact)
            runner._addresses = []
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for party in parties:
            party.close()
    single = {z: dlap_pmf(scale, z) for z in range(-25, 26)}
    pmf = (
        single
        if threshold == 0
        else {z: sum(single.get(a, 0) * single.get(z - a, 0) for a in single) for z in range(-25, 26)}
    )
    stat, critical = chi_square(draws, pmf)
    assert stat < critical, (stat, critical)
