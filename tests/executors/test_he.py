"""The he executor: answers and debits as plain, only ciphertexts and noisy values reach the gateway, refusals."""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from helpers import chi_square, dlap_pmf

pytest.importorskip("tenseal")

from dpgateway.errors import BackendError, ConfigError, InvalidParameterError, UnsupportedError
from dpgateway.executors import signing
from dpgateway.executors.base import NoisePlan
from dpgateway.executors.he import cube, scheme
from dpgateway.executors.he.executor import HeExecutor
from dpgateway.executors.he.holder import FRESH_SECONDS, Holder
from dpgateway.gateway import Gateway
from dpgateway.mechanisms import laplace_half_width
from dpgateway.policies.loader import parse_config

GROUPS = ["a", "b", "c"]
SQL = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM {t} GROUP BY g"
Row = tuple[int, str | None, int | None]


def _rows() -> list[Row]:
    rows: list[Row] = [(j, GROUPS[j % 3], (7 * j) % 60) for j in range(600)]
    rows += [(10_000, "a", 50)] * 200  # one person with 200 rows: bounded to k = 2
    rows += [(20_000, None, 5), (20_001, "zz", 5), (20_002, "b", None)]  # NULL and out-of-domain groups
    return rows


def _config(folder: Path, *, gateway: bool = False) -> dict[str, Any]:
    columns = {
        "pid": {"type": "int"},
        "g": {"type": "str", "public_values": GROUPS},
        "x": {"type": "int", "bounds": [0, 50]},
    }
    table = {"source": "data.parquet", "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": columns}
    return {
        # the gateway's copy of the policy names a source it does not have: it never reads the he table's rows
        "tables": {
            "enc": {**table, "executor": "he", **({"source": "at-the-owner.parquet"} if gateway else {})},
            "pooled": table,
        },
        "executors": {"he": {"key_holder": "keys/holder.key", "public_key": "keys/public.key", "timeout_s": 30}},
        "ledger": "sqlite:///ledger.db",
        "budget": {"per_subject": {"epsilon": 1000}, "per_analyst": {"epsilon": 1000}, "per_query": {"epsilon": 5}},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys, the owner's data and the encrypted cube of table ``enc`` (sums of x, grouped by g)."""
    folder = tmp_path_factory.mktemp("he")
    con = duckdb.connect()
    con.execute("CREATE TABLE t (pid BIGINT, g VARCHAR, x BIGINT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", _rows())
    con.execute(f"COPY t TO '{folder / 'data.parquet'}' (FORMAT parquet)")
    con.close()
    keys = folder / "keys"
    scheme.write_keys(scheme.generate(), keys / "holder.key", keys / "public.key", keys / "gateway.key")
    config = parse_config(_config(folder), base_dir=folder)
    table = config.table("enc")
    assert table is not None
    fields = cube.plan_fields(table, sums=["x"], avgs=["x"], variances=[], groupings=["g"])
    public = folder / "keys" / "public.key"
    cube.encrypt_table(
        table, cube.owner_copy(config, "enc"), scheme.read_keys(public), folder / "he-data" / "enc", fields=fields,
        key_digest=cube.key_id(public),
    )  # fmt: skip
    return folder


def _gateway(folder: Path) -> Gateway:
    assert not (folder / "at-the-owner.parquet").exists()
    return Gateway(parse_config(_config(folder, gateway=True), base_dir=folder))


def _exact(k: int = 2) -> dict[str | None, tuple[float, float]]:
    """Weighted count and sum per group (each unit's rows weighted k / max(n_u, k)), from the rows in Python."""
    rows = _rows()
    n_u: dict[int, int] = {}
    for pid, _, _ in rows:
        n_u[pid] = n_u.get(pid, 0) + 1
    out: dict[str | None, tuple[float, float]] = {}
    for g in [None, *GROUPS]:
        chosen = [r for r in rows if g is None or r[1] == g]
        count = sum(k / max(n_u[r[0]], k) for r in chosen)
        total = sum(k / max(n_u[r[0]], k) * min(max(r[2], 0), 50) for r in chosen if r[2] is not None)
        out[g] = (count, total)
    return out


def test_he_answers_within_noise_and_debits_like_plain(folder: Path) -> None:
    exact = _exact()
    with _gateway(folder) as gw:
        he = gw.query(SQL.format(t="enc"), analyst="h", epsilon=2.0)
        plain = gw.query(SQL.format(t="pooled"), analyst="p", epsilon=2.0)
        assert (he.epsilon, he.delta) == (plain.epsilon, plain.delta)
        spent = {c.analyst: (c.epsilon, c.delta) for c in gw.store.history()}
        assert spent["h"] == spent["p"]
        assert [r[0] for r in he.rows] == GROUPS == [r[0] for r in plain.rows]
        # per measurement epsilon 1: count noise scale 2 (k) rows, sum noise scale 100 (k * 50), 99.99% each
        for g, n, s in he.rows:
            assert abs(n - exact[g][0]) <= laplace_half_width(2.0, 0.9999) + 1
            assert abs(s - exact[g][1]) <= laplace_half_width(100.0, 0.9999) + 1
        scalar = gw.query("SELECT COUNT(*) AS n, AVG(x) AS a FROM enc", analyst="h", epsilon=2.0)
        units = sum(min(n, 2) for n in _units().values())
        assert abs(scalar.rows[0][0] - exact[None][0]) <= laplace_half_width(3.0, 0.9999) + 1
        assert 0 <= scalar.rows[0][1] <= 50
        alone = gw.query("SELECT COUNT(*) AS n FROM enc", analyst="h", epsilon=1.0)  # the unit-count estimator
        assert abs(alone.rows[0][0] - units) <= laplace_half_width(2.0, 0.9999)
        assert "he" in gw.explain(SQL.format(t="enc"), analyst="h", epsilon=1.0).executor


def _units() -> dict[int, int]:
    n_u: dict[int, int] = {}
    for pid, _, _ in _rows():
        n_u[pid] = n_u.get(pid, 0) + 1
    return n_u


class Recorder:
    """Records every message the gateway sends to the key holder and every reply it receives."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        original = HeExecutor.ask

        def ask(executor: HeExecutor, message: dict[str, Any]) -> dict[str, Any]:
            self.sent.append(copy.deepcopy(message))
            reply = original(executor, message)
            self.received.append(copy.deepcopy(reply))
            return reply

        monkeypatch.setattr(HeExecutor, "ask", ask)


def test_gateway_receives_only_ciphertexts_and_noisy_values(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    opened: list[str] = []
    real_open = os.open

    def watch(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    exact = _exact()
    with _gateway(folder) as gw:
        result = gw.query(SQL.format(t="enc"), analyst="b", epsilon=2.0)
        executor = gw.executors._he["enc"]
        assert isinstance(executor, HeExecutor) and executor._evaluator is not None
        assert executor._evaluator.keys.secret_key is None  # the gateway holds no secret key
    assert not any(p.endswith("holder.key") for p in opened)
    (message,) = recorder.sent
    (reply,) = recorder.received
    # what the gateway sends: the plan, the layout and one ciphertext; what it gets back: noisy values only
    sent = {
        "type",
        "noise",
        "fingerprint",
        "ciphertext",
        "period",
        "slots",
        "bounds",
        "capacity",
        "nonce",
        "issued",
        "mac",
    }
    assert set(message) == sent
    assert set(reply) == {"values", "fingerprint"}
    holder = Holder(folder / "keys" / "holder.key")
    slots, _ = holder.decryptor.decrypt(base64.b64decode(message["ciphertext"]))
    counts = [round(exact[g][0] * 10**6) for g in GROUPS]
    sent_counts = [slots[s] for s in message["slots"][0]]
    assert all(abs(a - b) <= 1000 for a, b in zip(sent_counts, counts, strict=True))  # the ciphertext is the totals
    assert all(v not in slots[: message["period"]] for column in reply["values"].values() for v in column)
    assert result.rows and all(isinstance(v, int) for column in reply["values"].values() for v in column)


def _request(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    recorder = Recorder(monkeypatch)
    with _gateway(folder) as gw:  # a fresh analyst: an earlier answer would be replayed, not recomputed
        gw.query(SQL.format(t="enc"), analyst=f"r{len(gw.store.history())}", epsilon=1.0)
    return recorder.sent[0]


def _signed(folder: Path, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` signed with the gateway's request key (as a gateway that meant to send it would), fresh."""
    message = {k: v for k, v in message.items() if k != "mac"} | {"nonce": secrets.token_hex(16), "issued": time.time()}
    return {**message, "mac": signing.sign(scheme.read_request_key(folder / "keys" / "gateway.key"), message)}


def test_key_holder_answers_a_signed_request_once_and_only_while_fresh(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A captured request replayed to the key holder gets no second, independently noised answer."""
    message = _request(folder, monkeypatch)
    holder = Holder(folder / "keys" / "holder.key")
    assert "values" in holder.handle(message)
    assert holder.handle(message) == {"error": "key holder refused: the request was already answered (a replay)"}
    key = scheme.read_request_key(folder / "keys" / "gateway.key")
    stale = {k: v for k, v in message.items() if k != "mac"} | {"nonce": secrets.token_hex(16)}
    stale["issued"] = time.time() - 2 * FRESH_SECONDS
    stale["mac"] = signing.sign(key, stale)
    assert "not fresh" in holder.handle(stale)["error"]
    assert "values" in holder.handle(_signed(folder, message))  # the same plan, newly issued: answered


def test_key_holder_refuses_a_plan_that_does_not_match(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _request(folder, monkeypatch)
    holder = Holder(folder / "keys" / "holder.key")
    assert "values" in holder.handle(message)
    tampered = copy.deepcopy(message)
    tampered["noise"]["measurements"][0][3] = (0.5).hex()  # a smaller noise scale, the old fingerprint
    unsigned = {"error": "key holder refused: the request is not signed by the gateway this key holder serves"}
    assert holder.handle(tampered) == unsigned  # changed after signing: the signature no longer matches
    assert holder.handle({**message, "mac": "0" * 64}) == unsigned
    assert holder.handle({k: v for k, v in message.items() if k != "mac"}) == unsigned
    mismatch = {"error": "key holder refused: the noise plan does not match its fingerprint"}
    assert holder.handle(_signed(folder, tampered)) == mismatch
    weaker = copy.deepcopy(tampered)
    weaker["fingerprint"] = NoisePlan.from_json(weaker["noise"]).fingerprint()  # consistent, but underpaid
    assert "does not pay for its declared epsilon" in holder.handle(_signed(folder, weaker))["error"]
    more = copy.deepcopy(message)
    more["slots"][0] = [*more["slots"][0], 7]
    assert "not cells x measurements" in holder.handle(_signed(folder, more))["error"]


def test_key_holder_decrypts_final_aggregates_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _request(folder, monkeypatch)
    holder = Holder(folder / "keys" / "holder.key")
    enc = cube.Cube.load(folder / "he-data" / "enc")
    evaluator = scheme.Evaluator(scheme.read_keys(folder / "keys" / "public.key"))
    raw = next(enc.batches())[0]  # one row block, not folded: a decryption-oracle request
    unfolded = {**message, "ciphertext": base64.b64encode(evaluator.to_bytes(evaluator.from_raw(raw))).decode()}
    assert "not a final aggregate" in holder.handle(_signed(folder, unfolded))["error"]


def test_overflow_is_refused(folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = parse_config(_config(folder), base_dir=folder)
    table = config.table("enc")
    assert table is not None
    fields = cube.plan_fields(table, sums=["x"], avgs=[], variances=[], groupings=[])
    keys = scheme.read_keys(folder / "keys" / "public.key")
    t = keys.plain_modulus
    assert scheme.fits(t // (2 * 10**6) - 1, 10**6, t) and not scheme.fits(t // (2 * 10**6) + 1, 10**6, t)
    prepared = next((folder / ".dpgateway-cache").glob("enc-*.parquet"))
    with pytest.raises(InvalidParameterError, match="could wrap the plaintext modulus"):
        cube.encrypt_table(table, prepared, keys, tmp_path / "big", fields=fields, key_digest="", pad_to=10**9)
    assert not (tmp_path / "big" / cube.CIPHERTEXTS).exists()
    message = _request(folder, monkeypatch)
    holder = Holder(folder / "keys" / "holder.key")
    assert "could wrap" in holder.handle(_signed(folder, {**message, "capacity": 10**9}))["error"]


def test_unsupported_shapes_are_refused_before_spending(folder: Path) -> None:
    with _gateway(folder) as gw:
        before = len(gw.store.history())
        for sql, match in [
            ("SELECT COUNT(*) FROM enc WHERE x > 3", "unfiltered queries only"),
            ("SELECT CASE WHEN x < 9 THEN 'lo' ELSE 'hi' END AS b, COUNT(*) FROM enc GROUP BY 1", "plain column only"),
            (
                "SELECT g, CASE WHEN x < 9 THEN 1 ELSE 2 END AS b, COUNT(*) FROM enc GROUP BY g, 2",
                "one public column at a time",
            ),
            ("SELECT x, COUNT(*) FROM enc GROUP BY x", "public groups only"),
            ("SELECT g, VARIANCE(x) FROM enc GROUP BY g", "no encrypted contributions"),
        ]:
            with pytest.raises(UnsupportedError, match=match):
                gw.query(sql, analyst="u", epsilon=1.0)
        assert len(gw.store.history()) == before


def test_key_file_must_be_private(folder: Path, tmp_path: Path) -> None:
    loose = tmp_path / "holder.key"
    loose.write_bytes((folder / "keys" / "holder.key").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(InvalidParameterError, match="readable by others"):
        Holder(loose)
    public = tmp_path / "public.key"
    public.write_bytes((folder / "keys" / "public.key").read_bytes())
    public.chmod(0o600)
    with pytest.raises(InvalidParameterError, match="holds no secret key"):
        Holder(public)
    assert (folder / "keys" / "holder.key").stat().st_mode & 0o777 == 0o600


def test_unreachable_key_holder_fails_the_query(folder: Path) -> None:
    raw = _config(folder, gateway=True)
    raw["executors"]["he"]["key_holder"] = "tcp://127.0.0.1:9"
    with Gateway(parse_config(raw, base_dir=folder)) as gw, pytest.raises(BackendError, match="key holder refused"):
        gw.query(SQL.format(t="enc"), analyst="d", epsilon=1.0)


@pytest.mark.slow
def test_noise_budget_after_a_large_sum(folder: Path) -> None:
    """4000 ciphertexts summed and folded still decrypt exactly (the budget scheme.py states)."""
    keys = scheme.read_keys(folder / "keys" / "public.key")
    holder = Holder(folder / "keys" / "holder.key")
    rng = np.random.default_rng(1)
    values = rng.integers(-(10**6), 10**6, size=(40, scheme.DEGREE))
    encryptor = scheme.Encryptor(keys)
    block = np.stack([encryptor.encrypt(v) for v in values])

    def batches() -> Iterator[np.ndarray]:
        for _ in range(100):
            yield block

    evaluator = scheme.Evaluator(keys)
    folded = evaluator.fold(evaluator.from_raw(scheme.sum_raw(batches(), keys.primes)), 32)
    slots, budget = holder.decryptor.decrypt(evaluator.to_bytes(folded))
    assert budget > 20
    expected = (values.sum(axis=0) * 100).reshape(-1, 32).sum(axis=0)
    assert slots[:32] == [int(v) for v in expected]


@pytest.mark.slow
def test_released_noise_is_the_central_distribution(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key holder's release minus the exact total is OpenDP's discrete Laplace at the planned scale.

    Seeded by construction (OpenDP cannot be seeded): the chi-square test fails with probability 1e-6.
    """
    recorder = Recorder(monkeypatch)
    with _gateway(folder) as gw:
        gw.query("SELECT COUNT(*) AS n FROM enc", analyst="dist", epsilon=0.5)  # unit count: sensitivity k = 2
    (message,) = recorder.sent
    noise = NoisePlan.from_json(message["noise"])
    scale = noise.measurements[0].scale
    exact = sum(min(n, 2) for n in _units().values())
    holder = Holder(folder / "keys" / "holder.key")
    draws = [
        holder.handle(_signed(folder, message))["values"][noise.measurements[0].name][0] - exact for _ in range(800)
    ]
    stat, critical = chi_square(draws, {z: dlap_pmf(scale, z) for z in range(-200, 201)})
    assert stat < critical, (stat, critical)


def test_cli_keygen_encrypt_and_query(folder: Path, tmp_path: Path) -> None:
    """The documented commands: keygen (0600 secret file), the owner's encrypt, then a query on the cube."""
    import yaml
    from click.testing import CliRunner

    from dpgateway.cli import cli

    (tmp_path / "data.parquet").write_bytes((folder / "data.parquet").read_bytes())
    (tmp_path / "dpgateway.yaml").write_text(yaml.safe_dump(_config(tmp_path)))
    runner = CliRunner()
    config = str(tmp_path / "dpgateway.yaml")
    keys = tmp_path / "keys"
    done = runner.invoke(cli, ["he", "keygen", "--out", str(keys)])
    assert done.exit_code == 0, done.output
    assert (keys / "holder.key").stat().st_mode & 0o777 == 0o600
    args = ["he", "encrypt", "enc", "--config", config, "--public-key", str(keys / "public.key")]
    done = runner.invoke(cli, [*args, "--out", str(tmp_path / "he-data"), "--sum", "x", "--group-by", "g"])
    assert done.exit_code == 0, done.output
    assert "encrypted enc: 2 ciphertexts, 9 fields per row" in done.output
    done = runner.invoke(cli, [*args, "--group-by", "x"])
    assert done.exit_code == 1 and "public_values" in done.output
    done = runner.invoke(cli, ["query", "--config", config, "--analyst", "c", "--format", "json", SQL.format(t="enc")])
    assert done.exit_code == 0, done.output
    assert [row[0] for row in json.loads(done.output)["rows"]] == GROUPS


def test_config_section(tmp_path: Path) -> None:
    raw = _config(tmp_path)
    config = parse_config(raw, base_dir=tmp_path)
    assert config.he.key_holder == str(tmp_path / "keys/holder.key")
    assert config.he.ciphertexts == tmp_path / "he-data"
    assert config.he.gateway_key == tmp_path / "keys" / "gateway.key"
    raw["executors"]["he"]["key_holder"] = "tcp://10.0.0.5:7000"
    assert parse_config(raw, base_dir=tmp_path).he.key_holder == "tcp://10.0.0.5:7000"
    raw["executors"]["he"]["secret"] = "x"
    with pytest.raises(ConfigError, match=r"executors\.he"):
        parse_config(raw, base_dir=tmp_path)


def test_a_cube_made_under_another_policy_is_refused(folder: Path) -> None:
    raw = _config(folder, gateway=True)
    raw["tables"]["enc"]["columns"]["x"]["bounds"] = [0, 500]  # the owner clamped to [0, 50]
    with Gateway(parse_config(raw, base_dir=folder)) as gw:
        with pytest.raises(UnsupportedError, match="encrypted under another policy"):
            gw.query(SQL.format(t="enc"), analyst="stale", epsilon=1.0)
        assert all(c.analyst != "stale" for c in gw.store.history())
