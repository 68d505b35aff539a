"""The ``dpgateway`` command line."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.panel import Panel
from rich.text import Text

from dpgateway import __version__
from dpgateway.cli_common import (
    NUMBER,
    analyst_option,
    config_option,
    console,
    format_option,
    render_rows,
    reports_errors,
)
from dpgateway.errors import FileAccessError, InvalidParameterError
from dpgateway.executors.demo import CHOICES as DEMO_EXECUTORS
from dpgateway.gateway import PUBLIC, Explanation, Gateway, Result
from dpgateway.policies.loader import load_config

F = TypeVar("F", bound=Callable[..., Any])

DEMO_QUERIES: tuple[tuple[str, str], ...] = (
    ("How many people are in the sample?", "SELECT COUNT(*) AS people_rows FROM pums"),
    (
        "Average income by sex (public keys: both groups always shown)",
        "SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income FROM pums GROUP BY sex",
    ),
    (
        "Rows by education (private keys: only groups that pass DP partition selection)",
        "SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ ORDER BY n DESC",
    ),
    (
        "Age bands (a CASE with literal results is a public key domain)",
        "SELECT CASE WHEN age < 30 THEN 'young' WHEN age < 60 THEN 'mid' ELSE 'old' END AS band, COUNT(*) AS n "
        "FROM pums GROUP BY 1 ORDER BY 1",
    ),
    (
        "Spread of age among married people",
        "SELECT AVG(age) AS mean_age, STDDEV(age) AS sd_age FROM pums WHERE married = 1",
    ),
)

epsilon_option = click.option(
    "--epsilon", type=NUMBER, default=None, help="Privacy budget to spend (default: budget.default_query_epsilon)."
)
executor_option = click.option(
    "--executor",
    default=None,
    metavar="NAME",
    help="Run on this executor instead of the table's (plain, mpc, enclave, he) where its policy allows it "
    "(tables.<name>.executors_allowed).",
)
delta_option = click.option(
    "--delta",
    type=NUMBER,
    default=None,
    help="Delta for partition selection of private group keys (default: budget.default_query_delta).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dpgateway")
def cli() -> None:
    """dpgateway: ordinary SQL in, differentially private answers out.

    Every answer is computed with each person's contribution bounded, noised with OpenDP, and
    debited from a persistent privacy-budget ledger before it is shown. Start with `dpgateway demo`.
    """


def _sql_command(func: F) -> F:
    """The arguments and options shared by ``query`` and ``explain``."""
    func = reports_errors(func)
    for decorate in (
        format_option(),
        executor_option,
        delta_option,
        epsilon_option,
        analyst_option,
        config_option,
        click.argument("sql"),
    ):
        func = decorate(func)
    return func


@cli.command()
@_sql_command
def query(
    sql: str,
    config_path: str | None,
    analyst: str | None,
    epsilon: float | None,
    delta: float | None,
    executor: str | None,
    fmt: str,
) -> None:
    """Answer SQL with differential privacy, spending budget (use - to read SQL from stdin).

    \b
    Example:
      dpgateway query --epsilon 0.5 "SELECT sex, AVG(income) FROM pums GROUP BY sex"
    """
    with Gateway.from_config(config_path) as gw:
        result = gw.query(_sql_arg(sql), analyst=analyst, epsilon=epsilon, delta=delta, executor=executor)
    _print_result(result, fmt)


@cli.command()
@_sql_command
def explain(
    sql: str,
    config_path: str | None,
    analyst: str | None,
    epsilon: float | None,
    delta: float | None,
    executor: str | None,
    fmt: str,
) -> None:
    """Show the bounded SQL, mechanisms, cost and 95% accuracy of a query, without spending anything."""
    with Gateway.from_config(config_path) as gw:
        plan = gw.explain(_sql_arg(sql), analyst=analyst, epsilon=epsilon, delta=delta, executor=executor)
    _print_explanation(plan, fmt)


@cli.command()
@click.argument("table")
@config_option
@reports_errors
def prepare(table: str, config_path: str | None) -> None:
    """Materialize a copy of TABLE that later unfiltered queries read (spends nothing).

    Every row with a person is stored clustered by person, with the person's row count and the row's
    keyed-hash rank (what bounding computes on the fly), as Parquet in the config's cache_dir (PostgreSQL: a
    table in the gateway's schema, docs/backends.md); the copy is ignored once the source or the policy
    changes (run prepare again).
    """
    with Gateway.from_config(config_path) as gw:
        copy = gw.prepare(table)
    click.echo(f"prepared {copy.table}: {copy.path} (bounded to {copy.k} row(s) per unit when read)")


@cli.command()
@click.option("--epsilon", type=NUMBER, default=0.5, show_default=True, help="Budget per demo query.")
@click.option(
    "--init",
    "init_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Instead of running, copy the sample data and its dpgateway.yaml into this folder.",
)
@click.option(
    "--executor",
    type=click.Choice(DEMO_EXECUTORS),
    default=None,
    help="Run the example end to end on this executor (beside plain, with timings).",
)
@format_option()
@reports_errors
def demo(epsilon: float, init_dir: str | None, executor: str | None, fmt: str) -> None:
    """Run example queries on the bundled PUMS sample (1,000 people, 1-4 rows each).

    Uses a throwaway ledger, so your own budget is untouched. With --executor, the data owner's steps (split
    across parties, seal, encrypt) run first, then each query runs on the executor and on plain, timed.
    """
    data = resources.files("dpgateway") / "data"
    if init_dir:
        _init_demo(Path(init_dir), data)
        return
    if executor is not None:
        from dpgateway.executor_cli import run_executor_demo

        with resources.as_file(data / "pums.csv") as csv:
            run_executor_demo(executor, csv, epsilon=epsilon, fmt=fmt, show=_print_result)
        return
    with resources.as_file(data / "demo.yaml") as config_file, tempfile.TemporaryDirectory() as tmp:
        config = load_config(config_file)
        config = dataclasses.replace(config, ledger=f"sqlite:///{Path(tmp) / 'demo-ledger.db'}")
        documents = []
        with Gateway(config) as gw:
            out = console()
            for title, sql in DEMO_QUERIES:
                with out.status(f"[dim]{title}"):
                    result = gw.query(sql, analyst="demo", epsilon=epsilon)
                if fmt == "json":
                    documents.append({"title": title, "sql": sql, **result.to_dict()})
                    continue
                out.print(Panel(Text(sql), title=title, title_align="left", border_style="cyan"))
                _print_result(result, fmt)
        if fmt == "json":
            render_rows([], [], "json", extra=documents)


def _init_demo(target: Path, data: Any) -> None:
    """Copy the sample policy and data into ``target``; never overwrite a file that is already there."""
    files = {"pums.csv": data / "pums.csv", "dpgateway.yaml": data / "demo.yaml"}
    existing = [name for name in files if (target / name).exists()]
    if existing:
        raise InvalidParameterError(
            f"{target} already holds {' and '.join(existing)}; demo --init never overwrites files: "
            "choose another folder or move them away"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            with open(target / name, "xb") as out:  # "x": fails rather than replace a file created meanwhile
                out.write(source.read_bytes())
    except OSError as exc:
        raise FileAccessError(
            f"demo --init cannot write into {str(target)!r} ({exc.strerror}); choose a folder you may write"
        ) from None
    click.echo(
        f"Wrote {target / 'dpgateway.yaml'} and {target / 'pums.csv'}; try:\n"
        f'  cd {target} && dpgateway query "SELECT COUNT(*) FROM pums"'
    )


def _sql_arg(sql: str) -> str:
    return sys.stdin.read() if sql == "-" else sql


def _print_result(result: Result, fmt: str) -> None:
    """The rows with each column's 95% accuracy (JSON keys, CSV companion columns, table header lines);
    warnings on stderr."""
    for warning in result.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    if fmt == "json":
        render_rows(result.columns, result.rows, fmt, extra=result.to_dict())
        return
    if fmt == "csv":
        columns, rows = _with_accuracy_columns(result)
        render_rows(columns, rows, fmt)
        return
    render_rows(result.columns, result.rows, fmt, subtitles=[_subtitle(result, c) for c in result.columns])
    analyst = result.remaining.get("analyst", {})
    if result.replayed:
        cost = "replayed from cache: no cost; the values and their accuracy are those of the first answer"
    elif result.epsilon == 0 and result.accuracy and set(result.accuracy.values()) == {PUBLIC}:
        cost = "public data: exact, no cost"
    else:
        cost = f"spent ε={result.epsilon:.4g}, δ={result.delta:.3g}"
    left = f"analyst budget left ε={analyst.get('epsilon', float('nan')):.4g}"
    console().print(Text(f"{cost}; {left}; under each column: its 95% accuracy", style="dim"))


def _subtitle(result: Result, column: str) -> str:
    accuracy = result.accuracy.get(column, "")
    return accuracy if not accuracy or accuracy.startswith(("exact", "depends")) else f"95% {accuracy}"


def _with_accuracy_columns(result: Result) -> tuple[list[str], list[list[Any]]]:
    """CSV stays one plain table: after each column that is not an exact key comes ``<name> ±95%``, the
    95% half-width (a number where exact, 0 for exact values, else the accuracy text) on every row."""
    columns: list[str] = []
    extra: list[tuple[int, Any]] = []
    for i, name in enumerate(result.columns):
        columns.append(name)
        accuracy = result.accuracy.get(name, "")
        if accuracy.startswith("exact key"):
            continue
        width = result.half_width.get(name)
        columns.append(f"{name} ±95%")
        extra.append((i, width if width is not None else accuracy))
    pending = dict(extra)
    rows = []
    for row in result.rows:
        out: list[Any] = []
        for i, value in enumerate(row):
            out.append(value)
            if i in pending:
                out.append(pending[i])
        rows.append(out)
    return columns, rows


def _print_explanation(plan: Explanation, fmt: str) -> None:
    if fmt == "json":
        render_rows([], [], fmt, extra=plan.to_dict())
        return
    rows: list[list[Any]] = [
        [m.measurement, m.mechanism, m.epsilon, m.sensitivity, m.noise_scale, m.threshold] for m in plan.mechanisms
    ]
    if fmt == "csv":
        render_rows(["measurement", "mechanism", "epsilon", "sensitivity", "noise_scale", "threshold"], rows, fmt)
        return
    out = console()
    out.print(Panel(Text(plan.bounded_sql), title="bounded SQL pushed to the backend", title_align="left"))
    render_rows(
        ["measurement", "mechanism", "epsilon", "sensitivity", "noise scale", "threshold"],
        rows,
        fmt,
        title=f"cost: ε={plan.epsilon:.4g}, δ={plan.delta:.3g} (nothing spent); executor: {plan.executor_detail}",
    )
    render_rows(["column", "95% accuracy"], list(plan.accuracy.items()), fmt)
    for note in plan.notes:
        out.print(Text(f"- {note}", style="dim"))


def _register_admin_commands() -> None:
    from dpgateway.admin_cli import audit, budget

    cli.add_command(budget)
    cli.add_command(audit)
    from dpgateway.server_cli import serve, user

    cli.add_command(serve)
    cli.add_command(user)
    from dpgateway.executor_cli import enclave, mpc

    cli.add_command(enclave)
    cli.add_command(mpc)
    from dpgateway.he_cli import he

    cli.add_command(he)


_register_admin_commands()


def main() -> None:
    """Console-script entry point."""
    cli()
