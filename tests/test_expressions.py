"""Aggregates over row expressions and FILTER: bounded SQL executed against an independent pandas reference.

Each case is an aggregate over an expression and a pandas function computing, independently of the
planner, each row's value with PostgreSQL's semantics on the clamped columns (integer division truncates,
ROUND is half away from zero, conditions read the raw values). The test checks that

- every value lies in the interval the planner derived (the soundness claim of passes/intervals.py),
  on data with NULLs, NaN, infinities and values outside the declared bounds;
- the backend's exact bounded aggregates equal the reference: per row ``round((v - c)^p * scale)``,
  weighted by ``trunc(. * k / max(n_u, k))`` where the weighted rewrite applies (k = 2 < some row counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlglot
from helpers import exact_by_group, make_gateway

from dpgateway import Gateway, sqlparse
from dpgateway.errors import DPGatewayError

K = 2
AGE, INCOME, SCORE = (0.0, 100.0), (0.0, 200_000.0), (-5.0, 5.0)
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "age": {"type": "int", "bounds": list(AGE)},
        "income": {"type": "float", "bounds": list(INCOME)},
        "score": {"type": "float", "bounds": list(SCORE)},
        "sex": {"type": "int", "public_values": [0, 1]},
        "educ": {"type": "int"},
    },
}

Value = Callable[[pd.DataFrame], pd.Series]


def _clip(f: pd.DataFrame, name: str) -> pd.Series:
    lo, hi = {"age": AGE, "income": INCOME, "score": SCORE}[name]
    return f[name].clip(lo, hi)


def _half_away(s: pd.Series) -> pd.Series:
    return np.sign(s) * np.floor(np.abs(s) + 0.5)


def _trunc_div(s: pd.Series, d: int) -> pd.Series:
    return np.sign(s) * (np.abs(s) // d)


def _when(mask: pd.Series, value: pd.Series | float) -> pd.Series:
    """``CASE WHEN mask THEN value END``: NULL where the condition is false or NULL."""
    out = pd.Series(value, index=mask.index, dtype=float)
    return out.where(mask.fillna(False).astype(bool))


CASES: list[tuple[str, Value]] = [
    ("SUM(income * 2)", lambda f: _clip(f, "income") * 2),
    ("AVG(CASE WHEN sex = 1 THEN income ELSE 0 END)", lambda f: _clip(f, "income").where(f["sex"] == 1, 0.0)),
    ("SUM(CASE WHEN age > 30 THEN score END)", lambda f: _when(f["age"] > 30, _clip(f, "score"))),
    ("SUM(COALESCE(score, 0))", lambda f: _clip(f, "score").fillna(0.0)),
    ("AVG(EXP(score / 10))", lambda f: np.exp(_clip(f, "score") / 10)),
    ("SUM(LN(income + 1))", lambda f: np.log(_clip(f, "income") + 1)),
    ("SUM(ROUND(score))", lambda f: _half_away(_clip(f, "score"))),
    ("AVG(ROUND(income / 1000, 1))", lambda f: _half_away(_clip(f, "income") / 1000 * 10) / 10),
    ("SUM(ABS(score) - 1)", lambda f: _clip(f, "score").abs() - 1),
    (  # GREATEST and LEAST skip NULLs, as in PostgreSQL
        "SUM(LEAST(age, 60) - GREATEST(score, 0))",
        lambda f: _clip(f, "age").clip(upper=60).fillna(60) - _clip(f, "score").clip(0).fillna(0),
    ),
    ("SUM(age / 7)", lambda f: _trunc_div(_clip(f, "age"), 7)),
    ("SUM((age - 50) / 7)", lambda f: _trunc_div(_clip(f, "age") - 50, 7)),
    ("SUM(CAST(age AS DOUBLE PRECISION) / 7)", lambda f: _clip(f, "age") / 7),
    ("SUM(score * score - age)", lambda f: _clip(f, "score") ** 2 - _clip(f, "age")),
    ("STDDEV(SQRT(income))", lambda f: np.sqrt(_clip(f, "income"))),
    ("VARIANCE(POWER(score, 3))", lambda f: _clip(f, "score") ** 3),
    ("SUM(FLOOR(score) + CEIL(score))", lambda f: np.floor(_clip(f, "score")) + np.ceil(_clip(f, "score"))),
    ("SUM(income) FILTER (WHERE age > 30)", lambda f: _when(f["age"] > 30, _clip(f, "income"))),
    ("AVG(score) FILTER (WHERE sex = 0 AND educ < 9)", lambda f: _when((f["sex"] == 0) & (f["educ"] < 9), _clip(f, "score"))),
    ("COUNT(*) FILTER (WHERE income > 50000)", lambda f: _when(f["income"] > 50000, 1.0)),
    ("COUNT(CASE WHEN score < 0 THEN 1 END)", lambda f: _when(f["score"] < 0, 1.0)),
    ("COUNT(score) FILTER (WHERE age >= 40)", lambda f: _when(f["age"] >= 40, f["score"])),
    # IS NOT NULL: sqlglot 30 reads it as one flagged node, which verification once refused (sqlparse.py)
    ("SUM(income) FILTER (WHERE score IS NOT NULL)", lambda f: _when(f["score"].notna(), _clip(f, "income"))),
    ("COUNT(*) FILTER (WHERE age IS NOT NULL AND NOT sex IS NULL)", lambda f: _when(f["age"].notna() & f["sex"].notna(), 1.0)),
    ("SUM(CASE WHEN income IS NOT NULL THEN score END)", lambda f: _when(f["income"].notna(), _clip(f, "score"))),
]  # fmt: skip


def people(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """``n`` people with 1-4 rows; values inside and outside the bounds, NULLs, NaN and infinities."""
    counts = rng.integers(1, 5, n)
    size = int(counts.sum())
    frame = pd.DataFrame(
        {
            "pid": np.repeat(np.arange(1, n + 1), counts),
            "age": rng.integers(-5, 110, size).astype(float),
            "income": np.round(rng.lognormal(10, 1.5, size), 2),
            "score": np.round(rng.normal(0, 4, size), 3),
            "sex": rng.integers(0, 2, size).astype(float),
            "educ": rng.integers(1, 17, size),
        }
    )
    for column in ("age", "income", "score", "sex"):
        frame.loc[rng.random(size) < 0.05, column] = math.nan
    frame.loc[rng.random(size) < 0.02, "score"] = math.inf
    frame.loc[rng.random(size) < 0.02, "score"] = -math.inf
    frame["age"] = frame["age"].astype("Int64")
    frame["sex"] = frame["sex"].astype("Int64")
    return frame


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return people(np.random.default_rng(17), 400)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, data: pd.DataFrame) -> Iterator[Gateway]:
    with make_gateway(tmp_path_factory.mktemp("expressions"), data, POLICY) as gw:
        yield gw


def _typed(data: pd.DataFrame) -> pd.DataFrame:
    """The frame as the backend reads it: numbers as floats, NULL as NaN."""
    return data.assign(**{c: data[c].astype(float) for c in ("age", "income", "score", "sex", "educ")})


def _weighted(values: pd.Series, n: pd.Series) -> pd.Series:
    """``trunc(v * k / max(n_u, k))`` per row, in integers; NaN (a NULL value) stays NaN."""
    return pd.Series(
        [
            math.nan if pd.isna(v) else math.copysign(abs(int(v)) * K // max(int(m), K), v)
            for v, m in zip(values, n, strict=True)
        ],
        index=values.index,
    )


@pytest.mark.parametrize(("aggregate", "value"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("grouped", [False, True])
def test_expression_aggregates_match_an_independent_reference(
    gateway: Gateway, data: pd.DataFrame, aggregate: str, value: Value, grouped: bool
) -> None:
    sql = f"SELECT sex, {aggregate} FROM t GROUP BY sex" if grouped else f"SELECT {aggregate} FROM t"
    plan = gateway.explain(sql).plan
    # grouped: each row weighted (weighted); scalar: each person's total weighted once (unit_weighted)
    assert plan is not None and plan.rewrite == ("weighted" if grouped else "unit_weighted")
    frame = _typed(data)
    v = value(frame).astype(float)
    n = frame.groupby("pid")["pid"].transform("size")
    assert (n > K).any()
    keys = ["sex"] if grouped else []
    sizes = frame.groupby("pid").size()
    reference = pd.DataFrame({"sex": frame["sex"]}) if grouped else pd.DataFrame(index=sizes.index)
    for m in plan.measurements:
        if m.kind == "count":
            row = pd.Series(float(m.scale), index=v.index).where(v.notna())
        else:
            assert m.bounds is not None
            lo, hi = m.bounds
            present = v.dropna()
            assert ((present >= lo) & (present <= hi)).all(), f"{m.label}: a value outside [{lo}, {hi}]"
            shifted = v - m.center
            row = _half_away((shifted**2 if m.squared else shifted) * m.scale)
        if grouped:
            reference[m.name] = _weighted(row.astype(float), n)
        else:  # T_u per person (NULL when all of its values are), then trunc(T_u * k / max(n_u, k)) once
            reference[m.name] = _weighted(row.astype(float).groupby(frame["pid"]).sum(min_count=1), sizes)
    names = [m.name for m in plan.measurements]
    if grouped:
        reference = reference[reference["sex"].isin([0, 1])]
        expected = {(int(g),): tuple(r) for g, r in reference.groupby("sex")[names].sum(min_count=1).iterrows()}
    else:
        expected = {(): tuple(reference[names].sum(min_count=1))}
    got = exact_by_group(gateway.connector.execute(plan.bounded_sql, plan.settings), len(keys))
    assert set(got) >= set(expected)
    for key, row in expected.items():
        want = [0 if pd.isna(x) else int(x) for x in row]  # exact_by_group reads an empty SUM as 0
        assert list(got[key]) == want, (key, [m.label for m in plan.measurements])


def test_explain_reports_accuracy_and_labels_for_expressions(gateway: Gateway) -> None:
    explained = gateway.explain("SELECT AVG(income * 2) FILTER (WHERE age > 30) AS a, SUM(ABS(score)) FROM t")
    plan = explained.plan
    assert plan is not None
    labels = [m.label for m in plan.measurements]
    assert labels[0] == "COUNT(income * 2 FILTER (WHERE age > 30))"
    assert labels[-1] == "SUM(ABS(score))"
    assert [mech.measurement for mech in explained.mechanisms] == labels
    assert explained.accuracy["a"].endswith("/ n (n = rows in the group)")
    assert explained.accuracy["sum"].startswith("±")


def test_filters_share_the_units_bounding(gateway: Gateway, data: pd.DataFrame) -> None:
    """COUNT(*) FILTER (WHERE c) + COUNT(*) FILTER (WHERE NOT c) + COUNT(*) FILTER (WHERE c IS NULL) is COUNT(*):
    every filtered aggregate reads the same bounded rows (the unit's k rows or weights come first). Exactly per
    group when each row is weighted; for a scalar query each person's three parts are truncated apart
    (unit_weighted: each total weighted once), so the parts may fall short by less than one fixed-point unit per
    part of a person with more than k rows, never more (and never above COUNT(*))."""
    counts = (
        "COUNT(*), COUNT(*) FILTER (WHERE age > 30), COUNT(*) FILTER (WHERE NOT age > 30), "
        "COUNT(*) FILTER (WHERE age IS NULL)"
    )
    for sql in (f"SELECT sex, {counts} FROM t GROUP BY sex", f"SELECT {counts} FROM t"):
        plan = gateway.explain(sql).plan
        assert plan is not None
        rows = gateway.connector.execute(plan.bounded_sql, plan.settings).rows
        for row in rows:
            total, parts = row[-4], row[-3:]
            assert parts[0] > 0 and parts[1] > 0
            if plan.group_keys:
                assert total == sum(parts)
            else:
                heavy = int((data.groupby("pid").size() > K).sum())
                assert plan.rewrite == "unit_weighted" and 0 <= total - sum(parts) < 3 * heavy


REFUSED = [
    ("SELECT SUM(income / score) FROM t", "42501", r"divisor score can be 0 .*bounds"),
    ("SELECT SUM(LN(score)) FROM t", "42501", r"LN is undefined at or below 0"),
    ("SELECT SUM(SQRT(score)) FROM t", "42501", r"SQRT is undefined below 0"),
    ("SELECT SUM(EXP(income)) FROM t", "42501", r"EXP overflows"),
    ("SELECT SUM(age * age * age * age * age * age * age * age * age) FROM t", "42501", r"beyond BIGINT range"),
    ("SELECT SUM(educ + 1) FROM t", "42501", r"t.educ has no declared bounds.*tables.t.columns.educ"),
    ("SELECT AVG(POWER(score, 0.5)) FROM t", "42501", r"non-negative base"),
    ("SELECT SUM(CAST(score AS INT)) FROM t", "0A000", r"CAST to INT"),
    ("SELECT SUM(LENGTH(CAST(age AS TEXT))) FROM t", "0A000", r"LENGTH is not supported in an aggregate"),
    ("SELECT SUM(age) FILTER (WHERE pid = 3) FROM t", "42501", r"privacy unit"),
    ("SELECT SUM(CASE WHEN pid > 3 THEN 1 ELSE 0 END) FROM t", "42501", r"privacy unit"),
    ("SELECT SUM(age) FILTER (WHERE SUM(age) > 3) FROM t", "42803", r"aggregate functions are not allowed"),
    ("SELECT SUM(NULL + age) FROM t", "0A000", r"always NULL"),
    ("SELECT SUM(score / 1e200) FROM t", "42501", r"underflow \(PostgreSQL raises on that\)"),
    ("SELECT SUM(income * income * income) FROM t", "42501", r"beyond ±1e\+15"),
    ("SELECT AVG(EXP(-income)) FROM t", "42501", r"EXP overflows or underflows"),
]


@pytest.mark.parametrize(("sql", "sqlstate", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_unbounded_expressions_are_refused_naming_the_fix(
    gateway: Gateway, sql: str, sqlstate: str, message: str
) -> None:
    with pytest.raises(DPGatewayError, match=message) as info:
        gateway.explain(sql)
    assert info.value.sqlstate == sqlstate


def test_sensitivity_and_noise_scale_come_from_the_derived_interval(gateway: Gateway) -> None:
    """SUM(income * 2 - 1000): income in [0, 200000] gives [-1000, 399000]; k rows move it by k * 399000."""
    from dpgateway.passes.budget import fixed_point_scale

    plan = gateway.explain("SELECT SUM(income * 2 - 1000) FROM t", epsilon=2.0).plan
    assert plan is not None
    (m,) = plan.measurements
    assert m.bounds is not None
    lo, hi = m.bounds
    assert lo == pytest.approx(-1000, rel=1e-8) and lo <= -1000
    assert hi == pytest.approx(399000, rel=1e-8) and hi >= 399000
    assert m.bound == max(-lo, hi) and m.scale == fixed_point_scale(m.bound)
    assert m.sensitivity == K * math.ceil(m.bound * m.scale)
    assert m.noise_scale == pytest.approx(m.sensitivity / 2.0, rel=1e-12)


def _random_expression(rng: np.random.Generator, depth: int) -> str:
    """A random expression of the supported grammar over age (int), income and score (doubles)."""
    if depth == 0 or rng.random() < 0.25:
        return str(rng.choice(["age", "income / 1000", "score", "2", "7", "0.5", "-3", "(age - 50)"]))
    a, b = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    shapes = [
        f"({a} + {b})", f"({a} - {b})", f"({a} * {b})", f"({a} / {b})", f"-({a})", f"ABS({a})",
        f"ROUND({a})", f"FLOOR({a})", f"CEIL({a})", f"GREATEST({a}, {b})", f"LEAST({a}, {b})",
        f"COALESCE({a}, {b})", f"CASE WHEN score > 0 THEN {a} ELSE {b} END", f"EXP({a} / 100)",
        f"LN(ABS({a}) + 1)", f"SQRT(ABS({a}))", f"POWER({a}, 2)", f"ROUND({a}, 1)",
    ]  # fmt: skip
    return str(rng.choice(shapes))


def test_random_expressions_stay_inside_their_derived_interval(gateway: Gateway, data: pd.DataFrame) -> None:
    """Soundness of passes/intervals.py on the backend itself: 200 random expressions, each evaluated (as the
    rebuilt, clamped SQL, before the final clamp) on every row of a frame with values outside the bounds,
    NULLs and infinities; every value lies in the derived interval, or the expression was refused."""
    import duckdb

    rng = np.random.default_rng(2026)
    frame = _typed(data)
    extremes = pd.DataFrame(
        {
            "pid": 0,
            "age": [0.0, 100.0, -1e9, 1e9],
            "income": [0.0, 2e5, 1e300, -1e-300],
            "score": [-5.0, 5.0, 5e-324, -0.0],
        }
    )
    frame = pd.concat([frame, extremes.assign(sex=0.0, educ=1)], ignore_index=True)
    con = duckdb.connect()
    con.register("frame", frame)
    con.execute("CREATE TABLE rows AS SELECT CAST(age AS BIGINT) AS age, income, score FROM frame")
    accepted = 0
    for _ in range(200):
        text = _random_expression(rng, 3)
        try:
            plan = gateway.explain(f"SELECT SUM({text}) FROM t").plan
        except DPGatewayError:
            continue
        assert plan is not None
        (m,) = plan.measurements
        assert m.arg is not None and m.bounds is not None
        if m.column is not None:  # a bare column: clamped to its bounds by the fixed-point value itself
            continue
        lo, hi = m.bounds
        values = [v for (v,) in con.execute(f"SELECT {m.arg.sql('duckdb')} FROM rows").fetchall() if v is not None]
        assert all(lo <= v <= hi for v in values), (text, lo, hi, min(values), max(values))
        accepted += 1
    assert accepted >= 120, accepted  # the grammar is mostly within what is answered


@pytest.mark.parametrize(
    ("negated", "plain"),
    [
        ("x IS NOT NULL", "NOT x IS NULL"),
        ("x NOT LIKE 'a%'", "NOT x LIKE 'a%'"),
        ("x NOT ILIKE 'a%'", "NOT x ILIKE 'a%'"),
        ("(x + 1 IS NOT NULL) = y", "(NOT x + 1 IS NULL) = y"),
    ],
)
def test_negated_predicates_parse_as_not_around_the_plain_node(negated: str, plain: str) -> None:
    """One tree for both spellings, with no ``negate`` flag left: the shape every dialect reads back."""
    parsed = sqlparse.parse(f"SELECT COUNT(*) FROM t WHERE {negated}")
    assert parsed == sqlparse.parse(f"SELECT COUNT(*) FROM t WHERE {plain}")
    assert not any(node.args.get("negate") for node in parsed.walk())
    for dialect in ("duckdb", "postgres", "spark"):
        assert sqlglot.parse_one(parsed.sql(dialect), read=dialect) == parsed


def test_is_not_null_in_where_and_in_a_group_key_runs(gateway: Gateway) -> None:
    """Verification once refused every query with ``IS NOT NULL`` (42501); now they run like ``NOT ... IS NULL``."""
    pairs = [
        ("SELECT COUNT(*) FROM t WHERE score IS NOT NULL", "SELECT COUNT(*) FROM t WHERE NOT score IS NULL"),
        (
            "SELECT CASE WHEN score IS NOT NULL THEN 1 ELSE 0 END AS known, SUM(income) FROM t GROUP BY 1",
            "SELECT CASE WHEN NOT score IS NULL THEN 1 ELSE 0 END AS known, SUM(income) FROM t GROUP BY 1",
        ),
    ]
    for negated, plain in pairs:
        answers = []
        for sql in (negated, plain):
            plan = gateway.explain(sql).plan
            assert plan is not None
            answers.append(
                exact_by_group(gateway.connector.execute(plan.bounded_sql, plan.settings), len(plan.group_keys))
            )
        assert answers[0] == answers[1] and answers[0]
