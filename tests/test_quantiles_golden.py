"""Golden bounded SQL of quantiles and COUNT(DISTINCT), compared as text and executed for meaning.

Same format as tests/fixtures/rewrite (``-- name``, the analyst SQL, the bounded SQL as ``explain`` shows
it, each ending with ``;``), in tests/fixtures/quantiles. The bounded SQL runs on DuckDB over the bundled PUMS
sample with k = 4 (the most rows anyone has, so row bounding keeps every row) and is compared with pandas:
per group, each value clamped and snapped to the nearest grid candidate, counted per candidate; distinct
counts with ``nunique``. Regenerate with ``DPGATEWAY_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml
from sqlglot import exp

from dpgateway.connectors.duckdb import DuckDBHooks
from dpgateway.passes.context import PlanContext
from dpgateway.passes.quantiles import BIN, grid, quantile_sources
from dpgateway.plan import DPPlan
from dpgateway.planner import build_plan
from dpgateway.policies.loader import parse_config

FIXTURE = Path(__file__).parent / "fixtures" / "quantiles" / "golden.sql"
DATA = Path(str(resources.files("dpgateway") / "data"))
POLICY = """
tables:
  pums:
    source: pums.csv
    privacy_unit: pid
    max_rows_per_unit: 4
    columns:
      pid: {type: int}
      age: {type: int, bounds: [18, 90]}
      income: {type: float, bounds: [0, 200000]}
      sex: {type: int, public_values: [0, 1]}
      educ: {type: int}
"""
QUERIES = {
    "median by public key": "SELECT sex, MEDIAN(income), COUNT(DISTINCT pid) FROM pums GROUP BY sex",
    "min max of an int": "SELECT MIN(age), MAX(age), PERCENTILE_DISC(0.25) WITHIN GROUP (ORDER BY age) FROM pums",
    "quantile by private key with a filter": "SELECT educ, quantile_cont(income, 0.9) FROM pums WHERE age > 30 GROUP BY educ",
    "distinct counts": "SELECT sex, COUNT(DISTINCT pid), COUNT(DISTINCT educ) FROM pums GROUP BY sex",
    "two columns and a distinct count": "SELECT sex, MEDIAN(age), MAX(income), COUNT(DISTINCT educ) FROM pums GROUP BY sex",
    "quantiles of expressions": (
        "SELECT sex, MEDIAN(age + 1), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY income / 1000), "
        "quantile_cont(income / 1000, 0.1), MEDIAN(age) FROM pums GROUP BY sex"
    ),
}
# Each expression a query takes quantiles of, evaluated independently in pandas (columns clamped to the bounds)
EXPRESSIONS = {
    "age + 1": lambda f: f["age"].clip(18, 90) + 1,
    "income / 1000": lambda f: f["income"].clip(0, 200000) / 1000,
}


def _plan(sql: str) -> DPPlan:
    config = parse_config(yaml.safe_load(POLICY), base_dir=DATA)
    ctx = PlanContext(config=config, hooks=DuckDBHooks(), seed=b"golden-seed")
    return build_plan(sql, epsilon=1.0, delta=1e-6, ctx=ctx)


def _cases() -> dict[str, tuple[str, str]]:
    blocks = [b.strip() for b in FIXTURE.read_text().split(";") if b.strip()]
    cases = {}
    for analyst, bounded in zip(blocks[::2], blocks[1::2], strict=True):
        name, _, sql = analyst.partition("\n")
        cases[name.removeprefix("--").strip()] = (sql.strip(), bounded)
    return cases


if os.environ.get("DPGATEWAY_UPDATE_GOLDEN"):
    FIXTURE.write_text("".join(f"-- {name}\n{sql};\n{_plan(sql).shown_sql};\n" for name, sql in QUERIES.items()))


@pytest.mark.parametrize("name", list(QUERIES))
def test_golden_text(name: str) -> None:
    sql, expected = _cases()[name]
    assert sql == QUERIES[name] and _plan(sql).shown_sql == expected


@pytest.mark.parametrize("name", list(QUERIES))
def test_golden_meaning(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sql, expected = _cases()[name]
    plan = _plan(sql)
    assert plan.table is not None
    (tmp_path / "pums.csv").write_bytes((DATA / "pums.csv").read_bytes())
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect()
    con.execute(f'CREATE VIEW "pums" AS {exp.select(exp.Star()).from_(DuckDBHooks().source(plan.table)).sql("duckdb")}')
    result = con.sql(expected)
    got = pd.DataFrame(result.fetchall(), columns=[d[0] for d in result.description])
    raw = pd.read_csv(tmp_path / "pums.csv")
    raw = raw[raw["pid"].notna()]
    assert raw.groupby("pid").size().max() <= 4  # k = 4 keeps every row
    if plan.where is not None:
        raw = raw[con.sql(f"SELECT {plan.where.sql('duckdb')} AS keep FROM raw").df()["keep"].fillna(False).to_numpy()]
    keys = [k.name for k in plan.group_keys]
    for key in plan.group_keys:
        raw[key.name] = con.sql(f"SELECT {key.expr.sql('duckdb')} AS k FROM raw").df()["k"].to_numpy()
    sources = quantile_sources(plan)
    bin_names = [f"{BIN}{i}" for i in range(len(sources))]
    for i, source in enumerate(sources):  # set i: rows with __bin<i> set, one histogram per value
        assert source.bounds is not None
        (lo, hi), g = source.bounds, grid(source, plan.table)
        values = raw[source.column] if source.column else EXPRESSIONS[source.text](raw)
        raw[bin_names[i]] = [
            min(g.size - 1, max(0, math.floor((min(max(v, lo), hi) - g.lo) * g.per_unit + 0.5))) for v in values
        ]
        reference = raw.groupby([*keys, bin_names[i]]).size().rename("n").reset_index()
        rows = got[got[bin_names[i]].notna() & (got[bin_names[i]] >= 0)]
        for q in (m for m in plan.measurements if m.kind == "quantile" and m.arg == source.arg):
            merged = rows[[*keys, bin_names[i], q.name]].merge(reference, on=[*keys, bin_names[i]], how="outer")
            assert (merged[q.name].fillna(0).astype("int64") == merged["n"].fillna(0).astype("int64")).all(), q.label
    plain = got[got[bin_names].isna().all(axis=1)] if bin_names else got  # the (keys) set
    for m in plan.measurements:
        if m.kind == "quantile":
            continue
        if m.kind == "count" and m.column is None:  # the partition-selection count of private keys
            reference = raw.groupby(keys).size() if keys else pd.Series([len(raw)])
        else:
            assert m.kind == "count_distinct" and m.column is not None
            reference = raw.groupby(keys)[m.column].nunique() if keys else pd.Series([raw[m.column].nunique()])
        by_key = dict(zip(plain[keys[0]], plain[m.name], strict=True)) if keys else {0: plain[m.name].iloc[0]}
        assert {k: int(v) for k, v in by_key.items()} == {k: int(v) for k, v in reference.items()}
