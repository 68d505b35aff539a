"""PostgreSQL specifics: the guarded casts never raise, errors hide values, secrets stay secret,
the gateway's role only reads, and the catalog check runs before any query."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import psycopg2
import pytest
from conftest import PUMS_COLUMNS, URL_ENV, PostgresDatabase, exact, pums_frame, sorted_rows
from helpers import trusted_sql

from dpgateway import Gateway
from dpgateway.connectors.postgres import TRANSACTION_SETTINGS, PostgresConnector
from dpgateway.connectors.postgres_sql import TARGETS, PostgresHooks
from dpgateway.errors import BackendError, ConfigError, PrerequisiteError
from dpgateway.policies.loader import parse_config
from dpgateway.policies.model import Column, Config

pytestmark = pytest.mark.postgres

TRICKY = [
    "0", "-0", "+7", "9223372036854775807", "-9223372036854775808", "9223372036854775808", "-9223372036854775809",
    "99999999999999999999", " 5", "5 ", "1_000", "0x1F", "", "abc", "1.5", "-1.5e3", "1e308", "1e309", "1e-320",
    "2e-308", "NaN", "nan", "-inf", "Infinity", "+infinity", "+NaN", "1" * 400, "." + "1" * 255, "." + "1" * 256, "1.", ".5",
    "2023-02-28", "2023-02-30", "2024-02-29", "0000-01-01", "9999-12-31", "2023-13-01", "true", "YES", "off", "2",
]  # fmt: skip


@pytest.fixture
def strings(pg_database: PostgresDatabase) -> PostgresDatabase:
    pg_database.load("strings", pd.DataFrame({"s": TRICKY}))
    return pg_database


@pytest.mark.parametrize("input_is_valid", [False, True])
@pytest.mark.parametrize("kind", ["int", "float", "bool", "date"])
def test_guarded_casts_never_raise_and_agree_with_the_cast(
    strings: PostgresDatabase, kind: str, input_is_valid: bool
) -> None:
    """Each guarded value is NULL or exactly what the plain cast gives; the plain cast raises on some inputs."""
    with psycopg2.connect(strings.admin_url) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        if input_is_valid and int(cur.fetchone()[0]) < 160000:
            pytest.skip("pg_input_is_valid needs PostgreSQL 16+ (this server is older)")
        hooks = PostgresHooks(input_is_valid=input_is_valid)
        guarded = hooks.typed(Column(name="s", type=kind)).sql("postgres")  # type: ignore[arg-type]
        cur.execute(f"SELECT s, {guarded} FROM census.strings")
        got = dict(cur.fetchall())
        failures = 0
        for s in TRICKY:
            cur.execute("SAVEPOINT p")
            try:
                cur.execute(f"SELECT CAST(%s AS {TARGETS[kind]})", (s,))
                plain = cur.fetchone()[0]
            except psycopg2.Error:
                cur.execute("ROLLBACK TO SAVEPOINT p")
                failures += 1
                assert got[s] is None, s
                continue
            if got[s] is not None:
                assert got[s] == plain, s
            elif kind == "float" and isinstance(plain, float) and math.isnan(plain):
                continue  # NaN is read as missing
    assert failures > 0  # the inputs include ones the plain cast rejects
    assert sum(v is not None for v in got.values()) >= 3


def test_text_columns_give_the_same_aggregates_as_native_ones(
    pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = pums_frame()
    pg_database.load("pums_text", frame.astype(str))
    pg_database.load("pums_native", frame)
    monkeypatch.setenv(URL_ENV, pg_database.reader_url)
    results = []
    for name in ("pums_text", "pums_native"):
        source = {"connector": "postgres", "url": {"$env": URL_ENV}, "table": f"census.{name}"}
        raw = {
            "tables": {
                "pums": {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": PUMS_COLUMNS}
            }
        }
        with Gateway(parse_config({**raw, "ledger": f"sqlite:///{tmp_path / name}.db"}, base_dir=tmp_path)) as gw:
            plan = gw.explain("SELECT educ, COUNT(*), SUM(income) FROM pums GROUP BY educ").plan
            guarded = 'CAST("pid" AS TEXT)' in plan.bounded_sql  # text columns are guarded, native ones cast directly
            assert guarded == (name == "pums_text")
            results.append(sorted_rows(exact(gw, "SELECT educ, COUNT(*), SUM(income) FROM pums GROUP BY educ")))
    assert results[0] == results[1]


def test_backend_error_hides_values(pg_database: PostgresDatabase) -> None:
    pg_database.load("secret_values", pd.DataFrame({"s": ["the-secret-value"]}))
    with PostgresConnector(pg_database.reader_url) as connector:
        with pytest.raises(BackendError, match=r"withheld.*") as raised:
            connector.execute(trusted_sql("SELECT CAST(s AS BIGINT) FROM census.secret_values"))
        assert "the-secret-value" not in str(raised.value) and "22P02" in str(raised.value)
        assert connector.execute(trusted_sql("SELECT 1 AS one")).rows == ((1,),)  # the pool recovered


def test_every_query_is_read_only(pg_database: PostgresDatabase) -> None:
    """Even a role that may write cannot: each transaction is READ ONLY (the admin URL is a superuser)."""
    with PostgresConnector(pg_database.admin_url) as connector:
        with pytest.raises(BackendError, match="SQLSTATE 25006"):
            connector.execute(trusted_sql("CREATE TABLE census.written (a int)"))
        assert connector.execute(trusted_sql("SHOW transaction_read_only")).rows == (("on",),)


def test_statement_timeout_applies(pg_database: PostgresDatabase) -> None:
    connector = PostgresConnector(pg_database.reader_url, statement_timeout_ms=50)
    with connector, pytest.raises(BackendError, match="SQLSTATE 57014"):
        connector.execute(trusted_sql("SELECT pg_sleep(2)"))


def test_url_secret_never_shown(pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "postgresql://someone:hunter2@127.0.0.1:1/nothing"
    monkeypatch.setenv(URL_ENV, bad)
    source = {"connector": "postgres", "url": {"$env": URL_ENV}, "table": "census.pums"}
    config = parse_config({"tables": {"t": {"source": source, "columns": {"a": {"type": "int"}}}}}, base_dir=tmp_path)
    assert "hunter2" not in repr(config) and URL_ENV in repr(config)
    with pytest.raises(ConfigError, match=f"cannot connect to the database of {{\\$env: {URL_ENV}}}") as raised:
        Gateway(config, store=None)
    assert "hunter2" not in str(raised.value)
    monkeypatch.delenv(URL_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {URL_ENV} is not set"):
        parse_config({"tables": {"t": {"source": source, "columns": {"a": {"type": "int"}}}}}, base_dir=tmp_path)


def test_a_gateway_reads_one_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(URL_ENV, "postgresql://x@127.0.0.1:1/x")
    tables = {
        "a": {
            "source": {"connector": "postgres", "url": {"$env": URL_ENV}, "table": "s.a"},
            "columns": {"x": {"type": "int"}},
        },
        "b": {"source": "b.csv", "columns": {"x": {"type": "int"}}},
    }
    with pytest.raises(ConfigError, match="a gateway reads one backend"):
        Gateway(parse_config({"tables": tables}, base_dir=tmp_path))


def test_catalog_check_names_missing_columns_and_privileges(
    pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg_database.load("checked", pd.DataFrame({"a": [1]}))
    with psycopg2.connect(pg_database.admin_url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS census.hidden (a int)")  # no GRANT to the reader
    monkeypatch.setenv(URL_ENV, pg_database.reader_url)
    for table, columns, message in (
        ("census.checked", {"a": {"type": "int"}, "b": {"type": "int"}}, "b not found in census.checked"),
        ("census.hidden", {"a": {"type": "int"}}, "has no SELECT on census.hidden"),
        ("census.absent", {"a": {"type": "int"}}, "census.absent does not exist"),
    ):
        source = {"connector": "postgres", "url": {"$env": URL_ENV}, "table": table}
        raw = {"tables": {"t": {"source": source, "columns": columns}}, "ledger": f"sqlite:///{tmp_path / 'l.db'}"}
        with pytest.raises(ConfigError, match=message):
            Gateway(parse_config(raw, base_dir=tmp_path))


def test_unit_round_trip_only_where_the_catalog_type_needs_it(pg_database: PostgresDatabase) -> None:
    """A text unit keeps only the exact spelling of an id ('07', ' 7', '7.0' are no id, never person 7);
    an integer-typed unit is its own id, read by a plain cast (no per-row text conversions)."""
    pg_database.load("units", pd.DataFrame({"t": ["7", "07", " 7", "7.0", "-3"], "n": [7, 7, 7, 7, -3]}))
    with PostgresConnector(pg_database.reader_url) as connector:
        columns = {"t": Column(name="t", type="int"), "n": Column(name="n", type="int")}  # type: ignore[arg-type]
        connector.hooks.remember_type(columns["t"], "text")
        connector.hooks.remember_type(columns["n"], "bigint")
        native = connector.hooks.unit(columns["n"]).sql("postgres")
        assert native == 'CAST("n" AS BIGINT)'
        text_unit = connector.hooks.unit(columns["t"]).sql("postgres")
        rows = connector.execute(trusted_sql(f"SELECT t, {text_unit}, {native} FROM census.units ORDER BY t")).rows
    assert [(t, unit) for t, unit, _ in rows] == [(" 7", None), ("-3", -3), ("07", None), ("7", 7), ("7.0", None)]
    assert [n for _, _, n in rows] == [7, -3, 7, 7, 7]


def test_every_transaction_gets_the_settings(pg_database: PostgresDatabase) -> None:
    with PostgresConnector(pg_database.reader_url) as connector:
        for name, value in TRANSACTION_SETTINGS:
            assert connector.execute(trusted_sql(f"SELECT current_setting('{name}')")).rows == ((value,),)


def _pums_config(pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The PUMS sample loaded as census.pums, read through the reader role (k = 2), with a SQLite ledger."""
    pg_database.load("pums", pums_frame())
    monkeypatch.setenv(URL_ENV, pg_database.reader_url)
    source = {"connector": "postgres", "url": {"$env": URL_ENV}, "table": "census.pums"}
    spec = {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": PUMS_COLUMNS}
    return parse_config({"tables": {"pums": spec}, "ledger": f"sqlite:///{tmp_path / 'l.db'}"}, base_dir=tmp_path)


def test_prepare_without_the_change_trigger_is_refused_with_the_sql_to_run(
    pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table without the gateway's change log and trigger is not copied (tests/backends/test_postgres_copy.py
    covers copies): 55000, naming the SQL to run; nothing is written, and queries bound on the fly."""
    with Gateway(_pums_config(pg_database, tmp_path, monkeypatch)) as gw:
        with pytest.raises(
            PrerequisiteError, match=r"(?s)cannot be prepared on postgres: .*CREATE OR REPLACE TRIGGER"
        ) as e:
            gw.prepare("pums")
        assert e.value.sqlstate == "55000"
        plan = gw.explain("SELECT COUNT(*) FROM pums").plan
        assert plan is not None and plan.prepared is None
    assert not list(tmp_path.glob("**/*.json")) and not list(tmp_path.glob("**/*.parquet"))  # nothing was written


def test_scalar_count_groups_by_unit_without_hashagg_and_the_same_answer(
    pg_database: PostgresDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scalar COUNT(*) pre-aggregation runs with ``enable_hashagg = off`` (parallel sort and group,
    postgres_sql.PostgresHooks.per_unit_settings); the setting changes the plan, not the rows."""
    with Gateway(_pums_config(pg_database, tmp_path, monkeypatch)) as gw:
        plan = gw.explain("SELECT COUNT(*) FROM pums WHERE age > 30", epsilon=1.0).plan
        assert plan is not None and plan.rewrite == "unit_count"
        assert plan.settings == (("enable_hashagg", "off"),)
        probe = trusted_sql("SELECT current_setting('enable_hashagg')")
        assert gw.connector.execute(probe, plan.settings).rows == (("off",),)
        without = gw.connector.execute(plan.bounded_sql).rows
        assert gw.connector.execute(plan.bounded_sql, plan.settings).rows == without
        assert without[0][0] > 0
