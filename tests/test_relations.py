"""Joins, privacy units through foreign keys and per-person subqueries (passes/relations.py, per_unit.py).

- the exact bounded aggregates of joined and per-person queries equal an independent pandas reference
  (joins done by pandas, the fixed-point values recomputed in Python) on a TPC-H-like dataset;
- one customer with many rows in every joined table moves each exact aggregate by at most the
  sensitivity the budget pass noises for;
- joins that could pair two people's rows, unsupported join shapes and inner queries not grouped by the
  unit are refused with their SQLSTATEs; joined relations never read prepared copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tpch
import yaml

from dpgateway import Gateway
from dpgateway.budget_store import open_store
from dpgateway.connectors.base import ExactAggregates
from dpgateway.errors import ConfigError, DPGatewayError
from dpgateway.passes.budget import COUNT_SCALE
from dpgateway.plan import DPPlan
from dpgateway.policies.loader import load_config, parse_config

HEAVY = 10**6  # the customer with many rows in every table


def with_heavy(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One extra customer: 3 customer rows, 60 orders of the top price, 4 lines of 50 units each."""
    out = dict(frames)
    row = frames["customer"].iloc[0].to_dict() | {"c_custkey": HEAVY, "c_acctbal": 9999.0, "c_mktsegment": "BUILDING"}
    out["customer"] = pd.concat([frames["customer"], pd.DataFrame([row] * 3)], ignore_index=True)
    keys = np.arange(60) * 4 + 10**7
    orders = pd.DataFrame(
        {"o_orderkey": keys, "o_custkey": HEAVY, "o_orderpriority": "1-URGENT", "o_totalprice": 499999.0}
    )
    out["orders"] = pd.concat([frames["orders"], orders], ignore_index=True)
    lines = pd.DataFrame(
        {
            "l_orderkey": np.repeat(keys, 4),
            "l_linenumber": np.tile(np.arange(1, 5), 60),
            "l_quantity": 50,
            "l_extendedprice": 99999.0,
            "l_returnflag": "R",
        }
    )
    out["lineitem"] = pd.concat([frames["lineitem"], lines], ignore_index=True)
    return out


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return tpch.generate(200)


