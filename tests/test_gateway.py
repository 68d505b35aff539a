"""The Gateway API end to end on DuckDB and a SQLite ledger."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from dpgateway import Gateway
from dpgateway.connectors.base import ExactAggregates, MockConnector
from dpgateway.errors import BackendError, BudgetError, DPGatewayError, InternalError, QueryCapError
from dpgateway.policies.loader import load_config


def test_result_carries_frame_cost_and_remaining(demo_gateway: Gateway) -> None:
    before = demo_gateway.remaining("alice")["analyst"]["epsilon"]
    res = demo_gateway.query(
        "SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income FROM pums GROUP BY sex", analyst="alice", epsilon=0.8
    )
    assert isinstance(res.frame, pd.DataFrame)
    assert list(res.frame.columns) == ["sex", "n", "avg_income"]
    assert sorted(res.frame["sex"]) == [0, 1]  # public keys: every declared value, always
    assert res.epsilon == pytest.approx(0.8) and res.epsilon <= 0.8
    assert res.delta == 0.0  # no partition selection on public keys
    assert res.remaining["analyst"]["epsilon"] == pytest.approx(before - res.epsilon)
    assert (res.frame["avg_income"].between(0, 500000)).all()
    assert (res.frame["n"] >= 0).all()


def test_explain_spends_nothing_and_matches_query_cost(demo_gateway: Gateway) -> None:
    sql = "SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ"
    before = demo_gateway.remaining("bob")
    plan = demo_gateway.explain(sql, analyst="bob", epsilon=0.4, delta=1e-7)
    assert demo_gateway.remaining("bob") == before
    assert plan.delta == 1e-7 and plan.epsilon <= 0.4
    assert "ROW_NUMBER() OVER (PARTITION BY" in plan.bounded_sql and "<= 3" in plan.bounded_sql
    assert plan.mechanisms[0].threshold is not None
    res = demo_gateway.query(sql, analyst="bob", epsilon=0.4, delta=1e-7)
    assert (res.epsilon, res.delta) == (plan.epsilon, plan.delta)


def test_replay_is_free_and_identical(demo_gateway: Gateway) -> None:
    sql = "SELECT COUNT(*) AS n FROM pums WHERE age > 40"
    first = demo_gateway.query(sql, analyst="carol", epsilon=0.3)
    again = demo_gateway.query("select count(*) as n from pums where age > 40", analyst="carol", epsilon=0.3)
    assert again.replayed and again.epsilon == 0.0
    assert again.rows == first.rows
    assert again.remaining == first.remaining
    other_eps = demo_gateway.query(sql, analyst="carol", epsilon=0.2)
    assert not other_eps.replayed and other_eps.epsilon > 0


def test_post_processing_applies_having_order_limit(demo_gateway: Gateway) -> None:
    res = demo_gateway.query(
        "SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ HAVING COUNT(*) > 100 ORDER BY n DESC LIMIT 3",
        analyst="dave",
        epsilon=1.0,
    )
    assert len(res.frame) <= 3
    assert (res.frame["n"] > 100).all()
    assert list(res.frame["n"]) == sorted(res.frame["n"], reverse=True)


def test_arithmetic_on_aggregates_and_ordinals(demo_gateway: Gateway) -> None:
    res = demo_gateway.query(
        "SELECT married, SUM(income) / COUNT(*) AS ratio, ROUND(AVG(age), 1) AS a FROM pums GROUP BY 1 ORDER BY 1",
        analyst="dave",
        epsilon=1.0,
    )
    assert list(res.frame["married"]) == [0, 1]
    assert res.frame["a"].between(0, 100).all()


def test_private_groups_hide_rare_keys(tmp_path: Path) -> None:
    rows = [{"pid": i, "city": "big", "x": 1} for i in range(2000)] + [{"pid": 5000, "city": "rare", "x": 1}]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "dpgateway.yaml").write_text(
        "tables:\n  t:\n    source: t.csv\n    privacy_unit: pid\n    columns:\n"
        "      pid: {type: int}\n      city: {type: str}\n      x: {type: int, bounds: [0, 1]}\n"
        "budget:\n  per_analyst: {epsilon: 100, delta: 0.001}\n  per_subject: {epsilon: 100, delta: 0.001}\n"
        "ledger: sqlite:///ledger.db\n"
    )
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        for i in range(10):
            res = gw.query(
                f"SELECT city, COUNT(*) AS n FROM t WHERE x >= -{i} GROUP BY city", analyst="eve", epsilon=1.0
            )
            assert list(res.frame["city"]) == ["big"]  # rare: count 1, threshold ~ 20: P(release) < 1e-6
            assert res.delta > 0


def test_budget_exhaustion_refuses_with_53000_and_remaining(demo_config_path: Path) -> None:
    with Gateway.from_config(demo_config_path) as gw:  # per_analyst epsilon 4, per_query 1
        for i in range(4):
            gw.query(f"SELECT COUNT(*) FROM pums WHERE age > {i}", analyst="frank", epsilon=1.0)
        with pytest.raises(BudgetError, match="remain") as info:
            gw.query("SELECT COUNT(*) FROM pums WHERE age > 99", analyst="frank", epsilon=0.5)
        assert info.value.sqlstate == "53000"
        assert gw.remaining("frank")["analyst"]["epsilon"] == pytest.approx(0.0, abs=1e-9)


def test_per_query_cap_is_53400(demo_config_path: Path) -> None:
    with Gateway.from_config(demo_config_path) as gw, pytest.raises(QueryCapError, match=r"budget\.per_query") as info:
        gw.query("SELECT COUNT(*) FROM pums", analyst="gina", epsilon=1.5)
    assert info.value.sqlstate == "53400"


def test_subject_domain_cap_spans_analysts(demo_config_path: Path) -> None:
    with Gateway.from_config(demo_config_path) as gw:  # per_subject epsilon 4 across everyone
        for i, who in enumerate(["h1", "h2", "h3", "h4"]):
            gw.query(f"SELECT COUNT(*) FROM pums WHERE age > {i}", analyst=who, epsilon=1.0)
        with pytest.raises(BudgetError, match="domain"):
            gw.query("SELECT COUNT(*) FROM pums", analyst="h5", epsilon=0.1)


def test_backend_failure_is_charged_and_hides_values(demo_config_path: Path) -> None:
    config = load_config(demo_config_path)

    def explode(sql: str) -> ExactAggregates:
        raise BackendError("the backend could not run the bounded query (IOException)")

    with Gateway(config, connector=MockConnector(explode)) as gw:
        before = gw.remaining("ivan")["analyst"]["epsilon"]
        with pytest.raises(BackendError, match="could not run"):
            gw.query("SELECT COUNT(*) FROM pums", analyst="ivan", epsilon=0.5)
        assert gw.remaining("ivan")["analyst"]["epsilon"] == pytest.approx(before - 0.5)
        records = gw.store.audit_log(analyst="ivan")
    assert [(r.outcome, r.epsilon, r.message) for r in records] == [
        ("error", 0.5, "charged, no answer released: the query failed after the backend was called (SQLSTATE 58000)")
    ]


def _not_a_count(sql: str) -> ExactAggregates:
    return ExactAggregates(columns=("__m0",), rows=(("secret 1234",),))  # not a count: noise cannot be added


def _crash(sql: str) -> ExactAggregates:
    raise RuntimeError("secret 1234")  # a connector bug, not a BackendError


@pytest.mark.parametrize("answer", [_not_a_count, _crash], ids=["post-processing", "connector bug"])
def test_any_failure_after_the_backend_ran_is_charged(demo_config_path: Path, answer) -> None:
    with Gateway(load_config(demo_config_path), connector=MockConnector(answer)) as gw:
        with pytest.raises(InternalError, match=r"this is a bug.*: the query failed: \w+Error$"):
            gw.query("SELECT COUNT(*) FROM pums", analyst="ivan", epsilon=0.5)
        records = gw.store.audit_log(analyst="ivan")
        charges = gw.store.history("analyst:ivan")
    assert [(c.state, c.epsilon) for c in charges] == [("committed", 0.5)]
    assert [(r.outcome, r.message) for r in records] == [
        ("error", "charged, no answer released: the query failed after the backend was called (SQLSTATE XX000)")
    ]


def test_mock_connector_sees_only_bounded_sql(demo_config_path: Path) -> None:
    config = load_config(demo_config_path)
    mock = MockConnector(lambda sql: ExactAggregates(columns=("__m0",), rows=((1000,),)))
    with Gateway(config, connector=mock) as gw:
        res = gw.query("SELECT COUNT(*) AS n FROM pums", analyst="jo", epsilon=1.0)
    assert len(mock.statements) == 1 and 'LEAST("__n", 3)' in mock.statements[0]  # per-unit pre-aggregation
    assert abs(res.rows[0][0] - 1000) < 200  # noise scale 3: P(|Z| >= 200) < 1e-28


def test_public_table_is_exact_and_free(tmp_path: Path) -> None:
    pd.DataFrame({"region": [1, 2, 3], "name": ["n", "s", "e"]}).to_csv(tmp_path / "regions.csv", index=False)
    (tmp_path / "dpgateway.yaml").write_text(
        "tables:\n  regions: {source: regions.csv, public: true}\nledger: sqlite:///ledger.db\n"
    )
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        res = gw.query("SELECT name FROM regions WHERE region >= 2 ORDER BY name", analyst="kim")
    assert res.rows == [["e"], ["s"]] and res.epsilon == 0.0


def test_public_key_listing_reads_no_data(demo_config_path: Path) -> None:
    config = load_config(demo_config_path)
    mock = MockConnector(lambda sql: pytest.fail("the data must not be read"))
    with Gateway(config, connector=mock) as gw:
        res = gw.query("SELECT sex FROM pums GROUP BY sex", analyst="lee")
    assert res.rows == [[0], [1]] and res.epsilon == 0.0


def test_empty_filter_still_answers(demo_gateway: Gateway) -> None:
    sql = "SELECT COUNT(*) AS n, SUM(income) AS s, AVG(age) AS a FROM pums WHERE age > 1000"
    res = demo_gateway.query(sql, analyst="m", epsilon=8.0)
    n, s, a = res.rows[0]
    # 4 measurements at epsilon 2 each: COUNT(*) noise scale 1.5, so P(|noise| >= 100) < 1e-28
    assert abs(n) < 100 and 0 <= a <= 100 and s >= 0


def test_config_mismatch_is_a_config_error(tmp_path: Path) -> None:
    pd.DataFrame({"pid": [1], "age": [3]}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "dpgateway.yaml").write_text(
        "tables:\n  t:\n    source: t.csv\n    privacy_unit: pid\n    columns:\n"
        "      pid: {type: int}\n      salary: {type: float, bounds: [0, 1]}\nledger: sqlite:///l.db\n"
    )
    with pytest.raises(DPGatewayError, match=r"salary not found in t\.csv") as info:
        Gateway.from_config(tmp_path / "dpgateway.yaml")
    assert info.value.sqlstate == "F0000"


def test_row_level_table_needs_no_unit(tmp_path: Path) -> None:
    pd.DataFrame({"age": list(range(100))}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "dpgateway.yaml").write_text(
        "tables:\n  t:\n    source: t.csv\n    columns:\n      age: {type: int, bounds: [0, 100]}\nledger: sqlite:///l.db\n"
    )
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        plan = gw.explain("SELECT COUNT(*) FROM t", epsilon=1.0)
        assert "ROW_NUMBER" not in plan.bounded_sql
        assert plan.mechanisms[0].sensitivity == 1
        res = gw.query("SELECT COUNT(*) FROM t", analyst="n", epsilon=1.0)
        assert set(res.remaining["domains"]) == {"table:t"}


def test_gateway_is_stateless_between_queries(demo_gateway: Gateway) -> None:
    fields_before = {f: getattr(demo_gateway, f) for f in ("config", "connector", "store")}
    demo_gateway.query("SELECT COUNT(*) FROM pums", analyst="o", epsilon=0.1)
    assert {f: getattr(demo_gateway, f) for f in fields_before} == fields_before
    assert dataclasses.is_dataclass(demo_gateway.explain("SELECT COUNT(*) FROM pums").plan)


AGREEMENT_QUERIES = [
    # (query, whether the Python evaluator answers it; otherwise the sandbox DuckDB does)
    ("SELECT sex, COUNT(*) AS n, AVG(income) AS a FROM pums GROUP BY sex", True),
    ("SELECT COUNT(*) AS n, SUM(income) AS s, AVG(age) AS a FROM pums", True),
    (
        "SELECT married, COUNT(*) * 2 - 1 AS c, -COUNT(*) AS neg, COUNT(*) - 2 * COUNT(*) AS m FROM pums GROUP BY 1",
        True,
    ),
    (
        "SELECT married, COUNT(*) / 7 AS d, (COUNT(*) - 50000) / 7 AS e FROM pums GROUP BY married",
        True,
    ),  # integer division
    ("SELECT sex, COUNT(*) / (COUNT(*) - COUNT(*)) AS z FROM pums GROUP BY sex", False),  # zero divisor: NULL
    ("SELECT sex, SUM(income) / COUNT(*) AS r, VARIANCE(age) AS v, STDDEV(income) AS sd FROM pums GROUP BY sex", False),
    ("SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ", True),
    ("SELECT sex, COUNT(*) + 0.5 AS half FROM pums GROUP BY sex", False),  # a DECIMAL literal
    ("SELECT sex, ROUND(AVG(age), 1) AS a FROM pums GROUP BY sex", False),  # a function it does not know
    ("SELECT sex, COUNT(*) AS n FROM pums GROUP BY sex ORDER BY n DESC", False),
    ("SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ HAVING COUNT(*) > 10 LIMIT 2", False),
]


@pytest.mark.parametrize(("sql", "in_python"), AGREEMENT_QUERIES)
def test_python_post_processing_agrees_with_duckdb(demo_gateway: Gateway, sql: str, in_python: bool) -> None:
    """The Python fast path of postprocess.py gives exactly the sandbox DuckDB's frame (values and dtypes),
    also on edge values (zero, negative, huge), where it must hand over to DuckDB instead."""
    from dpgateway.noise import Noisy, add_noise
    from dpgateway.postprocess import _python_outputs, post_process, post_processing_sql, run_sandboxed

    plan = demo_gateway.explain(sql, epsilon=1.0, delta=1e-7).plan
    assert plan is not None
    noisy = add_noise(plan, demo_gateway.connector.execute(plan.bounded_sql, plan.settings))
    assert (_python_outputs(plan, noisy) is not None) == in_python
    edges = [noisy]
    keys = {k.name for k in plan.group_keys}
    for count, value in ((0, 0.0), (-3, -1.5), (2**31, 1e300), (2**40, -0.0), (-(2**31) + 1, 2.0**53 + 1)):
        values = tuple(
            column
            if name in keys
            else [(count if name in noisy.counts else value) if i % 2 else v for i, v in enumerate(column)]
            for name, column in zip(noisy.columns, noisy.values, strict=True)
        )
        edges.append(Noisy(noisy.columns, values, noisy.counts))
    for case in edges:
        try:
            expected = run_sandboxed(post_processing_sql(plan), case.frame(), what="the outputs").frame()
        except DPGatewayError as exc:
            with pytest.raises(DPGatewayError, match=exc.sqlstate):
                post_process(plan, case)
            continue
        expected.columns = [o.name for o in plan.outputs]
        pd.testing.assert_frame_equal(post_process(plan, case).frame(), expected)
