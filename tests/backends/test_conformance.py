"""One suite, every backend: the same bounded plans give the same exact aggregates on each engine.

For the rewrites that do not depend on the row hash (weighted, unit_weighted, unit_grouped, unit_count, and row bounding when no unit
has more than k rows) the exact bounded aggregates must be IDENTICAL to DuckDB's, the reference backend
(whose own tests check it against independent references). For row bounding each unit keeps the same
number of rows; and one person moves each exact aggregate by at most its sensitivity on every backend.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
from conftest import PUMS_COLUMNS, Backend, PostgresDatabase, exact, pums_frame, sorted_rows

from dpgateway import Gateway
from dpgateway.errors import UnsupportedError


def _pums(backend: Backend, k: int, frame: pd.DataFrame | None = None, name: str = "pums") -> Gateway:
    source = backend.load(name, pums_frame() if frame is None else frame)
    spec = {"source": source, "privacy_unit": "pid", "max_rows_per_unit": k, "columns": PUMS_COLUMNS}
    return backend.gateway({"pums": spec})


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    """DuckDB over the same data: the reference every backend must match."""
    return Backend("duckdb", tmp_path_factory.mktemp("reference"), None)


IDENTICAL = [
    ("unit_weighted", "SELECT COUNT(*), SUM(income), AVG(age) FROM pums"),
    ("weighted", "SELECT sex, COUNT(*), SUM(income), COUNT(age) FROM pums GROUP BY sex"),
    ("weighted", "SELECT married, AVG(income) FROM pums WHERE age > 30 AND race IN (1, 2) GROUP BY married"),
    ("unit_weighted", "SELECT VARIANCE(age), STDDEV(income) FROM pums WHERE income BETWEEN 1000 AND 90000"),
    ("unit_weighted", "SELECT COUNT(*), COUNT(age), SUM(income), AVG(age) FROM pums WHERE age > 30 OR sex = 2"),
    ("unit_count", "SELECT COUNT(*) FROM pums WHERE age >= 40"),
    ("unit_weighted", "SELECT COUNT(age), SUM(income) FROM pums WHERE income IS NOT NULL AND age IS NOT NULL"),
    # row expressions (passes/intervals.py) and FILTER: PostgreSQL semantics on every backend
    ("weighted", "SELECT age / 10, COUNT(*), SUM(income) FROM pums GROUP BY age / 10"),
    ("weighted", "SELECT width_bucket(income, 0, 100000, 7), COUNT(*), AVG(age) FROM pums GROUP BY 1"),
    ("weighted", "SELECT FLOOR(age / 10) * 10 AS decade, sex, AVG(income) FROM pums GROUP BY 1, 2"),
    (
        "unit_weighted",
        "SELECT SUM(income * 2), AVG(CASE WHEN sex = 1 THEN income ELSE 0 END), SUM(COALESCE(income, 0)) FROM pums",
    ),
    (
        "weighted",
        "SELECT sex, AVG(LN(income + 1)), SUM(ROUND(income / 1000, 1)), SUM(age / 7), SUM((age - 50) / 7) FROM pums GROUP BY sex",
    ),
    (
        "unit_weighted",
        "SELECT AVG(EXP(age / 10.0)), STDDEV(SQRT(income)), SUM(ABS(age - 50)), SUM(GREATEST(age, 40) - LEAST(age, 60)) FROM pums",
    ),
    (
        "unit_weighted",
        "SELECT SUM(ROUND(income / 3)), SUM(FLOOR(income / 7) + CEIL(income / 7)), VARIANCE(POWER(age, 2)), SUM(CAST(age AS DOUBLE PRECISION) / 7) FROM pums",
    ),
    (
        "weighted",
        "SELECT married, SUM(income) FILTER (WHERE age > 30), COUNT(*) FILTER (WHERE race IN (1, 2)), AVG(age) FILTER (WHERE sex = 0) FROM pums GROUP BY married",
    ),
    ("unit_weighted", "SELECT COUNT(*) FILTER (WHERE age >= 40), COUNT(CASE WHEN income > 50000 THEN 1 END) FROM pums"),
    ("unit_count", "SELECT COUNT(*) FROM pums"),
]


@pytest.mark.parametrize(("rewrite", "sql"), IDENTICAL)
def test_hash_free_rewrites_are_identical(backend: Backend, reference: Backend, rewrite: str, sql: str) -> None:
    gateway, expected = _pums(backend, 3), _pums(reference, 3)
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.rewrite == rewrite
    assert sorted_rows(exact(gateway, sql)) == sorted_rows(exact(expected, sql))


def test_row_bounding_is_identical_when_no_unit_exceeds_k(backend: Backend, reference: Backend) -> None:
    sql = "SELECT educ, COUNT(*), SUM(income), AVG(age) FROM pums WHERE sex = 1 GROUP BY educ"
    gateway, expected = _pums(backend, 4), _pums(reference, 4)  # PUMS persons have 1 to 4 rows
    assert gateway.explain(sql).plan.rewrite == "rows"  # type: ignore[union-attr]
    result = sorted_rows(exact(gateway, sql))
    assert len(result) > 5 and result == sorted_rows(exact(expected, sql))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_row_bounding_keeps_the_same_number_of_rows_per_unit(backend: Backend, reference: Backend, k: int) -> None:
    frame = pums_frame().assign(person=lambda f: f["pid"])  # a copy of the unit the planner does not know as one
    columns = {**PUMS_COLUMNS, "person": {"type": "int"}}

    def counts(on: Backend) -> dict[int, int]:
        spec = {"source": on.load("pums", frame), "privacy_unit": "pid", "max_rows_per_unit": k, "columns": columns}
        return dict(exact(on.gateway({"pums": spec}), "SELECT person, COUNT(*) FROM pums GROUP BY person").rows)

    got = counts(backend)
    assert got == {pid: min(n, k) for pid, n in frame.groupby("pid").size().items()}
    assert got == counts(reference)


PER_UNIT = [
    "SELECT sex, COUNT(*), SUM(income), COUNT(age) FROM pums GROUP BY sex",
    "SELECT married, senior, AVG(income), VARIANCE(age) FROM pums WHERE age > 30 GROUP BY 1, 2",
    "SELECT CASE WHEN educ < 9 THEN 'low' WHEN educ < 13 THEN 'mid' ELSE 'high' END AS e, zone, COUNT(*), "
    "STDDEV(income) FROM pums GROUP BY 1, 2",
    "SELECT senior, COUNT(*), SUM(income) FROM pums WHERE income > 1000 GROUP BY senior",
]


def _per_unit(on: Backend, frame: pd.DataFrame, name: str) -> Gateway:
    """PUMS (whose persons have one sex, marital status, education and age each) with two person attributes more:
    ``senior`` (a bool) and ``zone`` (text, NULL for every third person), all declared ``per_unit``."""
    columns = {**PUMS_COLUMNS, "senior": {"type": "bool"}, "zone": {"type": "str", "public_values": ["north", "south"]}}
    for column in ("sex", "married", "educ", "senior", "zone"):
        columns[column] = {**columns[column], "per_unit": True}
    zone = pd.Series([("north", "south", None)[p % 3] for p in frame["pid"]], dtype=object)  # None, not NaN
    frame = frame.assign(senior=frame["age"] >= 60, zone=zone)
    spec = {"source": on.load(name, frame), "privacy_unit": "pid", "max_rows_per_unit": 3, "columns": columns}
    return on.gateway({"pums": spec})


def test_per_unit_keys_are_identical_and_one_spread_person_moves_each_cell_vector_by_at_most_its_sensitivity(
    backend: Backend, reference: Backend
) -> None:
    """``unit_grouped`` (passes/unit_grouped.py) gives DuckDB's integers on every backend (a boolean key, NULL keys,
    filters); a person whose 500 rows break the declaration (every sex, zone and age) moves each measurement by at
    most its sensitivity in L1 over the cells, COUNT(*) by exactly k rows' worth."""
    frame = pums_frame()
    got, expected = _per_unit(backend, frame, "people"), _per_unit(reference, frame, "people")
    for sql in PER_UNIT:
        plan = got.explain(sql).plan
        assert plan is not None and plan.rewrite == "unit_grouped", sql
        assert sorted_rows(exact(got, sql)) == sorted_rows(exact(expected, sql)), sql
    spread = pd.DataFrame(
        [
            {**frame.iloc[0].to_dict(), "pid": 10**6, "sex": i % 2, "age": i % 101, "income": 500000.0}
            for i in range(500)
        ]
    ).astype(frame.dtypes.to_dict())
    with_person = _per_unit(backend, pd.concat([frame, spread], ignore_index=True), "spread")
    for sql in PER_UNIT[:3]:
        plan = got.explain(sql).plan
        assert plan is not None
        n = len(plan.group_keys)
        before = {tuple(r[:n]): r for r in exact(got, sql).rows}
        after = {tuple(r[:n]): r for r in exact(with_person, sql).rows}
        for i, m in enumerate(plan.measurements, start=n):
            distance = sum(
                abs((after.get(g, [0] * 9)[i] or 0) - (before.get(g, [0] * 9)[i] or 0))
                for g in before.keys() | after.keys()
            )
            assert 0 < distance <= m.sensitivity, (sql, m.name)
            if m.kind == "count" and m.arg is None and plan.where is None:
                assert distance == m.sensitivity, (sql, m.name)


