"""Prepared copies of PostgreSQL tables (connectors/postgres_copy.py): the same exact aggregates as on the fly,
never read once the source may have changed, private to the gateway's role, built in the background."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
import pytest
import sqlalchemy as sa
from conftest import PUMS_COLUMNS, READER, URL_ENV, PostgresDatabase, exact, pums_frame, sorted_rows

from dpgateway import Gateway
from dpgateway.connectors import postgres_copy
from dpgateway.connectors.postgres_copy import setup_sql
from dpgateway.errors import PrerequisiteError, PrivacyViolationError
from dpgateway.policies.loader import parse_config

pytestmark = pytest.mark.postgres

SCHEMA = "dpgateway"
WEIGHTED = "SELECT sex, COUNT(*) AS n, SUM(income) AS s, AVG(age) AS a FROM pums GROUP BY sex"
ROWS = "SELECT educ, COUNT(*) AS n, SUM(income) AS s FROM pums GROUP BY educ"
FILTERED = "SELECT sex, COUNT(*) AS n, SUM(income) AS s FROM pums WHERE age > 40 GROUP BY sex"
SCALAR = "SELECT COUNT(*) AS n, SUM(income) AS s FROM pums"


def admin(pg: PostgresDatabase, *statements: str) -> None:
    with psycopg2.connect(pg.admin_url) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    conn.close()


def install(pg: PostgresDatabase, table: str) -> None:
    """The docs' setup SQL, run as the superuser (schema, log and function once; the trigger on ``table``)."""
    relation = postgres_copy._table("census", table)
    admin(pg, setup_sql(SCHEMA, relation, READER))


@pytest.fixture
def db(pg_database: PostgresDatabase, monkeypatch: pytest.MonkeyPatch) -> PostgresDatabase:
    monkeypatch.setenv(URL_ENV, pg_database.reader_url)
    return pg_database


def gateway(tmp_path: Path, table: str, **prepare: Any) -> Gateway:
    source = {"connector": "postgres", "url": {"$env": URL_ENV}, "table": f"census.{table}"}
    spec = {"source": source, "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": PUMS_COLUMNS}
    budget = {"per_subject": {"epsilon": 1e6}, "per_analyst": {"epsilon": 1e6}, "per_query": {"epsilon": 10.0}}
    raw = {
        "tables": {"pums": spec},
        "budget": budget,
        "ledger": f"sqlite:///{tmp_path / 'l.db'}",
        "cache_dir": str(tmp_path / "cache"),
        "prepare": {"auto": False, **prepare},
    }
    return Gateway(parse_config(raw, base_dir=tmp_path))


