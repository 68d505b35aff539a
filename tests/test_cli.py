"""The query, explain and demo commands (the admin commands are tested in tests/ledger/)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dpgateway import Gateway, noise
from dpgateway.answers import avg_warnings
from dpgateway.cli import cli
from dpgateway.errors import InvalidParameterError
from dpgateway.gateway import PUBLIC, resolve_analyst
from dpgateway.mechanisms import laplace_half_width
from dpgateway.noise import Noisy


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


BY_SEX = "SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income FROM pums GROUP BY sex"


def test_query_output_carries_accuracy_in_every_format(run, demo_config_path: Path) -> None:
    config = str(demo_config_path)
    explained = json.loads(run("explain", "--config", config, "--format", "json", "--epsilon", "0.5", BY_SEX).stdout)
    doc = json.loads(run("query", "--config", config, "--epsilon", "0.5", "--format", "json", BY_SEX).stdout)
    assert doc["accuracy_95"] == explained["accuracy_95"] and set(doc["accuracy_95"]) == set(doc["columns"])
    assert doc["half_width_95"]["n"] > 0 and doc["accuracy_95"]["n"] == f"±{doc['half_width_95']['n']:.6g}"
    assert doc["half_width_95"]["sex"] == 0.0 and doc["half_width_95"]["avg_income"] is None
    assert doc["accuracy_95"]["avg_income"].startswith("≈ ±") and doc["warnings"] == []
    # the same query again is a free replay: same values, and the accuracy of the first answer
    rows = list(csv.reader(io.StringIO(run("query", "--config", config, "--format", "csv", BY_SEX).stdout)))
    assert rows[0] == ["sex", "n", "n ±95%", "avg_income", "avg_income ±95%"]
    assert [[int(r[0]), int(r[1])] for r in rows[1:]] == [row[:2] for row in doc["rows"]]
    assert all(float(r[2]) == doc["half_width_95"]["n"] and r[4] == doc["accuracy_95"]["avg_income"] for r in rows[1:])
    table = run("query", "--config", config, BY_SEX)
    assert f"95% {doc['accuracy_95']['n']}" in table.stdout and "exact key" in table.stdout
    caption = " ".join(table.stdout.split())  # the console wraps at 80 columns
    assert "replayed from cache: no cost; the values and their accuracy are those of the first answer" in caption


@pytest.fixture
def public_config(demo_config_path: Path) -> Path:
    """The demo policy plus a public table."""
    (demo_config_path.parent / "regions.csv").write_text("region,pop\nnorth,10\nsouth,20\n")
    policy = yaml.safe_load(demo_config_path.read_text())
    policy["tables"]["regions"] = {"source": "regions.csv", "public": True}
    demo_config_path.write_text(yaml.safe_dump(policy))
    return demo_config_path


def test_public_key_only_and_replayed_answers_say_what_applies(run, public_config: Path) -> None:
    with Gateway.from_config(public_config) as gw:
        public = gw.query("SELECT region, pop FROM regions", analyst="ann")
        assert public.accuracy == {"region": PUBLIC, "pop": PUBLIC} and public.half_width == {"region": 0.0, "pop": 0.0}
        keys = gw.query("SELECT sex FROM pums GROUP BY sex", analyst="ann")
        assert keys.epsilon == 0 and keys.accuracy == {"sex": "exact key"} and keys.half_width == {"sex": 0.0}
        first = gw.query(BY_SEX, analyst="ann", epsilon=0.5)
        again = gw.query(BY_SEX, analyst="ann", epsilon=0.5)
    assert again.replayed and not first.replayed and again.rows == first.rows
    assert (again.accuracy, again.half_width, again.warnings) == (first.accuracy, first.half_width, first.warnings)
    table = run("query", "--config", str(public_config), "SELECT region, pop FROM regions")
    assert "public data: exact, no cost" in table.stdout and "exact (public data)" in table.stdout
    rows = list(
        csv.reader(
            io.StringIO(
                run(
                    "query", "--config", str(public_config), "--format", "csv", "SELECT region, pop FROM regions"
                ).stdout
            )
        )
    )
    assert rows == [
        ["region", "region ±95%", "pop", "pop ±95%"],
        ["north", "0.0", "10", "0.0"],
        ["south", "0.0", "20", "0.0"],
    ]


@pytest.fixture
def no_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noisy values equal the exact bounded aggregates, so the warning is deterministic."""
    monkeypatch.setattr(noise, "noisy_vector", lambda values, scale, mechanism="laplace": list(values))


