"""Config and policy validation: every mistake is a ConfigError (F0000) naming the key and the fix."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from dpgateway.errors import ConfigError
from dpgateway.policies.loader import load_config, parse_config

GOOD = {
    "tables": {
        "t": {
            "source": "t.csv",
            "privacy_unit": "pid",
            "max_rows_per_unit": 2,
            "columns": {"pid": {"type": "int"}, "x": {"type": "float", "bounds": [0, 1]}},
        }
    }
}


def _with(path: str, value: object) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    node = spec
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return spec


_DELETE = object()

BAD = [
    ("tables", {}, "declare at least one table"),
    ("tables", [], "tables: must be a mapping"),
    ("colour", "blue", "unknown key 'colour'"),
    ("tables.t.source", _DELETE, "missing `source`"),
    ("tables.t.source", 3, "must be a file path or a connector mapping"),
    ("tables.t.privacy_unit", "who", "column 'who' is not declared"),
    ("tables.t.max_rows_per_unit", 0, "integer from 1 to"),
    ("tables.t.max_rows_per_unit", 2.5, "integer from 1 to"),
    ("tables.t.max_rows_per_unit", True, "integer from 1 to"),
    ("tables.t.columns.x.type", "money", "must be one of int, float"),
    ("tables.t.columns.x.bounds", [1, 0], "lo < hi"),
    ("tables.t.columns.x.bounds", [0, 0], "lo < hi"),
    ("tables.t.columns.x.bounds", [0, float("inf")], "finite numbers"),
    ("tables.t.columns.x.bounds", [0, 1e300], "at most 1e15"),
    ("tables.t.columns.x.bounds", ["a", "b"], "finite numbers"),
    ("tables.t.columns.x.shade", 1, "unknown key 'shade'"),
    ("tables.t.columns.pid.public_values", [], "non-empty list"),
    ("tables.t.columns.pid.public_values", [1, 1], "1 is listed twice once read as int"),
    ("tables.t.source", "t.parquet", None),
    ("tables.t.columns.pid.public_values", [1, 1.0], "1 is listed twice once read as int"),
    ("tables.t.columns.x.public_values", [1, 1.0], "1.0 is listed twice once read as float"),
    ("tables.t.columns.x.public_values", [0.5, float("nan")], "NaN is not a value a row can have"),
    ("tables.t.columns.x.public_values", ["nan"], "NaN is not a value a row can have"),
    ("tables.t.columns.pid.public_values", [True], "True is not a valid int"),
    ("tables.t.columns.pid.type", "float", "a privacy unit must be int or str"),
    ("tables.t.columns.pid.type", "date", "declare it `type: str` under tables.t.columns.pid"),
    ("tables.t.columns.pid.type", "bool", "a privacy unit must be int or str"),
    ("tables.t.csv", {"delimiter": ";", "quote": "'", "escape": "\\", "header": False, "comment": "#"}, None),
    ("tables.t.csv", {"quote": "", "null": "NA"}, None),
    ("tables.t.csv", {"sep": ";"}, "tables.t.csv: unknown key 'sep'"),
    ("tables.t.csv", {"delimiter": ";;"}, "tables.t.csv.delimiter: must be one character"),
    ("tables.t.csv", {"delimiter": ""}, "tables.t.csv.delimiter: must be one character"),
    ("tables.t.csv", {"quote": "\n"}, "tables.t.csv.quote: must be one character"),
    ("tables.t.csv", {"comment": 1}, "tables.t.csv.comment: must be one character"),
    ("tables.t.csv", {"header": "yes"}, "tables.t.csv.header: must be true or false"),
    ("tables.t.csv", {"null": 0}, "tables.t.csv.null: must be a string"),
    ("tables.t.csv", {"delimiter": ";", "comment": ";"}, "delimiter, quote and comment must be different"),
    ("tables.t.csv", {"quote": "", "escape": "\\"}, "escape: needs a quote character"),
    ("tables.t.csv", [","], "tables.t.csv: must be a mapping"),
    ("tables.t.columns.pid.bounds", None, None),  # explicit null bounds are fine
    ("tables.t.columns.pid.public_values", ["one"], "'one' is not a valid int"),
    ("tables.t.columns.pid.public_values", [1.5], "1.5 is not a valid int"),
    ("budget.window_days", -1, "budget.window_days: must be a positive number"),
    ("budget.per_analyst", {"epsilon": 0}, "budget.per_analyst.epsilon: must be a positive number"),
    ("budget.per_subject", {"delta": 2}, r"budget.per_subject.delta: must be a number in \[0, 1\)"),
    ("budget.per_query", {"epsilon": 1, "rho": 2}, "unknown key 'rho'"),
    ("budget.default_query_delta", "tiny", r"must be a number in \[0, 1\)"),
    ("budget.replay", "everyone", "budget.replay: must be one of analyst, global, off"),
    ("ledger", 5, "ledger: must be a URL"),
    # date bounds: two dates, YYYY-MM-DD, lo <= hi
    ("tables.t.columns.d", {"type": "date", "bounds": ["2020-01-01", "2024-12-31"]}, None),
    ("tables.t.columns.d", {"type": "date", "bounds": ["2020-01-01", "2020-01-01"]}, None),  # one day
    ("tables.t.columns.d", {"type": "date", "bounds": ["2024-01-01", "2020-01-01"]}, "2024-01-01 is after 2020-01-01"),
    ("tables.t.columns.d", {"type": "date", "bounds": ["2020-02-30", "2024-01-01"]}, "dates written YYYY-MM-DD"),
    ("tables.t.columns.d", {"type": "date", "bounds": ["2020-1-1", "2024-01-01"]}, "dates written YYYY-MM-DD"),
    ("tables.t.columns.d", {"type": "date", "bounds": [0, 10]}, "dates written YYYY-MM-DD"),
    ("tables.t.columns.d", {"type": "date", "bounds": ["2020-01-01"]}, "dates written YYYY-MM-DD"),
    ("tables.t.columns.d", {"type": "date", "bounds": "2020-01-01"}, "dates written YYYY-MM-DD"),
    ("tables.t.columns.d", {"type": "str", "bounds": [0, 1]}, "only int, float and date columns take bounds"),
    ("admins", "root", "admins: must be a list"),
]


@pytest.mark.parametrize(("path", "value", "match"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_config(path: str, value: object, match: str | None) -> None:
    spec = _with(path, value)
    if match is None:
        parse_config(spec, base_dir=Path("."))
        return
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(spec, base_dir=Path("."))
    assert info.value.sqlstate == "F0000"


def test_public_values_take_the_column_type() -> None:
    spec = _with("tables.t.columns", {"pid": {"type": "int"}, "s": {"type": "str", "public_values": [1, 2]}})
    column = parse_config(spec, base_dir=Path(".")).tables[0].column("s")
    assert column is not None and column.public_values == ("1", "2")


def test_date_bounds_read_yaml_dates_and_text() -> None:
    text = "tables: {t: {source: t.csv, columns: {d: {type: date, bounds: [2020-01-01, '2024-12-31']}}}}"
    column = parse_config(yaml.safe_load(text), base_dir=Path(".")).tables[0].column("d")
    assert column is not None and column.bounds is None
    assert column.date_bounds == (dt.date(2020, 1, 1), dt.date(2024, 12, 31))
    timestamp = "tables: {t: {source: t.csv, columns: {d: {type: date, bounds: [2020-01-01 10:00:00, 2024-12-31]}}}}"
    with pytest.raises(ConfigError, match="dates written YYYY-MM-DD") as info:
        parse_config(yaml.safe_load(timestamp), base_dir=Path("."))  # YAML reads a timestamp: not a date
    assert info.value.sqlstate == "F0000"


def test_row_level_table_takes_no_k() -> None:
    spec = _with("tables.t.privacy_unit", _DELETE)
    with pytest.raises(ConfigError, match="needs a privacy_unit"):
        parse_config(spec, base_dir=Path("."))


def test_paths_resolve_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "dpgateway.yaml").write_text(yaml.safe_dump({**GOOD, "ledger": "sqlite:///ledger.db"}))
    config = load_config(tmp_path / "dpgateway.yaml")
    assert config.tables[0].source == tmp_path / "t.csv"
    assert config.ledger == f"sqlite:///{tmp_path / 'ledger.db'}"
    assert config.tables[0].subject_domain == "pid"


def test_missing_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DPGATEWAY_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=r"dpgateway\.yaml' not found; pass --config PATH"):
        load_config()
    (tmp_path / "bad.yaml").write_text("tables: [unclosed")
    with pytest.raises(ConfigError, match="Cannot read config"):
        load_config(tmp_path / "bad.yaml")
    monkeypatch.setenv("DPGATEWAY_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="Cannot read config"):
        load_config()


def test_replay_scope_reaches_the_ledger(demo_config_path: Path) -> None:
    from dpgateway import Gateway

    text = demo_config_path.read_text().replace(
        "  default_query_epsilon: 0.5", "  default_query_epsilon: 0.5\n  replay: off"
    )
    demo_config_path.write_text(text)
    with Gateway.from_config(demo_config_path) as gw:
        first = gw.query("SELECT COUNT(*) FROM pums", analyst="rita")
        again = gw.query("SELECT COUNT(*) FROM pums", analyst="rita")
    assert not again.replayed and again.epsilon == first.epsilon > 0


def test_csv_options_only_for_csv_sources() -> None:
    spec = _with("tables.t.source", "t.parquet")
    spec["tables"]["t"]["csv"] = {"delimiter": ";"}
    with pytest.raises(ConfigError, match=r"tables\.t\.csv: only a CSV file source takes csv options"):
        parse_config(spec, base_dir=Path("."))
