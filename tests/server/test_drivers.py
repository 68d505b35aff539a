"""psycopg 3, asyncpg and pg8000 (extended protocol, binary formats, named statements) and psql."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from conftest import PASSWORD, Running

psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")
pg8000 = pytest.importorskip("pg8000.native")


def test_psycopg3_server_side_binding_and_prepared_statements(wire: Running) -> None:
    with psycopg.connect(wire.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT COUNT(*) AS n FROM pums WHERE age > %s", (40,)).fetchone()
        assert isinstance(row[0], int)
        for _ in range(3):  # prepare=True: a named statement, parsed once
            cur = conn.execute("SELECT COUNT(*) AS n FROM pums WHERE age > %s", (40,), prepare=True)
            assert isinstance(cur.fetchone()[0], int)
        cur = conn.cursor(binary=True)
        cur.execute("SELECT sex, COUNT(*) AS n FROM pums WHERE income > %s GROUP BY sex ORDER BY sex", (1000.5,))
        assert [r[0] for r in cur.fetchall()] == [0, 1]
        assert conn.execute("SELECT %s::text AS s, %s AS b", ("o'x; --", True)).fetchone() == ("o'x; --", True)


def test_psycopg3_error_then_rollback(wire: Running) -> None:
    with psycopg.connect(wire.dsn()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="would release raw rows"):
            conn.execute("SELECT * FROM pums")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="current transaction is aborted"):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_asyncpg_describe_before_bind_and_binary_results(wire: Running) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(
            host=wire.host, port=wire.port, user="alice", password=PASSWORD, database="dpgateway"
        )
        try:
            before = await conn.fetchval("SHOW dp.budget")
            statement = await conn.prepare("SELECT COUNT(*) AS n FROM pums WHERE age > $1")
            assert [a.name for a in statement.get_parameters()] == ["int8"]
            assert [a.type.name for a in statement.get_attributes()] == ["int8"]
            assert await conn.fetchval("SHOW dp.budget") == before  # Describe spent nothing
            rows = await statement.fetch(30)
            assert isinstance(rows[0]["n"], int)
            assert await conn.fetchval("SELECT 1") == 1
            async with conn.transaction():  # a cursor with prefetch=1: Execute max_rows 1, PortalSuspended
                sql = "SELECT sex, COUNT(*) AS n FROM pums GROUP BY sex ORDER BY sex"
                keys = [r["sex"] async for r in conn.cursor(sql, prefetch=1)]
            assert keys == [0, 1]
        finally:
            await conn.close()

    asyncio.run(run())


def test_pg8000(wire: Running) -> None:
    conn = pg8000.Connection("alice", host=wire.host, port=wire.port, password=PASSWORD, database="dpgateway")
    try:
        rows = conn.run("SELECT COUNT(*) AS n FROM pums WHERE age > :age", age=20)
        assert isinstance(rows[0][0], int)
        with pytest.raises(pg8000.DatabaseError, match="42501"):
            conn.run("SELECT * FROM pums")
        assert conn.run("SELECT 1") == [[1]]
    finally:
        conn.close()


def test_psql(wire: Running) -> None:
    if shutil.which("psql") is None:
        if os.environ.get("CI"):
            pytest.fail("psql is missing in CI: install postgresql-client")
        pytest.skip("psql is not installed (apt-get install -y postgresql-client)")
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    command = ["psql", "-X", "-h", wire.host, "-p", str(wire.port), "-U", "alice", "-d", "dpgateway"]
    done = subprocess.run(
        [*command, "-A", "-t", "-c", "SELECT COUNT(*) AS n FROM pums WHERE age > 30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit() and "dp: spent epsilon" in done.stderr
    bad = subprocess.run(
        [*command, "-c", "SELECT * FROM pums"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert bad.returncode == 1 and "ERROR:" in bad.stderr
