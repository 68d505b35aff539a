"""Date GROUP BY keys (passes/dates.py): EXTRACT, date_part and date_trunc of a date column with declared bounds.

The key reads the date clamped to its bounds, so a date outside them lands in the edge cell; its domain is
public (every cell released once, no partition selection, no delta). The exact bounded aggregates are checked
against pandas (an independent computation of PostgreSQL's EXTRACT and date_trunc), and one person with many
rows moves them by at most the sensitivity. Without bounds the key stays private, as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import exact_by_group, make_gateway, write_csv

from dpgateway import Gateway

K = 3
LO, HI = dt.date(2020, 3, 15), dt.date(2023, 8, 20)
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "d": {"type": "date", "bounds": [LO.isoformat(), HI.isoformat()]},
        "free": {"type": "date"},  # no bounds: private keys
        "x": {"type": "int", "bounds": [0, 100]},
    },
}


def people(rng: np.random.Generator, n: int, first: int = 1) -> pd.DataFrame:
    counts = rng.integers(1, 5, n)
    size = int(counts.sum())
    days = pd.Timestamp("2019-01-01") + pd.to_timedelta(rng.integers(0, 2200, size), unit="D")  # beyond the bounds too
    text = pd.Series(days.strftime("%Y-%m-%d"))
    text[rng.random(size) < 0.05] = ""  # NULL dates: in no cell
    text[rng.random(size) < 0.02] = "2021-02-30"  # not a day: NULL
    return pd.DataFrame(
        {"pid": np.repeat(np.arange(first, first + n), counts), "d": text, "free": text, "x": rng.integers(0, 90, size)}
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with make_gateway(tmp_path, people(np.random.default_rng(7), 300), POLICY) as gw:
        yield gw


def _months(lo: dt.date, hi: dt.date, step: int) -> tuple[dt.datetime, ...]:
    """Period starts from lo's to hi's, written independently of passes/dates.py (pandas periods)."""
    freq = {1: "MS", 3: "QS", 12: "YS"}[step]
    start = pd.Timestamp(lo).to_period({1: "M", 3: "Q", 12: "Y"}[step]).start_time
    return tuple(t.to_pydatetime() for t in pd.date_range(start, pd.Timestamp(hi), freq=freq))


def _trunc(step: int) -> Callable[[pd.Series], pd.Series]:
    return lambda s: s.dt.to_period({1: "M", 3: "Q", 12: "Y"}[step]).dt.start_time


KEYS: list[tuple[str, Callable[[pd.Series], pd.Series], tuple[Any, ...]]] = [
    ("EXTRACT(year FROM d)", lambda s: s.dt.year, tuple(range(2020, 2024))),
    ("date_part('year', d)", lambda s: s.dt.year, tuple(range(2020, 2024))),
    ("EXTRACT(quarter FROM d)", lambda s: s.dt.quarter, (1, 2, 3, 4)),
    ("EXTRACT(month FROM d)", lambda s: s.dt.month, tuple(range(1, 13))),
    ("date_part('day', d)", lambda s: s.dt.day, tuple(range(1, 32))),
    ("EXTRACT(dow FROM d)", lambda s: (s.dt.day_of_week + 1) % 7, tuple(range(7))),  # pandas: Monday 0
    ("date_trunc('month', d)", _trunc(1), _months(LO, HI, 1)),
    ("date_trunc('quarter', d)", _trunc(3), _months(LO, HI, 3)),
    ("date_trunc('year', d)", _trunc(12), _months(LO, HI, 12)),
]


def _expected(frame: pd.DataFrame, key: Callable[[pd.Series], pd.Series]) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Weighted COUNT(*) and SUM(x) per key (fixed point, as the weighted rewrite computes them), from pandas."""
    days = pd.to_datetime(frame["d"], format="%Y-%m-%d", errors="coerce").clip(pd.Timestamp(LO), pd.Timestamp(HI))
    n = frame.groupby("pid")["pid"].transform("size")
    count = n.map(lambda m: 10**6 * K // max(m, K))
    scale = 10**4  # passes/budget.py's fixed-point scale for a bound of 100
    total = frame["x"].clip(0, 100) * scale * K // n.clip(lower=K)
    keys = key(days)
    out = {}
    for value, rows in frame.assign(c=count, s=total).groupby(keys):
        out[(value.to_pydatetime() if isinstance(value, pd.Timestamp) else int(value),)] = (
            int(rows["c"].sum()),
            int(rows["s"].sum()),
        )
    return out


@pytest.mark.parametrize(("key", "key_of", "domain"), KEYS, ids=[k[0] for k in KEYS])
def test_date_keys_have_public_domains_and_exact_aggregates(
    gateway: Gateway, key: str, key_of: Callable[[pd.Series], pd.Series], domain: tuple[Any, ...]
) -> None:
    sql = f"SELECT {key} AS k, COUNT(*), SUM(x) FROM t GROUP BY 1"
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.group_keys[0].public_values == domain
    assert not plan.selects_partitions and plan.rewrite == "weighted" and plan.delta == 0
    assert plan.measurements[1].scale == 10**4
    frame = pd.read_csv(gateway.config.tables[0].source, keep_default_na=False)
    got = exact_by_group(gateway.connector.execute(plan.bounded_sql), 1)
    assert {g: v for g, v in got.items() if g != (None,)} == _expected(frame, key_of)
    result = gateway.query(sql, epsilon=1.0)
    assert sorted(r[0] for r in result.rows) == sorted(
        v.isoformat() if isinstance(v, dt.datetime) else v for v in domain
    )


def test_domains_are_the_image_of_the_bounds(tmp_path: Path) -> None:
    policy = {**POLICY, "columns": {**POLICY["columns"], "d": {"type": "date", "bounds": ["2021-11-29", "2022-01-02"]}}}
    with make_gateway(tmp_path, people(np.random.default_rng(1), 20), policy) as gw:

        def domain(key: str) -> tuple[Any, ...] | None:
            plan = gw.explain(f"SELECT {key}, COUNT(*) FROM t GROUP BY 1").plan
            assert plan is not None
            return plan.group_keys[0].public_values

        assert domain("EXTRACT(year FROM d)") == (2021, 2022)
        assert domain("EXTRACT(month FROM d)") == (1, 11, 12)
        assert domain("EXTRACT(quarter FROM d)") == (1, 4)
        assert domain("EXTRACT(day FROM d)") == tuple(range(1, 32))  # all of December
        assert domain("date_trunc('month', d)") == (
            dt.datetime(2021, 11, 1),
            dt.datetime(2021, 12, 1),
            dt.datetime(2022, 1, 1),
        )


def test_date_keys_stay_private_without_bounds_or_beyond_the_cap(tmp_path: Path, gateway: Gateway) -> None:
    for sql in (
        "SELECT EXTRACT(year FROM free), COUNT(*) FROM t GROUP BY 1",  # no bounds: as before
        "SELECT date_trunc('month', free), COUNT(*) FROM t GROUP BY 1",
        "SELECT EXTRACT(dow FROM free), COUNT(*) FROM t GROUP BY 1",  # was refused on DuckDB (DOW parsed back as DAYOFWEEK)
        "SELECT EXTRACT(doy FROM d), COUNT(*) FROM t GROUP BY 1",  # a part without a derived domain
    ):
        plan = gateway.explain(sql).plan
        assert plan is not None and plan.group_keys[0].public_values is None and plan.selects_partitions, sql
        assert "GREATEST" not in plan.shown_sql, sql  # read as is, not clamped
    wide = {**POLICY, "columns": {**POLICY["columns"], "d": {"type": "date", "bounds": ["0001-01-01", "9999-12-31"]}}}
    with make_gateway(tmp_path / "wide", people(np.random.default_rng(2), 20), wide) as gw:
        months = gw.explain("SELECT date_trunc('month', d), COUNT(*) FROM t GROUP BY 1").plan
        years = gw.explain("SELECT EXTRACT(year FROM d), COUNT(*) FROM t GROUP BY 1").plan
    assert months is not None and months.group_keys[0].public_values is None and months.selects_partitions
    assert "0001-01-01" in months.shown_sql  # over 10000 months: private, but still clamped to the bounds
    assert years is not None and years.group_keys[0].public_values == tuple(range(1, 10000))


def test_one_person_moves_date_cells_by_at_most_the_sensitivity(gateway: Gateway) -> None:
    rng = np.random.default_rng(11)
    others = people(rng, 200)
    days = pd.Timestamp("1990-01-01") + pd.to_timedelta(rng.integers(0, 20000, 800), unit="D")  # far outside too
    heavy = pd.DataFrame({"pid": 10**6, "d": days.strftime("%Y-%m-%d"), "free": "", "x": 100})
    source = gateway.config.tables[0].source
    for sql in (
        "SELECT date_trunc('month', d), COUNT(*), SUM(x) FROM t GROUP BY 1",
        "SELECT EXTRACT(dow FROM d), EXTRACT(year FROM d), COUNT(*), AVG(x) FROM t GROUP BY 1, 2",
    ):
        plan = gateway.explain(sql).plan
        assert plan is not None
        n_keys = len(plan.group_keys)

        def run(frame: pd.DataFrame, plan: Any = plan, n_keys: int = n_keys) -> dict[tuple[Any, ...], tuple[int, ...]]:
            write_csv(source, frame)
            return exact_by_group(gateway.connector.execute(plan.bounded_sql), n_keys)

        without, with_x = run(others), run(pd.concat([others, heavy]))
        zero = (0,) * len(plan.measurements)
        for i, m in enumerate(plan.measurements):
            moved = sum(abs(with_x.get(g, zero)[i] - without.get(g, zero)[i]) for g in without.keys() | with_x.keys())
            assert 0 < moved <= m.sensitivity, (sql, m.label)
