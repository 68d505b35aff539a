"""The enclave executor through the gateway and the CLI: labelled simulated everywhere, refused in production,
what crosses the boundary, refusals before the reservation, the executor override and the demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dpgateway.cli import cli
from dpgateway.errors import BackendError, ConfigError, InternalError, InvalidParameterError, PrivacyViolationError
from dpgateway.executors.enclave import protocol
from dpgateway.executors.enclave.executor import EnclaveExecutor
from dpgateway.gateway import Gateway
from dpgateway.policies.loader import parse_config
from executors.common import HE_MISSING, Data, executor_config

SQL = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM vault GROUP BY g"


def test_every_answer_explain_and_audit_record_says_simulated(executor_gateway: Gateway) -> None:
    gw = executor_gateway
    result = gw.query(SQL, analyst="label", epsilon=1.0)
    assert result.warnings and "SIMULATED executor enclave (backend: simulated" in result.warnings[0]
    explained = gw.explain(SQL).to_dict()
    assert explained["executor"] == "enclave" and explained["simulated"] is True
    assert "simulated" in explained["executor_detail"]
    assert any(note.startswith("executor: enclave (backend: simulated") for note in explained["notes"])
    (record,) = gw.store.audit_log(analyst="label")
    assert record.outcome == "released" and "executor: enclave (backend: simulated" in record.message
    assert gw.executors.choose(gw.explain(SQL).plan).simulated  # type: ignore[arg-type]


def test_production_refuses_the_simulated_backend(executor_data: Data) -> None:
    config = executor_config(executor_data.folder, enclave={"allow_simulated": False})
    with pytest.raises(ConfigError, match="allow_simulated: true for development"):
        parse_config(config, base_dir=executor_data.folder)
    del config["executors"]["enclave"]["allow_simulated"]  # the default is production
    with pytest.raises(ConfigError, match="refused in production"):
        parse_config(config, base_dir=executor_data.folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sealed": {}}, "reads only a sealed copy"),
        ({"backend": "sgx"}, "must be simulated"),
        ({"measurements": ["abc"]}, "96-hex-digit"),
        ({"sealed": {"vault": {"file": "vault.sealed"}}}, "two paths"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_enclave_settings_are_validated(executor_data: Data, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(executor_config(executor_data.folder, enclave=change), base_dir=executor_data.folder)


def test_only_wrapped_keys_and_noisy_values_cross_the_boundary(
    executor_gateway: Gateway, executor_data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    crossed: list[tuple[dict[str, Any], dict[str, Any]]] = []
    real = EnclaveExecutor._ask

    def tap(self: EnclaveExecutor, message: dict[str, Any]) -> dict[str, Any]:
        reply = real(self, message)
        crossed.append((message, reply))
        return reply

    monkeypatch.setattr(EnclaveExecutor, "_ask", tap)
    executor_gateway.query(SQL, analyst="tap", epsilon=1.0)
    (quote, evidence), (run, release) = crossed
    assert quote["op"] == "quote" and set(evidence) == {"session", "report", "kex_public", "sig_public"}
    assert run["op"] == "run" and set(run["grant"]) == {"broker_public", "iv", "wrapped"}
    key = protocol.read_key_file(executor_data.folder / "vault.key")
    assert protocol.b64(key) not in json.dumps(run) and len(protocol.unb64(run["grant"]["wrapped"])) == 32 + 16
    assert set(release) == {"cells", "values", "signature"}  # noisy integers per public cell, signed; nothing else
    assert sorted(release["values"]) == ["__m0", "__m1"] and all(len(v) == 2 for v in release["values"].values())


def test_a_result_not_signed_by_the_attested_key_is_rejected_and_charged(
    executor_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = EnclaveExecutor._ask

    def forge(self: EnclaveExecutor, message: dict[str, Any]) -> dict[str, Any]:
        reply = real(self, message)
        if message["op"] == "run":
            reply["values"] = {k: [v + 1 for v in column] for k, column in reply["values"].items()}
        return reply

    monkeypatch.setattr(EnclaveExecutor, "_ask", forge)
    with pytest.raises(InternalError, match="not signed by the attested enclave key"):
        executor_gateway.query(SQL, analyst="forge", epsilon=0.5)
    assert [(c.epsilon, c.state) for c in executor_gateway.store.history() if c.analyst == "forge"] == [
        (0.5, "committed")
    ]


def test_the_enclave_refuses_a_statement_reading_anything_else(executor_gateway: Gateway) -> None:
    plan = executor_gateway.explain(SQL).plan
    assert plan is not None
    runner = executor_gateway.executors.choose(plan)
    assert isinstance(runner, EnclaveExecutor)
    from dpgateway.executors.base import NoisePlan

    noise = NoisePlan.from_plan(plan)
    message = {
        "op": "quote",
        "nonce": protocol.b64(runner.broker.nonce()),
        "noise": noise.to_json(),
        "fingerprint": noise.fingerprint(),
        "sql": "SELECT COUNT(*) FROM read_parquet('/etc/passwd')",
        "source": str(plan.table.source) if plan.table else "",
        "sealed": "vault.sealed",
    }
    with pytest.raises(BackendError, match="enclave failed: PrivacyViolationError"):
        runner._ask(message)
    with pytest.raises(BackendError, match="does not match its fingerprint"):
        runner._ask({**message, "fingerprint": "0" * 64})
    with pytest.raises(BackendError, match="each attestation admits one run"):
        runner._ask({"op": "run", "session": "made-up", "grant": {}})


def test_a_measurement_outside_the_allowlist_refuses_before_any_debit(executor_data: Data) -> None:
    config = executor_config(executor_data.folder, enclave={"measurements": ["ab" * 48]})
    config["ledger"] = f"sqlite:///{executor_data.folder / 'allowlist.db'}"
    with Gateway(parse_config(config, base_dir=executor_data.folder)) as gw:
        with pytest.raises(Exception, match="not in the allowlist"):
            gw.query(SQL, analyst="allow", epsilon=0.5)
        assert gw.store.history() == []
        assert gw.store.audit_log(analyst="allow")[0].outcome == "refused"


def test_executor_override_follows_the_policy(executor_data: Data) -> None:
    config = executor_config(executor_data.folder)
    config["tables"]["pooled"]["executors_allowed"] = ["enclave"]
    config["executors"]["enclave"]["sealed"]["pooled"] = {"file": "vault.sealed", "key": "vault.key"}
    config["ledger"] = f"sqlite:///{executor_data.folder / 'override.db'}"
    path = executor_data.folder / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    sql = "SELECT COUNT(*) AS n FROM pooled"
    runner = CliRunner()
    out = runner.invoke(cli, ["explain", "--config", str(path), "--executor", "enclave", "--format", "json", sql])
    assert out.exit_code == 0, out.output
    explained = json.loads(out.output)
    assert explained["executor"] == "enclave" and explained["simulated"] is True
    out = runner.invoke(cli, ["explain", "--config", str(path), sql])
    assert out.exit_code == 0 and "executor: plain" in out.output
    out = runner.invoke(cli, ["query", "--config", str(path), "--executor", "enclave", "--format", "json", sql])
    assert out.exit_code == 0, out.output
    assert "SIMULATED executor enclave" in out.output
    out = runner.invoke(cli, ["query", "--config", str(path), "--executor", "mpc", sql])
    assert out.exit_code != 0 and "42501" in out.output and "does not allow mpc" in out.output
    with Gateway(parse_config(config, base_dir=executor_data.folder)) as gw:
        with pytest.raises(PrivacyViolationError, match="does not allow mpc"):
            gw.query(sql, analyst="o", executor="mpc")
        with pytest.raises(InvalidParameterError, match="runs on the enclave executor"):
            gw.prepare("vault")


def test_seal_command_and_measurement(tmp_path: Path, executor_data: Data) -> None:
    runner = CliRunner()
    source = executor_data.folder / "all.parquet"
    out = runner.invoke(
        cli, ["enclave", "seal", str(source), "--key", str(tmp_path / "k"), "--out", str(tmp_path / "s")]
    )
    assert out.exit_code == 0, out.output
    key = protocol.read_key_file(tmp_path / "k")
    assert protocol.open_sealed((tmp_path / "s").read_bytes(), key) == source.read_bytes()
    again = runner.invoke(
        cli, ["enclave", "seal", str(source), "--key", str(tmp_path / "k"), "--out", str(tmp_path / "s")]
    )
    assert again.exit_code != 0 and "never overwrites" in again.output
    out = runner.invoke(cli, ["enclave", "measurement"])
    assert out.exit_code == 0 and len(out.output.strip()) == 96


def test_demo_refuses_he_without_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpgateway.executors.he import scheme

    monkeypatch.setattr(scheme, "seal", None)  # as if tenseal were not installed
    monkeypatch.delitem(sys.modules, "dpgateway.executors.he.demo", raising=False)
    out = CliRunner().invoke(cli, ["demo", "--executor", "he"])
    assert out.exit_code != 0 and "tenseal" in out.output and "dpgateway[he]" in out.output


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["mpc", "enclave", pytest.param("he", marks=HE_MISSING)])
def test_demo_runs_end_to_end_with_timings(executor: str) -> None:
    out = CliRunner().invoke(cli, ["demo", "--executor", executor, "--format", "json"])
    assert out.exit_code == 0, out.output
    document = json.loads(out.output[out.output.index("{") :])
    assert document["executor"] == executor and document["debits_equal_plain"] is True
    assert len(document["queries"]) == 3 and all(q["seconds"] > 0 for q in document["queries"])
    assert any(step.startswith("owner:") for step, _, _ in document["timings"])
