"""Grouped queries by ``per_unit`` columns (passes/unit_grouped.py): the policy attribute, the choice of the form,
its exact aggregates against an independent per-unit reference and the per-row weighted form, its sensitivity when
the data breaks the declaration, and prepared copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tpch
import yaml

from dpgateway import Gateway
from dpgateway.connectors.duckdb import DuckDBConnector, DuckDBHooks
from dpgateway.errors import ConfigError
from dpgateway.passes.context import PlanContext
from dpgateway.plan import DPPlan
from dpgateway.planner import build_plan
from dpgateway.policies.loader import parse_config

K = 3
S = 10**6


def _policy(source: Path, per_unit: bool = True, **table: Any) -> dict[str, Any]:
    columns = {
        "pid": {"type": "int"},
        "region": {"type": "int", "bounds": [0, 9], "public_values": [0, 1, 2, 3, 4], "per_unit": per_unit},
        "smoker": {"type": "bool", "per_unit": per_unit},
        "city": {"type": "str", "per_unit": per_unit},
        "age": {"type": "int", "bounds": [0, 100]},
        "income": {"type": "float", "bounds": [-500, 1000]},
    }
    spec = {"source": str(source), "privacy_unit": "pid", "max_rows_per_unit": K, "columns": columns, **table}
    big = {"epsilon": 1e6, "delta": 0.5}
    return {"tables": {"t": spec}, "budget": {"per_subject": big, "per_analyst": big}, "ledger": "sqlite:///:memory:"}


def _people(seed: int, n_units: int = 300) -> pd.DataFrame:
    """Persons of 1-11 rows whose region, smoker and city are constant per person (NULL for some persons, a region
    outside the public values for others); age and income vary per row (negative and NULL incomes)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, size=n_units)
    region = rng.integers(0, 8, size=n_units).astype(object)  # 5, 6, 7: outside the public values
    region[rng.random(n_units) < 0.1] = None
    smoker = (rng.random(n_units) < 0.4).astype(object)
    smoker[rng.random(n_units) < 0.1] = None
    city = rng.choice(np.array(["Oslo", "Lima", "Pune"], dtype=object), size=n_units)
    city[rng.random(n_units) < 0.1] = None
    pid = np.repeat(np.arange(n_units), counts).astype(object)
    n = len(pid)
    income = rng.uniform(-800, 1500, size=n).round(2)
    income[rng.random(n) < 0.1] = np.nan
    frame = pd.DataFrame(
        {
            "pid": pid,
            "region": np.repeat(region, counts),
            "smoker": np.repeat(smoker, counts),
            "city": np.repeat(city, counts),
            "age": rng.integers(-10, 120, size=n),
            "income": income,
        }
    )
    frame.loc[rng.random(n) < 0.02, "pid"] = None  # rows nobody can be bounded for
    return frame


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _plan(sql: str, source: Path, per_unit: bool = True, **config: Any) -> DPPlan:
    raw = _policy(source, per_unit) | config
    ctx = PlanContext(config=parse_config(raw, base_dir=source.parent), hooks=DuckDBHooks(), seed=b"s")
    return build_plan(sql, epsilon=1.0, delta=1e-6, ctx=ctx)


def _exact(plan: DPPlan) -> dict[tuple[Any, ...], list[int]]:
    """Each cell's exact integers (NULL sums as 0)."""
    assert plan.table is not None and plan.bounded_sql is not None
    n = len(plan.group_keys)
    with DuckDBConnector(allowed_paths=[plan.table.source]) as con:
        rows = con.execute(plan.bounded_sql).rows
    return {tuple(row[:n]): [int(v or 0) for v in row[n:]] for row in rows}


# -- the policy -------------------------------------------------------------------------------------------------


