"""Prepared copies of PostgreSQL tables: a table in the gateway's own schema, used only while a trigger's
change count, the source's catalog identity and the copy's privacy all read as when it was built.

Layout (``copy_schema`` on the source, default ``dpgateway``; the DBA creates it once with
:func:`setup_sql`: the gateway's role gets USAGE and CREATE on it and SELECT on the change log, PUBLIC
nothing)::

    <schema>.source_changes (relid oid, n bigint)   one row per statement that changed a watched table
    <schema>.note_change()                          SECURITY DEFINER trigger function appending that row
    <source> trigger dpgateway_changes              AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE, FOR EACH
                                                    STATEMENT, ENABLE ALWAYS (fires under replica too)
    <schema>.<table>__<policy digest>               the copy: prepared_copy_tree's rows (passes/bounding.py)

Only the build writes, on its own connection in one REPEATABLE READ read-write transaction: the catalog
check (:func:`state_tree`), ``CREATE TABLE <copy>__new AS <verified copy SELECT>``, ``REVOKE ALL ... FROM
PUBLIC``, drop of the old copy, rename, ``ANALYZE``, the catalog check again (recorded in the manifest),
commit. Queries keep their READ ONLY transactions on the pool; they read the copy like a source. Every
statement is a sqlglot tree verified by :func:`dpgateway.sqlcheck.verify_statement` (the copy SELECT by
:func:`~dpgateway.sqlcheck.verify` first); identifiers come from the config only, validated and quoted.

Proof note (a copy is read only while it equals its source). The trigger appends a row to
``source_changes`` in the transaction of every INSERT, UPDATE, DELETE, TRUNCATE, COPY, MERGE (and
foreign-key cascade) statement on the source, so in any MVCC snapshot ``version = SUM(n)`` over the source's
rows counts exactly the committed statements that could have changed it, and never decreases (rows are
only appended; appends never conflict, so writers at any isolation level are not made to fail). The build
reads the version and the source rows in one snapshot, so the copy is the source at that version. A later
query uses the copy only if a catalog check run for it (one round trip, before planning) returns exactly
the state recorded at the build: the same version, the same source oid (a dropped and re-created table is
a new oid), ``relfilenode`` (a rewrite: TRUNCATE, ALTER COLUMN TYPE, VACUUM FULL), column list and types,
ordinary table with no row-level security and no inheritance children (writes to a child or partition do
not fire the parent's statement trigger), the trigger with its exact type (AFTER, statement, the four
events, every column, no WHEN), enabled ALWAYS, on our function, whose body and SECURITY DEFINER are
checked, and the ``xmin`` of the trigger's and the function's catalog rows (an ``ALTER TABLE ... DISABLE
TRIGGER`` and re-enable, or a function replaced and restored, writes new catalog row versions, so a write
made while the trigger did not fire is never hidden by a later re-enable), and the copy's oid and
privileges (owner only). With the same version, no committed statement changed the source after the
build's snapshot, so the copy's rows are the source's rows in the check's snapshot, and the answer equals
the on-the-fly answer at that instant (as the DuckDB file check, dpgateway/prepare.py: a write committed
between the check and the query is not in the answer, as it would not be in a query whose snapshot was
taken at the check). Limits (docs/backends.md): a superuser can write without firing any trigger
(``ALTER TABLE ... DISABLE TRIGGER`` is seen; changing the catalog by hand or writing the heap files is
not), and an ``xmin`` equal after 2^32 transactions is treated as unchanged. Tests:
tests/backends/test_postgres_copy.py.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg2
import psycopg2.extensions
import sqlglot
from sqlglot import exp

from dpgateway.connectors.base import CopyStore
from dpgateway.errors import BackendError, PrerequisiteError, PrivacyViolationError
from dpgateway.policies.model import Table
from dpgateway.sqlcheck import VerifiedSQL, verify_statement

TRIGGER = "dpgateway_changes"
LOG = "source_changes"
FUNCTION = "note_change"
# AFTER (no BEFORE bit 2), FOR EACH STATEMENT (no ROW bit 1), INSERT 4 | DELETE 8 | UPDATE 16 | TRUNCATE 32
TRIGGER_TYPE = 4 | 8 | 16 | 32
NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_WITHHELD = "details are withheld because they may contain data values"


def function_body(schema: str) -> str:
    """The trigger function's body (checked against ``pg_proc.prosrc`` before a copy is used)."""
    return f"BEGIN INSERT INTO {_quoted(schema)}.{LOG} (relid) VALUES (TG_RELID); RETURN NULL; END"


