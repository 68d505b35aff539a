"""Differential validation: each client runs the same cases against a real PostgreSQL 15 holding the demo schema
and rows (``reference_pg``, the oracle) and against the gateway with its shadow catalog; the answers' shapes must
agree. A shape is what a client or tool builds on: column names, type OIDs, the row count, the command's
success, the SQLSTATE of an error, and the rows themselves where they are not noisy (catalog and session
answers). Noisy DP values are never compared.

Cases where the gateway differs on purpose are not here: ``SELECT *`` of a policy table (refused, 42501), DP
notices, ``SHOW dp.*``, and the list of databases and their owners and privileges (the shadow has only its own
database, owned by its own role).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Running

psycopg = pytest.importorskip("psycopg")
psycopg2 = pytest.importorskip("psycopg2")
asyncpg = pytest.importorskip("asyncpg")
pg8000 = pytest.importorskip("pg8000.native")


@dataclass(frozen=True)
class Case:
    sql: str
    rows: bool = False  # compare the rows too (not noisy)


CASES = [
    Case("SELECT 1", rows=True),
    Case("SELECT 1 AS a, 'x' AS b, 2.5 AS c, true AS d", rows=True),
    Case("SELECT -1 AS neg, 2147483648 AS big, false AS f, 'y' AS s, 0", rows=True),  # literals: the session's
    Case("SELECT COUNT(*) AS n FROM pums WHERE age > 30"),
    Case("SELECT COUNT(*) FROM pums"),
    Case("SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income FROM pums GROUP BY sex ORDER BY sex"),
    Case("SELECT SUM(age) AS s, AVG(age) AS a, SUM(income) AS si, AVG(income) AS ai FROM pums"),
    Case("SELECT STDDEV(age) AS sd, VARIANCE(income) AS v FROM pums"),
    Case("SELECT married, sex, COUNT(*) AS n FROM pums GROUP BY married, sex ORDER BY married, sex"),
    Case("SELECT * FROM pums_nope"),
    Case("SELEC 1"),
    Case("SELECT COUNT(*) FROM pums WHERE nope > 1"),
    Case("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", rows=True),
    Case(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'pums' "
        "ORDER BY ordinal_position",
        rows=True,
    ),
    Case("SELECT current_schema(), session_user", rows=True),
    Case("SELECT current_database(), current_user", rows=True),
    Case("select pg_catalog.version()"),
    Case("SHOW transaction isolation level", rows=True),
    Case("SHOW standard_conforming_strings", rows=True),
    Case("SHOW search_path", rows=True),
    Case(
        "SELECT t.oid, typarray FROM pg_type t JOIN pg_namespace ns ON typnamespace = ns.oid WHERE typname = 'hstore'",
        rows=True,
    ),
    Case("SET application_name = 'differential'"),
]
IDS = [case.sql[:40] for case in CASES]


def _compare(run: Callable[[Running, Case], Any], reference: Running, gateway: Running) -> None:
    """Every case against both; all differences reported at once."""
    differences = []
    for case in CASES:
        expected, got = run(reference, case), run(gateway, case)
        if expected != got:
            differences.append(f"{case.sql}\n  PostgreSQL: {expected}\n  gateway:    {got}")
    assert not differences, "shapes differ:\n" + "\n".join(differences)


def test_psycopg2_simple_protocol(reference_pg: Running, catalog_wire: Running) -> None:
    def run(target: Running, case: Case) -> Any:
        conn = psycopg2.connect(target.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(case.sql)
                if cur.description is None:
                    return ("ok", cur.statusmessage)
                columns = [(d.name, d.type_code) for d in cur.description]
                rows = cur.fetchall()
                return ("ok", columns, len(rows), rows if case.rows else None)
        except psycopg2.Error as exc:
            return ("error", exc.pgcode)
        finally:
            conn.close()

    _compare(run, reference_pg, catalog_wire)


def test_psycopg3_extended_protocol_binary(reference_pg: Running, catalog_wire: Running) -> None:
    def run(target: Running, case: Case) -> Any:
        with psycopg.connect(target.dsn(), autocommit=True) as conn:
            try:
                cur = conn.cursor(binary=True)
                cur.execute(case.sql, prepare=True)
                if cur.description is None:
                    return ("ok", cur.statusmessage)
                columns = [(d.name, d.type_code) for d in cur.description]
                rows = cur.fetchall()
                return ("ok", columns, len(rows), rows if case.rows else None)
            except psycopg.Error as exc:
                return ("error", exc.sqlstate)

    _compare(run, reference_pg, catalog_wire)


def test_asyncpg_describe_before_bind(reference_pg: Running, catalog_wire: Running) -> None:
    async def shape(target: Running, case: Case) -> Any:
        conn = await asyncpg.connect(
            host=target.host, port=target.port, user="alice", password=PASSWORD, database="dpgateway"
        )
        try:
            if case.sql.upper().startswith("SET"):
                return ("ok", await conn.execute(case.sql))
            statement = await conn.prepare(case.sql)
            columns = [(a.name, a.type.oid) for a in statement.get_attributes()]
            rows = [tuple(r) for r in await statement.fetch()]
            return ("ok", columns, len(rows), rows if case.rows else None)
        except asyncpg.PostgresError as exc:
            return ("error", exc.sqlstate)
        finally:
            await conn.close()

    _compare(lambda target, case: asyncio.run(shape(target, case)), reference_pg, catalog_wire)


def test_pg8000(reference_pg: Running, catalog_wire: Running) -> None:
    def run(target: Running, case: Case) -> Any:
        conn = pg8000.Connection("alice", host=target.host, port=target.port, password=PASSWORD, database="dpgateway")
        try:
            rows = conn.run(case.sql)
            if conn.columns is None:
                return ("ok", None)
            columns = [(c["name"], c["type_oid"]) for c in conn.columns]
            return ("ok", columns, len(rows), rows if case.rows else None)
        except pg8000.DatabaseError as exc:
            return ("error", exc.args[0]["C"])
        finally:
            conn.close()

    _compare(run, reference_pg, catalog_wire)


def _psql(target: Running, *args: str) -> tuple[int, str, str]:
    if shutil.which("psql") is None:
        if os.environ.get("CI"):
            pytest.fail("psql is missing in CI: install postgresql-client")
        pytest.skip("psql is not installed (apt-get install -y postgresql-client)")
    command = ["psql", "-X", "-v", "VERBOSITY=verbose", "-h", target.host, "-p", str(target.port)]
    command += ["-U", "alice", "-d", "dpgateway", *args]
    done = subprocess.run(
        command, env=dict(os.environ, PGPASSWORD=PASSWORD), capture_output=True, text=True, timeout=30, check=False
    )
    first_error = next((line for line in done.stderr.splitlines() if line.startswith("ERROR:")), "")
    return done.returncode, done.stdout, first_error.split(":")[1].strip() if first_error else ""


@pytest.mark.parametrize(
    "command",
    [r"\dt", r"\d pums", r"\dn", r"\d+ pums", r"\dt pums", r"\dv", r"\di", "SELECT * FROM pums_nope", "SELEC 1"],
)
def test_psql_describes_and_errors_like_postgresql(reference_pg: Running, catalog_wire: Running, command: str) -> None:
    assert _psql(catalog_wire, "-c", command) == _psql(reference_pg, "-c", command)


@pytest.mark.slow
def test_jdbc_metadata_like_postgresql(reference_pg: Running, catalog_wire: Running, tmp_path: Path) -> None:
    from test_jdbc import JAR, PROGRAM, _tools

    java, javac = _tools()
    (tmp_path / "Probe.java").write_text(PROGRAM)
    subprocess.run([javac, "-cp", str(JAR), "-d", str(tmp_path), str(tmp_path / "Probe.java")], check=True, timeout=120)

    def probe(target: Running) -> dict[str, str]:
        url = f"jdbc:postgresql://{target.host}:{target.port}/dpgateway"
        done = subprocess.run(
            [java, "-cp", f"{JAR}{os.pathsep}{tmp_path}", "Probe", url, PASSWORD],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
        for differs in ("notice", "refused", "catalogs"):  # DP notice, SELECT * refused, the shadow's one database
            lines.pop(differs)
        return lines

    assert probe(catalog_wire) == probe(reference_pg)
