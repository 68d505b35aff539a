"""The query, explain and demo commands (the admin commands are tested in tests/ledger/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpgateway.cli import cli


@pytest.fixture
def run(demo_config_path: Path):
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None):
        return runner.invoke(cli, [*args], input=stdin, catch_exceptions=False)

    return invoke


def test_query_json_shape(run, demo_config_path: Path) -> None:
    result = run(
        "query",
        "--config",
        str(demo_config_path),
        "--analyst",
        "ann",
        "--epsilon",
        "0.5",
        "--format",
        "json",
        "SELECT sex, COUNT(*) AS n FROM pums GROUP BY sex",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) >= {"columns", "rows", "epsilon", "delta", "remaining"}
    assert doc["columns"] == ["sex", "n"] and [r[0] for r in doc["rows"]] == [0, 1]
    assert doc["epsilon"] == pytest.approx(0.5)
    assert doc["remaining"]["analyst"]["epsilon"] == pytest.approx(3.5)
    assert doc["remaining"]["domains"]["pid"]["epsilon"] == pytest.approx(3.5)


def test_query_table_and_csv(run, demo_config_path: Path) -> None:
    table = run("query", "--config", str(demo_config_path), "--analyst", "ann", "SELECT COUNT(*) AS n FROM pums")
    assert table.exit_code == 0 and "spent ε=0.5" in table.output and "n" in table.output
    csv_out = run(
        "query",
        "--config",
        str(demo_config_path),
        "--analyst",
        "ann",
        "--format",
        "csv",
        "SELECT COUNT(*) AS n FROM pums WHERE age > 3",
    )
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0] == "n,n ±95%" and lines[1].split(",")[0].lstrip("-").isdigit()


def test_query_from_stdin(run, demo_config_path: Path) -> None:
    result = run("query", "--config", str(demo_config_path), "--format", "json", "-", stdin="SELECT COUNT(*) FROM pums")
    assert json.loads(result.output)["columns"] == ["count"]


def test_refusal_exits_nonzero_with_sqlstate(run, demo_config_path: Path) -> None:
    result = run("query", "--config", str(demo_config_path), "SELECT * FROM pums")
    assert result.exit_code == 1
    assert result.output.startswith("ERROR 42501: SELECT * would release raw rows")
    as_json = run("query", "--config", str(demo_config_path), "--format", "json", "SELECT age FROM nowhere")
    assert as_json.exit_code == 1
    assert json.loads(as_json.output) == {
        "error": {"sqlstate": "42P01", "message": json.loads(as_json.output)["error"]["message"]}
    }
    assert "nowhere" in json.loads(as_json.output)["error"]["message"]


def test_budget_refusal_in_cli(run, demo_config_path: Path) -> None:
    for i in range(4):
        assert (
            run(
                "query",
                "--config",
                str(demo_config_path),
                "--analyst",
                "bo",
                "--epsilon",
                "1",
                f"SELECT COUNT(*) FROM pums WHERE age > {i}",
            ).exit_code
            == 0
        )
    refused = run("query", "--config", str(demo_config_path), "--analyst", "bo", "SELECT COUNT(*) FROM pums")
    assert refused.exit_code == 1 and refused.output.startswith("ERROR 53000:")


def test_missing_config_is_reported(run, tmp_path: Path) -> None:
    result = run("query", "--config", str(tmp_path / "none.yaml"), "SELECT 1")
    assert result.exit_code == 1 and "ERROR F0000: Config file" in result.output


def test_explain_spends_nothing(run, demo_config_path: Path) -> None:
    out = run(
        "explain",
        "--config",
        str(demo_config_path),
        "--format",
        "json",
        "--epsilon",
        "0.4",
        "SELECT educ, AVG(income) FROM pums GROUP BY educ",
    )
    doc = json.loads(out.output)
    assert doc["epsilon"] <= 0.4 and doc["delta"] > 0
    assert {m["measurement"] for m in doc["mechanisms"]} == {"COUNT(income)", "SUM(income - 250000)"}
    assert doc["accuracy_95"]["avg"].startswith("≈ ±")
    text = run("explain", "--config", str(demo_config_path), "SELECT COUNT(*) FROM pums")
    assert "bounded SQL" in text.output and "nothing spent" in text.output
    after = json.loads(
        run(
            "query",
            "--config",
            str(demo_config_path),
            "--format",
            "json",
            "--epsilon",
            "0.1",
            "SELECT COUNT(*) FROM pums",
        ).output
    )
    assert after["remaining"]["analyst"]["epsilon"] == pytest.approx(3.9)


def test_demo_runs_and_init_writes_a_starter(run, tmp_path: Path) -> None:
    result = run("demo")
    assert result.exit_code == 0, result.output
    assert "Average income by sex" in result.output and "spent ε=0.5" in result.output
    doc = json.loads(run("demo", "--format", "json").output)
    assert len(doc) == 5 and all(d["epsilon"] == pytest.approx(0.5) for d in doc)
    init = run("demo", "--init", str(tmp_path / "start"))
    assert init.exit_code == 0 and (tmp_path / "start" / "dpgateway.yaml").is_file()
    again = run(
        "query", "--config", str(tmp_path / "start" / "dpgateway.yaml"), "--format", "json", "SELECT COUNT(*) FROM pums"
    )
    assert again.exit_code == 0 and json.loads(again.output)["epsilon"] == pytest.approx(0.5)


def test_help_lists_every_command(run) -> None:
    out = run("--help").output
    for command in ("query", "explain", "demo", "budget", "audit"):
        assert command in out
