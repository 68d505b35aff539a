"""The admin CLI through click's CliRunner: budget show/history/grant/set-cap/reset and audit."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from conftest import make_spend

from dpgateway.admin_cli import audit, budget
from dpgateway.budget_store import open_store
from dpgateway.policies.loader import load_config

CONFIG = """
tables:
  pums:
    source: pums.csv
    privacy_unit: pid
    columns: {pid: {type: int}, age: {type: int, bounds: [0, 100]}}
budget:
  window_days: 30
  per_analyst: {epsilon: 2.0, delta: 1.0e-6}
  per_subject: {epsilon: 3.0, delta: 1.0e-6}
ledger: sqlite:///ledger.db
admins: [boss]
"""


@click.group()
def cli() -> None:
    """Stands in for the root group of dpgateway/cli.py."""


cli.add_command(budget)
cli.add_command(audit)


@pytest.fixture
def config_path(tmp_path: Path) -> str:
    path = tmp_path / "dpgateway.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    with open_store(config.ledger, config.budget) as store:
        for analyst in ("alice", "bob", "alice"):
            store.commit(store.reserve(make_spend(analyst=analyst)), epsilon=0.5, delta=1e-7, answer=[1])
        store.audit_event(make_spend(analyst="bob", sql="SELECT pid FROM pums"), outcome="refused", message="raw")
    return str(path)


def run(*args: str, user: str = "boss", stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, env={"DPGATEWAY_ANALYST": user, "COLUMNS": "200"})


def test_show_table_json_and_csv(config_path):
    table = run("budget", "show", "--config", config_path)
    assert table.exit_code == 0, table.output
    assert "rolling 30-day window" in table.output
    assert "│ analyst │ alice │ 1 " in table.output
    data = json.loads(run("budget", "show", "--config", config_path, "--format", "json").output)
    pid = next(s for s in data["scopes"] if s["kind"] == "domain")
    assert (pid["name"], pid["spent"]["epsilon"], pid["remaining"]["epsilon"], pid["cap"]["epsilon"]) == (
        "pid",
        1.5,
        1.5,
        3.0,
    )
    assert pid["next_expiry"] is not None and data["window_days"] == 30
    rows = list(
        csv.DictReader(
            io.StringIO(run("budget", "show", "--kind", "analyst", "--config", config_path, "--format", "csv").output)
        )
    )
    assert [(r["name"], r["eps left"]) for r in rows] == [("alice", "1.0"), ("bob", "1.5")]


def test_show_on_an_empty_ledger_states_the_default_caps(tmp_path):
    path = tmp_path / "dpgateway.yaml"
    path.write_text(CONFIG)
    result = run("budget", "show", "--config", str(path))
    assert result.exit_code == 0
    assert "No analyst or domain has spent budget in the last 30 days" in result.output
    assert "analyst epsilon=2" in result.output


def test_only_admins_change_caps(config_path):
    refused = run("budget", "grant", "analyst", "bob", "--epsilon", "1", "--config", config_path, user="bob")
    assert refused.exit_code == 1
    assert "ERROR 28P01: Analyst 'bob' may not change budgets" in refused.output
    assert "Traceback" not in refused.output
    as_json = run(
        "budget",
        "set-cap",
        "domain",
        "pid",
        "--epsilon",
        "9",
        "--analyst",
        "eve",
        "--config",
        config_path,
        "--format",
        "json",
    )
    assert as_json.exit_code == 1
    assert json.loads(as_json.output)["error"]["sqlstate"] == "28P01"
    reset = run("budget", "reset", "analyst", "alice", "--yes", "--config", config_path, user="alice")
    assert "ERROR 28P01" in reset.output


def test_grant_and_set_cap(config_path):
    granted = run("budget", "grant", "analyst", "bob", "--epsilon", "1", "--config", config_path)
    assert granted.exit_code == 0, granted.output
    assert "Granted analyst:bob: cap is now epsilon=3, delta=1e-06" in granted.output
    result = run(
        "budget",
        "set-cap",
        "domain",
        "pid",
        "--epsilon",
        "10",
        "--delta",
        "1e-5",
        "--config",
        config_path,
        "--format",
        "json",
    )
    assert json.loads(result.output) == {"scope": "domain:pid", "cap": {"epsilon": 10.0, "delta": 1e-5}}
    assert "3 *" in run("budget", "show", "--config", config_path).output
    nothing = run("budget", "grant", "analyst", "bob", "--config", config_path)
    assert "ERROR 22023: nothing to grant" in nothing.output


def test_reset_asks_for_confirmation(config_path):
    declined = run("budget", "reset", "analyst", "alice", "--config", config_path, stdin="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert '"name": "alice"' in run("budget", "show", "--config", config_path, "--format", "json").output
    confirmed = run("budget", "reset", "analyst", "alice", "--config", config_path, stdin="y\n")
    assert "Reset analyst:alice: 2 charge(s) no longer count against it" in confirmed.output
    quiet = run("budget", "reset", "analyst", "bob", "--yes", "--config", config_path, "--format", "json")
    assert json.loads(quiet.output) == {"scope": "analyst:bob", "charges_reset": 1}


def test_history_chart_json_csv_and_png(config_path, tmp_path):
    table = run("budget", "history", "analyst", "alice", "--config", config_path)
    assert table.exit_code == 0, table.output
    assert "epsilon spent in the rolling 30-day window (analyst:alice)" in table.output
    assert table.output.count("committed") == 2
    data = json.loads(run("budget", "history", "--since", "1d", "--config", config_path, "--format", "json").output)
    assert [c["analyst"] for c in data["charges"]] == ["alice", "bob", "alice"]
    assert data["charges"][0]["scopes"] == "analyst:alice domain:pid"
    rows = list(
        csv.reader(
            io.StringIO(run("budget", "history", "domain", "pid", "--config", config_path, "--format", "csv").output)
        )
    )
    assert rows[0][:2] == ["time (UTC)", "analyst"] and len(rows) == 4
    png = tmp_path / "spend.png"
    written = run("budget", "history", "--png", str(png), "--config", config_path)
    assert written.exit_code == 0, written.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    half = run("budget", "history", "analyst", "--config", config_path)
    assert "ERROR 22023: give both KIND and NAME" in half.output


def test_png_without_matplotlib_is_a_clear_error(config_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("budget", "history", "--png", str(tmp_path / "x.png"), "--config", config_path)
    assert result.exit_code == 1
    assert (
        "ERROR 0A000: --png needs matplotlib, which `pip install .` does not install; run `pip install 'dpgateway[plot]'`"
        in result.output
    )
    assert not (tmp_path / "x.png").exists()


def test_audit_filters_and_formats(config_path):
    table = run("audit", "--config", config_path)
    assert table.exit_code == 0, table.output
    assert "Audit log (newest first)" in table.output and "released" in table.output
    records = json.loads(run("audit", "--analyst", "bob", "--config", config_path, "--format", "json").output)
    assert [r["outcome"] for r in records] == ["refused", "released"]
    assert records[0]["sql"] == "SELECT pid FROM pums" and records[0]["message"] == "raw"
    refused = json.loads(
        run("audit", "--outcome", "refused", "--since", "1h", "--config", config_path, "--format", "json").output
    )
    assert len(refused) == 1
    rows = list(
        csv.reader(io.StringIO(run("audit", "--limit", "2", "--config", config_path, "--format", "csv").output))
    )
    assert len(rows) == 3 and rows[0][2] == "outcome"
    since_iso = json.loads(run("audit", "--since", "2999-01-01", "--config", config_path, "--format", "json").output)
    assert since_iso == []
    bad = run("audit", "--since", "yesterday", "--config", config_path)
    assert bad.exit_code == 1 and "ERROR 22023: --since 'yesterday'" in bad.output


def test_missing_config_is_a_config_error(tmp_path):
    result = run("audit", "--config", str(tmp_path / "absent.yaml"), "--format", "json")
    assert result.exit_code == 1
    assert json.loads(result.output)["error"]["sqlstate"] == "F0000"


def test_grant_or_set_cap_on_an_unknown_name_needs_confirmation(config_path, monkeypatch):
    typo = run("budget", "grant", "analyst", "alcie", "--epsilon", "1", "--config", config_path)
    assert typo.exit_code == 1
    assert "ERROR 22023: analyst:alcie matches no analyst in the ledger or the policy" in typo.output
    assert "pass --yes" in typo.output
    domain = run("budget", "set-cap", "domain", "pdi", "--epsilon", "5", "--config", config_path)
    assert domain.exit_code == 1 and "domain:pdi matches no domain" in domain.output
    assert '"alcie"' not in run("budget", "show", "--config", config_path, "--format", "json").output
    forced = run("budget", "grant", "analyst", "carol", "--epsilon", "1", "--yes", "--config", config_path)
    assert forced.exit_code == 0 and "Granted analyst:carol: cap is now epsilon=3" in forced.output
    assert run("budget", "grant", "analyst", "carol", "--epsilon", "1", "--config", config_path).exit_code == 0
    for known in (["analyst", "bob"], ["analyst", "boss"], ["domain", "pid"]):  # charged, admin, policy domain
        assert run("budget", "set-cap", *known, "--epsilon", "9", "--config", config_path).exit_code == 0
    monkeypatch.setattr("dpgateway.admin_cli._interactive", lambda: True)
    declined = run("budget", "grant", "analyst", "dave", "--epsilon", "1", "--config", config_path, stdin="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    asked = run("budget", "grant", "analyst", "dave", "--epsilon", "1", "--config", config_path, stdin="y\n")
    assert "matches no analyst in the ledger or the policy (a typo?). Change its cap anyway?" in asked.output
    assert asked.exit_code == 0 and "Granted analyst:dave" in asked.output


def test_admin_names_are_normalized(config_path):
    spaced = run(
        "budget", "grant", "analyst", "  bob ", "--epsilon", "1", "--analyst", " boss ", "--config", config_path
    )
    assert spaced.exit_code == 0 and "Granted analyst:bob: cap is now epsilon=3" in spaced.output
    history = json.loads(
        run("budget", "history", "analyst", " alice", "--config", config_path, "--format", "json").output
    )
    assert history["scope"] == "analyst:alice" and len(history["charges"]) == 2
    assert len(json.loads(run("audit", "--analyst", "bob ", "--config", config_path, "--format", "json").output)) == 2
    empty = run("budget", "grant", "analyst", "   ", "--epsilon", "1", "--config", config_path)
    assert empty.exit_code == 1 and "ERROR 22023: analyst '' is not a usable name" in empty.output
    blank_admin = run("budget", "grant", "analyst", "bob", "--epsilon", "1", "--config", config_path, user="  ")
    assert blank_admin.exit_code == 1 and "ERROR 22023" in blank_admin.output and "Traceback" not in blank_admin.output


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "abc"])
def test_absurd_cap_amounts_are_refused(config_path, value):
    for command in ("grant", "set-cap"):
        result = run("budget", command, "analyst", "bob", "--epsilon", value, "--config", config_path)
        assert result.exit_code == 1 and result.output.startswith("ERROR 22023: budget "), result.output
        assert "finite numbers >= 0" in result.output
