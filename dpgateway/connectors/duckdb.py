"""DuckDB over CSV and Parquet files: the embedded default backend."""

from __future__ import annotations

import contextlib
import csv as _csv
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
from sqlglot import exp

from dpgateway.connectors.base import Connector, ExactAggregates, Interrupts, SQLHooks
from dpgateway.errors import BackendError, ConfigError, QueryCanceledError
from dpgateway.policies.model import Column, Config, CsvDialect, PartySources, Table
from dpgateway.sqlcheck import VerifiedSQL

PARTY_RELATION = "party_rows"  # the relation a party exposes its own rows as (dpgateway/executors/mpc)
INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")


_DUCKDB_PARTS = {"DOW": "DAYOFWEEK", "DOY": "DAYOFYEAR"}


class DuckDBHooks(SQLHooks):
    """DuckDB reads files directly, CSV with the policy's dialect; private CSV columns arrive as text and
    are cast by the policy's types.

    Proof note (no data-dependent dialect): a private CSV is read with ``auto_detect = false``, the
    dialect of ``tables.<name>.csv`` and every column of the file as VARCHAR, so the SQL (and so
    ``explain`` and the audited hash) never depends on a value. A record that does not parse (too few
    fields, bad UTF-8, a line over DuckDB's 2 MB limit, text after a closing quote) is dropped or
    read leniently by a rule of that record alone (``ignore_errors``, ``strict_mode = false``: extra
    fields are ignored, a lone CR ends a record), and no record makes the query fail. One case is beyond
    any RFC 4180 reader: a quoted value may span lines, so an opening quote never closed swallows the
    following lines; ``quote: ""`` (one record per line) confines that too (README.md, "csv").
    Tests: tests/test_sources.py::test_parse_problems_stay_in_their_row.
    """

    DIALECT = "duckdb"
    UNIT_COUNT_BY_JOIN = True  # hash aggregate + hash join: about half the window's time (bench/README.md)
    # No per-query settings: disabling DuckDB's top_n_window_elimination for k > 1 (DESIGN performance
    # rules) made no measurable difference on DuckDB 2.0 (bench/RESULTS.md), so the default plan is kept.

    def __init__(self) -> None:
        # A CSV's column names, read from its header line once (schema metadata, not a person's value).
        self._headers: dict[tuple[str, CsvDialect], tuple[str, ...]] = {}

    def finish(self, tree: exp.Expr) -> exp.Expr:
        """``EXTRACT(DOW|DOY ...)`` spelled DAYOFWEEK/DAYOFYEAR (DuckDB's names for the same fields, 0 = Sunday
        as PostgreSQL's DOW): what sqlglot writes for DuckDB, so the statement parses back to the tree
        built (dpgateway/sqlcheck.py; without it a key such as ``EXTRACT(dow FROM d)`` was refused)."""
        if not any(n.name.upper() in _DUCKDB_PARTS for n in tree.find_all(exp.Extract)):
            return tree
        tree = tree.copy()
        for node in tree.find_all(exp.Extract):
            spelled = _DUCKDB_PARTS.get(node.name.upper())
            if spelled is not None:
                node.set("this", exp.var(spelled))
        return tree

    def source(self, table: Table) -> exp.Expr:
        if isinstance(table.source, PartySources):  # each party binds this name to its own rows
            return exp.to_table(PARTY_RELATION)
        path = Path(table.source)
        if path.suffix.lower() in (".parquet", ".pq"):
            return _call("read_parquet", exp.Literal.string(str(path)))
        dialect = table.csv
        options = {
            "delim": exp.Literal.string(dialect.delimiter),
            "quote": exp.Literal.string(dialect.quote),
            "escape": exp.Literal.string(dialect.escape),
            "comment": exp.Literal.string(dialect.comment),
            "header": exp.Boolean(this=dialect.header),
        }
        if not table.public:  # column types of public data may be detected: they reveal nobody
            names = self.csv_columns(path, dialect, table)
            columns = [
                exp.PropertyEQ(this=exp.Literal.string(n), expression=exp.Literal.string("VARCHAR")) for n in names
            ]
            options |= {
                "auto_detect": exp.false(),
                "columns": exp.Struct(expressions=columns),
                "nullstr": exp.Literal.string(dialect.null),
                "allow_quoted_nulls": exp.false(),
                "ignore_errors": exp.true(),
                "strict_mode": exp.false(),
                "null_padding": exp.false(),
            }
        kwargs = [exp.Kwarg(this=exp.var(k), expression=v) for k, v in options.items()]
        return _call("read_csv", exp.Literal.string(str(path)), *kwargs)

    def unit(self, column: Column) -> exp.Expr:
        """As :meth:`SQLHooks.unit`, with a shortcut where the source column is an integer type already:
        its cast to BIGINT is exact (or NULL), so the text comparison is skipped (it costs about 0.4 s per
        million rows of Parquet). ``typeof`` is the column's bound type, the same for every row."""
        exact = super().unit(column)
        if column.type != "int":
            return exact
        kind = exp.func("typeof", exp.column(column.name, quoted=True))
        integer = exp.In(this=kind, expressions=[exp.Literal.string(t) for t in INTEGER_TYPES])
        return exp.Case(ifs=[exp.If(this=integer, true=self.typed(column))], default=exact)

    def unit_count_by_join(self, table: Table) -> bool:
        """The join form over Parquet sources only. DuckDB 2.0 pushes a ``TRY_CAST`` of a column into
        ``read_csv``, whose ``ignore_errors`` then drops a record with an unparsable value instead of making
        the value NULL, and whether it does depends on the plan: the join form's two reads of one CSV could
        disagree (a unit counted in ``n_u`` with a row missing, or the reverse), so CSV sources keep the window.
        Test: tests/test_weighted_forms.py::test_csv_sources_keep_the_window."""
        source = table.source
        if not self.UNIT_COUNT_BY_JOIN or isinstance(source, (dict, PartySources)):
            return False
        return Path(source).suffix.lower() in (".parquet", ".pq")

    def csv_columns(self, path: Path, dialect: CsvDialect, table: Table) -> tuple[str, ...]:
        """The file's column names in order: its header line (read once), else the declared columns."""
        if not dialect.header:
            return tuple(c.name for c in table.columns)
        key = (str(path), dialect)
        names = self._headers.get(key)
        if names is None:
            names = self._headers[key] = _header(path, dialect, table.name)
        return names

    def file_source(self, path: str) -> exp.Expr:
        return _call("read_parquet", exp.Literal.string(path))


