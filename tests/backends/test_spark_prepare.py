"""Prepared copies on Spark (local master): the copy answers exactly as bounding on the fly does (weighted,
row-bounding and unit-count shapes, ``bound_first`` filtered queries), from a file or a folder source; a
source file changed, added or removed makes the copy unused; the copy is private whatever the umask; a
cluster or Connect master, a catalog table or a non-local path is refused (0A000); one person with many
rows moves the aggregates over a copy by at most their sensitivity; automatic preparation never blocks a
query. Every test shares the session-wide local Spark (conftest.py)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from test_prepare import _write_data

from dpgateway import Gateway, prepare
from dpgateway.connectors.spark import SparkConnector
from dpgateway.errors import UnsupportedError
from dpgateway.policies.loader import parse_config

pytestmark = pytest.mark.spark

COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [-10, 100]},
    "income": {"type": "float", "bounds": [-300, 900]},
    "sex": {"type": "int", "public_values": [0, 1]},
    "region": {"type": "int"},
}
QUERIES = {  # the rewrite each query takes, on the fly and over the copy
    "SELECT COUNT(*) FROM t": "unit_count",
    "SELECT sex, COUNT(*) AS n, AVG(income), VARIANCE(age), COUNT(region) FROM t GROUP BY sex": "weighted",
    "SELECT region, COUNT(*), SUM(income) FROM t GROUP BY region": "rows",
    "SELECT sex, SUM(income), STDDEV_POP(age) FROM t WHERE age > 40 GROUP BY sex": "weighted",
    "SELECT region, COUNT(*), AVG(income) FROM t WHERE age BETWEEN 20 AND 70 OR income < 0 GROUP BY region": "rows",
}


def _gateway(spark: Any, folder: Path, source: dict[str, Any], **prepare_settings: Any) -> Gateway:
    raw = {
        "tables": {"t": {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 3, "columns": COLUMNS}},
        "budget": {"per_subject": {"epsilon": 1e6, "delta": 0.5}, "per_analyst": {"epsilon": 1e6, "delta": 0.5}},
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
        "cache_dir": str(folder / "cache"),
        "prepare": {"auto": False, "filtered": "bound_first", **prepare_settings},
    }
    config = parse_config(raw, base_dir=folder)
    return Gateway(config, connector=SparkConnector(spark, config.tables))


def _exact(gw: Gateway, sql: str) -> tuple[bool, str, list[tuple[Any, ...]]]:
    """(whether the plan reads the copy, its rewrite, the exact bounded aggregates)."""
    plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
    assert plan is not None
    rows = gw.connector.execute(plan.bounded_sql, plan.settings).rows
    return plan.prepared is not None, plan.rewrite, sorted(rows, key=repr)


def _copy_used(gw: Gateway) -> bool:
    plan = gw.explain("SELECT COUNT(*) FROM t", epsilon=1.0, delta=1e-6).plan
    return plan is not None and plan.prepared is not None


def _parquet(csv: Path, target: Path) -> None:
    with duckdb.connect() as con:
        con.execute(f"COPY (FROM read_csv('{csv}', all_varchar = true)) TO '{target}' (FORMAT parquet)")


def _modes(folder: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of the folder and everything under it."""
    found = {("folder", folder.stat().st_mode & 0o777)}
    for inner, folders, files in os.walk(folder):
        found |= {("folder", (Path(inner) / f).stat().st_mode & 0o777) for f in folders}
        found |= {("file", (Path(inner) / f).stat().st_mode & 0o777) for f in files}
    return found


@pytest.mark.parametrize("layout", ["parquet file", "csv folder"])
def test_prepared_copy_gives_the_on_the_fly_aggregates_and_is_private(
    spark_session: Any, tmp_path: Path, layout: str
) -> None:
    """NULLs, NaN and infinities, NULL units, negative bounds; the copy written under umask 000."""
    data = tmp_path / "data"
    data.mkdir()
    if layout == "parquet file":
        _write_data(tmp_path / "t.csv", seed=5, nulls=True)
        _parquet(tmp_path / "t.csv", data / "t.parquet")
        source = {"connector": "spark", "path": str(data / "t.parquet"), "format": "parquet"}
        queries = QUERIES
    else:
        _write_data(data / "part-1.csv", seed=5, nulls=True)
        _write_data(data / "part-2.csv", seed=6, n_units=40, nulls=True)
        source = {"connector": "spark", "path": str(data), "format": "csv"}
        queries = {sql: rewrite for sql, rewrite in QUERIES.items() if "WHERE" in sql}  # fewer: Spark is slow
    with _gateway(spark_session, tmp_path, source) as gw:
        on_the_fly = {sql: _exact(gw, sql) for sql in queries}
        assert {sql: (used, rewrite) for sql, (used, rewrite, _) in on_the_fly.items()} == {
            sql: (False, rewrite) for sql, rewrite in queries.items()
        }
        umask = os.umask(0)
        try:
            copy = gw.prepare("t")
        finally:
            os.umask(umask)
        for sql, rewrite in queries.items():
            assert _exact(gw, sql) == (True, rewrite, on_the_fly[sql][2]), sql
    cache = tmp_path / "cache"
    assert Path(copy.path).parent == cache and Path(copy.path).is_dir()
    assert _modes(cache) == {("folder", 0o700), ("file", 0o600)}  # part files, checksums, _SUCCESS, manifest
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(copy.path).name, "t.json"])  # no scratch left


