"""The mpc executor: same answers and debits as plain, only noisy totals cross to the gateway, drop-outs abort."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from helpers import chi_square, dlap_pmf

from dpgateway.errors import BackendError, ConfigError, InvalidParameterError, PrivacyViolationError, UnsupportedError
from dpgateway.executors import signing
from dpgateway.executors.base import NoisePlan, accept
from dpgateway.executors.mpc import executor as mpc_executor
from dpgateway.executors.mpc import field, keys, wire
from dpgateway.executors.mpc.party import Party
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
    send, receive = wire.send, wire.receive

    def sent(sock: socket.socket, message: dict[str, Any]) -> None:
        crossed.append(message)
        send(sock, message)

    def received(sock: socket.socket) -> dict[str, Any]:
        crossed.append(receive(sock))
        return crossed[-1]

    monkeypatch.setattr(wire, "send", sent)  # every message the gateway process sends or receives
    monkeypatch.setattr(wire, "receive", received)
    with _gateway(folder) as gw:
        gw.query(SQL.format(t="trial"), analyst="tap", epsilon=1.0)
    replies = [m for m in crossed if "partial" in m]
    assert len(replies) == K
    # each partial is a sum of uniform field elements: a plaintext aggregate (fixed point, all below 2^40 here) would be
    # small; P(a uniform element decodes below 2^100) = 2^-26 per value
    assert all(abs(field.decode(v)) > 2**100 for r in replies for v in r["partial"])
    total = [field.decode(v) for v in field.add([r["partial"] for r in replies])]
    assert all(abs(v) < 2**40 for v in total)  # only the sum of all partials is the (noisy) total
    assert all(set(r) == {"partial", "fingerprint", "qid", "seq", "mac"} for r in replies)
    queries = [m for m in crossed if m.get("type") == "query"]
    assert len(queries) == K
    fields = {"type", "qid", "sql", "noise", "fingerprint", "collusion_threshold", "peers", "index", "session", "seq"}
    assert all(set(m) == fields | {"mac"} for m in queries)
    hellos = [m for m in crossed if m.get("type") == "hello"]
    assert len(crossed) == len(queries) + len(replies) + len(hellos)  # nothing else crossed


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


@contextlib.contextmanager
def _running_parties(folder: Path, key_folder: Path, threshold: int = 1) -> Iterator[list[str]]:
    """K parties in this process (a server thread each) on their own key files; yields their addresses."""
    if not keys.gateway_file(key_folder).exists():
        keys.generate(K, key_folder)
    servers, parties = [], []
    try:
        for i in range(K):
            party_keys = keys.read_party(keys.party_file(key_folder, i))
            party = Party(folder / f"site{i}.parquet", party_keys, collusion_threshold=threshold, timeout=5)
            parties.append(party)
            server = wire.MessageServer(("127.0.0.1", 0), party.handle, challenge=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        yield [f"tcp://127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for party in parties:
            party.close()


def _remote_gateway(folder: Path, key_folder: Path, peers: list[str], **mpc: Any) -> Gateway:
    config = _config(folder, keys=str(key_folder), **mpc)
    config["tables"]["trial"]["source"] = {"parties": peers}
    return Gateway(parse_config(config, base_dir=folder))


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0, 1])
def test_released_noise_is_the_central_distribution(data: Any, threshold: int, tmp_path: Path) -> None:
    """t = 0: the release minus the exact total is exactly OpenDP's discrete Laplace; t = 1: two such draws.

    Seeded by construction (OpenDP cannot be seeded): the test fails with probability 1e-6 per case.
    """
    folder, parts = data
    with (
        _running_parties(folder, tmp_path, threshold) as peers,
        _remote_gateway(folder, tmp_path, peers, collusion_threshold=threshold) as gw,
    ):
        plan = gw.explain("SELECT COUNT(*) AS n FROM trial", epsilon=0.5).plan
        assert plan is not None
        runner = gw.executors.choose(plan)
        assert isinstance(runner, mpc_executor.MpcExecutor)
        noise = NoisePlan.from_plan(plan)
        scale = noise.measurements[0].scale
        exact = sum(len(p) for p in parts)
        draws = []
        for _ in range(800):
            result = runner.execute(plan, noise)
            accept(noise, result)
            draws.append(result.values[noise.measurements[0].name][0] - exact)
    single = {z: dlap_pmf(scale, z) for z in range(-25, 26)}
    pmf = (
        single
        if threshold == 0
        else {z: sum(single.get(a, 0) * single.get(z - a, 0) for a in single) for z in range(-25, 26)}
    )
    stat, critical = chi_square(draws, pmf)
    assert stat < critical, (stat, critical)


@pytest.fixture(scope="module")
def deployment(data: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str], Gateway]]:
    """Three running parties on their own keys (as if on other hosts) and a gateway listing them as tcp://."""
    folder, _ = data
    key_folder = tmp_path_factory.mktemp("mpc-keys")
    with _running_parties(folder, key_folder) as peers, _remote_gateway(folder, key_folder, peers) as gw:
        yield key_folder, peers, gw


