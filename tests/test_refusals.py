"""Every refused query class, with its SQLSTATE; refusals never spend budget."""

from __future__ import annotations

import pytest

from dpgateway import Gateway
from dpgateway.errors import ALL_ERRORS, DPGatewayError

REFUSED = [
    # 42601 syntax errors
    ("SELEC COUNT(*) FROM pums", "42601"),
    ("SELECT COUNT(* FROM pums", "42601"),
    ("", "42601"),
    ("   ;  ", "42601"),
    ('SELECT "unterminated FROM pums', "42601"),
    # 42P01 unknown tables
    ("SELECT COUNT(*) FROM nowhere", "42P01"),
    ("SELECT COUNT(x.age) FROM pums", "42P01"),
    # 42703 unknown columns
    ("SELECT SUM(salary) FROM pums", "42703"),
    ("SELECT COUNT(*) FROM pums WHERE shoe_size > 3", "42703"),
    ("SELECT COUNT(*) FROM pums GROUP BY 5", "42703"),
    # 42803 grouping errors
    ("SELECT age, COUNT(*) FROM pums", "42803"),
    ("SELECT sex, age, COUNT(*) FROM pums GROUP BY sex", "42803"),
    ("SELECT COUNT(*) FROM pums WHERE SUM(age) > 3", "42803"),
    ("SELECT SUM(AVG(age)) FROM pums", "42803"),
    # 42501 privacy violations: raw rows, identifiers, unbounded values, writes, table functions
    ("SELECT * FROM pums", "42501"),
    ("SELECT age FROM pums", "42501"),
    ("SELECT age, income FROM pums WHERE pid = 7", "42501"),
    ("SELECT 1 FROM pums", "42501"),
    ("SELECT pid, COUNT(*) FROM pums GROUP BY pid", "42501"),
    ("SELECT pid % 2 AS half, COUNT(*) FROM pums GROUP BY pid % 2", "42501"),
    ("SELECT SUM(pid) FROM pums", "42501"),
    ("SELECT SUM(educ) FROM pums", "42501"),
    ("SELECT AVG(race) FROM pums", "42501"),
    ("SELECT a.sex, COUNT(*) FROM pums AS a JOIN pums AS b ON a.age = b.age GROUP BY a.sex", "42501"),
    ("DELETE FROM pums", "42501"),
    ("DROP TABLE pums", "42501"),
    ("INSERT INTO pums VALUES (1)", "42501"),
    ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "42501"),
    # 0A000 valid SQL we do not support (yet)
    ("SELECT SUM(income / age) FROM pums", "42501"),  # age can be 0: unbounded
    ("SELECT AVG(LN(income)) FROM pums", "42501"),  # income can be 0
    ("SELECT AVG(EXP(income)) FROM pums", "42501"),  # overflows within the bounds
    ("SELECT SUM(educ * 2) FROM pums", "42501"),  # educ has no bounds
    ("SELECT SUM(pid + 1) FROM pums", "42501"),  # the privacy unit
    ("SELECT SUM(RANDOM() * age) FROM pums", "0A000"),
    ("SELECT SUM(CAST(income AS INT)) FROM pums", "0A000"),
    ("SELECT MEDIAN(educ) FROM pums", "42501"),  # no bounds: no public candidates (docs/sql.md)
    ("SELECT MAX(pid) FROM pums", "42501"),
    ("SELECT SUM(DISTINCT income) FROM pums", "0A000"),
    ("SELECT MEDIAN(educ + 1) FROM pums", "42501"),  # a quantile of an unbounded expression
    ("SELECT MEDIAN(income / age) FROM pums", "42501"),  # age can be 0
    ("SELECT MEDIAN(LENGTH(CAST(income AS TEXT))) FROM pums", "0A000"),
    ("SELECT PERCENTILE_CONT(0.5) FROM pums", "0A000"),
    ("SELECT COUNT(*) FROM (SELECT * FROM pums WHERE age > 30) AS t", "0A000"),
    ("SELECT COUNT(*) FROM pums WHERE age IN (SELECT age FROM pums)", "0A000"),
    ("WITH t AS (SELECT * FROM pums) SELECT COUNT(*) FROM t", "0A000"),
    ("SELECT COUNT(*) FROM pums UNION SELECT COUNT(*) FROM pums", "0A000"),
    ("SELECT DISTINCT sex FROM pums", "0A000"),
    ("SELECT sex, COUNT(*) OVER () FROM pums GROUP BY sex", "0A000"),
    ("SELECT COUNT(*) FROM pums; SELECT COUNT(*) FROM pums", "0A000"),
    ("SELECT COUNT(*) FROM pums WHERE income / 2 > 10", "0A000"),
    ("SELECT COUNT(*) FROM pums WHERE random() > 0.5", "0A000"),
    ("SELECT sex, COUNT(*) FROM pums GROUP BY ROLLUP (sex)", "0A000"),
    ("SELECT COUNT(*) FROM pums LIMIT ALL", "0A000"),
    ("SHOW search_path", "0A000"),
    ("SET x = 1", "0A000"),
]