def test_per_unit_is_read_into_the_column(tmp_path: Path) -> None:
    config = parse_config(_policy(tmp_path / "t.csv"), base_dir=tmp_path)
    table = config.tables[0]
    assert [c.name for c in table.columns if c.per_unit] == ["region", "smoker", "city"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"per_unit": "yes"}, r"tables\.t\.columns\.region\.per_unit: must be true .* or false, not 'yes'"),
        ({"per_unit": 1}, r"tables\.t\.columns\.region\.per_unit: must be true .* or false, not 1"),
        ({"per_unit": None}, r"tables\.t\.columns\.region\.per_unit: must be true .* or false, not None"),
    ],
)
def test_per_unit_must_be_a_boolean(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = _policy(tmp_path / "t.csv")
    raw["tables"]["t"]["columns"]["region"] |= change
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, base_dir=tmp_path)


def test_per_unit_needs_a_privacy_unit(tmp_path: Path) -> None:
    raw = _policy(tmp_path / "t.csv")
    del raw["tables"]["t"]["privacy_unit"]
    raw["tables"]["t"]["max_rows_per_unit"] = 1
    with pytest.raises(ConfigError, match=r"tables\.t\.columns\.region\.per_unit: only a table with a privacy_unit"):
        parse_config(raw, base_dir=tmp_path)
    raw["tables"]["t"]["public"] = True
    with pytest.raises(
        ConfigError, match=r"per_unit: only a table with a privacy_unit .* declare tables\.t\.privacy_unit"
    ):
        parse_config(raw, base_dir=tmp_path)


# -- which form -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "rewrite"),
    [
        ("SELECT region, COUNT(*) FROM t GROUP BY region", "unit_grouped"),
        ("SELECT region, smoker, AVG(income) FROM t WHERE age > 30 GROUP BY 1, 2", "unit_grouped"),
        ("SELECT CASE WHEN city = 'Oslo' THEN 'n' ELSE 's' END, SUM(income) FROM t GROUP BY 1", "unit_grouped"),
        ("SELECT region / 3, VARIANCE(income) FROM t GROUP BY region / 3", "unit_grouped"),
        ("SELECT region, COUNT(*) FROM t WHERE income > 0 AND city IS NULL GROUP BY region", "unit_grouped"),
        ("SELECT region, age / 50, COUNT(*) FROM t GROUP BY 1, 2", "weighted"),  # age is not per unit
        ("SELECT CASE WHEN age < 50 THEN 1 ELSE 0 END, COUNT(*) FROM t GROUP BY 1", "weighted"),
        ("SELECT city, COUNT(*) FROM t GROUP BY city", "rows"),  # a private key: partition selection
        ("SELECT region, COUNT(DISTINCT age) FROM t GROUP BY region", "rows"),  # needs kept rows
        ("SELECT COUNT(*), SUM(income) FROM t", "unit_weighted"),
    ],
)
def test_the_form_is_chosen_for_keys_of_per_unit_columns_only(tmp_path: Path, sql: str, rewrite: str) -> None:
    plan = _plan(sql, _write(_people(0, 20), tmp_path / "t.csv"))
    assert plan.rewrite == rewrite
    declared = [n for n in plan.notes if "declared per_unit" in n]
    assert bool(declared) == (rewrite == "unit_grouped")


def test_the_form_is_not_chosen_without_the_declaration_or_where_it_does_not_apply(tmp_path: Path) -> None:
    source = _write(_people(0, 20), tmp_path / "t.csv")
    sql, filtered = (
        "SELECT region, COUNT(*) FROM t GROUP BY region",
        "SELECT region, SUM(income) FROM t WHERE age > 3 GROUP BY 1",
    )
    assert _plan(sql, source, per_unit=False).rewrite == "weighted"
    assert _plan(filtered, source, prepare={"filtered": "bound_first"}).rewrite == "weighted"
    assert _plan(sql, source, prepare={"filtered": "bound_first"}).rewrite == "unit_grouped"  # unfiltered
    raw = _policy(source)
    raw["tables"]["t"]["executors_allowed"] = ["he"]  # its encrypted cube holds per-row contributions only
    ctx = PlanContext(config=parse_config(raw, base_dir=tmp_path), hooks=DuckDBHooks(), seed=b"s")
    assert build_plan(sql, epsilon=1.0, delta=0.0, ctx=ctx).rewrite == "weighted"