@pytest.fixture
def pums(db: PostgresDatabase, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh copy of the PUMS sample with the change trigger installed; its table name."""
    name = f"pums_{request.node.name.split('[')[0][-20:]}_{abs(hash(request.node.nodeid)) % 10**6}"
    db.load(name, pums_frame())
    install(db, name)
    yield name


def as_role(pg: PostgresDatabase, role: str) -> str:
    return sa.make_url(pg.admin_url).set(username=role, password=None).render_as_string(hide_password=False)


def read_copy(gw: Gateway, sql: str) -> bool:
    plan = gw.explain(sql).plan
    assert plan is not None
    return plan.prepared is not None


@pytest.mark.parametrize("sql", [WEIGHTED, ROWS, FILTERED, SCALAR], ids=["weighted", "rows", "bound-first", "scalar"])
def test_the_copy_gives_the_on_the_fly_aggregates_exactly(
    db: PostgresDatabase, pums: str, tmp_path: Path, sql: str
) -> None:
    with gateway(tmp_path, pums, filtered="bound_first") as gw:
        before = exact(gw, sql)
        assert not read_copy(gw, sql)
        copy = gw.prepare("pums")
        assert copy.path.startswith(f"{SCHEMA}.") and read_copy(gw, sql)
        plan = gw.explain(sql).plan
        assert plan is not None and f'"{SCHEMA}"' in plan.bounded_sql
        if sql == ROWS:
            assert plan.rewrite == "rows"
        after = exact(gw, sql)
    assert after.columns == before.columns
    assert sorted_rows(after) == sorted_rows(before)


WRITES = {
    "insert": ["INSERT INTO census.{t} SELECT * FROM census.{t} LIMIT 1"],
    "update": ["UPDATE census.{t} SET income = income + 1 WHERE pid = (SELECT min(pid) FROM census.{t})"],
    "delete": ["DELETE FROM census.{t} WHERE pid = (SELECT min(pid) FROM census.{t})"],
    "truncate": ["TRUNCATE census.{t}"],
    "no-op update": ["UPDATE census.{t} SET income = income WHERE false"],
    "replica role": ["SET session_replication_role = replica", "DELETE FROM census.{t} WHERE age > 50"],
    "drop and re-create": [
        "CREATE TABLE census.{t}_keep AS SELECT * FROM census.{t}",
        "DROP TABLE census.{t}",
        "ALTER TABLE census.{t}_keep RENAME TO {t}",
        "GRANT SELECT ON census.{t} TO " + READER,
    ],
    "rewrite in place": ["ALTER TABLE census.{t} ALTER COLUMN income TYPE double precision USING income * 2"],
}


@pytest.mark.parametrize("write", list(WRITES))
def test_any_write_makes_the_copy_unused(db: PostgresDatabase, pums: str, tmp_path: Path, write: str) -> None:
    """Every statement that may change the source leaves the copy unread: queries bound on the fly and give
    what a gateway without any copy gives (never a stale read); preparing again makes it used again."""
    with gateway(tmp_path, pums) as gw:
        gw.prepare("pums")
        assert read_copy(gw, WEIGHTED)
        admin(db, *(s.format(t=pums) for s in WRITES[write]))
        if write == "drop and re-create":  # the trigger went with the old table: a copy cannot be built again
            assert not read_copy(gw, WEIGHTED)
            with pytest.raises(PrerequisiteError, match="no trigger dpgateway_changes") as refused:
                gw.prepare("pums")
            assert refused.value.sqlstate == "55000"
            return
        assert not read_copy(gw, WEIGHTED)
        fresh = sorted_rows(exact(gw, WEIGHTED))
        gw.prepare("pums")
        assert read_copy(gw, WEIGHTED)
        assert sorted_rows(exact(gw, WEIGHTED)) == fresh


def test_cascaded_deletes_and_copy_from_make_the_copy_unused(db: PostgresDatabase, pums: str, tmp_path: Path) -> None:
    """Rows changed by a foreign key's ON DELETE CASCADE (from another table's statement) or loaded by COPY
    FROM fire the statement trigger too."""
    admin(
        db,
        f"CREATE TABLE census.{pums}_people AS SELECT DISTINCT pid FROM census.{pums}",
        f"ALTER TABLE census.{pums}_people ADD PRIMARY KEY (pid)",
        f"ALTER TABLE census.{pums} ADD FOREIGN KEY (pid) REFERENCES census.{pums}_people ON DELETE CASCADE",
    )
    with gateway(tmp_path, pums) as gw:
        gw.prepare("pums")
        assert read_copy(gw, WEIGHTED)
        admin(db, f"DELETE FROM census.{pums}_people WHERE pid = (SELECT min(pid) FROM census.{pums}_people)")
        assert not read_copy(gw, WEIGHTED)
        gw.prepare("pums")
        assert read_copy(gw, WEIGHTED)
        with psycopg2.connect(db.admin_url) as conn, conn.cursor() as cur:
            buffer = io.StringIO()
            cur.copy_expert(f"COPY (SELECT * FROM census.{pums} LIMIT 2) TO STDOUT", buffer)
            buffer.seek(0)
            cur.copy_expert(f"COPY census.{pums} FROM STDIN", buffer)
        conn.close()
        assert not read_copy(gw, WEIGHTED)


def test_the_docs_give_the_setup_sql_the_gateway_prints() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "backends.md").read_text()
    assert setup_sql(SCHEMA, postgres_copy._table("census", "pums"), READER) in docs


def test_a_missing_trigger_refuses_with_the_sql_to_run(db: PostgresDatabase, tmp_path: Path) -> None:
    db.load("untriggered", pums_frame())
    install(db, "untriggered")
    admin(db, "DROP TRIGGER dpgateway_changes ON census.untriggered")
    with gateway(tmp_path, "untriggered") as gw:
        with pytest.raises(
            PrerequisiteError, match=r"(?s)no trigger dpgateway_changes.*CREATE OR REPLACE TRIGGER"
        ) as refused:
            gw.prepare("pums")
        assert refused.value.sqlstate == "55000"
        assert "ENABLE ALWAYS TRIGGER dpgateway_changes" in refused.value.message
        assert not read_copy(gw, WEIGHTED)


CHANGES = {  # what is changed after the build, and whether a build is then refused
    "disabled": (["ALTER TABLE census.{t} DISABLE TRIGGER dpgateway_changes"], True),
    "origin-only": (["ALTER TABLE census.{t} ENABLE TRIGGER dpgateway_changes"], True),  # replica writes missed
    "disable-write-enable": (  # the version did not move, the trigger's catalog row did
        [
            "ALTER TABLE census.{t} DISABLE TRIGGER dpgateway_changes",
            "DELETE FROM census.{t} WHERE age > 50",
            "ALTER TABLE census.{t} ENABLE ALWAYS TRIGGER dpgateway_changes",
        ],
        False,
    ),
    "all-triggers": (
        [
            "ALTER TABLE census.{t} DISABLE TRIGGER ALL",
            "ALTER TABLE census.{t} ENABLE ALWAYS TRIGGER dpgateway_changes",
        ],
        False,
    ),
    "function-replaced": (
        [
            "CREATE OR REPLACE FUNCTION dpgateway.note_change() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "AS $$BEGIN RETURN NULL; END$$",
            "DELETE FROM census.{t} WHERE age > 50",
        ],
        True,
    ),
    "row-level-security": (["ALTER TABLE census.{t} ENABLE ROW LEVEL SECURITY"], True),
    "inheritance-child": (["CREATE TABLE census.{t}_child () INHERITS (census.{t})"], True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_trigger_that_may_miss_writes_never_lets_the_copy_be_read(
    db: PostgresDatabase, pums: str, tmp_path: Path, change: str
) -> None:
    statements, refused = CHANGES[change]
    with gateway(tmp_path, pums) as gw:
        gw.prepare("pums")
        assert read_copy(gw, WEIGHTED)
        try:
            admin(db, *(s.format(t=pums) for s in statements))
            assert not read_copy(gw, WEIGHTED)
            if refused:
                with pytest.raises(PrerequisiteError, match="cannot be prepared on postgres") as raised:
                    gw.prepare("pums")
                assert raised.value.sqlstate == "55000"
            else:  # the trigger is as set up again: a new build is used
                gw.prepare("pums")
                assert read_copy(gw, WEIGHTED)
        finally:
            install(db, pums)  # the function restored for the next tests


def test_writers_need_no_privilege_on_the_gateways_schema(db: PostgresDatabase, pums: str, tmp_path: Path) -> None:
    """The trigger function runs as the gateway's role (SECURITY DEFINER): a writer with only INSERT on the
    source still bumps the version, and cannot read the log or the copy."""
    admin(
        db,
        "DO $$ BEGIN CREATE ROLE dpgateway_writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"GRANT USAGE ON SCHEMA census TO dpgateway_writer; GRANT SELECT, INSERT ON census.{pums} TO dpgateway_writer",
    )
    writer = as_role(db, "dpgateway_writer")
    with gateway(tmp_path, pums) as gw:
        gw.prepare("pums")
        with psycopg2.connect(writer) as conn, conn.cursor() as cur:
            cur.execute(f"INSERT INTO census.{pums} SELECT * FROM census.{pums} LIMIT 3")
        conn.close()
        assert not read_copy(gw, WEIGHTED)


def test_the_copy_is_readable_by_the_gateways_role_only(db: PostgresDatabase, pums: str, tmp_path: Path) -> None:
    admin(
        db,
        "DO $$ BEGIN CREATE ROLE dpgateway_other LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO dpgateway_other",  # even with the schema visible
    )
    other = as_role(db, "dpgateway_other")
    with gateway(tmp_path, pums) as gw:
        copy = gw.prepare("pums")
    schema, name = copy.path.split(".")
    with psycopg2.connect(other) as conn, conn.cursor() as cur:
        cur.execute("SELECT has_table_privilege(%s, 'SELECT')", (f'"{schema}"."{name}"',))
        assert cur.fetchone() == (False,)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(f'SELECT count(*) FROM "{schema}"."{name}"')
    conn.close()
    with psycopg2.connect(db.admin_url) as conn, conn.cursor() as cur:
        cur.execute(  # every privilege on the copy is its owner's, the gateway's role
            "SELECT pg_get_userbyid(c.relowner), array_agg(DISTINCT pg_get_userbyid(a.grantee)) FROM pg_class AS c, "
            "aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) AS a WHERE c.oid = to_regclass(%s) "
            "GROUP BY c.relowner",
            (copy.path,),
        )
        assert cur.fetchone() == (READER, [READER])
    conn.close()
    admin(db, f"REVOKE USAGE ON SCHEMA {SCHEMA} FROM dpgateway_other")


def test_default_privileges_that_would_share_the_copy_refuse_it(
    db: PostgresDatabase, pums: str, tmp_path: Path
) -> None:
    admin(
        db,
        "DO $$ BEGIN CREATE ROLE dpgateway_other LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {READER} IN SCHEMA {SCHEMA} GRANT SELECT ON TABLES TO dpgateway_other",
    )
    try:
        with gateway(tmp_path, pums) as gw:
            with pytest.raises(PrivacyViolationError, match="readable by roles other than") as refused:
                gw.prepare("pums")
            assert refused.value.sqlstate == "42501"
            assert not read_copy(gw, WEIGHTED)
    finally:
        admin(
            db,
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {READER} IN SCHEMA {SCHEMA} REVOKE SELECT ON TABLES FROM dpgateway_other",
        )


def test_one_person_with_many_rows_moves_each_aggregate_by_at_most_its_sensitivity(
    db: PostgresDatabase, tmp_path: Path
) -> None:
    """Over the copy: a person with 1000 rows (incomes beyond the bounds, spread over groups) moves
    every exact aggregate, summed over all groups (L1), by at most the measurement's sensitivity, for
    both rewrites; and it moves them (the test could fail)."""
    base = pums_frame()
    heavy = pd.DataFrame({c: [base[c].iloc[0]] * 1000 for c in base.columns})
    heavy["pid"] = -1
    heavy["income"] = [10.0**7 + i for i in range(1000)]
    heavy["sex"] = [i % 2 for i in range(1000)]
    heavy["educ"] = [i % 7 for i in range(1000)]
    db.load("with_heavy", pd.concat([base, heavy], ignore_index=True))
    db.load("without_heavy", base)
    results: dict[tuple[str, str], dict[Any, tuple[Any, ...]]] = {}
    plans = {}
    for name in ("with_heavy", "without_heavy"):
        install(db, name)
        (tmp_path / name).mkdir()
        with gateway(tmp_path / name, name) as gw:
            gw.prepare("pums")
            for sql in (WEIGHTED, ROWS):
                plan = gw.explain(sql).plan
                assert plan is not None and plan.prepared is not None
                plans[sql] = plan
                found = exact(gw, sql)
                keys = [found.columns.index(k.name) for k in plan.group_keys]
                results[name, sql] = {
                    tuple(row[i] for i in keys): dict(zip(found.columns, row, strict=True)) for row in found.rows
                }
    for sql in (WEIGHTED, ROWS):
        with_, without = results["with_heavy", sql], results["without_heavy", sql]
        for m in plans[sql].measurements:
            moved = sum(
                abs((with_.get(g, {}).get(m.name) or 0) - (without.get(g, {}).get(m.name) or 0))
                for g in set(with_) | set(without)
            )
            assert 0 < moved <= m.sensitivity, (sql, m.name, moved, m.sensitivity)


def test_automatic_preparation_builds_in_the_background_and_never_blocks(
    db: PostgresDatabase, pums: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gateway(tmp_path, pums, auto=True, after_queries=2) as gw:
        release = threading.Event()
        started = threading.Event()
        build = gw.connector.copies.build  # type: ignore[union-attr]

        def slow_build(*args: Any) -> Any:
            started.set()
            assert release.wait(30)
            return build(*args)

        monkeypatch.setattr(gw.connector.copies, "build", slow_build)
        for i in range(2):  # two different queries (an identical one is replayed from the answer cache)
            gw.query(WEIGHTED, analyst="a", epsilon=1.0 + i)
        assert started.wait(30)
        answer = gw.query(WEIGHTED, analyst="a", epsilon=3.0)  # answered while the build waits
        assert answer.plan is not None and answer.plan.prepared is None
        release.set()
        gw.auto_prepare.wait(60)
        assert read_copy(gw, WEIGHTED)


def test_automatic_preparation_without_the_trigger_keeps_answering(db: PostgresDatabase, tmp_path: Path) -> None:
    db.load("auto_untriggered", pums_frame())
    with gateway(tmp_path, "auto_untriggered", auto=True, after_queries=1) as gw:
        for i in range(3):
            gw.query(WEIGHTED, analyst="a", epsilon=1.0 + i)
            gw.auto_prepare.wait(60)
        assert not read_copy(gw, WEIGHTED)