@pytest.fixture(scope="module")
def gateway(frames: dict[str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = tpch.gateway(tmp_path_factory.mktemp("tpch"), frames)
    yield gw
    gw.close()


def exact(gw: Gateway, sql: str) -> tuple[DPPlan, ExactAggregates]:
    plan = gw.explain(sql, epsilon=1.0).plan
    assert plan is not None and plan.bounded_sql is not None
    return plan, gw.connector.execute(plan.bounded_sql, plan.settings)


# -- an independent reference: pandas joins, fixed-point values recomputed in Python ------------------


def _round(values: pd.Series) -> pd.Series:
    """ROUND half away from zero, as the backends do."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def reference(plan: DPPlan, frame: pd.DataFrame, keys: list[str]) -> list[tuple[Any, ...]]:
    """Per group, every measurement of ``plan`` over ``frame`` when no unit has more than k rows (weight 1)."""
    assert plan.table is not None
    count_scale = COUNT_SCALE if plan.rewrite in ("weighted", "unit_weighted") else 1
    groups = frame.groupby(keys, dropna=False) if keys else [((), frame)]
    rows = []
    for key, part in groups:
        values: list[Any] = list(key) if isinstance(key, tuple) else [key]
        for m in plan.measurements:
            if m.kind == "count":
                n = len(part) if m.column is None else int(part[m.column].notna().sum())
                values.append(n * count_scale)
                continue
            column = plan.table.column(m.column or "")
            assert column is not None and column.bounds is not None
            x = part[m.column].dropna().astype(float).clip(*column.bounds) - m.center
            values.append(int(_round((x**2 if m.squared else x) * m.scale).sum()))
        rows.append(tuple(values))
    return sorted(rows, key=str)


def _orders_with_unit(f: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return f["lineitem"].merge(f["orders"], left_on="l_orderkey", right_on="o_orderkey")  # orphans dropped


def _per_person_totals(f: dict[str, pd.DataFrame]) -> pd.DataFrame:
    price = f["orders"].assign(p=f["orders"]["o_totalprice"].clip(0, 500000))
    totals = price.groupby("o_custkey", as_index=False)["p"].sum().rename(columns={"p": "t"})
    return totals.assign(t=totals["t"].clip(0, tpch.MAX_ORDERS * 500000))


def _lines_per_person(f: dict[str, pd.DataFrame]) -> pd.DataFrame:
    counts = _orders_with_unit(f).groupby("o_custkey", as_index=False).size().rename(columns={"size": "n"})
    return counts.assign(n=counts["n"].clip(upper=tpch.MAX_ORDERS * tpch.MAX_LINES))


CASES: list[tuple[str, list[str], Callable[[dict[str, pd.DataFrame]], pd.DataFrame]]] = [
    (
        "SELECT c_mktsegment, COUNT(*), SUM(o_totalprice) FROM customer JOIN orders ON c_custkey = o_custkey "
        "GROUP BY c_mktsegment",
        ["c_mktsegment"],
        lambda f: f["customer"].merge(f["orders"], left_on="c_custkey", right_on="o_custkey"),
    ),
    (
        "SELECT l_returnflag, COUNT(*), SUM(l_quantity), AVG(l_extendedprice) FROM lineitem GROUP BY l_returnflag",
        ["l_returnflag"],
        _orders_with_unit,
    ),
    (
        "SELECT r_name, COUNT(*) FROM customer c JOIN nation n ON c.c_nationkey = n.n_nationkey "
        "JOIN region r ON n.n_regionkey = r.r_regionkey GROUP BY r_name",
        ["r_name"],
        lambda f: (
            f["customer"]
            .merge(f["nation"], left_on="c_nationkey", right_on="n_nationkey")
            .merge(f["region"], left_on="n_regionkey", right_on="r_regionkey")
        ),
    ),
    (
        "SELECT COUNT(*), COUNT(o_totalprice) FROM customer LEFT JOIN orders ON c_custkey = o_custkey",
        [],
        lambda f: f["customer"].merge(f["orders"], left_on="c_custkey", right_on="o_custkey", how="left"),
    ),
    (
        "SELECT o_orderpriority, SUM(l_extendedprice) FROM customer JOIN orders ON c_custkey = o_custkey "
        "JOIN lineitem ON l_orderkey = o_orderkey WHERE c_mktsegment = 'BUILDING' GROUP BY o_orderpriority",
        ["o_orderpriority"],
        lambda f: (
            f["customer"]
            .merge(f["orders"], left_on="c_custkey", right_on="o_custkey")
            .merge(f["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .query("c_mktsegment == 'BUILDING'")
        ),
    ),
    (
        "SELECT COUNT(*), AVG(t) FROM (SELECT o_custkey, SUM(o_totalprice) AS t FROM orders GROUP BY o_custkey) AS s "
        "WHERE t >= 1000000",
        [],
        lambda f: _per_person_totals(f).query("t >= 1000000"),
    ),
    (
        "WITH s AS (SELECT o_custkey, COUNT(*) AS n FROM orders JOIN lineitem ON o_orderkey = l_orderkey "
        "GROUP BY o_custkey) SELECT c_mktsegment, COUNT(*), SUM(n) FROM s JOIN customer ON c_custkey = o_custkey "
        "WHERE n > 3 GROUP BY c_mktsegment",
        ["c_mktsegment"],
        lambda f: _lines_per_person(f).merge(f["customer"], left_on="o_custkey", right_on="c_custkey").query("n > 3"),
    ),
]


@pytest.mark.parametrize(("sql", "keys", "joined"), CASES, ids=range(len(CASES)))
def test_exact_aggregates_match_an_independent_reference(
    gateway: Gateway, frames: dict[str, pd.DataFrame], sql: str, keys: list[str], joined: Any
) -> None:
    plan, result = exact(gateway, sql)
    expected = reference(plan, joined(frames), keys)
    got = sorted(((*r[: len(keys)], *(int(v or 0) for v in r[len(keys) :])) for r in result.rows), key=str)
    assert got == expected
    released = gateway.query(sql, epsilon=1.0).frame  # noised and post-processed end to end
    assert len(released.columns) >= 1


def test_relation_bounds_and_units(gateway: Gateway) -> None:
    """k by the product rule (a parent joined along a child's unit path counts 1); the unit chosen."""
    cases = {
        "SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey": (8, "c_custkey"),
        "SELECT COUNT(*) FROM lineitem": (32, "o_custkey"),
        "SELECT COUNT(*) FROM orders JOIN lineitem ON l_orderkey = o_orderkey": (32, "o_custkey"),
        "SELECT COUNT(*) FROM orders a JOIN orders b ON a.o_custkey = b.o_custkey": (64, "a.o_custkey"),
        "SELECT COUNT(*) FROM (SELECT c_custkey, COUNT(*) AS n FROM customer GROUP BY c_custkey) s": (1, "c_custkey"),
    }
    for sql, (k, unit) in cases.items():
        plan = gateway.explain(sql, epsilon=1.0).plan
        assert plan is not None and plan.table is not None
        assert (plan.table.max_rows_per_unit, plan.table.privacy_unit, plan.table.domain) == (k, unit, "customer"), sql


def test_explain_shows_table_names_not_paths_or_key(gateway: Gateway) -> None:
    plan = gateway.explain("SELECT r_name, COUNT(*) FROM lineitem JOIN orders ON l_orderkey = o_orderkey "
                           "JOIN customer ON c_custkey = o_custkey JOIN nation ON c_nationkey = n_nationkey "
                           "JOIN region ON n_regionkey = r_regionkey GROUP BY r_name", epsilon=1.0).plan  # fmt: skip
    assert plan is not None
    assert ".parquet" not in plan.shown_sql and "<row-order key>" in plan.shown_sql
    for name in ("lineitem", "orders", "customer", "nation", "region"):
        assert f'"{name}"' in plan.shown_sql


# -- one person with many rows in every joined table ----------------------------------------------------

SENSITIVITY = [
    "SELECT COUNT(*), SUM(o_totalprice), SUM(c_acctbal) FROM customer JOIN orders ON c_custkey = o_custkey",
    "SELECT c_mktsegment, COUNT(*), SUM(l_extendedprice) FROM customer JOIN orders ON c_custkey = o_custkey "
    "JOIN lineitem ON l_orderkey = o_orderkey GROUP BY c_mktsegment",
    "SELECT COUNT(*), SUM(l_quantity) FROM lineitem",
    "SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey",
    "SELECT n_name, COUNT(*), SUM(o_totalprice) FROM orders JOIN customer ON o_custkey = c_custkey "
    "JOIN nation ON c_nationkey = n_nationkey GROUP BY n_name",
    "SELECT COUNT(*), SUM(t), AVG(t) FROM (SELECT o_custkey, SUM(o_totalprice) AS t FROM orders GROUP BY o_custkey) s",
    "WITH s AS (SELECT o_custkey, COUNT(*) AS n, MAX(l_quantity) AS q FROM lineitem JOIN orders "
    "ON l_orderkey = o_orderkey GROUP BY o_custkey) SELECT c_mktsegment, COUNT(*), SUM(n), SUM(q) "
    "FROM s JOIN customer ON c_custkey = o_custkey GROUP BY c_mktsegment",
]


@pytest.fixture(scope="module")
def heavy(frames: dict[str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = tpch.gateway(tmp_path_factory.mktemp("tpch_heavy"), with_heavy(frames))
    yield gw
    gw.close()


@pytest.mark.parametrize("sql", SENSITIVITY, ids=range(len(SENSITIVITY)))
def test_one_customer_moves_each_aggregate_by_at_most_its_sensitivity(
    gateway: Gateway, heavy: Gateway, sql: str
) -> None:
    plan, without = exact(gateway, sql)
    _, moved = exact(heavy, sql)
    n = len(plan.group_keys)
    base = {tuple(r[:n]): r[n:] for r in without.rows}
    other = {tuple(r[:n]): r[n:] for r in moved.rows}
    for i, m in enumerate(plan.measurements):
        distance = sum(
            abs(int(other.get(g, [0] * 9)[i] or 0) - int(base.get(g, [0] * 9)[i] or 0))
            for g in base.keys() | other.keys()
        )
        assert 0 < distance <= m.sensitivity, (sql, m.label, distance, m.sensitivity)


# -- refusals -----------------------------------------------------------------------------------------

REFUSED = [
    ("SELECT COUNT(*) FROM orders a JOIN orders b ON a.o_orderkey = b.o_orderkey", "42501", "pair one person"),
    ("SELECT COUNT(*) FROM orders, customer", "42501", "cross join"),
    ("SELECT COUNT(*) FROM orders CROSS JOIN customer", "42501", "ON conditions on the unit"),
    (
        "SELECT COUNT(*) FROM lineitem JOIN customer ON l_orderkey = c_custkey",
        "42501",
        "l_orderkey = orders.o_orderkey",
    ),
    ("SELECT COUNT(*) FROM customer JOIN pums ON c_custkey = pid", "42501", "different people"),
    ("SELECT COUNT(*) FROM customer JOIN people ON c_custkey = person", "42501", "pair one person"),  # int vs str unit
    ("SELECT COUNT(*) FROM nation LEFT JOIN customer ON c_nationkey = n_nationkey", "0A000", "nullable side"),
    ("SELECT COUNT(*) FROM customer RIGHT JOIN orders ON c_custkey = o_custkey", "0A000", "RIGHT JOIN"),
    ("SELECT COUNT(*) FROM customer FULL JOIN orders ON c_custkey = o_custkey", "0A000", "FULL JOIN"),
    ("SELECT COUNT(*) FROM customer JOIN orders USING (c_custkey)", "0A000", "USING"),
    ("SELECT COUNT(*) FROM nation JOIN region ON n_regionkey = r_regionkey", "0A000", "public tables only"),
    (
        "SELECT COUNT(*) FROM (SELECT o_orderpriority, COUNT(*) AS n FROM orders GROUP BY o_orderpriority) s",
        "0A000",
        "grouped by exactly the privacy unit",
    ),
    ("SELECT COUNT(*) FROM (SELECT o_custkey, o_totalprice FROM orders) s", "0A000", "grouped by exactly"),
    (
        "SELECT COUNT(*) FROM (SELECT o_custkey, COUNT(*) AS n FROM orders GROUP BY o_custkey LIMIT 5) s",
        "0A000",
        "LIMIT",
    ),
    (
        "SELECT COUNT(*) FROM (SELECT o_custkey, COUNT(*) AS n FROM orders GROUP BY o_custkey HAVING COUNT(*) > 2) s",
        "0A000",
        "outer WHERE",
    ),
    (
        "SELECT COUNT(*) FROM (SELECT o_custkey, SUM(o_orderkey) AS n FROM orders GROUP BY o_custkey) s",
        "42501",
        "no declared bounds",
    ),
    ("SELECT COUNT(*) FROM orders WHERE o_custkey IN (SELECT c_custkey FROM customer)", "0A000", "only in FROM"),
    ("SELECT o_custkey, COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey GROUP BY 1", None, ""),
    (
        "SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey JOIN orders ON 1 = 1",
        "0A000",
        "more than once",
    ),
    ("SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = x", "42703", "does not exist"),
    ("SELECT COUNT(*) FROM customer JOIN orders ON c_custkey = o_custkey JOIN nope ON 1 = 1", "42P01", "nope"),
    ("WITH RECURSIVE s AS (SELECT 1) SELECT COUNT(*) FROM s", "0A000", "RECURSIVE"),
]


@pytest.mark.parametrize(("sql", "sqlstate", "message"), REFUSED, ids=range(len(REFUSED)))
def test_refusals(
    frames: dict[str, pd.DataFrame], tmp_path: Path, sql: str, sqlstate: str | None, message: str
) -> None:
    folder = tmp_path / "data"
    gw = tpch.gateway(folder, frames)
    config = yaml.safe_load((folder / "dpgateway.yaml").read_text())
    tpch.write_parquet(pd.DataFrame({"pid": [1, 2], "x": [1, 2]}), folder / "pums.parquet")
    config["tables"]["pums"] = {
        "source": str(folder / "pums.parquet"), "privacy_unit": "pid", "columns": {"pid": {"type": "int"}}
    }  # fmt: skip
    tpch.write_parquet(pd.DataFrame({"person": ["1", "2"]}), folder / "people.parquet")
    config["tables"]["people"] = {
        "source": str(folder / "people.parquet"), "privacy_unit": "person", "domain": "customer",
        "columns": {"person": {"type": "str"}},
    }  # fmt: skip
    gw.close()
    gw = Gateway(
        parse_config(config, base_dir=folder),
        store=open_store("sqlite:///:memory:", load_config(folder / "dpgateway.yaml").budget),
    )
    try:
        if sqlstate is None:  # grouping by a unit column other than the relation's: private keys, partition selection
            plan = gw.explain(sql, epsilon=1.0).plan
            assert plan is not None and plan.selects_partitions
            return
        with pytest.raises(DPGatewayError, match=message) as info:
            gw.explain(sql, epsilon=1.0)
        assert info.value.sqlstate == sqlstate
    finally:
        gw.close()


def test_joins_never_read_prepared_copies(frames: dict[str, pd.DataFrame], tmp_path: Path) -> None:
    gw = tpch.gateway(tmp_path, frames)
    try:
        gw.prepare("orders")
        single = gw.explain("SELECT COUNT(*), SUM(o_totalprice) FROM orders", epsilon=1.0).plan
        assert single is not None and single.prepared is not None  # the copy is valid and read alone
        for sql in (
            "SELECT COUNT(*), SUM(o_totalprice) FROM orders JOIN customer ON c_custkey = o_custkey",
            "SELECT COUNT(*), SUM(t) FROM (SELECT o_custkey, SUM(o_totalprice) AS t FROM orders GROUP BY o_custkey) s",
        ):
            plan = gw.explain(sql, epsilon=1.0).plan
            assert plan is not None and plan.prepared is None and "read_parquet" not in plan.shown_sql.lower()
        with pytest.raises(DPGatewayError, match="through foreign keys") as info:
            gw.prepare("lineitem")
        assert info.value.sqlstate == "22023"
    finally:
        gw.close()


# -- policy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": [{"from": "l_orderkey", "table": "nope", "to": "o_orderkey"}]}, "not another table"),
        ({"path": [{"from": "l_orderkey", "table": "orders", "to": "nope"}]}, "is not declared"),
        ({"path": [{"from": "nope", "table": "orders", "to": "o_orderkey"}]}, "is not declared"),
        ({"column": "o_orderkey"}, "must be the privacy_unit column"),
        ({"path": []}, "list the foreign keys"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_unit_path_policy_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    tables = tpch.policy({name: f"{name}.parquet" for name in ("region", "nation", "customer", "orders", "lineitem")})
    tables["lineitem"]["privacy_unit"] = {**tables["lineitem"]["privacy_unit"], **change}
    with pytest.raises(ConfigError, match=message):
        parse_config({"tables": tables}, base_dir=tmp_path)


def test_unit_path_shares_the_domain(tmp_path: Path) -> None:
    tables = tpch.policy({name: f"{name}.parquet" for name in ("region", "nation", "customer", "orders", "lineitem")})
    del tables["lineitem"]["domain"]
    config = parse_config({"tables": tables}, base_dir=tmp_path)
    lineitem = config.table("lineitem")
    assert lineitem is not None and lineitem.subject_domain == "customer"
    tables["lineitem"]["domain"] = "other"
    with pytest.raises(ConfigError, match="differs from 'customer'"):
        parse_config({"tables": tables}, base_dir=tmp_path)


def test_ledger_debits_the_shared_domain(gateway: Gateway) -> None:
    before = gateway.remaining("bob")["domains"]["customer"]["epsilon"]
    sql = "SELECT COUNT(*) FROM lineitem JOIN orders ON l_orderkey = o_orderkey"
    result = gateway.query(sql, analyst="bob", epsilon=0.5)
    assert result.epsilon == pytest.approx(0.5)
    assert set(result.remaining["domains"]) == {"customer"}
    assert result.remaining["domains"]["customer"]["epsilon"] == pytest.approx(before - 0.5)


# -- PUMS: people with 1 to 4 rows, a one-row-per-person table in the same domain ---------------------------

PUMS_CASES: list[tuple[str, list[str], Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]]] = [
    (
        "SELECT p.sex, COUNT(*), SUM(r.income) FROM person p JOIN pums r ON p.pid = r.pid WHERE p.age >= 40 "
        "GROUP BY p.sex",
        ["sex"],
        lambda person, rows: person.merge(rows, on="pid", suffixes=("", "_r")).query("age >= 40"),
    ),
    (
        "SELECT married, COUNT(*), AVG(total) FROM (SELECT pid, SUM(income) AS total FROM pums GROUP BY pid) t "
        "JOIN person ON person.pid = t.pid WHERE total > 20000 GROUP BY married",
        ["married"],
        lambda person, rows: (
            rows.assign(total=rows["income"].clip(0, 500000))
            .groupby("pid", as_index=False)["total"]
            .sum()
            .assign(total=lambda f: f["total"].clip(0, 4 * 500000))
            .merge(person, on="pid")
            .query("total > 20000")
        ),
    ),
]


@pytest.mark.parametrize(("sql", "keys", "joined"), PUMS_CASES, ids=range(len(PUMS_CASES)))
def test_pums_joins_match_an_independent_reference(tmp_path: Path, sql: str, keys: list[str], joined: Any) -> None:
    rows = pd.read_csv(str(resources.files("dpgateway") / "data" / "pums.csv"))
    person = rows.drop_duplicates("pid")[["pid", "age", "sex", "married"]]
    columns = {
        "pid": {"type": "int"},
        "age": {"type": "int", "bounds": [0, 100]},
        "sex": {"type": "int", "public_values": [0, 1]},
        "married": {"type": "int", "public_values": [0, 1]},
    }
    tables = {
        "person": {"source": str(tmp_path / "person.parquet"), "privacy_unit": "pid", "domain": "people", "columns": columns},
        "pums": {
            "source": str(tmp_path / "pums.parquet"), "privacy_unit": "pid", "max_rows_per_unit": 4, "domain": "people",
            "columns": {"pid": {"type": "int"}, "income": {"type": "float", "bounds": [0, 500000]}},
        },
    }  # fmt: skip
    tpch.write_parquet(person, tmp_path / "person.parquet")
    tpch.write_parquet(rows[["pid", "income"]], tmp_path / "pums.parquet")
    config = parse_config({"tables": tables, "ledger": "sqlite:///:memory:"}, base_dir=tmp_path)
    with Gateway(config, store=open_store(config.ledger, config.budget)) as gw:
        plan, result = exact(gw, sql)
    expected = reference(plan, joined(person, rows[["pid", "income"]]), keys)
    got = sorted(((*r[: len(keys)], *(int(v or 0) for v in r[len(keys) :])) for r in result.rows), key=str)
    assert got == expected


# -- golden bounded SQL: the shown SQL of each reference case, compared as text ------------------------------

GOLDEN = Path(__file__).parent / "fixtures" / "relations" / "tpch.sql"


def test_golden_bounded_sql(gateway: Gateway) -> None:
    """The bounded SQL (as ``explain`` shows it) of each case above; the cases are also executed against
    pandas (test_exact_aggregates_match_an_independent_reference). Regenerate after an intended change
    with ``DPGATEWAY_UPDATE_GOLDEN=1 pytest tests/test_relations.py``."""
    shown = []
    for sql, _, _ in CASES:
        plan = gateway.explain(sql, epsilon=1.0).plan
        assert plan is not None
        shown.append(f"-- {sql}\n{plan.shown_sql};\n")
    if os.environ.get("DPGATEWAY_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("".join(shown))
    assert GOLDEN.read_text() == "".join(shown)
