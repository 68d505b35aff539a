"""Golden rewrites: analyst SQL -> bounded SQL, compared as text and executed for meaning.

Each case in tests/fixtures/rewrite/*.sql is a comment line ``-- name``, the analyst SQL, and the
expected bounded SQL as ``explain`` shows it (``plan.shown_sql``: the source read as relation ``pums``,
the row-order key as a placeholder; each ending with ``;``). The bounded SQL is also run on DuckDB and compared with
an independent pandas computation: row bounding keeps every row (the policy keeps 4 rows per person,
the most anyone has, so only clamping and fixed-point rounding apply); for weighted plans the reference
computes each person's matching row count ``n`` and sums ``trunc(v * k / max(n, k))`` per row itself (per
person's total ``T`` for ``unit_weighted`` plans: ``trunc(T * k / max(n, k))``), with ``k`` patched lower so
that the weights matter.
Regenerate after an intended change with ``DPGATEWAY_UPDATE_GOLDEN=1 pytest tests/test_rewrite.py``.
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
from dpgateway.planner import build_plan
from dpgateway.policies.loader import parse_config

FIXTURES = Path(__file__).parent / "fixtures" / "rewrite"
DATA = Path(str(resources.files("dpgateway") / "data"))  # the header is read when the SQL is rendered
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


def _plan(sql: str, k: int = 4):
    policy = yaml.safe_load(POLICY)
    policy["tables"]["pums"]["max_rows_per_unit"] = k
    config = parse_config(policy, base_dir=DATA)
    ctx = PlanContext(config=config, hooks=DuckDBHooks(), seed=b"golden-seed")
    return build_plan(sql, epsilon=1.0, delta=1e-6, ctx=ctx)


def _cases() -> list[tuple[str, str, str, Path]]:
    cases = []
    for path in sorted(FIXTURES.glob("*.sql")):
        blocks = [b.strip() for b in path.read_text().split(";") if b.strip()]
        for analyst, bounded in zip(blocks[::2], blocks[1::2], strict=True):
            name, _, sql = analyst.partition("\n")
            cases.append((name.removeprefix("--").strip(), sql.strip(), bounded, path))
    return cases


def _update_golden() -> None:
    for path in sorted(FIXTURES.glob("*.sql")):
        cases = [c for c in _cases() if c[3] == path]
        path.write_text("".join(f"-- {name}\n{sql};\n{_plan(sql).shown_sql};\n" for name, sql, _, _ in cases))


CASES = _cases()


if os.environ.get("DPGATEWAY_UPDATE_GOLDEN"):
    _update_golden()
    CASES = _cases()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rewrite")
    (folder / "pums.csv").write_bytes((resources.files("dpgateway") / "data" / "pums.csv").read_bytes())
    return folder


@pytest.mark.parametrize(("name", "sql", "expected", "path"), CASES, ids=[c[0] for c in CASES])
def test_rewrite_text(name: str, sql: str, expected: str, path: Path) -> None:
    assert _plan(sql).shown_sql == expected


@pytest.mark.parametrize(("name", "sql", "expected", "path"), CASES, ids=[c[0] for c in CASES])
def test_rewrite_meaning(
    name: str, sql: str, expected: str, path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weighted = _plan(sql).rewrite in ("weighted", "unit_weighted")
    plan = _plan(sql, k=2 if weighted else 4)  # k = 2 < some people's row counts
    k = plan.table.max_rows_per_unit
    monkeypatch.chdir(workdir)
    con = duckdb.connect()  # its own connection: the default one may hold another test's unfinished result
    source = exp.select(exp.Star()).from_(DuckDBHooks().source(plan.table)).sql("duckdb")
    con.execute(f'CREATE VIEW "pums" AS {source}')  # the relation the shown SQL reads
    result = con.sql(plan.bounded_sql if k != 4 else expected)
    got = pd.DataFrame(result.fetchall(), columns=[d[0] for d in result.description])
    raw = pd.read_csv(workdir / "pums.csv")
    raw = raw[raw["pid"].notna()]
    if plan.where is not None:
        mask = con.sql(f"SELECT {plan.where.sql('duckdb')} AS keep FROM raw").df()["keep"].fillna(False)
        raw = raw[mask.to_numpy(dtype=bool)]
    keys = [k.name for k in plan.group_keys]
    for key in plan.group_keys:
        raw[key.name] = con.sql(f"SELECT {key.expr.sql('duckdb')} AS k FROM raw").df()["k"].to_numpy()
    n = raw.groupby("pid")["pid"].transform("size").to_numpy()  # matching rows per person
    assert not weighted or (n > k).any()
    per_unit = plan.rewrite == "unit_weighted"  # each person's total weighted once, not each row
    for m in plan.measurements:
        if m.kind == "count":
            raw[m.name] = int(m.scale) * (1 if m.column is None else raw[m.column].notna().astype(int))
            if plan.rewrite == "weighted":
                raw[m.name] = _truncated_weights(raw[m.name].to_numpy(), n, k)
            continue
        column = next(c for c in _plan_config_columns() if c["name"] == m.column)
        lo, hi = column["bounds"]
        value = raw[m.column].clip(lo, hi) - m.center
        fixed = ((value**2 if m.squared else value) * m.scale).map(
            lambda v: math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)
        )
        if plan.rewrite == "weighted":
            fixed = pd.Series(_truncated_weights(fixed.to_numpy(), n, k), index=fixed.index)
        raw[m.name] = fixed
    names = [m.name for m in plan.measurements]
    if per_unit:  # T_u per person (NULL when every value is), then trunc(T_u * k / max(n_u, k))
        units = raw.groupby("pid")
        totals = units[names].sum(min_count=1)
        sizes = units["pid"].size().to_numpy()
        raw = pd.DataFrame({name: _truncated_weights(totals[name].to_numpy(), sizes, k) for name in names})
    reference = raw.groupby(keys)[names].sum().reset_index() if keys else raw[names].sum().to_frame().T
    got = got.sort_values(keys).reset_index(drop=True) if keys else got
    reference = reference.sort_values(keys).reset_index(drop=True) if keys else reference
    assert got[keys].astype(str).equals(reference[keys].astype(str))
    assert got[names].astype("int64").equals(reference[names].astype("int64"))


def _truncated_weights(values, n, k: int) -> list:
    """``trunc(v * k / max(n, k))`` per row in Python integers; NaN (a NULL value) stays NaN."""
    out = []
    for v, n_u in zip(values, n, strict=True):
        if pd.isna(v):
            out.append(math.nan)
            continue
        magnitude = abs(int(v)) * k // max(int(n_u), k)
        out.append(magnitude if v >= 0 else -magnitude)
    return out


def _plan_config_columns() -> list[dict]:
    spec = yaml.safe_load(POLICY)["tables"]["pums"]["columns"]
    return [{"name": n, **s} for n, s in spec.items()]