def _call(name: str, *args: exp.Expr) -> exp.Expr:
    return exp.Table(this=exp.Anonymous(this=name, expressions=list(args)))


def _header(path: Path, dialect: CsvDialect, table: str) -> tuple[str, ...]:
    """The first non-comment line of ``path`` parsed with ``dialect``: the file's column names."""
    where = f"tables.{table}.source"
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            line = next((x for x in handle if not (dialect.comment and x.startswith(dialect.comment))), "")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the header line of {path.name}: {type(exc).__name__}") from None
    reader = _csv.reader(
        [line.rstrip("\r\n")],
        delimiter=dialect.delimiter,
        quoting=_csv.QUOTE_MINIMAL if dialect.quote else _csv.QUOTE_NONE,
        quotechar=dialect.quote or None,
        doublequote=dialect.escape == dialect.quote,
        escapechar=dialect.escape if dialect.escape and dialect.escape != dialect.quote else None,
    )
    fields = next(reader, [])
    names = tuple(f.strip() for f in fields)
    lowered = [n.lower() for n in names]
    duplicate = next((n for i, n in enumerate(lowered) if n in lowered[:i] or not n), None)
    if not names or duplicate is not None:
        raise ConfigError(
            f"{where}: the header line of {path.name} must name every column once "
            f"(found {duplicate!r} twice or empty); fix the header, or set tables.{table}.csv.header: false"
        )
    return names


