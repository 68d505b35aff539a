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
from rich.text import Text

from dpgateway.errors import DPGatewayError, FileAccessError, InternalError

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


class _Number(click.ParamType):
    """A float when the text is one; otherwise the text itself, so the command refuses it with SQLSTATE 22023
    (click's own usage error would carry no SQLSTATE and ignore ``--format json``)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            return value


NUMBER = _Number()


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
        except OSError as exc:  # a file or folder the command writes or reads: name it, no traceback
            where = f" {exc.filename!r}" if exc.filename else ""
            fail(FileAccessError(f"cannot use{where}: {exc.strerror or exc}"), kwargs.get("fmt", "table"))
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
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str,
    *,
    title: str | None = None,
    extra: Any = None,
    subtitles: Sequence[str] | None = None,
) -> None:
    """Print rows as a rich table, CSV, or JSON (``extra`` is the JSON document when given).

    Table headers and cells are literal text, never rich markup: a value such as ``[red]x[/]`` prints as is.
    ``subtitles`` adds a dim second header line under each column (e.g. its 95% accuracy).
    """
    if fmt == "json":
        click.echo(json.dumps(extra if extra is not None else {"columns": list(columns), "rows": rows}, default=str))
    elif fmt == "csv":
        print_csv(columns, rows)
    else:
        table = Table(title=None if title is None else Text(title), title_justify="left")
        for i, name in enumerate(columns):
            header = Text(str(name))
            if subtitles is not None and subtitles[i]:
                header.append("\n" + subtitles[i], style="dim")
            table.add_column(header)
        for row in rows:
            table.add_row(*(Text(format_value(v)) for v in row))
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
