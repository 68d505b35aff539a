"""Contribution bounding: one privacy unit moves each measurement by at most its sensitivity.

The bounded SQL of a plan (``gw.explain(...).plan.bounded_sql``) runs on neighbouring datasets, with and
without one person X, on the same gateway (so the same secret row-order seed) by rewriting its CSV.
Checked exactly, before noise, in the integer units the noise is added in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import TABLE, exact_by_group, make_gateway, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from dpgateway import Gateway
from dpgateway.passes.budget import fixed_point_scale
from dpgateway.plan import DPPlan

K = 3
INCOME = (0.0, 100_000.0)
SCORE = (-50.0, 50.0)
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "age": {"type": "int", "bounds": [0, 100]},
        "income": {"type": "float", "bounds": list(INCOME)},
        "score": {"type": "float", "bounds": list(SCORE)},
        "sex": {"type": "int", "public_values": [0, 1]},
        "educ": {"type": "int"},
    },
}
QUERIES = [
    "SELECT COUNT(*) AS n FROM t",
    "SELECT sex, COUNT(*) AS n FROM t GROUP BY sex",
    "SELECT educ, COUNT(*) AS n FROM t GROUP BY educ",
    "SELECT educ, sex, COUNT(*) AS n, COUNT(income) AS m FROM t GROUP BY educ, sex",
    "SELECT educ, SUM(income) AS s FROM t GROUP BY educ",
    "SELECT sex, SUM(score) AS s FROM t WHERE age > 30 GROUP BY sex",
    "SELECT sex, AVG(income) AS a, VARIANCE(score) AS v FROM t GROUP BY sex",
    "SELECT educ, AVG(score) AS a, STDDEV(income) AS sd FROM t WHERE educ < 120 GROUP BY educ",
    # row expressions (bounds by interval arithmetic, passes/intervals.py) and FILTER
    "SELECT SUM(income * 2 - score) AS s, AVG(CASE WHEN age > 30 THEN score ELSE 0 END) AS a FROM t",
    "SELECT sex, SUM(COALESCE(score, 0)) FILTER (WHERE age < 50) AS s, COUNT(*) FILTER (WHERE income > 10) AS n "
    "FROM t GROUP BY sex",
    "SELECT educ, AVG(LN(income + 1)) AS l, VARIANCE(ABS(score) / 10) AS v, SUM(age / 7) AS d FROM t GROUP BY educ",
    "SELECT sex, SUM(ROUND(score)) AS r, AVG(EXP(score / 10)) AS e, COUNT(CASE WHEN score > 0 THEN 1 END) AS c "
    "FROM t WHERE age > 20 GROUP BY sex",
]
X = 10**6  # the pid of the person with 1000 rows


def people(rng: np.random.Generator, n: int, first_pid: int = 1) -> pd.DataFrame:
    """``n`` people with 1-5 rows each, values inside and outside the declared bounds."""
    counts = rng.integers(1, 6, n)
    size = int(counts.sum())
    return pd.DataFrame(
        {
            "pid": np.repeat(np.arange(first_pid, first_pid + n), counts),
            "age": rng.integers(-5, 110, size),
            "income": np.round(rng.lognormal(10, 1.5, size), 2),
            "score": np.round(rng.normal(0, 40, size), 3),
            "sex": rng.integers(0, 2, size),
            "educ": rng.integers(1, 17, size),
        }
    )


def person_x(rng: np.random.Generator, rows: int = 1000) -> pd.DataFrame:
    """One person with many rows spread over groups no one else has, and extreme values."""
    return pd.DataFrame(
        {
            "pid": X,
            "age": rng.integers(0, 100, rows),
            "income": rng.choice([0.0, 5.0, 1e12, -1e9, 99_999.5, 3.3e5], rows),
            "score": rng.choice([-1e6, 1e6, 0.25, -49.75, 50.0], rows),
            "sex": rng.integers(0, 2, rows),
            "educ": rng.integers(1, 200, rows),
        }
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    rng = np.random.default_rng(0)
    with make_gateway(tmp_path, people(rng, 5), POLICY) as gw:
        yield gw


def exact(gw: Gateway, plan: DPPlan, data: pd.DataFrame) -> dict[str, dict[tuple[Any, ...], int]]:
    """Each measurement's exact bounded value per group, on ``data`` (written over the gateway's CSV)."""
    write_csv(gw.config.tables[0].source, data)
    by_group = exact_by_group(gw.connector.execute(plan.bounded_sql, plan.settings), len(plan.group_keys))
    return {m.name: {key: row[i] for key, row in by_group.items()} for i, m in enumerate(plan.measurements)}


def added(a: dict[tuple[Any, ...], int], b: dict[tuple[Any, ...], int]) -> dict[tuple[Any, ...], int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in a.keys() | b.keys()}


def l1_change(a: dict[tuple[Any, ...], int], b: dict[tuple[Any, ...], int]) -> int:
    return sum(abs(a.get(key, 0) - b.get(key, 0)) for key in a.keys() | b.keys())


@pytest.mark.parametrize("sql", QUERIES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_person_moves_each_measurement_by_at_most_its_sensitivity(gateway: Gateway, sql: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    others, x = people(rng, 300), person_x(rng)
    plan = gateway.explain(sql, epsilon=1.0, delta=1e-6).plan
    assert plan is not None
    with_x = exact(gateway, plan, pd.concat([others, x]).sample(frac=1, random_state=seed))
    without_x = exact(gateway, plan, others)
    x_alone = exact(gateway, plan, x)
    for m in plan.measurements:
        change = l1_change(with_x[m.name], without_x[m.name])
        assert change <= m.sensitivity, f"{m.label}: one person moved it by {change} > {m.sensitivity}"
        # X's kept rows are the same with or without everyone else: the change is exactly X's own aggregate.
        assert l1_change(with_x[m.name], added(without_x[m.name], x_alone[m.name])) == 0
        if m.kind == "count" and m.arg is None:
            # X has 1000 matching rows and keeps exactly k of them (rows), or k rows' worth (weighted, in
            # fixed point): the bound is tight.
            assert change == K * m.scale


def test_row_order_and_other_people_do_not_change_which_rows_are_kept(gateway: Gateway) -> None:
    """The exact per-group aggregates of a one-person filter are the same whoever else is in the file."""
    rng = np.random.default_rng(11)
    x = person_x(rng, rows=40)
    sql = f"SELECT educ, COUNT(*) AS n, SUM(income) AS s, SUM(score) AS z FROM t WHERE pid = {X} GROUP BY educ"
    plan = gateway.explain(sql, epsilon=1.0, delta=1e-6).plan
    assert plan is not None
    alone = exact(gateway, plan, x)
    assert sum(alone[plan.measurements[0].name].values()) == K
    for seed in range(5):
        crowd = people(np.random.default_rng(100 + seed), 200)
        mixed = pd.concat([crowd, x, people(np.random.default_rng(200 + seed), 50, first_pid=5000)])
        assert exact(gateway, plan, mixed.sample(frac=1, random_state=seed)) == alone


def test_outliers_are_clamped_to_the_bounds(gateway: Gateway) -> None:
    lo, hi = INCOME
    values = [1e12, -5.0, 250.5, hi + 0.5, lo - 1e-3, 1e308]
    data = pd.DataFrame({"pid": range(len(values)), "age": 1, "income": values, "score": 0, "sex": 0, "educ": 1})
    plan = gateway.explain("SELECT SUM(income) AS s, AVG(income) AS a FROM t", epsilon=1.0).plan
    assert plan is not None
    got = exact(gateway, plan, data)
    scale = fixed_point_scale(max(abs(lo), abs(hi)))
    clamped = [min(hi, max(lo, v)) for v in values]
    by_kind = {(m.kind, m.center): m.name for m in plan.measurements}
    assert got[by_kind[("sum", 0.0)]] == {(): sum(round(v * scale) for v in clamped)}
    mid = (lo + hi) / 2
    centered = [round((v - mid) * fixed_point_scale(hi - mid)) for v in clamped]
    assert got[by_kind[("sum", mid)]] == {(): sum(centered)}


# Messy cells of a float column [0, 100000] and an int column [0, 100], and what bounding must make of them.
MESSY_FLOATS = [
    ("12.5", 12.5),
    ("-7", 0.0),
    ("NaN", None),
    ("nan", None),
    ("inf", INCOME[1]),
    ("-inf", INCOME[0]),
    ("Infinity", INCOME[1]),
    ("1e400", INCOME[1]),
    ("-1e400", INCOME[0]),
    ("1e300", INCOME[1]),
    ("abc", None),
    ("", None),
    ("1,5", None),
]
MESSY_INTS = [
    ("42", 42),
    ("-3", 0),
    ("1000", 100),
    ("99999999999999999999", None),
    ("x7", None),
    ("", None),
]


def test_messy_values_are_nulled_or_clamped_never_an_error(gateway: Gateway) -> None:
    """NaN and unparsable text become NULL, infinities and huge values are clamped; nothing fails."""
    lines = ["pid,age,income,score,sex,educ"]
    lines += [f'{i},1,"{raw}",0,0,{i}' for i, (raw, _) in enumerate(MESSY_FLOATS)]
    lines += [f"{100 + i},{raw},1,0,1,{100 + i}" for i, (raw, _) in enumerate(MESSY_INTS)]
    # Rows whose privacy unit is NULL (or not an integer) belong to nobody and are dropped.
    lines += [",50,50,0,0,500", "abc,50,50,0,0,501", "1e400,50,50,0,0,502"]
    write_csv(gateway.config.tables[0].source, "\n".join(lines) + "\n")
    sql = "SELECT educ, COUNT(*) AS n, COUNT(income) AS ni, SUM(income) AS si, SUM(age) AS sa FROM t GROUP BY educ"
    plan = gateway.explain(sql, epsilon=1.0, delta=1e-6).plan
    assert plan is not None
    by_group = exact_by_group(gateway.connector.execute(plan.bounded_sql, plan.settings), 1)
    income_scale = fixed_point_scale(INCOME[1])
    age_scale = fixed_point_scale(100)
    expected = {
        (i,): (1, int(v is not None), round((v or 0) * income_scale), round(1 * age_scale))
        for i, (_, v) in enumerate(MESSY_FLOATS)
    }
    expected |= {
        (100 + i,): (1, 1, round(1 * income_scale), round((v or 0) * age_scale)) for i, (_, v) in enumerate(MESSY_INTS)
    }
    assert by_group == expected
    # End to end the same data gives an answer (noisy, so only its shape is checked).
    res = gateway.query("SELECT COUNT(income) AS n, SUM(income) AS s, AVG(income) AS a FROM t", analyst="messy")
    assert res.columns == ["n", "s", "a"] and INCOME[0] <= res.rows[0][2] <= INCOME[1]


# -- property-based: random people, and a random person X -------------------------------------------------

rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 30),  # pid
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**20), 10**20)),  # income
        st.integers(0, 1),  # sex
        st.integers(0, 5),  # educ
    ),
    max_size=60,
)


def _frame(rows: list[tuple[int, Any, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"pid": p, "age": 40, "income": v, "score": 1.0, "sex": s, "educ": e} for p, v, s, e in rows],
        columns=["pid", "age", "income", "score", "sex", "educ"],
    )


@pytest.fixture(scope="module")
def module_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with make_gateway(
        tmp_path_factory.mktemp("prop"), [{"pid": 1, "age": 1, "income": 1, "score": 1, "sex": 0, "educ": 1}], POLICY
    ) as gw:
        yield gw


@settings(max_examples=40, deadline=None, database=None)
@given(
    others=rows_strategy,
    x_rows=st.lists(st.tuples(st.floats(-1e6, 1e6), st.integers(0, 1), st.integers(0, 9)), min_size=1, max_size=30),
)
def test_neighbours_differ_by_at_most_the_sensitivity(
    module_gateway: Gateway, others: list[Any], x_rows: list[Any]
) -> None:
    gw = module_gateway
    x = _frame([(X, v, s, e) for v, s, e in x_rows])
    d = _frame(others)
    plan = gw.explain(
        f"SELECT educ, sex, COUNT(*) AS n, SUM(income) AS s, AVG(income) AS a FROM {TABLE} GROUP BY educ, sex",
        epsilon=1.0,
        delta=1e-6,
    ).plan
    assert plan is not None
    with_x, without_x, x_alone = exact(gw, plan, pd.concat([d, x])), exact(gw, plan, d), exact(gw, plan, x)
    for m in plan.measurements:
        assert l1_change(with_x[m.name], without_x[m.name]) <= m.sensitivity
        assert l1_change(with_x[m.name], added(without_x[m.name], x_alone[m.name])) == 0
