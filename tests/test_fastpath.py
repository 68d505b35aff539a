"""The fast rewrites keep their meaning and their sensitivity.

- scalar COUNT(*) by per-unit pre-aggregation equals the hash-ordered row-bounded count, on random data,
  with and without a filter, with NULL units;
- the weighted rewrite computes ``sum trunc(v * k / max(n_u, k))`` exactly as an independent Python
  reference does, with negative values, NULL values and NULL units, filtered or not;
- adding one person with many rows moves each exact bounded aggregate of every rewrite (weighted,
  per-unit count, row bounding, each on the fly and over a prepared copy) by at most the sensitivity the
  budget pass noises for;
- the plan cache reuses plans and never serves one built for another policy.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import trusted_sql

from dpgateway import Gateway
from dpgateway.connectors.duckdb import DuckDBConnector, DuckDBHooks
from dpgateway.errors import BackendError, DPGatewayError, InternalError
from dpgateway.passes.bounding import _row_bounded
from dpgateway.passes.context import PlanContext
from dpgateway.passes.verify import verify_backend_sql
from dpgateway.plan import DPPlan
from dpgateway.planner import PlanCache, build_plan
from dpgateway.policies.loader import parse_config

K = 3


def _policy(source: Path, k: int = K) -> dict:
    return {
        "tables": {
            "t": {
                "source": str(source),
                "privacy_unit": "pid",
                "max_rows_per_unit": k,
                "columns": {
                    "pid": {"type": "int"},
                    "age": {"type": "int", "bounds": [0, 100]},
                    "income": {"type": "float", "bounds": [0, 1000]},
                    "sex": {"type": "int", "public_values": [0, 1]},
                    "region": {"type": "int"},
                },
            }
        },
        "budget": {"per_subject": {"epsilon": 1e6, "delta": 0.5}, "per_analyst": {"epsilon": 1e6, "delta": 0.5}},
        "ledger": "sqlite:///:memory:",
    }


def _people(seed: int, n_units: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 12, size=n_units)
    pid = np.repeat(np.arange(n_units), counts).astype(object)
    n = len(pid)
    pid[rng.random(n) < 0.03] = None  # rows nobody can be bounded for
    return pd.DataFrame(
        {
            "pid": pid,
            "age": rng.integers(-10, 120, size=n),
            "income": rng.uniform(-100, 1500, size=n).round(2),
            "sex": rng.integers(0, 2, size=n),
            "region": rng.integers(0, 5, size=n),
        }
    )


def _ctx(source: Path, k: int = K) -> PlanContext:
    config = parse_config(_policy(source, k), base_dir=source.parent)
    return PlanContext(config=config, hooks=DuckDBHooks(), seed=b"fastpath-seed")


def _exact(plan: DPPlan) -> list[tuple]:
    assert plan.table is not None and plan.bounded_sql is not None
    with DuckDBConnector(allowed_paths=[plan.table.source]) as con:
        return sorted(con.execute(plan.bounded_sql).rows, key=repr)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("where", ["", " WHERE age > 40", " WHERE income BETWEEN 100 AND 900 OR sex = 1"])
def test_unit_count_equals_row_bounded_count(tmp_path: Path, seed: int, where: str) -> None:
    source = tmp_path / "t.csv"
    _people(seed).to_csv(source, index=False)
    for k in (1, K, 20):
        ctx = _ctx(source, k)
        plan = build_plan(f"SELECT COUNT(*) FROM t{where}", epsilon=1.0, delta=0.0, ctx=ctx)
        assert plan.rewrite == "unit_count"
        assert plan.table is not None
        row_bounded = verify_backend_sql(_row_bounded(plan, plan.table, ctx), ctx=ctx)
        assert "__rn" in row_bounded.bounded_sql and "__rn" not in plan.bounded_sql
        assert _exact(plan) == _exact(row_bounded)


def _weighted_reference(frame: pd.DataFrame, policy: dict, sql_where: str, plan: DPPlan) -> dict[tuple, list[int]]:
    """``sum_r trunc(v(r) * k / max(n_u, k))`` per group, in Python integers, independent of our SQL."""
    k = policy["tables"]["t"]["max_rows_per_unit"]
    rows = frame[frame["pid"].notna()]
    if sql_where:
        rows = rows.query(sql_where)
    n = rows.groupby("pid")["pid"].transform("size")
    columns = policy["tables"]["t"]["columns"]
    out: dict[tuple, list[int]] = {}
    for (_, row), n_u in zip(rows.iterrows(), n, strict=True):
        key = tuple(row[name] for name in ("sex",) if plan.group_keys)
        totals = out.setdefault(key, [0] * len(plan.measurements))
        for j, m in enumerate(plan.measurements):
            x = row[m.column] if m.column else 1
            if pd.isna(x):
                continue
            if m.kind == "count":
                v = 10**6
            else:
                lo, hi = columns[m.column]["bounds"]
                value = min(max(float(x), lo), hi) - m.center
                value = (value**2 if m.squared else value) * m.scale
                v = int(np.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)  # DuckDB ROUND: half away from 0
            magnitude = abs(v) * k // max(int(n_u), k)
            totals[j] += magnitude if v >= 0 else -magnitude  # truncation toward zero
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("sql", "where"),
    [
        ("SELECT sex, SUM(income), COUNT(*), COUNT(income) FROM t GROUP BY sex", ""),
        ("SELECT sex, SUM(income), AVG(age) FROM t WHERE age > 40 GROUP BY sex", "age > 40"),
        ("SELECT sex, VAR_POP(income) FROM t GROUP BY sex", ""),
        ("SELECT sex, SUM(income), COUNT(income) FROM t WHERE income < 100 GROUP BY sex", "income < 100"),
    ],
)
def test_weighted_rewrite_matches_an_independent_reference(tmp_path: Path, seed: int, sql: str, where: str) -> None:
    frame = _people(seed)
    frame.loc[np.random.default_rng(seed).random(len(frame)) < 0.1, "income"] = None  # NULL values
    source = tmp_path / "t.csv"
    frame.to_csv(source, index=False)
    policy = _policy(source)
    policy["tables"]["t"]["columns"]["income"]["bounds"] = [-500, 1000]  # negative values, before centring too
    config = parse_config(policy, base_dir=tmp_path)
    plan = build_plan(sql, epsilon=1.0, delta=0.0, ctx=PlanContext(config=config, hooks=DuckDBHooks(), seed=b"s"))
    assert plan.rewrite == "weighted" and "__rn" not in plan.bounded_sql
    n_keys = len(plan.group_keys)
    got = {row[:n_keys]: [int(v or 0) for v in row[n_keys:]] for row in _exact(plan)}
    reference = _weighted_reference(pd.read_csv(source), policy, where, plan)
    assert got == reference


@pytest.mark.parametrize(
    ("v", "n", "k", "expected"),
    [(7, 5, 3, 4), (-7, 5, 3, -4), (-1, 10, 3, 0), (1, 10, 3, 0), (-6, 2, 3, -6), (10**6, 4, 3, 750000)],
)
def test_weighting_truncates_toward_zero(v: int, n: int, k: int, expected: int) -> None:
    """``SIGN(v) * ((ABS(v) * k) // GREATEST(n, k))`` on DuckDB is ``trunc(v * k / max(n, k))``."""
    with DuckDBConnector() as con:
        (row,) = con.execute(
            trusted_sql(f"SELECT SIGN({v}::BIGINT) * ((ABS({v}::BIGINT)::HUGEINT * {k}) // GREATEST({n}, {k}))")
        ).rows
    assert row[0] == expected == int(v * k / max(n, k))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM t",
        "SELECT COUNT(*) FROM t WHERE age > 40",
        "SELECT sex, COUNT(*), SUM(income) FROM t GROUP BY sex",
        "SELECT COUNT(income), AVG(income), VAR_POP(age) FROM t",
        "SELECT sex, AVG(income) FROM t WHERE age > 40 GROUP BY sex",
        "SELECT region, AVG(income), VARIANCE(age) FROM t GROUP BY region",
        "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, COUNT(*) FROM t GROUP BY 1",
    ],
)
@pytest.mark.parametrize("prepared", [False, True], ids=["on-the-fly", "prepared"])
def test_one_person_with_many_rows_moves_each_aggregate_by_at_most_its_sensitivity(
    tmp_path: Path, sql: str, prepared: bool
) -> None:
    """Exact bounded aggregates (before noise) on D and on D plus one person with 1000 rows."""
    base = _people(7)
    rng = np.random.default_rng(0)
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "age": rng.integers(-10, 120, size=1000),
            "income": rng.uniform(-1e6, 1e6, size=1000),
            "sex": rng.integers(0, 2, size=1000),
            "region": rng.integers(0, 50, size=1000),  # also new groups
        }
    )
    results = []
    for i, frame in enumerate([base, pd.concat([base, big], ignore_index=True)]):
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        frame.to_csv(folder / "t.csv", index=False)
        policy = _policy(folder / "t.csv") | {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"}  # one secret seed
        (folder / "dpgateway.yaml").write_text(yaml.safe_dump(policy))
        with Gateway.from_config(folder / "dpgateway.yaml") as gw:
            if prepared:
                gw.prepare("t")
            plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
            assert plan is not None
            scalar_count = sql.startswith("SELECT COUNT(*) FROM t")
            scalar = not plan.group_keys
            expected = (
                "rows"
                if "region" in sql
                else "unit_count"
                if scalar_count
                else "unit_weighted"
                if scalar
                else "weighted"
            )
            assert plan.rewrite == expected
            assert (plan.prepared is not None) == (prepared and plan.where is None)
            exact = gw.connector.execute(plan.bounded_sql)
        n_keys = len(plan.group_keys)
        results.append((plan, {row[:n_keys]: row[n_keys:] for row in exact.rows}))
    (plan, before), (_, after) = results
    moves = []
    for j, m in enumerate(plan.measurements):
        moved = sum(
            abs((after.get(key, (None,) * 9)[j] or 0) - (before.get(key, (None,) * 9)[j] or 0))
            for key in {*before, *after}
        )
        assert moved <= m.sensitivity, (m.label, moved, m.sensitivity)
        moves.append(moved)
    # A centred sum can net to zero (kept values clamped to lo and hi), but the person's rows always count.
    assert any(moves), moves


def test_plan_cache_reuses_plans_and_is_keyed_by_policy(tmp_path: Path) -> None:
    source = tmp_path / "t.csv"
    _people(1).to_csv(source, index=False)
    cache = PlanCache(maxsize=2)
    ctx = _ctx(source)
    first = cache.build("SELECT COUNT(*) FROM t", epsilon=1.0, delta=0.0, ctx=ctx)
    assert cache.build("SELECT COUNT(*) FROM t", epsilon=1.0, delta=0.0, ctx=ctx) is first
    assert cache.build("SELECT COUNT(*) FROM t", epsilon=0.5, delta=0.0, ctx=ctx) is not first
    respelled = cache.build("select   count(*)\nfrom T", epsilon=1.0, delta=0.0, ctx=ctx)  # same normalized SQL
    assert respelled.bounded_sql == first.bounded_sql and respelled.sql == "select   count(*)\nfrom T"
    other = _ctx(source, k=5)  # a policy change: new fingerprint, new plan
    assert other.fingerprint != ctx.fingerprint
    changed = cache.build("SELECT COUNT(*) FROM t", epsilon=1.0, delta=0.0, ctx=other)
    assert changed is not first and 'LEAST("__n", 5)' in changed.bounded_sql
    reseeded = dataclasses.replace(ctx, seed=b"another-seed")
    assert reseeded.fingerprint != ctx.fingerprint
    assert len(cache._plans) == 2  # bounded LRU


def test_commit_and_remaining_is_one_debit_then_the_budget_left(tmp_path: Path) -> None:
    from dpgateway.budget_store import open_store
    from dpgateway.budget_store.base import Spend
    from dpgateway.policies.model import Budget

    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}", Budget())
    spend = Spend(analyst="ann", domains=("pid",), epsilon=0.5, delta=0.0, query_key="q", sql="SELECT 1")
    reservation = store.reserve(spend)
    left = store.commit_and_remaining(
        reservation, epsilon=0.5, delta=0.0, answer={"rows": []}, analyst="ann", domains=["pid"]
    )
    assert left == store.remaining("ann", ["pid"])
    assert left.analyst.remaining_epsilon == pytest.approx(3.5) and left.domains["pid"].spent_epsilon == 0.5
    assert store.cached_answer("ann", "q") == {"rows": []}
    assert [r.outcome for r in store.audit_log()] == ["released"]
    with pytest.raises(InternalError, match="already committed"):
        store.commit_and_remaining(reservation, epsilon=0.5, delta=0.0, analyst="ann", domains=["pid"])
    store.close()


