"""Floating-point and overflow edge cases: huge bounds, NaN/inf/1e308/unparsable values in the data, sums of many
rows at the bound, extreme epsilon and delta. Never a crash or traceback; released values are finite or NULL
and within their possible range; every error carries a SQLSTATE and none is an internal error (XX000).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from attack_support import ATTACKER, attack_gateway

from dpgateway import Gateway
from dpgateway.errors import DPGatewayError

WEIRD = [
    "1e15", "-1e15", "NaN", "nan", "inf", "-inf", "Infinity", "1e308", "-1e308", "1e400", "-1e400", "abc", "",
    "0x10", "1_000", " 5 ", "9223372036854775807", "-9223372036854775808", "99999999999999999999", "4.9e-324",
]  # fmt: skip
HUGE = 1e15
COLUMNS = {
    "pid": {"type": "int"},
    "x": {"type": "float", "bounds": [-HUGE, HUGE]},
    "y": {"type": "int", "bounds": [-HUGE, HUGE]},
    "s": {"type": "str"},
    "g": {"type": "int", "public_values": [0, 1]},
}
QUERIES = [
    "SELECT SUM(x), AVG(x), VARIANCE(x), VAR_POP(x), STDDEV(x), STDDEV_POP(x), COUNT(x) FROM t",
    "SELECT SUM(y), AVG(y), VARIANCE(y), STDDEV(y), COUNT(y) FROM t",
    "SELECT g, SUM(x) / COUNT(*) AS r, AVG(y) * 1e300 AS big FROM t GROUP BY g",
    "SELECT s, COUNT(*) FROM t GROUP BY s",
    "SELECT COUNT(*) FROM t WHERE x > 1e307 OR y < -9e18 OR x * 1e300 > 1 OR y * y > 0",
]
PARAMETERS = [(1e-9, 1e-6), (1e3, 1e-6), (1.0, 1e-15), (1.0, 0.39), (1.0, 1e-300), (1.0, 5e-324), (1e-15, 1e-6)]


def weird_csv() -> str:
    rows = [f"{i},{v},{v},{v},{i % 2}" for i, v in enumerate(WEIRD)]
    return "pid,x,y,s,g\n" + "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def weird_gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with attack_gateway(tmp_path_factory.mktemp("weird"), weird_csv(), COLUMNS, replay="off") as gw:
        yield gw


def check_released(gw: Gateway, sql: str, epsilon: float, delta: float) -> None:
    try:
        res = gw.query(sql, analyst=ATTACKER, epsilon=epsilon, delta=delta)
    except DPGatewayError as exc:
        assert len(exc.sqlstate) == 5 and exc.sqlstate != "XX000", exc.message
        assert "Traceback" not in exc.message
        return
    for row in res.rows:
        for name, value in zip(res.columns, row, strict=True):
            assert value is None or isinstance(value, (int, str)) or math.isfinite(value), (name, value)
            if isinstance(value, float) and name.startswith(("var", "stddev")):
                assert value >= 0, (name, value)


@pytest.mark.parametrize(("epsilon", "delta"), PARAMETERS)
@pytest.mark.parametrize("sql", QUERIES)
def test_weird_values_and_extreme_parameters(weird_gateway: Gateway, sql: str, epsilon: float, delta: float) -> None:
    check_released(weird_gateway, sql, epsilon, delta)


def test_tiny_delta_is_a_parameter_error_not_a_bug(weird_gateway: Gateway) -> None:
    """Partition selection cannot certify a delta below what OpenDP's map resolves (about 1e-16)."""
    with pytest.raises(DPGatewayError, match="delta") as info:
        weird_gateway.query("SELECT s, COUNT(*) FROM t GROUP BY s", analyst=ATTACKER, epsilon=1.0, delta=1e-300)
    assert info.value.sqlstate == "22023"


def test_sums_of_many_rows_at_the_bound_stay_exact_and_finite(tmp_path: Path) -> None:
    """200,000 rows at 1e15: the real sum 2e20 exceeds 64-bit integers, the fixed-point sum does not."""
    n = 200_000
    csv = "pid,x,y,s,g\n" + "".join(f"{i},1e15,1000000000000000,a,1\n" for i in range(n))
    with attack_gateway(tmp_path, csv, COLUMNS) as gw:
        res = gw.query("SELECT SUM(x), SUM(y), AVG(x), COUNT(*) FROM t", analyst=ATTACKER, epsilon=1000.0)
    total_x, total_y, mean, count = res.rows[0]
    # Noise: SUM scale 4 * 1e6 / 1000 fixed-point units of 1e9 = 4e12 real units; P(|Z| > 30 scales) < 1e-12.
    assert abs(total_x - n * HUGE) <= 30 * 4e12 and abs(total_y - n * HUGE) <= 30 * 4e12
    assert abs(mean - HUGE) <= 1e9 and abs(count - n) <= 30


@pytest.mark.parametrize("bounds", [[0, 5e-324], [-1e-310, 1e-310], [0, 1e-160], [-HUGE, HUGE]])
def test_extreme_bounds_are_answered(tmp_path: Path, bounds: list[float]) -> None:
    """Denormal bounds (and squares that underflow) still give a finite fixed-point scale. (Degenerate
    bounds such as [0, 0] are refused by the config loader: lo < hi.)"""
    columns = {"pid": {"type": "int"}, "x": {"type": "float", "bounds": bounds}}
    csv = "pid,x\n" + "".join(f"{i},{bounds[1]}\n" for i in range(20))
    with attack_gateway(tmp_path, csv, columns) as gw:
        for sql in ("SELECT SUM(x), AVG(x), VARIANCE(x), STDDEV(x) FROM t", "SELECT SUM(x) FROM t"):
            check_released(gw, sql, 1.0, 1e-6)


def test_sample_variance_is_population_variance_times_n_over_n_minus_1(tmp_path: Path) -> None:
    """At epsilon 1000 the noise is negligible, so VARIANCE must be VAR_POP * n / (n - 1), never below 0."""
    csv = "pid,x\n" + "".join(f"{i},{i % 7}\n" for i in range(100))
    with attack_gateway(tmp_path, csv, {"pid": {"type": "int"}, "x": {"type": "float", "bounds": [0, 10]}}) as gw:
        res = gw.query("SELECT VARIANCE(x), VAR_POP(x), COUNT(x) FROM t", analyst=ATTACKER, epsilon=1000.0)
    sample, population, n = res.rows[0]
    assert sample == pytest.approx(population * max(n, 2) / (max(n, 2) - 1), rel=1e-9)
    assert population == pytest.approx(4.0, abs=0.05)  # 0..6 repeated: variance 4