def _request(gw: Gateway, peers: list[str]) -> dict[str, Any]:
    """The query message the gateway would send (before the party index, session, number and signature)."""
    plan = gw.explain(SQL.format(t="trial"), epsilon=1.0).plan
    assert plan is not None
    noise = NoisePlan.from_plan(plan)
    return {
        "type": "query",
        "qid": "q" + str(id(noise)),
        "sql": str(plan.bounded_sql),
        "noise": noise.to_json(),
        "fingerprint": noise.fingerprint(),
        "collusion_threshold": 1,
        "peers": peers,
    }


def _connect(peer: str) -> wire.Connection:
    host, _, port = peer.removeprefix("tcp://").rpartition(":")
    return wire.Connection((host, int(port)), 5, challenge=True)


def _ask(connection: wire.Connection, message: dict[str, Any]) -> dict[str, Any]:
    wire.send(connection.sock, message)
    return wire.receive(connection.sock)


def test_parties_answer_the_gateway_that_holds_their_keys(deployment: Any, data: Any) -> None:
    _, _, gw = deployment
    _, parts = data
    rows = [r for p in parts for r in p]
    result = gw.query(SQL.format(t="trial"), analyst="signed", epsilon=2.0)
    for g, n, _ in result.rows:
        assert abs(n - sum(1 for r in rows if r[1] == g)) <= result.half_width["n"]


def test_parties_refuse_unsigned_tampered_and_wrongly_keyed_requests(deployment: Any, tmp_path: Path) -> None:
    key_folder, peers, gw = deployment
    request_key = keys.read_gateway(keys.gateway_file(key_folder))[0]
    keys.generate(K, tmp_path)
    other_key = keys.read_gateway(keys.gateway_file(tmp_path))[0]  # another deployment's key for party 0
    message = _request(gw, peers)
    refused = "party refused or failed: Refused: the request is not signed by the gateway this party serves"
    with contextlib.closing(_connect(peers[0])) as connection:
        bound = {**message, "index": 0, "session": connection.nonce, "seq": 0}
        assert _ask(connection, bound) == {"error": refused}  # unsigned
        signed = signing.signed(request_key, bound)
        widened = {**signed, "noise": {**signed["noise"], "delta": 0.5}}
        assert _ask(connection, widened) == {"error": refused}  # changed after signing
        assert _ask(connection, {**signed, "sql": signed["sql"].replace("LEAST", "GREATEST")}) == {"error": refused}
        assert _ask(connection, {**signed, "mac": "0" * 64}) == {"error": refused}
        assert _ask(connection, signing.signed(other_key, bound)) == {"error": refused}  # wrong key
        to_other = signing.signed(request_key, {**bound, "index": 1})  # party 0's key, asking as if to party 1
        assert "this is party 0" in _ask(connection, to_other)["error"]