class DuckDBConnector(Connector):
    """One in-process DuckDB database; each thread queries on its own cursor, which keeps recent SQL prepared.

    Preparing skips parsing, binding and optimizing on repeats of the same bounded SQL (about 0.7 ms of
    3 ms on a 1,000-row table). A prepared statement reads its files when it runs, and DuckDB binds it
    again when a file's columns or types changed, so it answers exactly as the SQL text would
    (tests/test_fastpath.py::test_prepared_statements_follow_the_file).
    """

    hooks: DuckDBHooks
    interrupts: Interrupts
    PREPARED = 256
    """Statements each thread keeps prepared; the least recently run one is dropped first."""

    def __init__(
        self,
        *,
        threads: int | None = None,
        allowed_paths: Sequence[str | os.PathLike[str]] = (),
        allowed_directories: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.hooks = DuckDBHooks()  # per connector: it remembers the CSV headers it read
        self._con = duckdb.connect(":memory:")
        if threads:
            self._con.execute("SET threads = ?", [threads])
        _lock_down(self._con, allowed_paths, allowed_directories)
        self._lock = threading.Lock()
        self._local = threading.local()  # .cursor, and .prepared: SQL text -> statement name, oldest first
        self.interrupts = Interrupts(lambda cursor: cursor.interrupt())

    @classmethod
    def for_config(cls, config: Config, *, threads: int | None = None) -> DuckDBConnector:
        """A connector that may read the policy's file sources and the cache folder (prepared copies), nothing else."""
        files = [t.source for t in config.tables if not isinstance(t.source, (dict, PartySources))]
        return cls(threads=threads, allowed_paths=files, allowed_directories=[config.cache_folder])

    def _execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        running = None
        try:
            if settings:  # settings stay with a cursor: use a fresh one, closed after
                with self._lock:
                    cursor = self._con.cursor()
                try:
                    with self.interrupts.running(cursor) as running:
                        for name, value in settings:
                            cursor.execute(_set(name, value))
                        return _exact(cursor.execute(sql))
                finally:
                    cursor.close()
            local = self._local
            if getattr(local, "cursor", None) is None:
                with self._lock:
                    local.cursor = self._con.cursor()
                local.prepared = OrderedDict()
            with self.interrupts.running(local.cursor) as running:
                try:
                    return _exact(self._run_prepared(local.cursor, sql))
                finally:
                    if running.cancelled:  # its interrupt flag may outlive the statement
                        self._drop_cursor()
        except duckdb.Error as exc:
            self._drop_cursor()  # after an error this thread starts on a new cursor
            if running is not None and running.cancelled:
                raise QueryCanceledError("canceling statement due to user request") from None
            # Proof note: DuckDB messages can quote data values (e.g. conversion errors), so only the
            # error class is reported. Test: tests/test_errors.py::test_backend_error_hides_values.
            raise BackendError(
                f"the backend could not run the bounded query ({type(exc).__name__}); details are withheld "
                "because they may contain data values. Check that the policy's source paths and columns match "
                "the data"
            ) from None

    def _run_prepared(self, cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyConnection:
        prepared: OrderedDict[str, str] = self._local.prepared
        name = prepared.get(sql)
        if name is None:
            if len(prepared) >= self.PREPARED:
                cursor.execute(f"DEALLOCATE {prepared.popitem(last=False)[1]}")
            name = f"dp_{next(_names)}"
            cursor.execute(f"PREPARE {name} AS {sql}")
            prepared[sql] = name
        else:
            prepared.move_to_end(sql)
        return cursor.execute(f"EXECUTE {name}")

    def _drop_cursor(self) -> None:
        cursor = getattr(self._local, "cursor", None)
        self._local.cursor = None
        if cursor is not None:
            with contextlib.suppress(duckdb.Error):
                cursor.close()

    def _materialize(self, sql: VerifiedSQL, path: str) -> int:
        with self._lock:
            cursor = self._con.cursor()
        try:
            cursor.sql(sql).write_parquet(path)
            count = cursor.execute("SELECT COUNT(*) FROM read_parquet(?)", [path]).fetchone()
        except duckdb.Error as exc:
            raise BackendError(
                f"the backend could not write the prepared copy ({type(exc).__name__}); details are withheld "
                "because they may contain data values"
            ) from None
        finally:
            cursor.close()
        return int(count[0]) if count else 0

    def check_table(self, table: Table) -> None:
        if isinstance(table.source, PartySources) or table.executor == "he":
            return  # the gateway never reads these rows: the parties (mpc) or the data owner (he) do
        if isinstance(table.source, dict):
            raise ConfigError(
                f"tables.{table.name}.source: connector {table.source.get('connector')!r} is not available"
            )
        path = Path(table.source)
        if not path.is_file():
            raise ConfigError(f"tables.{table.name}.source: file {str(path)!r} not found")
        relation = exp.select(exp.Star()).from_(self.hooks.source(table)).limit(0)
        try:
            with self._lock:
                cursor = self._con.cursor()
            found = {d[0].lower() for d in cursor.execute(relation.sql("duckdb")).description or ()}
            cursor.close()
        except duckdb.Error as exc:
            raise ConfigError(
                f"tables.{table.name}.source: DuckDB cannot read {str(path)!r}: {type(exc).__name__}"
            ) from None
        missing = [c.name for c in table.columns if c.name.lower() not in found]
        if missing:
            raise ConfigError(
                f"tables.{table.name}.columns: {', '.join(missing)} not found in {path.name}; "
                f"the file has: {', '.join(sorted(found))}"
            )

    def close(self) -> None:
        self._con.close()


_names = itertools.count()


def _lock_down(
    con: duckdb.DuckDBPyConnection,
    paths: Sequence[str | os.PathLike[str]],
    directories: Sequence[str | os.PathLike[str]],
) -> None:
    """Only the listed files and folders are readable (or writable), no extension loads, and no SQL can undo it.

    Proof note (locked engine, the third layer after the parser allowlist and the round-trip check):
    with external access disabled DuckDB opens only ``allowed_paths`` / ``allowed_directories``, so a
    statement that somehow called ``read_text('/etc/passwd')``, another table's file, ``ATTACH`` or
    ``INSTALL`` fails with a permission error; ``lock_configuration`` refuses every later ``SET``, so no
    statement can widen this. ``allowed_paths`` must be set after connecting (DuckDB 2.0 refuses it in the
    connect config). Test: tests/attacks/test_injection.py::test_locked_engine_refuses_other_files.
    """
    files = sorted({form for p in paths for form in (str(p), str(Path(p).resolve()))})
    folders = sorted({form for d in directories for form in (f"{d}{os.sep}", f"{Path(d).resolve()}{os.sep}")})
    con.execute("SET allowed_paths = ?", [files])
    con.execute("SET allowed_directories = ?", [folders])
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(_set(setting, False))
    con.execute(_set("lock_configuration", True))


def _set(name: str, value: Any) -> str:
    literal = exp.Boolean(this=value) if isinstance(value, bool) else exp.Literal.string(value)
    item = exp.SetItem(this=exp.EQ(this=exp.var(name), expression=literal))
    return exp.Set(expressions=[item]).sql("duckdb")


def _exact(result: duckdb.DuckDBPyConnection) -> ExactAggregates:
    columns = tuple(d[0] for d in result.description or ())
    return ExactAggregates(columns=columns, rows=tuple(tuple(r) for r in result.fetchall()))