def test_explain_names_the_form_and_the_declared_columns(tmp_path: Path) -> None:
    source = _write(_people(0, 20), tmp_path / "t.csv")
    (tmp_path / "dpgateway.yaml").write_text(yaml.safe_dump(_policy(source)))
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        notes = gw.explain("SELECT smoker, region, COUNT(*) FROM t GROUP BY 1, 2", epsilon=1.0).notes
    assert any("in one cell" in n and "per-unit pre-aggregation" in n for n in notes), notes
    assert any("declared per_unit (smoker, region)" in n and "unit_grouped" in n for n in notes), notes


# -- exact aggregates -------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _per_unit_reference(frame: pd.DataFrame, plan: DPPlan, where: str, keys: list[Any]) -> dict[tuple, list[int]]:
    """``sum_u trunc(T_u * k / max(n_u, k))`` per cell, the cell each key's smallest value over the unit's rows
    (``keys``: per key a column name or a function of the rows), in Python integers, independent of our SQL."""
    rows = frame[frame["pid"].notna()]
    if where:
        rows = rows.query(where)
    bounds = {"income": (-500, 1000), "age": (0, 100)}
    out: dict[tuple, list[int]] = {}
    for _, unit in rows.groupby("pid"):
        n_u = len(unit)
        cell = []
        for key in keys:
            values = [v for v in (unit[key] if isinstance(key, str) else key(unit)) if _cell(v) is not None]
            cell.append(min(values) if values else None)
        totals = out.setdefault(tuple(cell), [0] * len(plan.measurements))
        for j, m in enumerate(plan.measurements):
            total, present = 0, m.column is None
            for x in unit[m.column] if m.column else [1] * n_u:
                if pd.isna(x):
                    continue
                present = True
                if m.kind == "count":
                    total += S
                    continue
                lo, hi = bounds[m.column]
                value = (min(max(float(x), lo), hi) - m.center) ** (2 if m.squared else 1) * m.scale
                total += int(np.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)  # ROUND half away from 0
            magnitude = abs(total) * K // max(n_u, K)
            totals[j] += (magnitude if total >= 0 else -magnitude) if present else 0  # truncated toward zero
    return out


def _band(unit: pd.DataFrame) -> list[Any]:
    return [None if pd.isna(c) else "n" if c == "Oslo" else "s" for c in unit["city"]]


CASES = [
    ("SELECT region, COUNT(*), SUM(income), COUNT(income) FROM t GROUP BY region", "", ["region"]),
    ("SELECT region, smoker, AVG(income), VAR_POP(income) FROM t GROUP BY 1, 2", "", ["region", "smoker"]),
    ("SELECT city, region, COUNT(*) FROM t WHERE age > 40 GROUP BY 1, 2", "age > 40", ["city", "region"]),
    (
        "SELECT CASE WHEN city = 'Oslo' THEN 'n' WHEN city <> 'Oslo' THEN 's' END AS b, SUM(income) FROM t "
        "WHERE income < 200 OR age < 10 GROUP BY 1",
        "income < 200 or age < 10",
        [_band],
    ),
    ("SELECT smoker, STDDEV(income), COUNT(*) FROM t WHERE income > -100 GROUP BY smoker", "income > -100", ["smoker"]),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("sql", "where", "keys"), CASES)