def test_prepared_statements_follow_the_file(tmp_path: Path) -> None:
    """The connector runs bounded SQL as prepared statements: a rewritten file is read as it is now
    (new rows, reordered columns), a changed type is an error and the next query recovers, each thread
    prepares on its own cursor, and only the most recent statements stay prepared."""
    source = tmp_path / "t.parquet"
    sql = trusted_sql(f"SELECT SUM(a), SUM(b) FROM read_parquet('{source}')")

    def write(select: str) -> None:
        duckdb.execute(f"COPY ({select}) TO '{source}' (FORMAT parquet)")

    connector = DuckDBConnector(allowed_paths=[source])
    write("SELECT 1 AS a, 10 AS b")
    assert connector.execute(sql).rows == ((1, 10),)
    write("SELECT * FROM (VALUES (2, 20), (3, 30)) v(a, b)")
    assert connector.execute(sql).rows == ((5, 50),)
    write("SELECT 200 AS b, 7 AS a")  # same columns, other order
    assert connector.execute(sql).rows == ((7, 200),)
    write("SELECT 200 AS b, 'x' AS a")  # a is text now: SUM cannot bind
    with pytest.raises(BackendError, match="details are withheld"):
        connector.execute(sql)
    write("SELECT 4 AS a, 40 AS b")
    assert connector.execute(sql).rows == ((4, 40),)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: connector.execute(trusted_sql(f"{sql} WHERE a <> {i % 5}")).rows, range(40)))
    assert answers == [((4, 40),) if i % 5 != 4 else ((None, None),) for i in range(40)]

    connector.PREPARED = 3
    for i in range(10):
        assert connector.execute(trusted_sql(f"SELECT {i} + SUM(a) FROM read_parquet('{source}')")).rows == ((i + 4,),)
    assert len(connector._local.prepared) == 3
    connector.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM t WHERE age > 40",
        "SELECT sex, COUNT(*), SUM(income), COUNT(income) FROM t WHERE age > 40 GROUP BY sex",
        "SELECT AVG(income), VAR_POP(income) FROM t WHERE income < 0 OR age > 100",
        "SELECT region, COUNT(*), AVG(income) FROM t WHERE age BETWEEN 20 AND 60 GROUP BY region",
        "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, SUM(income) FROM t WHERE sex = 1 GROUP BY 1",
    ],
)
@pytest.mark.parametrize("prepared", [False, True], ids=["on-the-fly", "prepared"])
def test_bound_first_moves_each_aggregate_by_at_most_its_sensitivity(tmp_path: Path, sql: str, prepared: bool) -> None:
    """``prepare.filtered: bound_first``: one person with 1000 rows (negative and NULL values, NULL ages),
    a filter matching only some of their rows; exact bounded aggregates on D and D plus that person."""
    base = _people(8)
    rng = np.random.default_rng(1)
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "age": pd.array(rng.integers(-10, 120, size=1000), dtype="Int64"),
            "income": rng.uniform(-1e6, 1e6, size=1000),
            "sex": rng.integers(0, 2, size=1000),
            "region": rng.integers(0, 50, size=1000),
        }
    )
    big.loc[rng.random(1000) < 0.2, "income"] = None
    big.loc[rng.random(1000) < 0.1, "age"] = None
    results = []
    for i, frame in enumerate([base, pd.concat([base, big], ignore_index=True)]):
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        frame.to_csv(folder / "t.csv", index=False)
        policy = _policy(folder / "t.csv") | {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"}
        policy["tables"]["t"]["columns"]["income"]["bounds"] = [-500, 1000]
        policy["prepare"] = {"auto": False, "filtered": "bound_first"}
        (folder / "dpgateway.yaml").write_text(yaml.safe_dump(policy))
        with Gateway.from_config(folder / "dpgateway.yaml") as gw:
            if prepared:
                gw.prepare("t")
            plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
            assert plan is not None and (plan.prepared is not None) == prepared
            assert plan.rewrite == ("rows" if "region" in sql else "weighted")  # a filtered COUNT(*) too
            assert any("bound first" in note for note in plan.notes)
            exact = gw.connector.execute(plan.bounded_sql)
        n_keys = len(plan.group_keys)
        results.append((plan, {row[:n_keys]: row[n_keys:] for row in exact.rows}))
    (plan, before), (_, after) = results
    moves = []
    for j, m in enumerate(plan.measurements):
        keys = {*before, *after}
        moved = sum(abs((after.get(k, (None,) * 9)[j] or 0) - (before.get(k, (None,) * 9)[j] or 0)) for k in keys)
        assert moved <= m.sensitivity, (m.label, moved, m.sensitivity)
        moves.append(moved)
    # Weighted: the person's matching rows always count. Rows: their k kept rows may all fail the filter.
    assert any(moves) or plan.rewrite == "rows", moves


def _unit_weighted_reference(frame: pd.DataFrame, policy: dict, sql_where: str, plan: DPPlan) -> list[int]:
    """``sum_u trunc(T_u * k / max(n_u, k))``, ``T_u`` the unit's exact integer total, in Python integers."""
    k = policy["tables"]["t"]["max_rows_per_unit"]
    rows = frame[frame["pid"].notna()]
    if sql_where:
        rows = rows.query(sql_where)
    columns = policy["tables"]["t"]["columns"]
    out = [0] * len(plan.measurements)
    for _, unit in rows.groupby("pid"):
        n_u = len(unit)
        for j, m in enumerate(plan.measurements):
            total = 0
            for x in unit[m.column] if m.column else [1] * n_u:
                if pd.isna(x):
                    continue
                if m.kind == "count":
                    total += 10**6
                    continue
                lo, hi = columns[m.column]["bounds"]
                value = min(max(float(x), lo), hi) - m.center
                value = (value**2 if m.squared else value) * m.scale
                total += int(np.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)  # ROUND half away from 0
            magnitude = abs(total) * k // max(n_u, k)
            out[j] += magnitude if total >= 0 else -magnitude  # truncation toward zero
    return out


class _IntegerTotals(DuckDBHooks):
    UNIT_TOTALS_AS_DOUBLE = False  # unit totals as the engine's own integer SUM (DuckDB: 128-bit)


@pytest.mark.parametrize("hooks", [DuckDBHooks, _IntegerTotals])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("sql", "where"),
    [
        ("SELECT SUM(income), COUNT(*), COUNT(income) FROM t", ""),
        ("SELECT AVG(income), VAR_POP(age), STDDEV(income) FROM t", ""),
        ("SELECT SUM(income), COUNT(*), COUNT(income) FROM t WHERE age > 40", "age > 40"),
        ("SELECT AVG(income), VAR_POP(age) FROM t WHERE income < 100 OR sex = 1", "income < 100 or sex == 1"),
        ("SELECT STDDEV(income) FROM t WHERE region <> 2", "region != 2"),
    ],
)
def test_unit_weighted_rewrite_matches_an_independent_reference(
    tmp_path: Path, seed: int, sql: str, where: str, hooks: type[DuckDBHooks]
) -> None:
    """Scalar queries (unfiltered, or filtered under filter_first) pre-aggregate per unit; the exact aggregates
    equal a Python per-unit reference (NULL values, negative values before and after centring), with the unit
    totals summed as DOUBLE (every backend) or as the engine's integer SUM."""
    frame = _people(seed)
    frame.loc[np.random.default_rng(seed).random(len(frame)) < 0.1, "income"] = None
    source = tmp_path / "t.csv"
    frame.to_csv(source, index=False)
    policy = _policy(source)
    policy["tables"]["t"]["columns"]["income"]["bounds"] = [-500, 1000]
    config = parse_config(policy, base_dir=tmp_path)
    plan = build_plan(sql, epsilon=1.0, delta=0.0, ctx=PlanContext(config=config, hooks=hooks(), seed=b"s"))
    assert plan.rewrite == "unit_weighted" and "OVER" not in plan.bounded_sql and "GROUP BY" in plan.bounded_sql
    assert ("SUM(CAST(CASE" in plan.bounded_sql) == hooks.UNIT_TOTALS_AS_DOUBLE
    (row,) = _exact(plan)
    assert [int(v or 0) for v in row] == _unit_weighted_reference(pd.read_csv(source), policy, where, plan)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(income) FROM t WHERE age > 0",
        "SELECT COUNT(income), AVG(income), VAR_POP(age) FROM t WHERE sex = 1 OR age < 50",
        "SELECT STDDEV(income), COUNT(*) FROM t WHERE income > -100000",
        "SELECT SUM(income), COUNT(income), VAR_POP(age) FROM t",  # unfiltered: the same per-unit form
        "SELECT AVG(income), COUNT(*), STDDEV(age) FROM t",
    ],
)
@pytest.mark.parametrize("rows", [1000, 20_000])
def test_unit_weighted_one_person_with_many_rows_moves_each_aggregate_by_at_most_its_sensitivity(
    tmp_path: Path, sql: str, rows: int
) -> None:
    """Exact aggregates on D and on D plus one person with many rows (negative values, NULLs)."""
    base = _people(7)
    rng = np.random.default_rng(1)
    income = rng.uniform(-1e6, 1e6, size=rows)
    income[rng.random(rows) < 0.2] = np.nan
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "age": rng.integers(-10, 120, size=rows),
            "income": income,
            "sex": rng.integers(0, 2, size=rows),
            "region": rng.integers(0, 50, size=rows),
        }
    )
    results = []
    for i, frame in enumerate([base, pd.concat([base, big], ignore_index=True)]):
        source = tmp_path / f"t{i}.csv"
        frame.to_csv(source, index=False)
        policy = _policy(source)
        policy["tables"]["t"]["columns"]["income"]["bounds"] = [-500, 1000]
        config = parse_config(policy, base_dir=tmp_path)
        plan = build_plan(sql, epsilon=1.0, delta=0.0, ctx=PlanContext(config=config, hooks=DuckDBHooks(), seed=b"s"))
        assert plan.rewrite == "unit_weighted"
        (row,) = _exact(plan)
        results.append((plan, row))
    (plan, before), (_, after) = results
    moves = [abs(int(a or 0) - int(b or 0)) for a, b in zip(after, before, strict=True)]
    for m, moved in zip(plan.measurements, moves, strict=True):
        assert moved <= m.sensitivity, (m.label, moved, m.sensitivity)
    assert any(moves), moves


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (7.0, 5, 4),
        (-7.0, 5, -4),
        (-1.0, 10, 0),
        (1.0, 10, 0),
        (-6.0, 2, -6),
        (1e300, 10, 3 * 5),
        (-1e300, 4, -3 * 5),
        (None, 4, None),  # every value of the unit NULL: nothing (GREATEST would have skipped the NULL)
    ],
)
def test_unit_contribution_truncates_toward_zero_and_is_clamped(
    total: float | None, n: int, expected: int | None
) -> None:
    """One unit's ``clamp(trunc(T * k / max(n, k)), -k V, k V)`` (k = 3, V = 5): truncated toward zero, and a
    total no row values could give is clamped to ``k V`` instead of failing the cast to BIGINT."""
    from sqlglot import exp

    from dpgateway.passes.unit_forms import unit_contribution as _unit_contribution

    expr = _unit_contribution(exp.column("t", quoted=True), "n", 3, 5)
    sql = exp.select(expr).from_(
        exp.Values(
            expressions=[
                exp.Tuple(
                    expressions=[
                        exp.cast(exp.Literal.number(repr(total)) if total is not None else exp.Null(), "DOUBLE"),
                        exp.Literal.number(n),
                    ]
                )
            ],
            alias=exp.TableAlias(this=exp.to_identifier("v"), columns=[exp.to_identifier("t"), exp.to_identifier("n")]),
        )
    )
    with DuckDBConnector() as con:
        (row,) = con.execute(trusted_sql(sql.sql("duckdb"))).rows
    assert row[0] == expected


