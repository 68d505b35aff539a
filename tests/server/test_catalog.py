"""Catalog queries through the shadow catalog: psql, SQLAlchemy inspect, pandas read_sql, client probes, and the
shadow's safety properties (no rows, no other database or role, no writes, policy tables go to the DP path)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import PASSWORD, Running

psycopg = pytest.importorskip("psycopg")
psycopg2 = pytest.importorskip("psycopg2")

DECLARED = ["pid", "age", "income", "sex", "married", "educ", "race"]


def _psql(wire: Running, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("psql") is None:
        if os.environ.get("CI"):
            pytest.fail("psql is missing in CI: install postgresql-client")
        pytest.skip("psql is not installed (apt-get install -y postgresql-client)")
    command = ["psql", "-X", "-h", wire.host, "-p", str(wire.port), "-U", "alice", "-d", "dpgateway", *args]
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_psql_dt_and_d(catalog_wire: Running) -> None:
    listed = _psql(catalog_wire, "-A", "-t", "-c", r"\dt")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "public|pums|table|dpgateway"
    described = _psql(catalog_wire, "-A", "-t", "-c", r"\d pums")
    assert described.returncode == 0, described.stderr
    columns = [line.split("|")[:2] for line in described.stdout.strip().splitlines()]
    assert columns == [[name, "bigint" if name != "income" else "double precision"] for name in DECLARED]


def test_sqlalchemy_inspect_and_pandas(catalog_wire: Running) -> None:
    url = f"postgresql+psycopg2://alice:{PASSWORD}@{catalog_wire.host}:{catalog_wire.port}/dpgateway"
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        assert inspector.get_schema_names() == ["information_schema", "public"]
        assert inspector.get_table_names() == ["pums"]
        assert [c["name"] for c in inspector.get_columns("pums")] == DECLARED
        assert str(inspector.get_columns("pums")[2]["type"]) == "DOUBLE PRECISION"
        frame = pd.read_sql("SELECT sex, COUNT(*) AS n FROM pums GROUP BY sex ORDER BY sex", engine)
        assert list(frame.columns) == ["sex", "n"] and frame["n"].dtype == "int64" and len(frame) == 2
        with engine.connect() as conn:
            assert pd.read_sql(sa.text("SELECT 1 AS one"), conn)["one"].tolist() == [1]
    finally:
        engine.dispose()


def test_psycopg3_server_side_catalog_query(catalog_wire: Running) -> None:
    with psycopg.connect(catalog_wire.dsn()) as conn:  # extended protocol with a parameter, inside BEGIN
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
            ("pums",),
        ).fetchall()
        assert [r[0] for r in rows] == DECLARED
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT count(*) FROM pg_class WHERE relname = %s", ("pums",)).fetchone() == (1,)
        row = conn.execute("SELECT COUNT(*) AS n FROM pums WHERE age > %s", (40,)).fetchone()
        assert isinstance(row[0], int)  # a policy table in the same session still takes the DP path


def test_client_probes(catalog_wire: Running) -> None:
    """What DBeaver, Metabase and pgjdbc send on connect."""
    with contextlib.closing(psycopg2.connect(catalog_wire.dsn())) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("SET extra_float_digits = 3")
        cur.execute("SET application_name = 'DBeaver 24.0.0 - Main'")
        cur.execute("SELECT current_schema(), session_user")
        assert cur.fetchone() == ("public", "alice")  # who logged in, not the shadow's role
        cur.execute("select current_catalog")
        assert cur.fetchone() == ("dpgateway",)
        cur.execute("SHOW TRANSACTION ISOLATION LEVEL")
        assert cur.fetchone() == ("read committed",)
        cur.execute("select pg_catalog.version()")
        assert cur.fetchone()[0].startswith("PostgreSQL ")
        cur.execute("SELECT n.oid, n.* FROM pg_catalog.pg_namespace n WHERE n.nspname = 'public'")
        assert cur.rowcount == 1
        cur.execute(  # psql 15's tab completion of `SELECT * FROM pu<TAB>`
            "SELECT pg_catalog.quote_ident(c.relname) FROM pg_catalog.pg_class c WHERE c.relkind IN "
            "('r', 'S', 'v', 'm', 'f', 'p') AND substring(pg_catalog.quote_ident(c.relname),1,2)='pu' AND "
            "pg_catalog.pg_table_is_visible(c.oid) AND c.relnamespace <> (SELECT oid FROM pg_catalog.pg_namespace "
            "WHERE nspname = 'pg_catalog') LIMIT 1000"
        )
        assert cur.fetchall() == [("pums",)]
        cur.execute("BEGIN")
        cur.execute("SAVEPOINT sp1")
        cur.execute("RELEASE SAVEPOINT sp1")
        cur.execute("COMMIT")


def test_shadow_is_row_less_and_private(catalog_wire: Running) -> None:
    with contextlib.closing(psycopg2.connect(catalog_wire.dsn())) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("SELECT datname FROM pg_database")
        assert cur.fetchall() == [("dpgateway",)]
        cur.execute("SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%' ORDER BY 1")
        assert cur.fetchall() == [("analyst",), ("dpgateway",)]  # no analyst's name
        # a policy table named only inside a string reaches the shadow, which has no row to give
        cur.execute("SELECT query_to_xml('select count(*) as n from pums', false, false, '')::text")
        assert "<n>0</n>" in cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pums%'")
        assert cur.fetchone() == (0,)  # track_activities is off: no session sees another's statements
        for write in ("lo_create(0)", "pg_terminate_backend(1)", "pg_advisory_lock(1)", "pg_notify('a', 'b')"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="permission denied for function"):
                cur.execute(f"SELECT pg_catalog.{write}")
        with pytest.raises(psycopg2.Error, match=r"read-only transaction|permission denied"):
            cur.execute("WITH d AS (DELETE FROM pg_catalog.pg_description RETURNING 1) SELECT 1")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="permission denied"):
            cur.execute("SELECT pg_catalog.pg_read_file('/etc/passwd')")


def test_a_policy_table_always_takes_the_dp_path(catalog_wire: Running) -> None:
    with contextlib.closing(psycopg2.connect(catalog_wire.dsn())) as conn, conn.cursor() as cur:
        conn.autocommit = True
        for sql in ("SELECT * FROM pums", "SELECT * FROM public.pums", 'SELECT * FROM "pums"', "TABLE pums"):
            with pytest.raises(psycopg2.Error, match=r"would release raw rows|not supported|syntax") as info:
                cur.execute(sql)
            assert info.value.pgcode != "42P01", sql  # the shadow would say 'relation does not exist' or 0 rows
        cur.execute("SELECT relname FROM pg_class WHERE relname = 'pums'")
        assert cur.fetchall() == [("pums",)]