def test_exact_aggregates_equal_a_per_unit_reference_and_the_weighted_form(
    tmp_path: Path, seed: int, sql: str, where: str, keys: list[Any]
) -> None:
    """On data keeping the declaration (NULL keys, keys outside the public values, NULL and negative values,
    filters): the same cells as the per-row weighted form, each equal to a per-unit reference and within the
    per-row truncation (less than one fixed-point unit per row of a unit with more than k rows) of the weighted form."""
    source = _write(_people(seed), tmp_path / "t.csv")
    raw = _policy(source)
    raw["tables"]["t"]["columns"]["city"]["public_values"] = ["Oslo", "Lima", "Pune"]  # a public key here
    ctx = PlanContext(config=parse_config(raw, base_dir=tmp_path), hooks=DuckDBHooks(), seed=b"s")
    plan = build_plan(sql, epsilon=1.0, delta=0.0, ctx=ctx)
    for column in raw["tables"]["t"]["columns"].values():
        column["per_unit"] = False
    weighted_ctx = PlanContext(config=parse_config(raw, base_dir=tmp_path), hooks=DuckDBHooks(), seed=b"s")
    weighted = build_plan(sql, epsilon=1.0, delta=0.0, ctx=weighted_ctx)
    assert plan.rewrite == "unit_grouped" and weighted.rewrite == "weighted"
    assert "OVER" not in plan.bounded_sql and "JOIN" not in plan.bounded_sql
    assert [m.sensitivity for m in plan.measurements] == [m.sensitivity for m in weighted.measurements]
    got = _exact(plan)
    assert got == _per_unit_reference(pd.read_csv(source), plan, where, keys)
    per_row = _exact(weighted)
    assert set(got) == set(per_row)  # the same cells: NULL keys and values outside the public domain included
    rows = pd.read_csv(source)
    rows = rows[rows["pid"].notna()].query(where) if where else rows[rows["pid"].notna()]
    sizes = rows.groupby("pid").size()
    heavy_rows = int(sizes[sizes > K].sum())
    assert heavy_rows > 0
    for cell, values in got.items():
        for a, b in zip(values, per_row[cell], strict=True):
            assert abs(a - b) <= heavy_rows, (cell, a, b)


# -- sensitivity, when the data breaks the declaration ----------------------------------------------------------


SENSITIVITY = [
    "SELECT region, COUNT(*), SUM(income), COUNT(income) FROM t GROUP BY region",
    "SELECT region, smoker, AVG(income), VARIANCE(income) FROM t GROUP BY 1, 2",
    "SELECT CASE WHEN city = 'Oslo' THEN 'n' ELSE 's' END, region / 3, SUM(income) FROM t GROUP BY 1, 2",
    "SELECT smoker, COUNT(*), STDDEV(income) FROM t WHERE income > -300 GROUP BY smoker",
]


def _neighbours(tmp_path: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """D and D plus one person with ``rows`` rows spread over every cell (NULL keys, keys outside the public
    values), with values at the bounds and beyond, negative and NULL."""
    base = _people(7, 100)
    rng = np.random.default_rng(seed)
    income = rng.choice([-1e6, -500.0, 1000.0, 1e6], size=rows)
    income[rng.random(rows) < 0.2] = np.nan
    region = rng.integers(0, 10, size=rows).astype(object)
    region[rng.random(rows) < 0.1] = None
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "region": region,
            "smoker": rng.choice(np.array([True, False, None], dtype=object), size=rows),
            "city": rng.choice(np.array(["Oslo", "Lima", None], dtype=object), size=rows),
            "age": rng.integers(-10, 120, size=rows),
            "income": income,
        }
    )
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    d0.mkdir(), d1.mkdir()
    return _write(base, d0 / "t.csv"), _write(pd.concat([base, big], ignore_index=True), d1 / "t.csv")


def _moves(before: dict[tuple, list[int]], after: dict[tuple, list[int]], n: int) -> list[int]:
    cells = {*before, *after}
    return [sum(abs(after.get(c, [0] * n)[j] - before.get(c, [0] * n)[j]) for c in cells) for j in range(n)]