def test_parties_refuse_replayed_requests(deployment: Any) -> None:
    key_folder, peers, gw = deployment
    request_keys = keys.read_gateway(keys.gateway_file(key_folder))
    message = _request(gw, peers)
    connections = [_connect(p) for p in peers]
    try:
        signed = [
            signing.signed(request_keys[i], {**message, "index": i, "session": c.nonce, "seq": 0})
            for i, c in enumerate(connections)
        ]
        for connection, request in zip(connections, signed, strict=True):
            wire.send(connection.sock, request)
        replies = [wire.receive(c.sock) for c in connections]
        assert all("partial" in r and signing.signed_by(k, r) for r, k in zip(replies, request_keys, strict=True))
        replayed = "the request is replayed"
        assert replayed in _ask(connections[0], signed[0])["error"]  # same connection, same number
        with contextlib.closing(_connect(peers[0])) as fresh:  # another connection: another challenge
            assert replayed in _ask(fresh, signed[0])["error"]
            later = signing.signed(request_keys[0], {**message, "index": 0, "session": fresh.nonce, "seq": 1})
            assert replayed in _ask(fresh, later)["error"]  # a number skipped ahead
    finally:
        for connection in connections:
            connection.close()


def test_parties_take_shares_only_from_the_party_named(deployment: Any) -> None:
    key_folder, peers, _ = deployment
    pair_key = keys.read_party(keys.party_file(key_folder, 1)).pair_keys[0]  # parties 0 and 1 share it
    with contextlib.closing(_connect(peers[2])) as connection:
        share = {"type": "share", "qid": "forged", "sender": 0, "values": [1, 2], "session": connection.nonce, "seq": 0}
        reply = _ask(connection, signing.signed(pair_key, share))  # signed by 0-1's key, sent to party 2
        assert reply == {"error": "party refused or failed: Refused: the share is not signed by the party it names"}


def test_the_gateway_takes_only_partials_signed_for_its_request(data: Any, tmp_path: Path) -> None:
    folder, _ = data
    keys.generate(K, tmp_path)
    forged = {"partial": [0, 0, 0, 0], "fingerprint": "x"}
    servers = [wire.MessageServer(("127.0.0.1", 0), lambda m, s: forged, challenge=True) for _ in range(K)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    peers = [f"tcp://127.0.0.1:{s.server_address[1]}" for s in servers]
    try:
        with _remote_gateway(folder, tmp_path, peers) as gw, pytest.raises(BackendError, match="not signed by it"):
            gw.query(SQL.format(t="trial"), analyst="forged", epsilon=1.0)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_remote_parties_need_a_key_folder(data: Any) -> None:
    folder, _ = data
    config = _config(folder)
    config["tables"]["trial"]["source"] = {"parties": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]}
    with pytest.raises(ConfigError, match="dpgateway mpc keygen"):
        parse_config(config, base_dir=folder)


