"""Binned GROUP BY keys over bounded columns: public domains where exact, clamped inputs, PostgreSQL division.

A key such as ``age / 10`` reads ``age`` clamped to its declared bounds, so its domain is the image of
the declared integer range: public (no partition selection, every bin released) when it is an integer
function of one integer column. The exact bounded aggregates are checked against pandas, and one person
with many rows moves them by at most the sensitivity.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import exact_by_group, make_gateway, write_csv

from dpgateway import Gateway
from dpgateway.errors import DPGatewayError

K = 3
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "age": {"type": "int", "bounds": [0, 99]},
        "income": {"type": "float", "bounds": [0, 100000]},
        "educ": {"type": "int"},
    },
}


def people(rng: np.random.Generator, n: int, first: int = 1) -> pd.DataFrame:
    counts = rng.integers(1, 4, n)
    size = int(counts.sum())
    return pd.DataFrame(
        {
            "pid": np.repeat(np.arange(first, first + n), counts),
            "age": rng.integers(-20, 130, size),  # outside the bounds too: clamped into the edge bins
            "income": np.round(rng.lognormal(10, 1, size), 2),
            "educ": rng.integers(1, 17, size),
        }
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with make_gateway(tmp_path, people(np.random.default_rng(3), 300), POLICY) as gw:
        yield gw


def _counts(gw: Gateway, sql: str) -> dict[tuple[Any, ...], int]:
    plan = gw.explain(sql).plan
    assert plan is not None
    return {key: row[0] for key, row in exact_by_group(gw.connector.execute(plan.bounded_sql), 1).items()}


BINS = [
    ("age / 10", lambda a: a // 10, tuple(range(10))),
    ("FLOOR(age / 10) * 10", lambda a: a // 10 * 10, tuple(range(0, 100, 10))),
    ("(age - 50) / 20", lambda a: np.trunc((a - 50) / 20).astype(int), (-2, -1, 0, 1, 2)),
    ("LEAST(age, 65) / 5", lambda a: np.minimum(a, 65) // 5, tuple(range(14))),
    ("age / 10 * 10 + 5", lambda a: a // 10 * 10 + 5, tuple(range(5, 100, 10))),
    ("age / 10 + age / 7", lambda a: a // 10 + a // 7, tuple(sorted({a // 10 + a // 7 for a in range(100)}))),
    ("ABS(age - 40) / 25", lambda a: (a - 40).abs() // 25, (0, 1, 2)),
]


@pytest.mark.parametrize(("key", "bin_of", "domain"), BINS, ids=[b[0] for b in BINS])
def test_integer_bins_have_public_domains_and_exact_counts(
    gateway: Gateway, key: str, bin_of: Any, domain: tuple
) -> None:
    sql = f"SELECT {key} AS b, COUNT(*) FROM t GROUP BY {key}"
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.group_keys[0].public_values == domain
    assert not plan.selects_partitions and plan.rewrite == "weighted" and plan.delta == 0
    frame = pd.read_csv(gateway.config.tables[0].source)
    frame["b"] = bin_of(frame["age"].clip(0, 99))
    n = frame.groupby("pid")["pid"].transform("size")
    frame["w"] = [10**6 * K // max(m, K) for m in n]  # each row's weighted count, fixed point
    expected = {(b,): int(w) for b, w in frame.groupby("b")["w"].sum().items()}
    assert _counts(gateway, sql) == expected
    result = gateway.query(sql, epsilon=1.0)
    assert sorted(r[0] for r in result.rows) == sorted(domain)  # every bin, each once


def _width_bucket(x: pd.Series, low: float, high: float, n: int) -> pd.Series:
    """PostgreSQL's width_bucket, written out independently: 0 below, n + 1 at or above high, else 1..n."""
    inner = np.minimum(np.floor(n * ((x - low) / (high - low))), n - 1) + 1
    return pd.Series(np.where(x < low, 0, np.where(x >= high, n + 1, inner)), index=x.index).where(x.notna())


