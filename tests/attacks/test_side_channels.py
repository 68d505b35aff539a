"""Error, row-count and message side channels: the same query on two neighbouring datasets (without and with
one crafted person) must fail or succeed the same way, with the same SQLSTATE and message, and release the
same number of rows when the keys are public. Backend messages never quote a data value.

The crafted person carries values built to make a careless rewrite fail: a string that does not parse as a
number, the smallest 64-bit integer (ABS and negation overflow), a date that does not exist, NaN and 1e308.
Timing is not tested (see docs/security.md): no test here measures time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from attack_support import ATTACKER, attack_gateway
from click.testing import CliRunner

from dpgateway import Gateway
from dpgateway.cli import cli
from dpgateway.errors import DPGatewayError

SECRET_CODE = "SECRET-4711"
INT64_MIN = "-9223372036854775808"
COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "income": {"type": "float", "bounds": [0, 100000]},
    "code": {"type": "str"},
    "born": {"type": "str"},
    "day": {"type": "date"},
    "sex": {"type": "int", "public_values": [0, 1]},
}
HEADER = "pid,age,income,code,born,day,sex\n"
CRAFTED = f"999,{INT64_MIN},1e308,{SECRET_CODE},2001-02-30,9999-99-99,1\n"
# Strings that must never appear in any message (the crafted person's values).
FORBIDDEN = (SECRET_CODE, "4711", INT64_MIN, "9223372036854775808", "2001-02-30", "9999-99-99")


def base_rows() -> str:
    rows = [
        f"{i},{20 + i % 50},{1000.0 * i},{100 + i},1980-01-{1 + i % 28:02d},2020-01-{1 + i % 28:02d},{i % 2}"
        for i in range(40)
    ]
    return HEADER + "\n".join(rows) + "\n"


PROBES = [
    # casts that fail on the crafted value unless they are total
    "SELECT COUNT(*) FROM t WHERE CAST(code AS INT) > 0",
    "SELECT COUNT(*) FROM t WHERE pid = 999 AND CAST(code AS INT) > 0",
    "SELECT COUNT(*) FROM t WHERE CAST(code AS INT) > 0 OR pid = 999",
    "SELECT COUNT(*) FROM t WHERE CAST(born AS DATE) > DATE '2000-01-01'",
    "SELECT COUNT(*) FROM t WHERE CAST(age AS DECIMAL(3, 0)) > 0",
    "SELECT COUNT(*) FROM t WHERE CAST(income AS INT) > 0",
    "SELECT COUNT(*) FROM t WHERE EXTRACT(year FROM CAST(born AS DATE)) > 1990",
    # integer overflow on the smallest 64-bit value
    "SELECT COUNT(*) FROM t WHERE ABS(age) > 0",
    "SELECT COUNT(*) FROM t WHERE -age < 0",
    "SELECT COUNT(*) FROM t WHERE age - 1 < 0",
    "SELECT COUNT(*) FROM t WHERE age * 4611686018427387904 > 0",
    "SELECT COUNT(*) FROM t WHERE age + 9223372036854775807 > 0",
    "SELECT COUNT(*) FROM t WHERE SUBSTRING(code, age, 2) = 'a'",
    "SELECT COUNT(*) FROM t WHERE SUBSTRING(code, 1, age) = 'a'",
    "SELECT COUNT(*) FROM t WHERE ROUND(income, 2) * 1e308 > 0",
    "SELECT COUNT(*) FROM t WHERE LENGTH(code) * 4611686018427387904 > 0",
    "SELECT COUNT(*) FROM t WHERE CONCAT(code, age) = 'x'",
    "SELECT COUNT(*) FROM t WHERE day > DATE '2000-01-01'",
    # group keys that fail on the crafted value unless they are total (public and private domains)
    "SELECT CASE WHEN CAST(code AS INT) > 100 THEN 'hi' ELSE 'lo' END AS c, COUNT(*) FROM t GROUP BY 1",
    "SELECT CAST(code AS INT) % 2 AS c, COUNT(*) FROM t GROUP BY 1",
    "SELECT ABS(age) AS a, COUNT(*) FROM t GROUP BY 1",
    "SELECT sex, SUM(age), AVG(income), VARIANCE(income), STDDEV(age) FROM t GROUP BY sex",
    "SELECT sex, COUNT(*) FROM t WHERE CAST(code AS INT) > 0 GROUP BY sex",
    # aggregates over the crafted values
    "SELECT SUM(age), AVG(age), SUM(income), AVG(income), VAR_POP(income), COUNT(income) FROM t",
    # refused queries: refusals come from the SQL alone
    "SELECT code FROM t",
    "SELECT SUM(code) FROM t",
    "SELECT MIN(age) FROM t",
    "SELECT COUNT(*) FROM t WHERE pid IN (SELECT pid FROM t WHERE age < 0)",
    "SELECT SUM(CASE WHEN pid = 999 THEN age END) FROM t",
    "SELECT COUNT(*) FROM t WHERE DATE_TRUNC('fortnight', day) > day",
    "SELECT COUNT(*) FROM t WHERE code > 5",
    "SELECT COUNT(*) FROM t WHERE ROUND(income, age) > 0",
]


def outcome(gw: Gateway, sql: str) -> tuple[Any, ...]:
    """What an analyst can observe besides the noisy numbers: success or error class, SQLSTATE, message,
    the columns and, when the group keys are public, the number of rows."""
    try:
        res = gw.query(sql, analyst=ATTACKER, epsilon=1.0, delta=1e-6)
    except DPGatewayError as exc:
        return ("error", type(exc).__name__, exc.sqlstate, exc.message)
    public = not gw.explain(sql, epsilon=1.0, delta=1e-6).plan.selects_partitions  # type: ignore[union-attr]
    return ("ok", tuple(res.columns), len(res.rows) if public else "private keys: row count is DP")


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("neighbours")
    without = attack_gateway(folder / "without", base_rows(), COLUMNS)
    with_one = attack_gateway(folder / "with", base_rows() + CRAFTED, COLUMNS)
    yield without, with_one
    without.close()
    with_one.close()


@pytest.mark.parametrize("sql", PROBES)
def test_outcome_does_not_depend_on_one_person(neighbours: Any, sql: str) -> None:
    without, with_one = neighbours
    seen = outcome(with_one, sql)
    assert outcome(without, sql) == seen
    assert not any(s in str(seen) for s in FORBIDDEN)


@pytest.mark.parametrize("sql", PROBES)
def test_released_values_are_finite_or_null(neighbours: Any, sql: str) -> None:
    _, with_one = neighbours
    try:
        res = with_one.query(sql, analyst=ATTACKER, epsilon=1.0, delta=1e-6)
    except DPGatewayError:
        return
    for row in res.rows:
        for cell in row:
            assert cell is None or not isinstance(cell, float) or abs(cell) < float("inf")
            assert str(cell) not in FORBIDDEN


def test_backend_message_never_quotes_a_value(tmp_path: Path) -> None:
    """A data file DuckDB cannot parse as the policy's CSV no longer fails a query (each bad record is
    dropped alone, tests/test_sources.py); a backend failure (the file gone) is reported without quoting
    what the backend saw."""
    gw = attack_gateway(tmp_path, base_rows() + CRAFTED, COLUMNS)
    with gw:
        (tmp_path / "t.csv").write_text(f'pid,age\n1,"{SECRET_CODE}\n2,"3,4\n')
        released = gw.query("SELECT COUNT(*) FROM t WHERE CAST(code AS INT) > 0", analyst=ATTACKER, epsilon=1.0)
        assert not any(s in repr(released.rows) for s in FORBIDDEN)
        (tmp_path / "t.csv").unlink()
        with pytest.raises(DPGatewayError, match="details are withheld") as info:  # not the replayed answer
            gw.query("SELECT COUNT(*) FROM t WHERE CAST(code AS INT) > 0", analyst=ATTACKER, epsilon=0.9)
    assert info.value.sqlstate == "58000"
    assert not any(s in info.value.message for s in FORBIDDEN)


def test_cli_output_never_quotes_a_value(tmp_path: Path) -> None:
    """The same probes through the CLI as JSON: errors carry a SQLSTATE, and no output quotes the person."""
    attack_gateway(tmp_path, base_rows() + CRAFTED, COLUMNS).close()
    runner = CliRunner()
    for sql in PROBES[:8] + PROBES[-8:]:
        args = ["query", "--config", str(tmp_path / "dpgateway.yaml"), "--analyst", ATTACKER, "--format", "json"]
        result = runner.invoke(cli, [*args, "--epsilon", "1.0", sql], catch_exceptions=False)
        doc = json.loads(result.output)
        assert ("error" in doc) == (result.exit_code == 1)
        if "error" in doc:
            assert len(doc["error"]["sqlstate"]) == 5 and doc["error"]["sqlstate"] != "XX000"
        assert not any(s in result.output for s in FORBIDDEN), result.output
        assert "Traceback" not in result.output


def test_public_key_row_count_is_the_declared_domain(tmp_path: Path) -> None:
    """With public keys the number of released rows is the domain size, whether or not anyone has a key."""
    frame = pd.DataFrame({"pid": [1, 2, 3], "age": [30, 40, 50], "income": [1.0, 2.0, 3.0], "code": ["a", "b", "c"]})
    frame = frame.assign(born="x", day="2020-01-01", sex=[0, 0, 0])  # nobody has sex = 1
    with attack_gateway(tmp_path, frame, COLUMNS) as gw:
        res = gw.query("SELECT sex, COUNT(*) AS n FROM t GROUP BY sex", analyst=ATTACKER, epsilon=1.0)
    assert [r[0] for r in res.rows] == [0, 1]