@pytest.mark.parametrize("sql", SENSITIVITY)
@pytest.mark.parametrize("rows", [1000, 20_000])
@pytest.mark.parametrize("prepared", [False, True], ids=["on-the-fly", "prepared"])
def test_a_person_spread_over_every_cell_moves_each_aggregate_by_at_most_its_sensitivity(
    tmp_path: Path, sql: str, rows: int, prepared: bool
) -> None:
    """Exact aggregates on D and on D plus one person whose rows break the declaration (every cell, NULL keys,
    keys outside the public values): in L1 over all cells, each measurement moves by at most its sensitivity, and
    for COUNT(*) by exactly k rows' worth (all of the person in one cell)."""
    results = []
    for source in _neighbours(tmp_path, rows, seed=rows):
        policy = _policy(source) | {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"}  # one secret seed
        (source.parent / "dpgateway.yaml").write_text(yaml.safe_dump(policy))
        with Gateway.from_config(source.parent / "dpgateway.yaml") as gw:
            if prepared:
                gw.prepare("t")
            plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
            assert plan is not None and plan.rewrite == "unit_grouped"
            assert (plan.prepared is not None) == (prepared and plan.where is None)
            n = len(plan.group_keys)
            exact = gw.connector.execute(plan.bounded_sql)
            results.append((plan, {row[:n]: [int(v or 0) for v in row[n:]] for row in exact.rows}))
    (plan, before), (_, after) = results
    moves = _moves(before, after, len(plan.measurements))
    for m, moved in zip(plan.measurements, moves, strict=True):
        assert moved <= m.sensitivity, (m.label, moved, m.sensitivity)
        if m.kind == "count" and m.arg is None and plan.where is None:
            assert moved == K * S == m.sensitivity  # the whole person, in one cell
    assert any(moves), moves


# -- prepared copies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT region, COUNT(*), AVG(income), COUNT(income) FROM t GROUP BY region",
        "SELECT smoker, region, VAR_POP(income), STDDEV(age) FROM t GROUP BY 1, 2",
        "SELECT CASE WHEN city = 'Oslo' THEN 'n' ELSE 's' END, SUM(income) FROM t GROUP BY 1",
        "SELECT region / 3, COUNT(age) FROM t GROUP BY 1",
    ],
)
def test_a_prepared_copy_gives_the_on_the_fly_aggregates(tmp_path: Path, sql: str) -> None:
    """Data keeping the declaration: the copy's stored per-unit contributions, by each unit's rank-1 row's keys,
    are the on-the-fly aggregates; a measurement the copy does not store runs on the fly; filtered queries too."""
    source = _write(_people(3), tmp_path / "t.csv")
    (tmp_path / "dpgateway.yaml").write_text(yaml.safe_dump(_policy(source)))
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:

        def run(query: str) -> tuple[DPPlan, list[Any]]:
            plan = gw.explain(query, epsilon=1.0).plan
            assert plan is not None and plan.rewrite == "unit_grouped"
            return plan, sorted(gw.connector.execute(plan.bounded_sql).rows, key=repr)

        cold_plan, cold = run(sql)
        gw.prepare("t")
        copy_plan, copied = run(sql)
        assert cold_plan.prepared is None and copy_plan.prepared is not None
        assert "__rn" in copy_plan.bounded_sql and 'GROUP BY "pid"' not in copy_plan.bounded_sql
        assert copied == cold
        assert run(sql.replace(" FROM t", " FROM t WHERE age > 50"))[0].prepared is None  # filter first: on the fly
        assert run("SELECT region, SUM(income * 2) FROM t GROUP BY region")[0].prepared is None  # not stored


def test_joined_relations_take_the_form_by_the_joined_tables_declarations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join keeps a joined column's declaration: customer's segment, per customer, groups the joined rows per
    customer; no customer exceeds k there, so the answer is the weighted form's exactly."""
    policy = tpch.policy
    sql = (
        "SELECT c_mktsegment, COUNT(*), SUM(o_totalprice), AVG(c_acctbal) FROM customer JOIN orders "
        "ON c_custkey = o_custkey WHERE o_totalprice > 1000 GROUP BY c_mktsegment"
    )
    results = []
    for per_unit in (True, False):

        def declared(sources: dict[str, Any], per_unit: bool = per_unit) -> dict[str, Any]:
            tables = policy(sources)
            tables["customer"]["columns"]["c_mktsegment"]["per_unit"] = per_unit
            return tables

        monkeypatch.setattr(tpch, "policy", declared)
        with tpch.gateway(tmp_path / str(per_unit), tpch.generate(200)) as gw:
            plan = gw.explain(sql).plan
            assert plan is not None and plan.relation is not None
            results.append((plan.rewrite, sorted(gw.connector.execute(plan.bounded_sql).rows)))
    (grouped, per_unit_rows), (weighted, weighted_rows) = results
    assert (grouped, weighted) == ("unit_grouped", "weighted")
    assert per_unit_rows == weighted_rows and len(per_unit_rows) == 5