@pytest.mark.parametrize(
    ("column", "low", "high", "n"), [("income", 0, 100000, 5), ("age", -10, 75.5, 7), ("educ", 2, 12, 4)]
)
def test_width_bucket_is_public_and_exact(gateway: Gateway, column: str, low: float, high: float, n: int) -> None:
    sql = f"SELECT width_bucket({column}, {low}, {high}, {n}) AS b, COUNT(*) FROM t GROUP BY 1"
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.group_keys[0].public_values == tuple(range(n + 2))
    assert not plan.selects_partitions
    frame = pd.read_csv(gateway.config.tables[0].source)
    frame["b"] = _width_bucket(frame[column].astype(float), low, high, n)
    weights = frame.groupby("pid")["pid"].transform("size").map(lambda m: 10**6 * K // max(m, K))
    expected = {(int(b),): int(w) for b, w in weights.groupby(frame["b"]).sum().items()}
    assert _counts(gateway, sql) == expected
    assert sorted(r[0] for r in gateway.query(sql, epsilon=1.0).rows) == list(range(n + 2))


def test_width_bucket_refusals(gateway: Gateway) -> None:
    for sql, message in (
        ("SELECT width_bucket(income, 10, 5, 3), COUNT(*) FROM t GROUP BY 1", "low < high"),
        ("SELECT width_bucket(income, 0, 10, 0), COUNT(*) FROM t GROUP BY 1", "a count from 1"),
        ("SELECT width_bucket(income / 2, 0, 10, 3), COUNT(*) FROM t GROUP BY 1", "a numeric column"),
    ):
        with pytest.raises(DPGatewayError, match=message) as info:
            gateway.explain(sql)
        assert info.value.sqlstate == "0A000"


def test_binned_keys_are_private_when_not_exact(gateway: Gateway) -> None:
    for sql in (
        "SELECT FLOOR(income / 10000) AS b, COUNT(*) FROM t GROUP BY 1",  # a double key
        "SELECT age + educ AS b, COUNT(*) FROM t GROUP BY 1",  # educ has no bounds: an ordinary row expression
        "SELECT income / 1000 + age AS b, COUNT(*) FROM t GROUP BY 1",  # two columns
    ):
        plan = gateway.explain(sql).plan
        assert plan is not None and plan.group_keys[0].public_values is None and plan.selects_partitions


def test_one_person_moves_binned_counts_by_at_most_the_sensitivity(gateway: Gateway) -> None:
    rng = np.random.default_rng(5)
    others = people(rng, 200)
    heavy = pd.DataFrame({"pid": 10**6, "age": rng.integers(-50, 200, 500), "income": 1e9, "educ": 3})
    sql = "SELECT age / 10, COUNT(*), SUM(income) FROM t GROUP BY age / 10"
    plan = gateway.explain(sql).plan
    assert plan is not None
    source = gateway.config.tables[0].source

    def run(frame: pd.DataFrame) -> dict[tuple[Any, ...], tuple[int, ...]]:
        write_csv(source, frame)
        return exact_by_group(gateway.connector.execute(plan.bounded_sql), 1)

    without, with_x = run(others), run(pd.concat([others, heavy]))
    for i, m in enumerate(plan.measurements):
        moved = sum(abs(with_x.get(g, (0, 0))[i] - without.get(g, (0, 0))[i]) for g in without.keys() | with_x.keys())
        assert 0 < moved <= m.sensitivity, m.label


def test_division_in_a_key_needs_bounds(gateway: Gateway) -> None:
    with pytest.raises(DPGatewayError, match=r"t.educ has no declared bounds.*tables.t.columns.educ") as info:
        gateway.explain("SELECT educ / 4, COUNT(*) FROM t GROUP BY educ / 4")
    assert info.value.sqlstate == "42501"
    with pytest.raises(DPGatewayError, match=r"divisor \(age - 50\) can be 0") as info:
        gateway.explain("SELECT 1000 / (age - 50), COUNT(*) FROM t GROUP BY 1000 / (age - 50)")
    assert info.value.sqlstate == "42501"