def test_keygen_writes_private_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    keys.generate(3, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gateway.key", "party0.key", "party1.key", "party2.key"]
    assert all((tmp_path / f).stat().st_mode & 0o777 == 0o600 for f in files)
    party1, party2 = keys.read_party(tmp_path / "party1.key"), keys.read_party(tmp_path / "party2.key")
    assert party1.request_key == keys.read_gateway(tmp_path / "gateway.key")[1] != party2.request_key
    assert party1.pair_keys[2] == party2.pair_keys[1] and 1 not in party1.pair_keys
    with pytest.raises(InvalidParameterError, match="exists"):
        keys.generate(3, tmp_path)
    (tmp_path / "party1.key").chmod(0o644)
    with pytest.raises(InvalidParameterError, match="readable by others"):
        keys.read_party(tmp_path / "party1.key")


def test_a_party_reads_its_file_again_once_it_changed(tmp_path: Path) -> None:
    for name in [f"site{i}" for i in range(K)] + ["all"]:
        _write(tmp_path / f"{name}.parquet", [(0, "a", 1)])
    keys.generate(K, tmp_path / "keys")
    with _gateway(tmp_path) as gw:
        plan = gw.explain("SELECT g, COUNT(*) AS n FROM trial GROUP BY g").plan
    assert plan is not None
    noise = NoisePlan.from_plan(plan)
    party = Party(tmp_path / "site0.parquet", keys.read_party(tmp_path / "keys" / "party0.key"), collusion_threshold=1)
    try:
        before = party._local(str(plan.bounded_sql), noise)  # exact local aggregates, in fixed point
        _write(tmp_path / "site0.parquet", [(j, "b", 1) for j in range(5)])
        after = party._local(str(plan.bounded_sql), noise)
    finally:
        party.close()
    assert before[0][1] == 0 < before[0][0] and after[0][0] == 0 < after[0][1] == 5 * before[0][0]


def test_shares_cross_the_network_masked(deployment: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone reading every link sees only padded shares: y_i = partial_i - in_i + out_i needs the pair keys."""
    key_folder, peers, gw = deployment
    index = {("127.0.0.1", int(p.rpartition(":")[2])): i for i, p in enumerate(peers)}
    shares: list[tuple[int, int, list[int]]] = []  # (sender, receiver, values on the wire)
    partials: dict[int, list[int]] = {}
    qids: set[str] = set()
    send = wire.send

    def tap(sock: socket.socket, message: dict[str, Any]) -> None:
        if message.get("type") == "query":
            qids.add(message["qid"])
        if message.get("type") == "share":
            shares.append((message["sender"], index[sock.getpeername()[:2]], list(message["values"])))
        if "partial" in message:
            partials[index[sock.getsockname()[:2]]] = list(message["partial"])
        send(sock, message)

    monkeypatch.setattr(wire, "send", tap)  # the parties run in this process: their sends are tapped too
    gw.query("SELECT COUNT(*) AS n FROM trial", analyst="eavesdrop", epsilon=1.0)
    assert len(shares) == K * (K - 1) and sorted(partials) == list(range(K))
    pair = {i: keys.read_party(keys.party_file(key_folder, i)).pair_keys for i in range(K)}
    (qid,) = qids

    def local(i: int, unmask: bool) -> int:
        def clear(sender: int, receiver: int, values: list[int]) -> int:
            pad = field.pad(pair[sender][receiver], qid, sender, receiver, 1)[0] if unmask else 0
            return (values[0] - pad) % field.PRIME

        received = sum(clear(s, r, v) for s, r, v in shares if r == i)
        sent = sum(clear(s, r, v) for s, r, v in shares if s == i)
        return field.decode(partials[i][0] - received + sent)

    assert all(abs(local(i, unmask=True)) < 2**40 for i in range(K))  # with the keys: each party's y_i
    assert all(abs(local(i, unmask=False)) > 2**100 for i in range(K))  # without: uniform (P < 2^-26 each to fail)


def test_a_pool_replaces_a_connection_the_server_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "IDLE_S", 0.2)  # the server drops connections idle for 0.2 s
    server = wire.MessageServer(("127.0.0.1", 0), lambda m, s: {"seen": s.fresh(m)}, challenge=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = ("127.0.0.1", int(server.server_address[1]))
    pool = wire.Pool(5, challenge=True)
    try:
        first = pool.take(address)
        first.send({"type": "ping"}, b"k" * 32)
        assert first.receive() == {"seen": True}
        pool.give(address, first)
        assert pool.take(address) is first  # reused while open
        pool.give(address, first)
        time.sleep(0.6)
        second = pool.take(address)  # the server closed the first: a new connection, a new challenge
        assert second is not first and second.nonce != first.nonce and second.seq == 0
        second.send({"type": "ping"}, b"k" * 32)
        assert second.receive() == {"seen": True}
        second.close()
    finally:
        pool.close()
        server.shutdown()
        server.server_close()