def test_a_changed_added_or_removed_source_file_makes_the_copy_unused(spark_session: Any, tmp_path: Path) -> None:
    """A folder source: a change to its files is seen before a query plans, so a copy of the old files is
    never read; a new copy answers as bounding the new files on the fly does (each kind of change, at any
    depth, without Spark: tests/test_copy_check.py)."""
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    for i in range(3):
        _write_data(tmp_path / f"{i}.csv", seed=i, n_units=30)
        _parquet(tmp_path / f"{i}.csv", data / ("more" if i == 2 else "") / f"part-{i}.parquet")
    source = {"connector": "spark", "path": str(data), "format": "parquet"}
    sql = "SELECT sex, COUNT(*), SUM(income) FROM t GROUP BY sex"
    with _gateway(spark_session, tmp_path, source) as gw:
        gw.prepare("t")
        assert _copy_used(gw)
        _parquet(tmp_path / "0.csv", data / "more" / "part-3.parquet")  # added, in a subfolder
        assert not _copy_used(gw)
        fresh = _exact(gw, sql)
        assert not fresh[0]
        gw.prepare("t")
        assert _exact(gw, sql) == (True, *fresh[1:])
        shutil.copyfile(data / "part-0.parquet", data / "part-1.parquet")  # rewritten in place
        assert not _copy_used(gw)
        gw.prepare("t")
        assert _copy_used(gw)
        (data / "more" / "part-2.parquet").unlink()  # removed
        assert not _copy_used(gw)
        copies = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
        assert len(copies) == 2  # the copy in use and the one it replaced; the first is removed


@pytest.mark.parametrize(
    ("source", "master", "reason"),
    [
        ({"path": "DATA"}, "spark://host:7077", "only on a local master"),
        ({"path": "DATA"}, "yarn", "only on a local master"),
        ({"path": "DATA"}, "local-cluster[2,1,1024]", "only on a local master"),
        ({"path": "DATA"}, None, "only on a local master"),  # Spark Connect: no SparkContext here
        ({"table": "census.pums"}, "local[2]", "a catalog table has no file"),
        ({"path": "s3a://bucket/events/"}, "local[2]", "not on the local file system"),
        ({"path": "hdfs://namenode:8020/events"}, "local[2]", "not on the local file system"),
        ({"path": "DATA/*.parquet"}, "local[2]", "its path is a pattern"),
    ],
)
def test_a_copy_that_cannot_be_private_or_checked_is_refused(
    spark_session: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: dict[str, str],
    master: str | None,
    reason: str,
) -> None:
    """Refused with 0A000 and the reason; automatic preparation leaves such a table alone."""
    (tmp_path / "data").mkdir()
    if "path" in source:
        source = {"path": source["path"].replace("DATA", str(tmp_path / "data")), "format": "parquet"}
    monkeypatch.setattr(SparkConnector, "_master", lambda self: master)
    with _gateway(spark_session, tmp_path, {"connector": "spark", **source}, auto=True, after_queries=1) as gw:
        with pytest.raises(UnsupportedError, match=f"table t cannot be prepared on spark: .*{reason}") as raised:
            gw.prepare("t")
        assert raised.value.sqlstate == "0A000"
        assert gw._copies.sources == {}  # never checked, never built automatically
        gw.auto_prepare.queried(gw.config.tables[0])
        assert gw.auto_prepare._threads == {}
    assert not (tmp_path / "cache").exists()


def test_a_path_the_session_resolves_to_another_file_system_is_refused(spark_session: Any, tmp_path: Path) -> None:
    """A bare path is on ``fs.defaultFS``: the gateway asks Hadoop, as Spark does, not the path's spelling."""
    connector = SparkConnector(spark_session)
    table = parse_config(
        {
            "tables": {
                "t": {
                    "source": {"connector": "spark", "path": str(tmp_path)},
                    "privacy_unit": "pid",
                    "columns": {"pid": {"type": "int"}},
                }
            }
        },
        base_dir=tmp_path,
    ).tables[0]
    assert connector.copy_source(table) == str(tmp_path)
    connector._session.conf.set("fs.defaultFS", "hdfs://localhost:9")
    with pytest.raises(UnsupportedError, match="not on the local file system") as raised:
        connector.copy_source(table)
    assert raised.value.sqlstate == "0A000"


