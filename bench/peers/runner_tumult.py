"""Tumult Analytics on a workload: ``python runner_tumult.py JOB OUT``.

Runs in its own virtual environment (bench/peers/requirements-tumult.txt) on a local Spark. Tumult has no
SQL, so each query is translated by hand into a QueryBuilder (the ``BUILDERS`` below, one per query, named
by ``Query.tumult``); a query without a faithful translation is reported as not answered. Configuration
from the workload: every private table is protected with ``AddRowsWithID`` in one ID space (the person),
the unit column renamed ``uid`` (Tumult joins private tables only on equally named ID columns); a table
that reaches its person through a foreign key gets ``uid`` attached by that join before Tumult sees it (the
data owner's preprocessing, the counterpart of our policy's ``path``); ``MaxRowsPerID(k)`` with the same k as
every other system; public key domains as KeySets; the same value bounds; total budget
``ApproxDPBudget(epsilon, delta)`` per query.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, Workload, csv_path, table

UID = "uid"


def frames(workload: Workload) -> dict[str, Any]:
    """Each table as pandas, with the unit column (attached along its path if needed) renamed ``uid``."""
    import pandas as pd

    raw = {t.name: pd.read_csv(csv_path(workload, t.name)) for t in workload.tables}
    loaded = {}
    for t in workload.tables:
        frame = raw[t.name]
        for hop_from, parent, hop_to in t.path:  # attach the unit along the path, from the parents' raw rows
            parent_unit = table(workload, parent).unit
            keys = raw[parent][[hop_to, parent_unit]]
            frame = frame.merge(keys, left_on=hop_from, right_on=hop_to, how="inner")
            if hop_to != hop_from:
                frame = frame.drop(columns=[hop_to])
        if t.unit is not None:
            frame = frame.rename(columns={t.unit: UID})
        for column in t.columns:
            if column.type == "date" and column.name in frame:
                frame[column.name] = frame[column.name].astype(str)
        loaded[t.name] = frame
    return loaded


def keyset(workload: Workload, *columns: str) -> Any:
    from tmlt.analytics import KeySet

    domains = {}
    for name in columns:
        column = next(c for t in workload.tables for c in t.columns if c.name == name)
        assert column.public_values is not None
        domains[name] = list(column.public_values)
    return KeySet.from_dict(domains)


def _bounds(workload: Workload, name: str) -> tuple[float, float]:
    column = next(c for t in workload.tables for c in t.columns if c.name == name)
    assert column.bounds is not None
    return column.bounds


def _k(workload: Workload, name: str) -> int:
    return table(workload, name).k


def builders() -> dict[str, Callable[[Workload], Any]]:
    from tmlt.analytics import ColumnType, MaxRowsPerID, QueryBuilder

    def rows(w: Workload, name: str) -> Any:
        return QueryBuilder(name).enforce(MaxRowsPerID(_k(w, name)))

    def orders_customers(w: Workload) -> Any:
        # orders joined to their customer on the person id (both private, one ID space), then nation (public)
        return (
            QueryBuilder("orders")
            .join_private("customer", join_columns=[UID])
            .rename({"c_nationkey": "n_nationkey"})
            .join_public("nation", join_columns=["n_nationkey"])
            .enforce(MaxRowsPerID(_k(w, "orders")))
        )

    def per_person(w: Workload, value: Callable[[list[Any]], Any], name: str, kind: Any) -> Any:
        return (
            QueryBuilder("orders")
            .flat_map_by_id(lambda rows: [{name: value(rows)}], new_column_types={name: kind})
            .enforce(MaxRowsPerID(1))
        )

    def sum_of(column: str) -> Callable[[list[Any]], float]:
        return lambda rows: float(sum(min(max(float(r[column]), 0.0), 600000.0) for r in rows))

    lo_price, hi_price = (0.0, 600000.0)
    return {
        "count_orders": lambda w: rows(w, "orders").count(),
        "count_by_priority": lambda w: rows(w, "orders").groupby(keyset(w, "o_orderpriority")).count(name="n"),
        "revenue_by_status": lambda w: (
            rows(w, "orders")
            .groupby(keyset(w, "o_orderstatus"))
            .sum("o_totalprice", *_bounds(w, "o_totalprice"), name="revenue")
        ),
        "avg_price": lambda w: rows(w, "orders").average("o_totalprice", *_bounds(w, "o_totalprice")),
        "count_by_segment": lambda w: rows(w, "customer").groupby(keyset(w, "c_mktsegment")).count(name="n"),
        "orders_by_nation": lambda w: orders_customers(w).groupby(keyset(w, "n_name")).count(name="n"),
        "revenue_by_region": lambda w: (
            orders_customers(w)
            .rename({"n_regionkey": "r_regionkey"})
            .join_public("region", join_columns=["r_regionkey"])
            .groupby(keyset(w, "r_name"))
            .sum("o_totalprice", *_bounds(w, "o_totalprice"), name="revenue")
        ),
        "quantity_by_flag": lambda w: (
            rows(w, "lineitem")
            .groupby(keyset(w, "l_returnflag"))
            .sum("l_quantity", *_bounds(w, "l_quantity"), name="qty")
        ),
        "frequent_customers": lambda w: per_person(w, len, "orders", ColumnType.INTEGER).filter("orders >= 15").count(),
        "avg_spend": lambda w: per_person(w, sum_of("o_totalprice"), "spend", ColumnType.DECIMAL).average(
            "spend", lo_price * _k(w, "orders"), hi_price * _k(w, "orders")
        ),
        "distinct_customers": lambda w: rows(w, "orders").count_distinct([UID]),
        "median_price": lambda w: rows(w, "orders").median("o_totalprice", *_bounds(w, "o_totalprice")),
        "pums_count": lambda w: rows(w, "pums").count(),
        "pums_sum_income": lambda w: rows(w, "pums").sum("income", *_bounds(w, "income")),
        "pums_avg_age": lambda w: rows(w, "pums").average("age", *_bounds(w, "age")),
        "pums_var_age": lambda w: rows(w, "pums").variance("age", *_bounds(w, "age")),
        "pums_count_by_sex": lambda w: rows(w, "pums").groupby(keyset(w, "sex")).count(name="n"),
        "pums_avg_income_by_sex": lambda w: (
            rows(w, "pums").groupby(keyset(w, "sex")).average("income", *_bounds(w, "income"), name="avg_income")
        ),
        "pums_count_by_educ": lambda w: rows(w, "pums").groupby(keyset(w, "educ")).count(name="n"),
        "pums_sum_income_by_educ": lambda w: (
            rows(w, "pums").groupby(keyset(w, "educ")).sum("income", *_bounds(w, "income"), name="total_income")
        ),
        "pums_count_by_race_educ": lambda w: rows(w, "pums").groupby(keyset(w, "race", "educ")).count(name="n"),
        "pums_median_income": lambda w: rows(w, "pums").median("income", *_bounds(w, "income")),
        "pums_max_age": lambda w: rows(w, "pums").max("age", *_bounds(w, "age")),
    }


def filtered(w: Workload, epsilon: float, delta: float, session: Any) -> Any:
    """``COUNT(*), AVG(income) ... WHERE``: two measurements, the budget split equally (Tumult's way)."""
    from tmlt.analytics import ApproxDPBudget, MaxRowsPerID, QueryBuilder

    base = QueryBuilder("pums").filter("age > 40 AND married = 1").enforce(MaxRowsPerID(_k(w, "pums")))
    half = ApproxDPBudget(epsilon / 2, delta / 2)
    count = session.evaluate(base.count(name="n"), half).toPandas()
    average = session.evaluate(base.average("income", *_bounds(w, "income"), name="avg_income"), half).toPandas()
    return count.join(average)


def run(job: dict[str, Any]) -> dict[str, Any]:
    import os

    from pyspark.sql import SparkSession
    from tmlt.analytics import AddRowsWithID, ApproxDPBudget, Session

    os.environ["PYSPARK_PYTHON"] = sys.executable  # Spark's Python workers need this venv's tmlt
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="tumult-warehouse-"))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    workload: Workload = replace(WORKLOADS[job["workload"]], data_dir=job["data_dir"])
    data = {name: spark.createDataFrame(frame) for name, frame in frames(workload).items()}
    known = builders()
    runs = job["trials"] * len(workload.queries)
    builder = Session.Builder().with_privacy_budget(
        ApproxDPBudget(job["epsilon"] * runs, min(job["delta"] * runs, 0.5))
    )
    builder = builder.with_id_space("person")
    for t in workload.tables:
        if t.public:
            builder = builder.with_public_dataframe(t.name, data[t.name])
        else:
            change = AddRowsWithID(id_column=UID, id_space="person")
            builder = builder.with_private_dataframe(t.name, data[t.name], protected_change=change)
    session = builder.build()  # one session; each evaluation below spends exactly (epsilon, delta)
    out: dict[str, Any] = {}
    for query in workload.queries:
        if query.tumult is None or (query.tumult not in known and query.tumult != "pums_filtered"):
            out[query.id] = {"refused": "no faithful QueryBuilder translation"}
            continue
        try:
            trials, wall = [], []
            for _ in range(job["trials"]):
                start = time.perf_counter()
                if query.tumult == "pums_filtered":
                    frame = filtered(workload, job["epsilon"], job["delta"], session)
                else:
                    budget = ApproxDPBudget(job["epsilon"], job["delta"])
                    frame = session.evaluate(known[query.tumult](workload), budget).toPandas()
                wall.append(time.perf_counter() - start)
                columns = [*query.keys, *(c for c in frame.columns if c not in query.keys)]
                frame = frame[columns]
                trials.append({"columns": columns, "rows": frame.astype(object).values.tolist()})
            out[query.id] = {"trials": trials, "epsilon": job["epsilon"], "seconds": sorted(wall)[len(wall) // 2]}
        except Exception as error:  # a refusal: record Tumult's own message
            out[query.id] = {"refused": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    spark.stop()
    return out


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(job), default=str))
