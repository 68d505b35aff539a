"""Pieces every CLI command shares: options, error reporting, rendering a result as table/JSON/CSV."""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from dpgateway.errors import DPGatewayError, InternalError

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json", "csv")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $DPGATEWAY_CONFIG, else ./dpgateway.yaml).",
)
analyst_option = click.option(
    "--analyst", default=None, help="Who is asking (default: $DPGATEWAY_ANALYST, else the OS user)."
)


def format_option(*choices: str) -> Callable[[F], F]:
    """``--format`` with the given choices (default: table, json and csv)."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices or FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )


def console() -> Console:
    """A rich console on stdout (no colours when not a terminal)."""
    return Console()


def reports_errors(command: F) -> F:
    """Print ``ERROR <SQLSTATE>: message`` (or JSON with ``--format json``) and exit 1; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DPGatewayError as exc:
            fail(exc, kwargs.get("fmt", "table"))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # a bug: still report it the same way, as XX000
            fail(InternalError(f"{type(exc).__name__}: {exc}"), kwargs.get("fmt", "table"))

    return wrapper  # type: ignore[return-value]


def fail(exc: DPGatewayError, fmt: str = "table") -> None:
    """Report one error and exit with status 1."""
    if fmt == "json":
        click.echo(json.dumps({"error": {"sqlstate": exc.sqlstate, "message": exc.message}}))
    else:
        click.echo(f"ERROR {exc.sqlstate}: {exc.message}", err=True)
    sys.exit(1)


def render_rows(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, *, title: str | None = None, extra: Any = None
) -> None:
    """Print rows as a rich table, CSV, or JSON (``extra`` is the JSON document when given)."""
    if fmt == "json":
        click.echo(json.dumps(extra if extra is not None else {"columns": list(columns), "rows": rows}, default=str))
    elif fmt == "csv":
        print_csv(columns, rows)
    else:
        table = Table(title=title, title_justify="left")
        for name in columns:
            table.add_column(str(name))
        for row in rows:
            table.add_row(*(format_value(v) for v in row))
        console().print(table)


def print_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a header line and rows as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    click.echo(buffer.getvalue(), nl=False)


def format_value(value: Any) -> str:
    """Compact human rendering of one cell."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:,.1f}"
    return str(value)