@pytest.mark.parametrize(("sql", "sqlstate"), REFUSED, ids=[f"{s}:{q[:40]}" for q, s in REFUSED])
def test_refused_with_sqlstate_and_no_spend(demo_gateway: Gateway, sql: str, sqlstate: str) -> None:
    before = demo_gateway.remaining("alice")
    with pytest.raises(DPGatewayError, match=r".+") as info:
        demo_gateway.query(sql, analyst="alice", epsilon=0.5)
    assert info.value.sqlstate == sqlstate, info.value.message
    assert demo_gateway.remaining("alice") == before
    # explain refuses the same way
    with pytest.raises(DPGatewayError, match=r".+") as again:
        demo_gateway.explain(sql, analyst="alice", epsilon=0.5)
    assert again.value.sqlstate == sqlstate


@pytest.mark.parametrize(
    ("epsilon", "delta", "match"),
    [
        (0, None, "epsilon must be a positive"),
        (-1, None, "epsilon must be a positive"),
        (float("nan"), None, "epsilon must be a positive"),
        (float("inf"), None, "epsilon must be a positive"),
        (0.5, -0.1, "delta must be a number"),
        (0.5, 1.0, "delta must be a number"),
    ],
)
def test_bad_parameters_are_22023(demo_gateway: Gateway, epsilon: float, delta: float | None, match: str) -> None:
    with pytest.raises(DPGatewayError, match=match) as info:
        demo_gateway.query("SELECT COUNT(*) FROM pums", analyst="alice", epsilon=epsilon, delta=delta)
    assert info.value.sqlstate == "22023"


def test_private_keys_without_delta_are_refused(demo_gateway: Gateway) -> None:
    with pytest.raises(DPGatewayError, match="needs delta in") as info:
        demo_gateway.query("SELECT educ, COUNT(*) FROM pums GROUP BY educ", analyst="alice", epsilon=0.5, delta=0.0)
    assert info.value.sqlstate == "22023"


def test_messages_name_the_fix(demo_gateway: Gateway) -> None:
    with pytest.raises(DPGatewayError, match=r"add `bounds: \[lo, hi\]` under tables\.pums\.columns\.educ"):
        demo_gateway.query("SELECT SUM(educ) FROM pums", analyst="alice")


def test_every_error_class_has_a_distinct_documented_sqlstate() -> None:
    import dpgateway.errors as errors

    states = [cls.sqlstate for cls in ALL_ERRORS]
    assert len(states) == len(set(states))
    for cls in ALL_ERRORS:
        assert cls.sqlstate in (errors.__doc__ or ""), f"{cls.__name__} missing from the errors docstring tree"
        assert len(cls.sqlstate) == 5