def setup_sql(schema: str, source: exp.Table, role: str = "<gateway role>") -> str:
    """The SQL a DBA runs once per database (schema, change log, function) and once per source table (trigger)."""
    s, relation = _quoted(schema), source.sql("postgres")
    return "\n".join(
        [
            "-- once per database, as a superuser or the database owner (who then owns the change log and function):",
            f"CREATE SCHEMA IF NOT EXISTS {s};",
            f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC;",
            f"GRANT USAGE, CREATE ON SCHEMA {s} TO {role};",
            f"CREATE TABLE IF NOT EXISTS {s}.{LOG} (relid oid NOT NULL, n bigint NOT NULL DEFAULT 1);",
            f"CREATE INDEX IF NOT EXISTS {LOG}_relid ON {s}.{LOG} (relid);",
            f"REVOKE ALL ON TABLE {s}.{LOG} FROM PUBLIC;",
            f"GRANT SELECT ON TABLE {s}.{LOG} TO {role};",
            f"CREATE OR REPLACE FUNCTION {s}.{FUNCTION}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER",
            f"  SET search_path = pg_catalog, pg_temp AS $body${function_body(schema)}$body$;",
            f"REVOKE ALL ON FUNCTION {s}.{FUNCTION}() FROM PUBLIC;",
            "-- once per source table, as its owner or a superuser (a non-superuser owner first needs:",
            f"-- GRANT USAGE ON SCHEMA {s} TO owner; GRANT EXECUTE ON FUNCTION {s}.{FUNCTION}() TO owner)",
            f"CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {relation}",
            f"  FOR EACH STATEMENT EXECUTE FUNCTION {s}.{FUNCTION}();",
            f"ALTER TABLE {relation} ENABLE ALWAYS TRIGGER {TRIGGER};",
        ]
    )


