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
    assert added.exit_code == 0 and "added user alice" in added.output
    admin = runner.invoke(cli, ["user", "add", "root", "--admin", *config], input="long-password\nlong-password\n")
    assert admin.exit_code == 0, admin.output
    listed = runner.invoke(cli, ["user", "list", *config])
    assert "alice" in listed.output and "admin" in listed.output and "long-password" not in listed.output
    again = runner.invoke(cli, ["user", "add", "alice", "--password-stdin", *config], input="another-one\n")
    assert again.exit_code == 1 and 'ERROR 22023: user "alice" already exists' in again.output
    changed = runner.invoke(cli, ["user", "passwd", "alice", "--password-stdin", *config], input="new-password\n")
    assert changed.exit_code == 0
    assert runner.invoke(cli, ["user", "remove", "alice", *config]).exit_code == 0
    gone = runner.invoke(cli, ["user", "remove", "alice", *config])
    assert gone.exit_code == 1 and "ERROR 42704" in gone.output


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