def test_avg_over_a_tiny_group_warns(run, demo_gateway: Gateway, demo_config_path: Path, no_noise: None) -> None:
    tiny = "SELECT sex, AVG(income) AS a FROM pums WHERE age > 100 GROUP BY sex"  # no one: noisy n = exact 0
    warned = demo_gateway.query(tiny, analyst="ann", epsilon=0.5)
    assert len(warned.warnings) == 1
    assert warned.warnings[0].startswith("column 'a' (AVG) is mostly noise in 2 of 2 group(s): (sex=0; noisy n=0)")
    assert demo_gateway.query(tiny, analyst="ann", epsilon=0.5).warnings == warned.warnings  # replayed
    assert demo_gateway.query("SELECT AVG(income) AS a FROM pums", analyst="ann").warnings == ()
    out = run("query", "--config", str(demo_config_path), "--format", "json", tiny)
    assert out.exit_code == 0 and out.stderr.startswith("WARNING: column 'a' (AVG) is mostly noise")
    assert json.loads(out.stdout)["warnings"] == [out.stderr.removeprefix("WARNING: ").strip()]


def test_avg_warning_rule_is_the_documented_floor(demo_gateway: Gateway) -> None:
    """A group warns exactly when its noisy count n <= max(W_count, W_sum / ((hi - lo) / 2))."""
    plan = demo_gateway.explain("SELECT sex, AVG(income) AS a FROM pums GROUP BY sex", epsilon=0.5).plan
    assert plan is not None
    count = next(m for m in plan.measurements if m.kind == "count")
    total = next(m for m in plan.measurements if m.kind == "sum")
    floor = max(
        laplace_half_width(count.noise_scale) / count.scale,
        laplace_half_width(total.noise_scale) / total.scale / ((500000 - 0) / 2),
    )
    columns = ("__g0", *(m.name for m in plan.measurements))
    at, above = int(floor), int(floor) + 1
    values = {count.name: [above, at], total.name: [0.0, 0.0]}
    released = Noisy(columns=columns, values=([0, 1], *(values[m.name] for m in plan.measurements)))
    (warning,) = avg_warnings(plan, released)
    assert f"in 1 of 2 group(s): (sex=1; noisy n={at})" in warning and f"at most {floor:.6g}" in warning
    released = Noisy(
        columns=columns,
        values=([0, 1], *([above, above] if m.kind == "count" else [0.0, 0.0] for m in plan.measurements)),
    )
    assert avg_warnings(plan, released) == ()


QUERY = "SELECT COUNT(*) FROM pums"
PRIVATE_KEYS = "SELECT educ, COUNT(*) FROM pums GROUP BY educ"


@pytest.mark.parametrize(
    ("options", "sql", "sqlstate", "message"),
    [
        (["--epsilon", "5e-324"], QUERY, "22023", "below the smallest epsilon"),
        (["--epsilon", "1e-300"], PRIVATE_KEYS, "22023", "below the smallest epsilon"),
        (["--epsilon", "1e308"], QUERY, "53400", "one query may spend at most"),
        (["--epsilon", "nan"], QUERY, "22023", "positive finite number, not nan"),
        (["--epsilon", "inf"], QUERY, "22023", "positive finite number, not inf"),
        (["--epsilon", "-inf"], QUERY, "22023", "positive finite number"),
        (["--epsilon", "0"], QUERY, "22023", "positive finite number"),
        (["--epsilon", "abc"], QUERY, "22023", "positive finite number, not 'abc'"),
        (["--delta", "1e-320"], PRIVATE_KEYS, "22023", "below the smallest delta"),
        (["--delta", "5e-324"], PRIVATE_KEYS, "22023", "below the smallest delta"),
        (["--delta", "nan"], QUERY, "22023", "delta must be a number in [0, 1), not nan"),
        (["--delta", "1e308"], QUERY, "22023", "delta must be a number in [0, 1)"),
        (["--delta", "-1"], QUERY, "22023", "delta must be a number in [0, 1)"),
        (["--delta", "x"], QUERY, "22023", "delta must be a number in [0, 1), not 'x'"),
        (["--analyst", "  "], QUERY, "22023", "is not a usable name"),
    ],
)
def test_absurd_parameters_are_clear_errors(run, demo_config_path: Path, options, sql, sqlstate, message) -> None:
    for command in ("query", "explain") if sqlstate == "22023" else ("query",):
        result = run(command, "--config", str(demo_config_path), *options, sql)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.startswith(f"ERROR {sqlstate}: ") and message in result.stderr, result.output
        as_json = run(command, "--config", str(demo_config_path), "--format", "json", *options, sql)
        assert json.loads(as_json.stdout)["error"]["sqlstate"] == sqlstate


