"""Spark specifics: the session the gateway owns, catalog and CSV sources, refusals, and errors that
carry a SQLSTATE but no data value (prepared copies: test_spark_prepare.py). Every test shares the
session-wide local Spark (conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import PUMS_COLUMNS, Backend, exact, pums_frame, sorted_rows
from helpers import trusted_sql
from sqlglot import exp

from dpgateway import Gateway
from dpgateway.connectors.spark import OWNED, SparkConnector
from dpgateway.errors import BackendError, ConfigError
from dpgateway.policies.loader import parse_config

pytestmark = pytest.mark.spark


def _spec(source: Any) -> dict[str, Any]:
    return {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 3}


def _config(tmp_path: Path, source: dict[str, Any], columns: dict[str, Any] | None = None) -> Any:
    spec = {**_spec(source), "columns": columns or PUMS_COLUMNS}
    return parse_config({"tables": {"pums": spec}, "ledger": f"sqlite:///{tmp_path / 'l.db'}"}, base_dir=tmp_path)


def test_the_gateway_owns_its_session_settings(spark_session: Any) -> None:
    """Each connector takes its own session with ANSI mode off, whatever the shared session says; a
    session switched to ANSI mode behind the gateway's back is refused before any query runs."""
    spark_session.conf.set("spark.sql.ansi.enabled", "true")
    try:
        connector = SparkConnector(spark_session)
        assert connector._session is not spark_session
        assert connector._session.conf.get("spark.sql.ansi.enabled") == OWNED["spark.sql.ansi.enabled"]
        assert connector.execute(trusted_sql("SELECT CAST('x' AS INT) AS v")).rows == ((None,),)
        connector._session.conf.set("spark.sql.ansi.enabled", "true")
        with pytest.raises(BackendError, match=r"spark\.sql\.ansi\.enabled is not false") as raised:
            connector.execute(trusted_sql("SELECT 1 AS one"))
        assert raised.value.sqlstate == "58000"
    finally:
        spark_session.conf.set("spark.sql.ansi.enabled", "false")


def test_config_may_not_set_the_owned_setting(tmp_path: Path) -> None:
    table = {"source": {"connector": "spark", "path": "a.parquet"}, "columns": {"x": {"type": "int"}}}
    raw = {"tables": {"a": table}, "spark": {"conf": {"spark.sql.ansi.enabled": True}}}
    with pytest.raises(ConfigError, match=r"spark.conf.spark.sql.ansi.enabled: the gateway sets this itself"):
        parse_config(raw, base_dir=tmp_path)


def test_per_query_settings_are_refused(spark_session: Any) -> None:
    with pytest.raises(BackendError, match="'work_mem' is not one the Spark backend applies"):
        SparkConnector(spark_session).execute(trusted_sql("SELECT 1 AS one"), (("work_mem", "1GB"),))


def test_catalog_table_source(spark_session: Any, tmp_path: Path) -> None:
    """``table: db.table`` reads the session catalog (shared by every session of the process) and gives
    the same exact aggregates as DuckDB over the same rows."""
    path = Backend("spark", tmp_path, None, spark_session).load("pums", pums_frame())["path"]
    spark_session.sql("CREATE DATABASE IF NOT EXISTS census")
    spark_session.sql(f"CREATE TABLE IF NOT EXISTS census.pums_catalog USING parquet LOCATION '{path}'")
    try:
        config = _config(tmp_path, {"connector": "spark", "table": "census.pums_catalog"})
        connector = SparkConnector(spark_session, config.tables)
        connector.check_table(config.tables[0])
        reference = Backend("duckdb", tmp_path, None)
        expected = reference.gateway({"pums": {**_spec(reference.load("ref", pums_frame())), "columns": PUMS_COLUMNS}})
        with Gateway(config, connector=connector) as gateway, expected:
            plan = gateway.explain("SELECT sex, COUNT(*) FROM pums GROUP BY sex").plan
            assert plan is not None and "`census`.`pums_catalog`" in plan.bounded_sql
            for sql in ("SELECT sex, COUNT(*), SUM(income) FROM pums GROUP BY sex", "SELECT COUNT(*) FROM pums"):
                assert sorted_rows(exact(gateway, sql)) == sorted_rows(exact(expected, sql))
    finally:
        spark_session.sql("DROP TABLE IF EXISTS census.pums_catalog")


