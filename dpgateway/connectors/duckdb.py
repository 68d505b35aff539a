"""DuckDB over CSV and Parquet files: the embedded default backend."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import duckdb
from sqlglot import exp

from dpgateway.connectors.base import Connector, ExactAggregates, SQLHooks
from dpgateway.errors import BackendError, ConfigError
from dpgateway.policies.model import Table


class DuckDBHooks(SQLHooks):
    """DuckDB reads files directly; private CSV columns arrive as text and are cast by the policy's types.

    Reading as text keeps type sniffing (which depends on the data) from ever failing a query.
    """

    DIALECT = "duckdb"
    # No per-query settings: disabling DuckDB's top_n_window_elimination for k > 1 (DESIGN performance
    # rules) made no measurable difference on DuckDB 2.0 (bench/RESULTS.md), so the default plan is kept.

    def source(self, table: Table) -> exp.Expr:
        path = Path(table.source)
        if path.suffix.lower() in (".parquet", ".pq"):
            return exp.Table(this=exp.Anonymous(this="read_parquet", expressions=[exp.Literal.string(str(path))]))
        options: list[exp.Expr] = [exp.Literal.string(str(path))]
        if not table.public:  # private columns arrive as text and are cast by the policy's types
            options.append(exp.Kwarg(this=exp.var("all_varchar"), expression=exp.true()))
        options.append(exp.Kwarg(this=exp.var("header"), expression=exp.true()))
        return exp.Table(this=exp.Anonymous(this="read_csv", expressions=options))

    def file_source(self, path: str) -> exp.Expr:
        return exp.Table(this=exp.Anonymous(this="read_parquet", expressions=[exp.Literal.string(path)]))


class DuckDBConnector(Connector):
    """One in-process DuckDB database; each query runs on its own cursor."""

    hooks = DuckDBHooks()

    def __init__(self, *, threads: int | None = None) -> None:
        self._con = duckdb.connect(":memory:")
        if threads:
            self._con.execute("SET threads = ?", [threads])
        self._lock = threading.Lock()

    def execute(self, sql: str, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        with self._lock:
            cursor = self._con.cursor()
        try:
            for name, value in settings:
                cursor.execute(
                    exp.Set(
                        expressions=[exp.SetItem(this=exp.EQ(this=exp.var(name), expression=exp.Literal.string(value)))]
                    ).sql("duckdb")
                )
            result = cursor.execute(sql)
            columns = tuple(d[0] for d in result.description or ())
            rows = tuple(tuple(r) for r in result.fetchall())
        except duckdb.Error as exc:
            # Proof note: DuckDB messages can quote data values (e.g. conversion errors), so only the
            # error class is reported. Test: tests/test_errors.py::test_backend_error_hides_values.
            raise BackendError(
                f"the backend could not run the bounded query ({type(exc).__name__}); details are withheld "
                "because they may contain data values. Check that the policy's source paths and columns match "
                "the data"
            ) from None
        finally:
            cursor.close()
        return ExactAggregates(columns=columns, rows=rows)

    def materialize(self, sql: str, path: str) -> int:
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