EDGES: list[Any] = [
    None,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    0.5,
    1.5,
    2.5,
    -0.5,
    -2.5,
    999999.5,
    0.0,
]


def test_null_nan_inf_and_huge_values(backend: Backend, reference: Backend) -> None:
    frame = pd.DataFrame(
        {"pid": [i // 2 for i in range(len(EDGES))], "x": EDGES, "g": [i % 3 for i in range(len(EDGES))]}
    )
    columns = {
        "pid": {"type": "int"},
        "x": {"type": "float", "bounds": [-1000000, 1000000]},
        "g": {"type": "int", "public_values": [0, 1, 2]},
    }

    def gateway(on: Backend) -> Gateway:
        spec = {"source": on.load("edges", frame), "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": columns}
        return on.gateway({"edges": spec})

    got, expected = gateway(backend), gateway(reference)
    for sql in (
        "SELECT COUNT(*), COUNT(x), SUM(x), AVG(x) FROM edges",
        "SELECT g, SUM(x), COUNT(x) FROM edges GROUP BY g",
        "SELECT COUNT(*) FROM edges WHERE x > 0",
        # ROUND half away from zero on the ties above, NULL/NaN/inf through an expression, FILTER
        "SELECT SUM(ROUND(x)), SUM(ROUND(x / 2) * 3), AVG(ABS(x) / 1000), SUM(COALESCE(x, 7)) FROM edges",
        "SELECT g, SUM(ROUND(x, 1)) FILTER (WHERE x < 3), COUNT(*) FILTER (WHERE x IS NULL) FROM edges GROUP BY g",
        "SELECT g, MEDIAN(x), COUNT(*) FROM edges GROUP BY g",  # quantile bins of NULL, NaN, +-inf, huge values
        "SELECT COUNT(DISTINCT x) FROM edges",
    ):
        assert sorted_rows(exact(got, sql)) == sorted_rows(exact(expected, sql)), sql


def test_empty_table(backend: Backend, reference: Backend) -> None:
    frame = pums_frame().iloc[:0]
    for sql in (
        "SELECT COUNT(*), SUM(income) FROM pums",
        "SELECT COUNT(*) FROM pums",
        "SELECT sex, COUNT(*) FROM pums GROUP BY sex",
    ):
        got = exact(_pums(backend, 2, frame, "empty"), sql)
        assert got.rows == exact(_pums(reference, 2, frame, "empty"), sql).rows, sql
    result = _pums(backend, 2, frame, "empty").query("SELECT COUNT(*) FROM pums", epsilon=1.0)
    assert len(result.rows) == 1


def test_one_person_moves_each_aggregate_by_at_most_its_sensitivity(backend: Backend) -> None:
    frame = pums_frame()
    heavy = pd.DataFrame([{**frame.iloc[0].to_dict(), "pid": 10**6, "income": 500000.0, "age": 100}] * 500)
    with_person = pd.concat([frame, heavy.astype(frame.dtypes.to_dict())], ignore_index=True)
    for sql in (
        "SELECT COUNT(*), SUM(income), SUM(age) FROM pums",
        "SELECT COUNT(*) FROM pums",
        "SELECT educ, SUM(income) FROM pums GROUP BY educ",
    ):
        without = _pums(backend, 3, frame, "without")
        plan = without.explain(sql).plan
        assert plan is not None
        base = {tuple(r[: len(plan.group_keys)]): r for r in exact(without, sql).rows}
        moved = {tuple(r[: len(plan.group_keys)]): r for r in exact(_pums(backend, 3, with_person, "with"), sql).rows}
        for i, m in enumerate(plan.measurements, start=len(plan.group_keys)):
            distance = sum(
                abs((moved.get(g, [0] * 9)[i] or 0) - (base.get(g, [0] * 9)[i] or 0))
                for g in base.keys() | moved.keys()
            )
            assert 0 < distance <= m.sensitivity, (sql, m.name)


def test_row_expressions_that_could_raise_are_total_or_refused(backend: Backend, reference: Backend) -> None:
    gateway = _pums(backend, 3)
    # Spark's TRY_CAST reads only integer text as BIGINT ('25000.0' is NULL; DuckDB takes it): docs/backends.md
    column = "age" if backend.spark is not None else "income"
    casts = (
        f"SELECT COUNT(*) FROM pums WHERE CAST(CAST({column} AS TEXT) AS BIGINT) > 30 AND CAST(age AS TEXT) LIKE '3%'"
    )
    assert exact(gateway, casts).rows == exact(_pums(reference, 3), casts).rows
    arithmetic = "SELECT COUNT(*) FROM pums WHERE age * 2 - 1 > 60"
    overflow = "SELECT COUNT(*) FROM pums WHERE age > 40 AND age + 9223372036854775747 > 0"  # over 60: overflow, NULL
    if isinstance(backend.pg, PostgresDatabase):  # PostgreSQL raises on overflow and has no TRY(): refused
        with pytest.raises(UnsupportedError, match=r"(SUB|MUL) over a column can fail on PostgreSQL"):
            gateway.explain(arithmetic)
    else:  # DuckDB makes it total with TRY(), Spark with try_add/try_subtract/try_multiply: overflow is NULL
        got = exact(gateway, arithmetic).rows
        assert got == exact(_pums(reference, 3), arithmetic).rows and got[0][0] > 0
        # DuckDB widens the sum to HUGEINT (no overflow); BIGINT on Spark overflows past age 60: NULL, no error
        kept = exact(gateway, overflow).rows[0][0]
        assert 0 < kept < got[0][0]


# -- joins, unit paths and per-person subqueries (passes/relations.py, passes/per_unit.py) -----------------

RELATIONS = [
    "SELECT c_mktsegment, COUNT(*), SUM(o_totalprice) FROM customer JOIN orders ON c_custkey = o_custkey "
    "GROUP BY c_mktsegment",
    "SELECT l_returnflag, COUNT(*), AVG(l_extendedprice) FROM lineitem GROUP BY l_returnflag",
    "SELECT COUNT(*), COUNT(o_totalprice) FROM customer LEFT JOIN orders ON c_custkey = o_custkey",
    "SELECT o_orderpriority, SUM(l_quantity) FROM customer JOIN orders ON c_custkey = o_custkey "
    "JOIN lineitem ON l_orderkey = o_orderkey JOIN nation ON c_nationkey = n_nationkey "
    "WHERE n_regionkey = 1 GROUP BY o_orderpriority",
    "SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey",
    "SELECT COUNT(*), AVG(t) FROM (SELECT o_custkey, SUM(o_totalprice) AS t FROM orders GROUP BY o_custkey) AS s "
    "WHERE t >= 1000000",
    "WITH s AS (SELECT o_custkey, COUNT(*) AS n, MAX(l_quantity) AS q FROM orders JOIN lineitem "
    "ON o_orderkey = l_orderkey GROUP BY o_custkey) SELECT c_mktsegment, COUNT(*), SUM(n), SUM(q) "
    "FROM s JOIN customer ON c_custkey = o_custkey WHERE n > 3 GROUP BY c_mktsegment",
]


def _tpch(on: Backend) -> Gateway:
    import tpch

    return on.gateway(tpch.policy({name: on.load(name, frame) for name, frame in tpch.generate(60).items()}))


def test_joins_and_per_person_subqueries_are_identical(backend: Backend, reference: Backend) -> None:
    """Weighted and per-unit rewrites over joined relations (no unit over k): the same exact aggregates."""
    gateway, expected = _tpch(backend), _tpch(reference)
    for sql in RELATIONS:
        plan = gateway.explain(sql).plan
        assert (
            plan is not None
            and plan.relation is not None
            and plan.rewrite in ("weighted", "unit_count", "unit_weighted")
        ), sql
        assert sorted_rows(exact(gateway, sql)) == sorted_rows(exact(expected, sql)), sql


QUANTILES_AND_DISTINCT = [
    "SELECT MEDIAN(income), MIN(income), MAX(income) FROM pums",
    "SELECT sex, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY age), COUNT(*) FROM pums GROUP BY sex",
    "SELECT married, quantile_disc(income, 0.25), SUM(income), AVG(age) FROM pums WHERE age > 30 GROUP BY married",
    "SELECT COUNT(DISTINCT pid), COUNT(DISTINCT educ) FROM pums",
    "SELECT sex, COUNT(DISTINCT pid), COUNT(*) FROM pums GROUP BY sex",
    "SELECT MIN(age), MAX(income), COUNT(DISTINCT educ), COUNT(*) FROM pums",
    "SELECT educ, MEDIAN(age), quantile_cont(income, 0.75) FROM pums WHERE sex = 1 GROUP BY educ",
    # quantiles of expressions: the value over clamped columns, clamped to its derived interval, then binned
    "SELECT sex, MEDIAN(age + 1), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY income / 1000) FROM pums GROUP BY sex",
    "SELECT MAX(age / 7 - 2), quantile_disc(ROUND(income / 3) * 2 + age, 0.3), MEDIAN(income) FROM pums",
]


@pytest.mark.parametrize("sql", QUANTILES_AND_DISTINCT)
def test_quantile_histograms_and_distinct_counts_are_identical(backend: Backend, reference: Backend, sql: str) -> None:
    """Per-candidate counts (the bin index computed in DOUBLE, FLOOR, clamped) and distinct counts match DuckDB's
    exactly when no unit exceeds k (PUMS persons have 1 to 4 rows)."""
    gateway, expected = _pums(backend, 4), _pums(reference, 4)
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.rewrite == "rows"
    result = sorted_rows(exact(gateway, sql))
    assert len(result) >= 1 and result == sorted_rows(exact(expected, sql))


def test_quantile_release_and_one_person_on_each_backend(backend: Backend) -> None:
    """A released median is a grid candidate; one person with 500 rows moves the histograms by at most k in L1."""
    from dpgateway.passes.quantiles import split_bins

    sql = "SELECT sex, MEDIAN(income) AS m, COUNT(DISTINCT educ) AS d FROM pums GROUP BY sex"
    distinct = "SELECT sex, COUNT(DISTINCT educ) AS d FROM pums GROUP BY sex"
    without = _pums(backend, 3)
    released = without.query("SELECT sex, MEDIAN(income) AS m FROM pums GROUP BY sex", epsilon=1.0)
    assert [row[0] for row in released.rows] == [0, 1]
    assert all(0 <= row[1] <= 500000 and float(row[1] / 500).is_integer() for row in released.rows)
    both = without.query(sql, epsilon=1.0)  # a quantile and a distinct count in one statement (grouping sets)
    assert [row[0] for row in both.rows] == [0, 1] and all(isinstance(row[2], int) for row in both.rows)
    frame = pums_frame()
    heavy = pd.DataFrame([{**frame.iloc[0].to_dict(), "pid": 10**6, "income": 500000.0, "educ": 99}] * 500)
    with_person = pd.concat([frame, heavy.astype(frame.dtypes.to_dict())], ignore_index=True)
    moved = _pums(backend, 3, with_person, "with")
    median = "SELECT sex, MEDIAN(income) AS m FROM pums GROUP BY sex"
    plan = without.explain(median).plan
    assert plan is not None
    name = plan.measurements[0].name
    before = split_bins(plan, exact(without, median))[1][name]
    after = split_bins(plan, exact(moved, median))[1][name]
    change = sum(
        abs(after.get(g, {}).get(i, 0) - before.get(g, {}).get(i, 0))
        for g in before.keys() | after.keys()
        for i in before.get(g, {}).keys() | after.get(g, {}).keys()
    )
    assert 0 < change <= 3
    counts = [dict(exact(g, distinct).rows) for g in (without, moved)]
    assert 0 < sum(abs(counts[1].get(s, 0) - counts[0].get(s, 0)) for s in (0, 1)) <= 3


DATE_KEYS = [
    "SELECT EXTRACT(year FROM d) AS y, COUNT(*), SUM(x) FROM visits GROUP BY 1",
    "SELECT date_part('quarter', d), EXTRACT(month FROM d), COUNT(*) FROM visits GROUP BY 1, 2",
    "SELECT EXTRACT(day FROM d), EXTRACT(dow FROM d), AVG(x) FROM visits GROUP BY 1, 2",
    "SELECT date_trunc('month', d) AS m, COUNT(*) FROM visits GROUP BY 1",
    "SELECT date_trunc('quarter', d), date_trunc('year', d), SUM(x) FROM visits GROUP BY 1, 2",
]


def test_date_keys_are_identical(backend: Backend, reference: Backend) -> None:
    """Date keys with public domains (passes/dates.py): the clamped date, PostgreSQL's EXTRACT (dow 0 = Sunday)
    and date_trunc (a timestamp at midnight) give the same keys and aggregates on every backend."""
    days = pd.date_range("2019-11-20", "2022-02-10", freq="5D").strftime("%Y-%m-%d").tolist()
    text = [*days, "", "2021-02-30", "1999-12-31", "2030-06-01"]  # NULL, not a day, before and after the bounds
    frame = pd.DataFrame(
        {"pid": [i // 2 for i in range(len(text))], "d": text, "x": [i % 50 for i in range(len(text))]}
    )
    columns = {
        "pid": {"type": "int"},
        "d": {"type": "date", "bounds": ["2020-01-01", "2021-12-31"]},
        "x": {"type": "int", "bounds": [0, 100]},
    }

    def gateway(on: Backend) -> Gateway:  # dates as text: each backend's typed read of a date column
        spec = {"source": on.load("visits", frame), "privacy_unit": "pid", "max_rows_per_unit": 2}
        return on.gateway({"visits": {**spec, "columns": columns}})

    got, expected = gateway(backend), gateway(reference)
    for sql in DATE_KEYS:
        plan = got.explain(sql).plan
        assert plan is not None and plan.rewrite == "weighted" and not plan.selects_partitions, sql
        result = sorted_rows(exact(got, sql))
        assert len(result) >= 3 and result == sorted_rows(exact(expected, sql)), sql
    # EXTRACT in WHERE and in a private key (read unclamped) means PostgreSQL's on every backend too
    for sql in (
        "SELECT COUNT(*), SUM(x) FROM visits WHERE EXTRACT(dow FROM d) IN (0, 6)",
        "SELECT CASE WHEN EXTRACT(dow FROM d) = 0 THEN 'sunday' ELSE 'other' END, COUNT(*) FROM visits GROUP BY 1",
        "SELECT EXTRACT(doy FROM d), COUNT(*) FROM visits GROUP BY 1",  # a private key (no unit exceeds k)
    ):
        result = sorted_rows(exact(got, sql))
        assert len(result) >= 1 and result == sorted_rows(exact(expected, sql)), sql