@pytest.mark.parametrize(
    ("where", "wrapped"),
    [
        ("income > -5", False),
        ("age BETWEEN 18 AND 65 AND NOT (income IS NULL OR sex IN (0, 1))", False),
        ("income > 1.5 OR age <= income", False),
        ("age > 1.5", True),  # int column against a decimal: a DECIMAL that need not hold the value
        ("age > 99999999999999999999", True),
        ("age + 1 > 5", True),
        ("CAST(income AS INT) > 5", True),
        ("age * 4 > 5", True),  # BIGINT overflow on the extreme rows without TRY
    ],
)
def test_try_only_around_expressions_that_can_fail(tmp_path: Path, where: str, wrapped: bool) -> None:
    """passes/total.py leaves comparisons of typed columns with literals of their kind alone; anything else keeps
    TRY. An int column holding the extreme BIGINT values never fails any of them."""
    frame = pd.DataFrame(
        {"pid": [1, 2, 3], "age": [2**63 - 1, -(2**63) + 1, 30], "income": [1e300, -1e300, 5.0], "sex": [0, 1, 1]}
    )
    frame["region"] = 0
    source = tmp_path / "t.csv"
    frame.to_csv(source, index=False)
    ctx = _ctx(source)
    plan = build_plan(f"SELECT COUNT(*), SUM(income) FROM t WHERE {where}", epsilon=1.0, delta=0.0, ctx=ctx)
    assert ("TRY(" in plan.bounded_sql) == wrapped
    _exact(plan)  # runs: no data-dependent error