def _quoted(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql("postgres")


def _table(schema: str, name: str) -> exp.Table:
    return exp.Table(this=exp.to_identifier(name, quoted=True), db=exp.to_identifier(schema, quoted=True))


def _catalog(name: str, alias: str) -> exp.Table:
    return exp.Table(
        this=exp.to_identifier(name),
        db=exp.to_identifier("pg_catalog"),
        alias=exp.TableAlias(this=exp.to_identifier(alias)),
    )


def _alias(table: exp.Table, alias: str) -> exp.Table:
    table.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
    return table


def _concat(*parts: exp.Expr) -> exp.Expr:
    """``a || b || ...`` as the postgres parser reads it back (left-deep)."""
    tree = parts[0]
    for part in parts[1:]:
        tree = exp.DPipe(this=tree, expression=part, safe=True)
    return tree


def _regclass(relation: exp.Table) -> exp.Expr:
    return exp.Anonymous(this="to_regclass", expressions=[exp.Literal.string(relation.sql("postgres"))])


def _col(name: str, table: str) -> exp.Column:
    return exp.column(name, table=table)


def _text(value: exp.Expr, name: str) -> exp.Expr:
    return exp.alias_(exp.cast(value, "TEXT"), name)


def _bigint(value: exp.Expr, name: str) -> exp.Expr:
    return exp.alias_(exp.cast(value, "BIGINT"), name)


def state_tree(source: exp.Table, copy: exp.Table, schema: str, *, version: bool) -> exp.Select:
    """One catalog read of everything a copy's validity depends on (proof note); ``version`` adds the change
    count (it reads the change log, so only once a build found the log)."""
    log = _table(schema, LOG)
    function = exp.Anonymous(
        this="to_regprocedure", expressions=[exp.Literal.string(f"{_quoted(schema)}.{FUNCTION}()")]
    )
    columns_text = _concat(
        exp.cast(_col("attnum", "a"), "TEXT"),
        exp.Literal.string(":"),
        exp.cast(_col("attname", "a"), "TEXT"),
        exp.Literal.string(":"),
        exp.cast(
            exp.Anonymous(this="format_type", expressions=[_col("atttypid", "a"), _col("atttypmod", "a")]), "TEXT"
        ),
    )
    attributes = (
        exp.select(
            exp.alias_(
                exp.GroupConcat(
                    this=exp.Order(this=columns_text, expressions=[exp.Ordered(this=_col("attnum", "a"))]),
                    separator=exp.Literal.string(","),
                ),
                "columns",
            )
        )
        .from_(_catalog("pg_attribute", "a"))
        .where(
            exp.and_(
                exp.EQ(this=_col("attrelid", "a"), expression=_regclass(source)),
                exp.GT(this=_col("attnum", "a"), expression=exp.Literal.number(0)),
                exp.Not(this=_col("attisdropped", "a")),
            )
        )
    )
    trigger_on = exp.and_(
        exp.EQ(this=_col("tgrelid", "t"), expression=_col("oid", "c")),
        exp.EQ(this=_col("tgname", "t"), expression=exp.Literal.string(TRIGGER)),
    )
    outputs = [
        _bigint(_col("oid", "c"), "source_oid"),
        _bigint(_col("relfilenode", "c"), "relfilenode"),
        _text(_col("relkind", "c"), "relkind"),
        exp.alias_(_col("relrowsecurity", "c"), "row_security"),
        exp.alias_(_col("relhassubclass", "c"), "has_children"),
        exp.alias_(exp.column("columns", table="a"), "columns"),
        _text(_col("xmin", "t"), "trigger_xmin"),
        _text(_col("tgenabled", "t"), "trigger_enabled"),
        _bigint(_col("tgtype", "t"), "trigger_type"),
        _text(_col("tgattr", "t"), "trigger_columns"),
        exp.alias_(exp.Is(this=_col("tgqual", "t"), expression=exp.Null()), "trigger_unconditional"),
        exp.alias_(exp.EQ(this=_col("tgfoid", "t"), expression=_col("oid", "p")), "trigger_function"),
        _text(_col("xmin", "p"), "function_xmin"),
        exp.alias_(
            exp.EQ(this=_col("prosrc", "p"), expression=exp.Literal.string(function_body(schema))), "function_body"
        ),
        exp.alias_(_col("prosecdef", "p"), "function_definer"),
        exp.alias_(exp.Not(this=exp.Is(this=_regclass(log), expression=exp.Null())), "log"),
        _bigint(_col("oid", "k"), "copy_oid"),
        _text(_col("relacl", "k"), "copy_acl"),
        _text(exp.Anonymous(this="pg_get_userbyid", expressions=[_col("relowner", "k")]), "copy_owner"),
    ]
    tree = (
        exp.select(*outputs)
        .from_(_catalog("pg_class", "c"))
        .join(_alias(exp.to_table("attributes"), "a"), join_type="cross")
        .join(_catalog("pg_trigger", "t"), on=trigger_on, join_type="left")
        .join(_catalog("pg_proc", "p"), on=exp.EQ(this=_col("oid", "p"), expression=function), join_type="left")
        .join(_catalog("pg_class", "k"), on=exp.EQ(this=_col("oid", "k"), expression=_regclass(copy)), join_type="left")
        .where(exp.EQ(this=_col("oid", "c"), expression=_regclass(source)))
        .with_("attributes", as_=attributes)
    )
    if version:
        count = exp.Coalesce(this=exp.Sum(this=exp.column("n")), expressions=[exp.Literal.number(0)])
        changes = (
            exp.select(exp.alias_(count, "version"))
            .from_(log)
            .where(exp.EQ(this=exp.column("relid"), expression=_regclass(source)))
        )
        tree = (
            tree.select(_bigint(exp.column("version", table="v"), "version"))
            .join(_alias(exp.to_table("changes"), "v"), join_type="cross")
            .with_("changes", as_=changes)
        )
    return tree


def problem(state: dict[str, Any] | None, schema: str) -> str | None:
    """Why no copy of a source in ``state`` can be kept valid (None: it can)."""
    if state is None:
        return "the source table was not found"
    if state["relkind"] != "r":
        return "the source is not an ordinary table (a view, a partitioned or a foreign table)"
    if state["row_security"]:
        return "the source has row-level security, so a copy could hold rows the gateway's role does not see"
    if state["has_children"]:
        return "the source has inheritance children or partitions, whose writes do not fire its trigger"
    if not state["log"]:
        return f"the change log {schema}.{LOG} does not exist (or the gateway's role cannot see it)"
    if state["trigger_xmin"] is None:
        return f"the source has no trigger {TRIGGER}"
    if not (state["trigger_function"] and state["function_body"] and state["function_definer"]):
        return f"trigger {TRIGGER} does not run {schema}.{FUNCTION}() as set up (SECURITY DEFINER, the given body)"
    if state["trigger_type"] != TRIGGER_TYPE or state["trigger_columns"] or not state["trigger_unconditional"]:
        return (
            f"trigger {TRIGGER} is not AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE FOR EACH STATEMENT on every column"
        )
    if state["trigger_enabled"] != "A":
        return f"trigger {TRIGGER} is not ENABLE ALWAYS (a disabled or origin-only trigger can miss writes)"
    return None


def private(state: dict[str, Any]) -> bool:
    """The copy is granted to nobody but its owner (``relacl`` NULL: the owner's default privileges only)."""
    acl = state.get("copy_acl")
    if state.get("copy_oid") is None:
        return False
    if acl is None:
        return True
    items = [item for item in acl.strip("{}").split(",") if item]
    owner = state.get("copy_owner")
    return all(item.split("=", 1)[0].strip('"') == owner for item in items)


class PostgresCopies(CopyStore):
    """Prepared copies in the gateway's schema of one PostgreSQL database (module docstring)."""

    def __init__(self, connector: Any, dsn: str, timeout_ms: str, settings: tuple[tuple[str, str], ...]) -> None:
        self._connector = connector
        self._dsn = dsn
        self._settings = (("statement_timeout", timeout_ms), *settings)

    def relation(self, table: Table, digest: str) -> str:
        spec = table.source
        assert isinstance(spec, dict)
        base = re.sub(r"[^a-z0-9_]", "_", table.name.lower())[:40]
        return f"{spec.get('copy_schema', 'dpgateway')}.{base}__{digest[:16]}"

    def _names(self, table: Table, digest: str) -> tuple[str, exp.Table, exp.Table]:
        schema, name = self.relation(table, digest).split(".")
        if not (NAME.match(schema) and NAME.match(name)):
            raise BackendError(f"the copy name {schema}.{name} is not a plain identifier (this is a bug)")
        return schema, self._connector.hooks.source(table), _table(schema, name)

    def state(self, table: Table, digest: str, *, version: bool = True) -> dict[str, Any] | None:
        schema, source, copy = self._names(table, digest)
        try:
            found = self._connector.read_catalog(
                verify_statement(state_tree(source, copy, schema, version=version), "postgres")
            )
        except BackendError:  # e.g. the change log was dropped: no copy is valid
            return None
        return dict(zip(found.columns, found.rows[0], strict=True)) if found.rows else None

    def build(self, table: Table, select: VerifiedSQL, digest: str) -> tuple[dict[str, Any], int]:
        schema, source, copy = self._names(table, digest)
        fresh = _table(schema, f"{copy.name[:57]}__new")
        ready = verify_statement(state_tree(source, copy, schema, version=False), "postgres")
        check = verify_statement(state_tree(source, copy, schema, version=True), "postgres")
        create = exp.Create(this=fresh, kind="TABLE", expression=_reparsed(select))
        statements = [
            verify_statement(create, "postgres"),
            verify_statement(_revoke(fresh), "postgres"),
            verify_statement(exp.Drop(tables=[copy.copy()], kind="TABLE", exists=True), "postgres"),
            verify_statement(
                exp.Alter(
                    this=fresh.copy(),
                    kind="TABLE",
                    actions=[exp.AlterRename(this=exp.Table(this=exp.to_identifier(copy.name, quoted=True)))],
                ),
                "postgres",
            ),
            verify_statement(exp.Analyze(tables=[copy.copy()]), "postgres"),
        ]
        try:
            conn = psycopg2.connect(self._dsn)
        except psycopg2.Error as exc:
            raise BackendError(f"cannot connect to build the prepared copy ({type(exc).__name__})") from None
        try:
            conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=False)
            with conn.cursor() as cursor:
                for name, value in self._settings:  # the first statement fixes the snapshot every later one reads
                    cursor.execute("SELECT set_config(%s, %s, true)", (name, value))
                why = problem(_one(cursor, ready), schema)  # the catalog only: the change log may be missing
                if why is not None:
                    raise PrerequisiteError(
                        f"table {table.name} cannot be prepared on postgres: {why}. A copy is used only while a "
                        f"trigger shows its source unchanged; run this SQL (docs/backends.md, prepared copies):\n"
                        + setup_sql(schema, source)
                    )
                _one(cursor, check)  # fails here, before any write, if the change log cannot be read
                cursor.execute(statements[0])
                rows = max(cursor.rowcount, 0)
                for statement in statements[1:]:
                    cursor.execute(statement)
                after = _one(cursor, check)
                if after is None or not private(after):
                    raise PrivacyViolationError(
                        f"the prepared copy of {table.name} would be readable by roles other than the gateway's "
                        f"(default privileges on schema {schema}?); it was not kept. Remove the grants "
                        f"(ALTER DEFAULT PRIVILEGES ... REVOKE) and prepare again"
                    )
            conn.commit()
            return after, rows
        except psycopg2.Error as exc:
            code = getattr(exc, "pgcode", None)
            raise BackendError(
                f"the backend could not build the prepared copy ({type(exc).__name__}"
                + (f", SQLSTATE {code}" if code else "")
                + f"); {_WITHHELD}. The gateway's role needs CREATE on schema {schema} (docs/backends.md)"
            ) from None
        finally:
            conn.close()  # rolls back whatever was not committed


def _one(cursor: Any, sql: VerifiedSQL) -> dict[str, Any] | None:
    cursor.execute(sql)
    row = cursor.fetchone()
    if row is None:
        return None
    names = [d[0] for d in cursor.description]
    return dict(zip(names, row, strict=True))


def _reparsed(select: VerifiedSQL) -> exp.Expr:
    """The verified copy SELECT as a tree again (what verify parsed back and compared)."""
    return sqlglot.parse_one(select, read="postgres")


def _revoke(table: exp.Table) -> exp.Revoke:
    return exp.Revoke(
        privileges=[exp.GrantPrivilege(this=exp.var("ALL"))],
        kind="TABLE",
        securable=table.copy(),
        principals=[exp.GrantPrincipal(this=exp.to_identifier("PUBLIC"))],
    )
