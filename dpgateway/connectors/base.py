"""The connector interface: run a bounded plan, return exact (not yet noisy) aggregates.

A connector is one method plus a mock. It also supplies the few SQL hooks where engines differ
(how to read a source, how to cast safely, the keyed row hash); everything else is rendered by the
sqlglot dialect named in ``DIALECT``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from dpgateway.errors import UnsupportedError
from dpgateway.policies.model import Column, Table

SQL_TYPES = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "bool": "BOOLEAN", "date": "DATE"}
_DATA_TYPES = {kind: exp.DataType.build(name) for kind, name in SQL_TYPES.items()}  # built (parsed) once


@dataclass(frozen=True)
class ExactAggregates:
    """Exact bounded aggregates per group: never released, only noised."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


class SQLHooks:
    """Engine-specific pieces of the bounded SQL. Subclasses override a few methods, never the planner."""

    DIALECT = "duckdb"

    def source(self, table: Table) -> exp.Expr:
        """The relation to read ``table`` from."""
        return exp.to_table(table.name)

    def typed(self, column: Column) -> exp.Expr:
        """The column cast to its declared type; values that do not fit become NULL, never an error."""
        value: exp.Expr = exp.TryCast(this=exp.column(column.name, quoted=True), to=_DATA_TYPES[column.type].copy())
        if column.type == "float":  # NaN is no number: treat it as missing
            value = exp.Nullif(this=value, expression=exp.cast(exp.Literal.string("NaN"), "DOUBLE"))
        return value

    def total(self, expr: exp.Expr) -> exp.Expr:
        """``expr`` over one raw row, never failing: where it would raise it yields NULL (passes/total.py)."""
        if isinstance(expr, exp.Column):  # a typed column cannot fail
            return expr.copy()
        safe = expr.copy().transform(lambda n: exp.TryCast(**n.args) if type(n) is exp.Cast else n)
        return exp.Try(this=safe)

    def row_hash(self, seed: bytes, columns: Sequence[exp.Expr]) -> exp.Expr:
        """A keyed, deterministic hash of a row's content (orders each unit's rows data-independently)."""
        key = hashlib.sha256(b"dpgateway-row-order" + seed).hexdigest()[:32]
        return exp.func("hash", exp.Literal.string(key), *columns)

    def settings(self, k: int) -> tuple[tuple[str, Any], ...]:
        """Per-query engine settings for a plan that keeps ``k`` rows per unit."""
        return ()

    def file_source(self, path: str) -> exp.Expr:
        """The relation reading a Parquet file written by the gateway (a prepared copy)."""
        return exp.to_table(path)

    def render(self, tree: exp.Expr) -> str:
        """The bounded query's text in this engine's dialect (a backend may adjust a node's semantics)."""
        return tree.sql(dialect=self.DIALECT)

    def state(self) -> str:
        """Anything besides the policy that changes the SQL these hooks render (keys the plan cache)."""
        return ""


class Connector(ABC):
    """Runs bounded SQL on one backend. Use as a context manager to close it."""

    hooks: SQLHooks = SQLHooks()

    @abstractmethod
    def execute(self, sql: str, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        """Run the bounded SQL and return its rows exactly."""

    def materialize(self, sql: str, path: str) -> int:
        """Write the rows of ``sql`` to the Parquet file ``path``; return how many (``dpgateway prepare``)."""
        raise UnsupportedError(f"the {type(self).__name__} backend cannot write prepared copies")

    def check_table(self, table: Table) -> None:  # noqa: B027 - optional hook
        """Verify the declared columns exist in the source (a schema check, no data read)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MockConnector(Connector):
    """Answers from a function of the SQL text; records every statement (for unit tests)."""

    def __init__(self, answer: Callable[[str], ExactAggregates]) -> None:
        self.answer = answer
        self.statements: list[str] = []

    def execute(self, sql: str, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        self.statements.append(sql)
        return self.answer(sql)