@pytest.mark.parametrize(
    ("key", "wrapped"),
    [
        ("CASE WHEN age < 30 THEN 'young' WHEN age < 60 THEN 'middle' ELSE 'old' END", False),
        ("CASE WHEN income > 1.5 OR sex = 1 THEN 1 WHEN age IS NULL THEN NULL END", False),
        ("CASE WHEN age < 30 THEN 'young' ELSE 1 END", True),  # results of two kinds: a cast
        ("CASE WHEN age * 4 > 5 THEN 'a' ELSE 'b' END", True),  # a condition that can overflow
        ("CASE WHEN age > 1 THEN age + 1 ELSE 0 END", True),  # a result that is computed
        ("CASE age WHEN 30 THEN 'a' ELSE 'b' END", True),  # simple CASE: not accepted
    ],
)
def test_try_only_around_group_keys_that_can_fail(tmp_path: Path, key: str, wrapped: bool) -> None:
    """A CASE group key (an age band) runs bare when its conditions cannot fail and its results are literals of
    one kind; the extreme BIGINT rows never make it fail."""
    frame = pd.DataFrame(
        {"pid": [1, 2, 3], "age": [2**63 - 1, -(2**63) + 1, 30], "income": [1e300, -1e300, 5.0], "sex": [0, 1, 1]}
    )
    frame["region"] = 0
    source = tmp_path / "t.csv"
    frame.to_csv(source, index=False)
    try:
        plan = build_plan(f"SELECT {key} AS b, COUNT(*) FROM t GROUP BY 1", epsilon=1.0, delta=1e-6, ctx=_ctx(source))
    except DPGatewayError:  # refused while planning (two result kinds): decided from the SQL alone, no data read
        assert wrapped
        return
    assert ("TRY(" in plan.bounded_sql) == wrapped
    _exact(plan)  # runs: no data-dependent error