def _under_a_file(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: unusable even for root (chmod would not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "sub"


@pytest.mark.parametrize("case", ["ledger", "png", "demo-init", "prepare-cache"])
def test_unusable_paths_are_clear_errors(run, demo_config_path: Path, tmp_path: Path, case: str) -> None:
    bad = _under_a_file(tmp_path)
    config = str(demo_config_path)
    policy = yaml.safe_load(demo_config_path.read_text())
    if case == "ledger":
        policy["ledger"] = f"sqlite:///{bad / 'ledger.db'}"
        demo_config_path.write_text(yaml.safe_dump(policy))
        args, expected = ["query", "--config", config, QUERY], ("58000", "Ledger database")
    elif case == "png":
        args, expected = ["budget", "history", "--png", str(bad / "x.png"), "--config", config], ("58030", "--png")
    elif case == "demo-init":
        args, expected = ["demo", "--init", str(bad)], ("58030", "demo --init cannot write into")
    else:
        policy["cache_dir"] = str(bad)
        demo_config_path.write_text(yaml.safe_dump(policy))
        args, expected = ["prepare", "pums", "--config", config], ("58030", "cache_dir")
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"ERROR {expected[0]}: ") and expected[1] in result.stderr, result.output


def test_demo_init_never_overwrites(run, tmp_path: Path) -> None:
    target = tmp_path / "start"
    assert run("demo", "--init", str(target)).exit_code == 0
    (target / "dpgateway.yaml").write_text("my own policy")
    again = run("demo", "--init", str(target))
    assert again.exit_code == 1 and again.stderr.startswith("ERROR 22023: ")
    assert "already holds pums.csv and dpgateway.yaml; demo --init never overwrites" in again.stderr
    assert (target / "dpgateway.yaml").read_text() == "my own policy"
    only_data = tmp_path / "data"
    only_data.mkdir()
    (only_data / "pums.csv").write_text("mine")
    refused = run("demo", "--init", str(only_data))
    assert refused.exit_code == 1 and "already holds pums.csv" in refused.stderr
    assert (only_data / "pums.csv").read_text() == "mine" and not (only_data / "dpgateway.yaml").exists()


def test_analyst_names_are_normalized(run, demo_gateway: Gateway, demo_config_path: Path) -> None:
    demo_gateway.query(QUERY, analyst="  ann\t", epsilon=0.5)
    assert demo_gateway.remaining("ann")["analyst"]["epsilon"] == pytest.approx(999.5)
    assert resolve_analyst(" bo ") == "bo"
    for bad in ("", "   ", "a\nb", "x" * 201):
        with pytest.raises(InvalidParameterError, match="is not a usable name"):
            demo_gateway.query(QUERY, analyst=bad)
        with pytest.raises(InvalidParameterError, match="is not a usable name"):
            demo_gateway.explain(QUERY, analyst=bad)
    run("query", "--config", str(demo_config_path), "--analyst", " cy ", QUERY)
    run("query", "--config", str(demo_config_path), "--analyst", "cy", "SELECT COUNT(*) FROM pums WHERE age > 1")
    shown = json.loads(run("budget", "show", "--config", str(demo_config_path), "--format", "json").stdout)
    analysts = {s["name"]: s["spent"]["epsilon"] for s in shown["scopes"] if s["kind"] == "analyst"}
    assert analysts == {"ann": pytest.approx(0.5), "cy": pytest.approx(1.0)}


def test_names_and_values_print_literally_in_tables(run, demo_config_path: Path) -> None:
    config = str(demo_config_path)
    for name in ("[red]mallory[/]", "[bold]eve", "[/]"):
        assert run("query", "--config", config, "--analyst", name, QUERY).exit_code == 0
    wide = CliRunner().invoke(cli, ["budget", "show", "--config", config], env={"COLUMNS": "200"})
    audit = CliRunner().invoke(cli, ["audit", "--config", config], env={"COLUMNS": "300"})
    for name in ("[red]mallory[/]", "[bold]eve", "[/]"):
        assert name in wide.stdout and name in audit.stdout
    header = run("query", "--config", config, "--analyst", "ann", 'SELECT COUNT(*) AS "[red]n[/]" FROM pums')
    assert "[red]n[/]" in header.stdout