def test_csv_source_reads_text_and_never_fails(spark_session: Any, tmp_path: Path) -> None:
    """A CSV source is read as text and cast by the policy: a malformed value is NULL, never an error."""
    csv = tmp_path / "people.csv"
    csv.write_text("pid,income\n1,10\n1,20\n2,oops\n3,\n4,1e3\n")
    columns = {"pid": {"type": "int"}, "income": {"type": "float", "bounds": [0, 1000]}}
    config = _config(tmp_path, {"connector": "spark", "path": str(csv), "format": "csv"}, columns)
    connector = SparkConnector(spark_session, config.tables)
    connector.check_table(config.tables[0])
    sql = "SELECT COUNT(*), COUNT(income), SUM(income) FROM pums"
    reference = Backend("duckdb", tmp_path, None)
    with Gateway(config, connector=connector) as gateway:
        got = exact(gateway, sql).rows
        assert got == exact(reference.gateway({"pums": {**_spec(str(csv)), "columns": columns}}), sql).rows
        assert 3 * got[0][0] == 5 * got[0][1] > 0  # five rows, three incomes ('oops' and '' are NULL), fixed point
        connector.close()
        assert not [t for t in spark_session.catalog.listTables() if t.name.startswith("dpgateway_")]


@pytest.mark.parametrize(
    ("source", "columns", "message"),
    [
        ({"path": "missing.parquet"}, None, r"Spark cannot read '.*missing.parquet' \(AnalysisException\)"),
        ({"table": "census.absent"}, None, r"Spark cannot read 'census.absent'"),
        ({"path": "PUMS"}, {**PUMS_COLUMNS, "zip": {"type": "int"}}, "zip not found in the source"),
    ],
)
def test_check_table_refusals(
    spark_session: Any, tmp_path: Path, source: dict[str, str], columns: Any, message: str
) -> None:
    if source.get("path") == "PUMS":
        source = Backend("spark", tmp_path, None, spark_session).load("pums", pums_frame())
    elif "path" in source:
        source = {"path": str(tmp_path / source["path"])}
    config = _config(tmp_path, {"connector": "spark", **source}, columns)
    with pytest.raises(ConfigError, match=message) as raised:
        SparkConnector(spark_session, config.tables).check_table(config.tables[0])
    assert raised.value.sqlstate == "F0000"


def test_backend_error_hides_values(spark_session: Any, tmp_path: Path) -> None:
    path = tmp_path / "secret.parquet"
    spark_session.createDataFrame([("the-secret-value",)], "s string").write.parquet(str(path))
    connector = SparkConnector(spark_session)
    with pytest.raises(BackendError, match="withheld") as raised:
        connector.execute(trusted_sql(f"SELECT raise_error(s) FROM parquet.`{path}`"))
    assert "the-secret-value" not in str(raised.value) and raised.value.sqlstate == "58000"
    assert connector.execute(trusted_sql("SELECT 1 AS one")).rows == ((1,),)  # the session still serves


def test_a_gateway_reads_one_backend(tmp_path: Path) -> None:
    tables = {
        "a": {"source": {"connector": "spark", "path": "a.parquet"}, "columns": {"x": {"type": "int"}}},
        "b": {"source": "b.csv", "columns": {"x": {"type": "int"}}},
    }
    with pytest.raises(ConfigError, match="a gateway reads one backend"):
        Gateway(parse_config({"tables": tables}, base_dir=tmp_path))


def test_row_hash_is_keyed_and_separates_nulls(spark_session: Any) -> None:
    """``xxhash64(key, c, c IS NULL, ...)``: (1, NULL) and (NULL, 1) differ, and another key reorders."""
    connector = SparkConnector(spark_session)
    hooks = connector.hooks

    def digest(key: str, first: str, second: str) -> Any:
        cols = [exp.Null() if v == "NULL" else exp.cast(exp.Literal.number(v), "INT") for v in (first, second)]
        sql = exp.select(hooks.row_hash(exp.Literal.string(key), cols).as_("h")).sql(dialect="spark")
        return connector.execute(trusted_sql(sql)).rows[0][0]

    assert digest("k", "1", "NULL") != digest("k", "NULL", "1")
    assert digest("k", "1", "2") != digest("other", "1", "2")
    assert digest("k", "1", "2") == digest("k", "1", "2")
