"""`dpgateway user ...` and the `server:` config section."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dpgateway.cli import cli
from dpgateway.errors import ConfigError
from dpgateway.policies.loader import parse_config


def test_user_commands(demo_config_path: Path) -> None:
    runner = CliRunner()
    config = ["--config", str(demo_config_path)]
    added = runner.invoke(cli, ["user", "add", "alice", "--password-stdin", *config], input="long-password\n")
    assert added.exit_code == 0 and "added user alice" in added.output  # no admin yet: anyone may add users
    admin = runner.invoke(cli, ["user", "add", "root", "--admin", *config], input="root-password\nroot-password\n")
    assert admin.exit_code == 0, admin.output
    listed = runner.invoke(cli, ["user", "list", *config])
    assert "alice" in listed.output and "admin" in listed.output and "long-password" not in listed.output
    as_root = ["--by", "root", "--password-stdin", *config]
    again = runner.invoke(cli, ["user", "add", "alice", *as_root], input="root-password\nanother-one\n")
    assert again.exit_code == 1 and 'ERROR 22023: user "alice" already exists' in again.output
    changed = runner.invoke(cli, ["user", "passwd", "alice", *as_root], input="root-password\nnew-password\n")
    assert changed.exit_code == 0, changed.output
    assert runner.invoke(cli, ["user", "remove", "alice", *as_root], input="root-password\n").exit_code == 0
    gone = runner.invoke(cli, ["user", "remove", "alice", *as_root], input="root-password\n")
    assert gone.exit_code == 1 and "ERROR 42704" in gone.output


def test_user_commands_need_an_admin_once_one_exists(demo_config_path: Path) -> None:
    runner = CliRunner()
    config = ["--config", str(demo_config_path), "--password-stdin"]
    runner.invoke(cli, ["user", "add", "root", "--admin", *config], input="root-password\n")
    added = runner.invoke(cli, ["user", "add", "alice", "--by", "root", *config], input="root-password\nalice-pass\n")
    assert added.exit_code == 0, added.output
    for by, password in (("root", "wrong-password"), ("alice", "alice-pass"), ("nobody", "x")):
        sneaky = runner.invoke(
            cli, ["user", "add", "eve", "--admin", "--by", by, *config], input=f"{password}\nevepass1\n"
        )
        assert sneaky.exit_code == 1 and ("ERROR 28P01" in sneaky.output or "ERROR 42501" in sneaky.output), by
    escalated = runner.invoke(cli, ["user", "passwd", "root", "--by", "alice", *config], input="alice-pass\nmine-now\n")
    assert escalated.exit_code == 1 and 'ERROR 42501: user "alice" is not an admin' in escalated.output
    listed = runner.invoke(cli, ["user", "list", "--config", str(demo_config_path)]).output
    assert "eve" not in listed


def test_budget_admin_needs_the_admin_password(demo_config_path: Path) -> None:
    """`admins: [admin]` in the demo config stops counting once users exist: a typed name proves nothing."""
    runner = CliRunner()
    config = ["--config", str(demo_config_path)]
    grant = ["budget", "grant", "analyst", "alice", "--epsilon", "1", "--yes", *config]
    assert runner.invoke(cli, [*grant, "--analyst", "admin"]).exit_code == 0  # no users yet: the config's admins
    runner.invoke(cli, ["user", "add", "root", "--admin", "--password-stdin", *config], input="root-password\n")
    runner.invoke(
        cli, ["user", "add", "alice", "--password-stdin", "--by", "root", *config], input="root-password\nalice-pass\n"
    )
    for analyst, password, code in (
        ("admin", "anything1", "28P01"),
        ("alice", "alice-pass", "42501"),
        ("root", "nope-nope", "28P01"),
    ):
        for command in (
            grant,
            ["budget", "set-cap", "analyst", "alice", "--epsilon", "99", "--yes", *config],
            ["budget", "reset", "analyst", "alice", "--yes", *config],
        ):
            refused = runner.invoke(cli, [*command, "--analyst", analyst, "--password-stdin"], input=f"{password}\n")
            assert refused.exit_code == 1 and f"ERROR {code}" in refused.output, (analyst, command, refused.output)
    done = runner.invoke(
        cli, [*grant, "--analyst", "root", "--password-stdin", "--format", "json"], input="root-password\n"
    )
    assert done.exit_code == 0, done.output
    audit = runner.invoke(cli, ["audit", "--outcome", "admin", "--format", "json", *config]).output
    assert '"analyst": "root"' in audit


def test_server_section(tmp_path: Path) -> None:
    tables = {"t": {"source": "t.csv", "public": True}}
    config = parse_config(
        {"tables": tables, "server": {"port": 7000, "tls_cert": "c.pem", "tls_key": "k.pem"}}, base_dir=tmp_path
    )
    assert config.server.port == 7000 and config.server.tls_cert == tmp_path / "c.pem"
    assert parse_config({"tables": tables}, base_dir=tmp_path).server.database == "dpgateway"
    with pytest.raises(ConfigError, match="set both tls_cert and tls_key"):
        parse_config({"tables": tables, "server": {"tls_cert": "c.pem"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"server\.port: must be a port number"):
        parse_config({"tables": tables, "server": {"port": "x"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="server: unknown key 'hots'"):
        parse_config({"tables": tables, "server": {"hots": "x"}}, base_dir=tmp_path)