@pytest.mark.slow
def test_one_person_with_many_rows_moves_aggregates_over_a_copy_by_at_most_their_sensitivity(
    spark_session: Any, tmp_path: Path
) -> None:
    """Exact bounded aggregates over the copy of D and of D plus one person with 500 rows (one secret seed)."""
    _write_data(tmp_path / "base.csv", seed=7, n_units=60)
    base = pd.read_csv(tmp_path / "base.csv")
    rng = np.random.default_rng(0)
    big = pd.DataFrame(
        {
            "pid": 10_000,
            "age": rng.integers(-10, 120, size=500),
            "income": rng.uniform(-1e6, 1e6, size=500).round(2),
            "sex": rng.integers(0, 2, size=500),
            "region": rng.integers(0, 50, size=500),  # also new groups
        }
    )
    results: list[dict[str, Any]] = []
    for i, frame in enumerate([base, pd.concat([base, big], ignore_index=True)]):
        frame.to_csv(tmp_path / f"d{i}.csv", index=False)
        _parquet(tmp_path / f"d{i}.csv", tmp_path / f"d{i}.parquet")
        (tmp_path / "cache").mkdir(exist_ok=True)
        source = {"connector": "spark", "path": str(tmp_path / f"d{i}.parquet"), "format": "parquet"}
        with _gateway(spark_session, tmp_path, source) as gw:
            gw.prepare("t")
            answers = {}
            for sql, rewrite in list(QUERIES.items())[1:4]:  # weighted, rows, filtered (bound first) weighted
                plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
                assert plan is not None and plan.prepared is not None and plan.rewrite == rewrite
                n_keys = len(plan.group_keys)
                exact = gw.connector.execute(plan.bounded_sql, plan.settings)
                answers[sql] = (plan, {row[:n_keys]: row[n_keys:] for row in exact.rows})
            results.append(answers)
    for sql in results[0]:
        (plan, before), (_, after) = results[0][sql], results[1][sql]
        moves = []
        for j, m in enumerate(plan.measurements):
            keys = {*before, *after}
            moved = sum(abs((after.get(k, (None,) * 9)[j] or 0) - (before.get(k, (None,) * 9)[j] or 0)) for k in keys)
            assert moved <= m.sensitivity, (sql, m.label, moved, m.sensitivity)
            moves.append(moved)
        assert any(moves) or plan.rewrite == "rows", (sql, moves)  # rows: the k kept rows may fail the filter


def test_automatic_preparation_never_blocks_a_query(
    spark_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After two queries the copy is built in the background; it is held until later queries are answered."""
    _write_data(tmp_path / "t.csv", seed=3, n_units=50)
    _parquet(tmp_path / "t.csv", tmp_path / "t.parquet")
    source = {"connector": "spark", "path": str(tmp_path / "t.parquet"), "format": "parquet"}
    release = threading.Event()
    with _gateway(spark_session, tmp_path, source, auto=True, after_queries=2) as gw:
        materialize = gw.connector.materialize

        def held(sql: Any, path: str) -> int:
            assert release.wait(60), "the build was never released"
            return materialize(sql, path)

        monkeypatch.setattr(gw.connector, "materialize", held)
        sql = "SELECT sex, COUNT(*) AS n{} FROM t GROUP BY sex"
        for i in range(3):  # the second starts the build; the third is answered while it is held
            assert gw.query(sql.format(i), analyst="ann", epsilon=0.1).columns == ["sex", f"n{i}"]
            assert not _copy_used(gw)
        assert list(gw.auto_prepare._threads) == ["t"] and gw.auto_prepare._threads["t"].is_alive()
        release.set()
        gw.auto_prepare.wait()
        assert _copy_used(gw)
        assert prepare.valid_copies(gw.config, gw._ctx.seed, gw._copies.sources)


def test_the_local_scratch_space_is_private(spark_session: Any) -> None:
    """Shuffle files (every query's, and a copy build's sort: person-level rows) go to a 0700 folder."""
    if os.environ.get("SPARK_LOCAL_DIRS"):
        pytest.skip("SPARK_LOCAL_DIRS names the scratch space; the gateway leaves it to the operator")
    local = spark_session.sparkContext.getConf().get("spark.local.dir")
    assert local is not None and Path(local).name.startswith("dpgateway-spark-")
    assert Path(local).stat().st_mode & 0o777 == 0o700
