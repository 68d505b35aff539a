"""``python bench/cold_forms.py --rows 10000000 --reps 5``: candidate SQL forms of the cold path's bounded queries
(issue 19), each timed on a plain DuckDB connection interleaved with the per-person floor. Printed only.

The current forms are the bounded SQL ``Gateway.explain`` plans for bench/run.py's shapes under its policy without
the ``per_unit`` declarations (the per-row weighted forms, as before session 9); each candidate reads the same ``typed``
CTE (taken from that plan's tree) and, unless marked as another estimator, must return exactly the same integers as
the current form (checked on every run). The ``unit_grouped`` forms the gateway plans for the region shapes with
``region`` declared ``per_unit`` (session 9) are timed beside them, not compared (each person's total is truncated
once, not each row: tests/test_unit_grouped.py checks them). Wall time and the process's CPU time (DuckDB's threads
included: steadier than wall time when other jobs share the cores) are both given as ratios to the floor measured
in the same repetitions. Results: bench/README.md, "Session 8".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
from run import BAND, FILTERED, FLOOR_SQL, SHAPES, generate, write_config

from dpgateway import Gateway

S, K = 1_000_000, 3  # the count scale and bench/run.py's k
CODE = "CASE WHEN age < 30 THEN 0 WHEN age < 60 THEN 1 ELSE 2 END"  # the age band's branch index


def single_cell(typed: str, key: str, where: str, label: str = "") -> str:
    """Weighted ``COUNT(*) BY key`` from one ``GROUP BY unit``: a unit whose rows all have one key value (or all
    NULL) adds ``n_u * (S k // max(n_u, k))`` to that cell, exactly the sum of its rows' weights; only the rows of
    units with several key values are joined back (with their ``n_u``) and weighted per row."""
    single = "__c = 0 OR (__c = __n AND __lo = __hi)"
    cell = f"[{label}][__g0 + 1]" if label else "__g0"
    return f"""WITH {typed}, per_unit AS (SELECT pid AS __u, COUNT(*) AS __n, COUNT({key}) AS __c, MIN({key}) AS __lo,
        MAX({key}) AS __hi FROM typed WHERE ({where}) AND pid IS NOT NULL GROUP BY pid),
    one AS (SELECT __lo AS __g0, SUM(__n * ({S * K} // GREATEST(__n, {K}))) AS m FROM per_unit WHERE {single} GROUP BY 1),
    multi AS (SELECT __u, __n FROM per_unit WHERE NOT ({single})),
    rest AS (SELECT {key} AS __g0, SUM({S * K} // GREATEST(__n, {K})) AS m FROM typed JOIN multi ON pid = __u
        WHERE ({where}) GROUP BY 1)
    SELECT {cell}, SUM(m) FROM (SELECT * FROM one UNION ALL SELECT * FROM rest) GROUP BY __g0"""


def by_age_mod_3(typed: str, where: str) -> str:
    """The weighted rewrite's join form (passes/bounding.py) of ``COUNT(*) BY age % 3``."""
    return f"""WITH {typed}, per_unit AS (SELECT pid AS __u, COUNT(*) AS __n FROM typed WHERE ({where})
        AND pid IS NOT NULL GROUP BY pid), ranked AS (SELECT *, age % 3 AS __g0 FROM typed JOIN per_unit ON pid = __u
        WHERE ({where})) SELECT __g0, SUM({S * K} // GREATEST(__n, {K})) FROM ranked GROUP BY __g0"""


def candidates(typed: dict[str, str], where: str) -> dict[str, tuple[str, str, bool]]:
    """name -> (shape, SQL, exact: the same integers as the current form)."""
    heavy = f"""heavy AS (SELECT pid AS __u, COUNT(*) AS __n FROM typed WHERE ({where}) AND pid IS NOT NULL
        GROUP BY pid HAVING COUNT(*) > {K})"""
    region, band, total = typed["COUNT(*) BY region"], typed["COUNT(*) BY age band"], typed["SUM(income)"]
    value = 'CASE WHEN NOT "income" IS NULL THEN ROUND(LEAST(GREATEST("income", 0), 500000) * 1) END'
    per_unit_sum = f"""per_unit AS (SELECT COUNT(*) AS __n, SUM({value}) AS __t FROM typed WHERE ({where})
        AND pid IS NOT NULL GROUP BY pid)"""
    return {
        "heavy persons only, LEFT JOIN": (
            "COUNT(*) BY region",
            f"""WITH {region}, {heavy} SELECT region, SUM(CASE WHEN __n IS NULL THEN {S} ELSE {S * K} // __n END)
            FROM typed LEFT JOIN heavy ON pid = __u WHERE ({where}) AND pid IS NOT NULL GROUP BY region""",
            True,
        ),
        "exact count minus heavy correction": (
            "COUNT(*) BY region",
            f"""WITH {region}, {heavy},
            tot AS (SELECT region, COUNT(*) * {S} AS c FROM typed WHERE ({where}) AND pid IS NOT NULL GROUP BY region),
            corr AS (SELECT region, SUM({S} - {S * K} // __n) AS x FROM typed JOIN heavy ON pid = __u
                WHERE ({where}) GROUP BY region)
            SELECT tot.region, c - COALESCE(x, 0) FROM tot LEFT JOIN corr ON tot.region IS NOT DISTINCT FROM corr.region""",
            True,
        ),
        "single-cell units, MIN/MAX(key)": ("COUNT(*) BY region", single_cell(region, "region", where), True),
        "single-cell units, bit_or(1 << key)": (  # exact only because region's values are 0..49 here
            "COUNT(*) BY region",
            f"""WITH {region}, per_unit AS (SELECT COUNT(*) AS __n, bit_or(CAST(1 AS UBIGINT) << CAST(region AS UBIGINT))
                AS __m FROM typed WHERE ({where}) AND pid IS NOT NULL GROUP BY pid)
            SELECT CAST(log2(__m) AS BIGINT), SUM(__n * ({S * K} // GREATEST(__n, {K}))) FROM per_unit
            WHERE bit_count(__m) = 1 GROUP BY 1""",
            True,
        ),
        "single-cell units, MIN/MAX(band)": ("COUNT(*) BY age band", single_cell(band, BAND, where), True),
        "single-cell units, MIN/MAX(branch index)": (
            "COUNT(*) BY age band",
            single_cell(band, CODE, where, "'young', 'middle', 'old'"),
            True,
        ),
        # A key that varies within a unit (not one of bench/run.py's shapes: ``age`` is not public), for which
        # most units span several cells: the weighted join form, as passes/bounding.py writes it, against the
        # single-cell form. Compared with each other, not with a plan.
        "age % 3: join form": ("COUNT(*) BY age % 3", by_age_mod_3(band, where), False),
        "age % 3: single-cell units, MIN/MAX(key)": (
            "COUNT(*) BY age % 3",
            single_cell(band, "(age % 3)", where),
            False,
        ),
        "per unit: no BIGINT/DOUBLE casts": (
            "SUM(income)",
            f"""WITH {total}, {per_unit_sum},
            weights AS (SELECT __n, GREATEST(__n, {K}) AS __d, __t, CAST(LEAST(GREATEST(__t, -9007199254740992),
                9007199254740992) AS BIGINT) AS __tt FROM per_unit)
            SELECT SUM(CASE WHEN NOT __t IS NULL THEN LEAST(GREATEST((__tt // __d) * {K} + (__tt - (__tt // __d) * __d)
                * {K} // __d, -1500000), 1500000) END) FROM weights""",
            True,
        ),
        "per unit: units of <= k rows add T_u": (
            "SUM(income)",
            f"""WITH {total}, {per_unit_sum}
            SELECT CAST(COALESCE(SUM(__t) FILTER (WHERE __n <= {K}), 0) + COALESCE(SUM(CAST(__t AS BIGINT) * {K} // __n)
                FILTER (WHERE __n > {K}), 0) AS BIGINT) FROM per_unit""",
            True,
        ),
        "per unit: total clamped to k*V, no n_u (other estimator)": (
            "SUM(income)",
            f"""WITH {total}, per_unit AS (SELECT SUM({value}) AS __t FROM typed WHERE ({where}) AND pid IS NOT NULL
                GROUP BY pid) SELECT SUM(LEAST(__t, 1500000)) FROM per_unit""",
            False,
        ),
    }


def payload(src: str) -> dict[str, tuple[str, str, bool]]:
    """The per-person GROUP BY alone with more or fewer aggregates (what each aggregate costs over the floor)."""
    forms = {
        "COUNT(*)": ["COUNT(*)"],
        "COUNT(*), MIN(region)": ["COUNT(*)", "MIN(region)"],
        "COUNT(*), MIN/MAX(region)": ["COUNT(*)", "MIN(region)", "MAX(region)"],
        "COUNT(*), bit_or(1 << region)": ["COUNT(*)", "bit_or(CAST(1 AS UBIGINT) << CAST(region AS UBIGINT))"],
        "COUNT(*), SUM(income)": ["COUNT(*)", "SUM(income)"],
        "SUM(income)": ["SUM(income)"],
        "GROUP BY pid, region: COUNT(*)": ["COUNT(*)"],
    }
    out = {}
    for name, aggregates in forms.items():
        keys = "pid, region" if "region:" in name else "pid"
        inner = ", ".join(f"{a} AS a{i}" for i, a in enumerate(aggregates))
        outer = ", ".join(f"SUM(a{i})" for i in range(len(aggregates)))
        sql = f"SELECT {outer} FROM (SELECT {inner} FROM {src} GROUP BY {keys})"
        out[f"payload: {name}"] = ("per-person GROUP BY", sql, False)
    return out


def typed_ctes(gw: Gateway, shapes: dict[str, tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Per shape: the current bounded SQL, and its ``typed`` CTE as SQL text (``typed AS (...)``)."""
    current, typed = {}, {}
    for name, (dp_sql, _) in shapes.items():
        plan = gw.explain(dp_sql.format(alias="v", n=5), epsilon=1.0).plan
        assert plan is not None and plan.bounded is not None
        current[name] = plan.bounded.sql(dialect="duckdb")
        cte = next(c for c in plan.bounded.args["with_"].expressions if c.alias == "typed")
        typed[name] = f"typed AS ({cte.this.sql(dialect='duckdb')})"
    return current, typed


def run(rows: int, reps: int) -> dict[str, dict[str, tuple[str, float, float, bool]]]:
    """Per workload: form -> (shape, wall ratio to the floor, CPU ratio, exact). Asserts each exact form's integers."""
    source = generate(rows)
    out: dict[str, dict[str, tuple[str, float, float, bool]]] = {}
    src = f"read_parquet('{source}')"
    raw = duckdb.connect()
    raw.execute("SET enable_progress_bar = false")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "per_unit").mkdir()
        weighted = Gateway.from_config(write_config(Path(tmp), source, per_unit=False))
        per_unit = Gateway.from_config(write_config(Path(tmp) / "per_unit", source))
        with weighted as gw, per_unit:
            for label, shapes, where in (("unfiltered", SHAPES, "TRUE"), ("filtered", FILTERED, "income > -5")):
                out[label] = _run_workload(raw, gw, per_unit, label, shapes, where, src, reps, rows)
    return out


def _run_workload(
    raw: duckdb.DuckDBPyConnection,
    gw: Gateway,
    per_unit: Gateway,
    label: str,
    shapes: dict[str, tuple[str, str]],
    where: str,
    src: str,
    reps: int,
    rows: int,
) -> dict[str, tuple[str, float, float, bool]]:
    """One workload's forms, checked and timed; form -> (shape, wall ratio, CPU ratio, exact)."""
    current, typed = typed_ctes(gw, shapes)
    forms = {f"current: {name}": (name, current[name], True) for name in current}
    grouped, _ = typed_ctes(per_unit, {name: shapes[name] for name in shapes if "BY region" in name})
    forms |= {f"unit_grouped: {name}": (name, sql, False) for name, sql in grouped.items()}
    forms |= candidates(typed, where)
    if label == "unfiltered":
        forms |= payload(src)
    expected = {name: sorted(raw.execute(current[name]).fetchall()) for name in current}
    for name, (shape, sql, exact) in forms.items():
        got = sorted(raw.execute(sql).fetchall())
        assert not exact or got == expected[shape], (name, got[:3], expected[shape][:3])
    mod_3 = [sorted(raw.execute(sql).fetchall()) for shape, sql, _ in forms.values() if shape.endswith("% 3")]
    assert mod_3[0] == mod_3[1], mod_3
    wall: dict[str, list[float]] = {name: [] for name in ["floor", *forms]}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    statements = {"floor": FLOOR_SQL.format(src=src)} | {name: sql for name, (_, sql, _) in forms.items()}
    for _ in range(reps):
        for name, sql in statements.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            raw.execute(sql).fetchall()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    floor, floor_cpu = statistics.median(wall["floor"]), statistics.median(cpu["floor"])
    print(f"\n{rows:,} rows, {label}: floor {floor * 1000:.0f} ms wall, {floor_cpu * 1000:.0f} ms CPU")
    result = {}
    for name, (shape, _, exact) in forms.items():
        ratio, ratio_cpu = statistics.median(wall[name]) / floor, statistics.median(cpu[name]) / floor_cpu
        result[name] = (shape, ratio, ratio_cpu, exact)
        mark = "" if exact else "  (not compared)"
        print(f"  {shape:22s} {name:58s} wall {ratio:5.2f}x  CPU {ratio_cpu:5.2f}x{mark}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    run(args.rows, args.reps)


if __name__ == "__main__":
    main()