def test_plans_are_shared_by_queries_that_differ_only_in_output_aliases(tmp_path: Path, monkeypatch) -> None:
    """One plan for queries that differ only in output names; each answer carries its own names. An alias
    named anywhere else (ORDER BY, a column) keys on the full text: swapping names there changes the query."""
    from dpgateway import planner

    source = tmp_path / "t.csv"
    _people(1).to_csv(source, index=False)
    built: list[str] = []
    build_plan_ = planner.build_plan
    monkeypatch.setattr(planner, "build_plan", lambda sql, **kw: built.append(sql) or build_plan_(sql, **kw))
    cache = PlanCache()
    ctx = _ctx(source)
    sql = "SELECT sex, COUNT(*) AS {a}, AVG(income) + 1 AS {b} FROM t GROUP BY sex"
    first = cache.build(sql.format(a="n0", b="m0"), epsilon=1.0, delta=0.0, ctx=ctx)
    second = cache.build(sql.format(a="n1", b="m1"), epsilon=1.0, delta=0.0, ctx=ctx)
    assert len(built) == 1
    assert [o.name for o in first.outputs] == ["sex", "n0", "m0"]
    assert [o.name for o in second.outputs] == ["sex", "n1", "m1"]
    assert second.bounded_sql == first.bounded_sql and second.measurements == first.measurements
    assert second.sql == sql.format(a="n1", b="m1") and '"n0"' not in second.post_sql  # rendered when needed
    assert cache.build(sql.format(a="n0", b="m0"), epsilon=1.0, delta=0.0, ctx=ctx) is first  # names as first built
    ordered = "SELECT COUNT(*) AS {a}, SUM(income) AS {b} FROM t ORDER BY a"
    by_count = cache.build(ordered.format(a="a", b="b"), epsilon=1.0, delta=0.0, ctx=ctx)
    by_sum = cache.build(ordered.format(a="b", b="a"), epsilon=1.0, delta=0.0, ctx=ctx)
    assert len(built) == 3 and by_count.post_sql != by_sum.post_sql
    with Gateway.from_config(_write(tmp_path, source)) as gw:
        for i in range(2):
            result = gw.query(sql.format(a=f"n{i}", b=f"m{i}"), analyst="a", epsilon=1.0)
            assert result.columns == ["sex", f"n{i}", f"m{i}"]


def _write(folder: Path, source: Path) -> Path:
    path = folder / "dpgateway.yaml"
    path.write_text(yaml.safe_dump(_policy(source) | {"ledger": f"sqlite:///{folder / 'ledger.db'}"}))
    return path


@pytest.mark.parametrize(
    ("sql", "binds"),
    [
        ("SELECT sex, COUNT(*) AS n, AVG(income) AS a FROM t GROUP BY sex", False),
        ("SELECT sex, COUNT(*) * 2 - 1 AS n, GREATEST(SUM(income), COUNT(*)) AS a FROM t GROUP BY sex", False),
        ("SELECT sex, COUNT(*) - sex AS n FROM t GROUP BY sex", False),  # an integer key is typed: no bind
        ("SELECT sex, COUNT(*) AS n FROM t GROUP BY sex ORDER BY n", True),
        ("SELECT sex, COUNT(*) AS n FROM t GROUP BY sex HAVING COUNT(*) > 3", True),
        ("SELECT COUNT(*) + 0.5 AS n FROM t", True),  # a decimal literal: no Python form
        ("SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, COUNT(*) AS n FROM t GROUP BY 1", False),
    ],
)
def test_post_processing_is_bound_only_when_its_types_are_not_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str, binds: bool
) -> None:
    """passes/post.py binds the sandbox query unless every computing output reads numeric columns only."""
    from dpgateway.passes import post

    source = tmp_path / "t.csv"
    _people(1).to_csv(source, index=False)
    bound: list[str] = []
    run = post.run_sandboxed
    monkeypatch.setattr(post, "run_sandboxed", lambda query, **kw: bound.append(query) or run(query, **kw))
    try:
        build_plan(sql, epsilon=1.0, delta=1e-6, ctx=_ctx(source))
    except Exception:
        assert binds  # refused at plan time, by the bind
    assert bool(bound) == binds
