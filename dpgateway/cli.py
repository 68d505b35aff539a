"""The ``dpgateway`` command line."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.panel import Panel

from dpgateway import __version__
from dpgateway.cli_common import (
    analyst_option,
    config_option,
    console,
    format_option,
    render_rows,
    reports_errors,
)
from dpgateway.gateway import Explanation, Gateway, Result
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
    "--epsilon", type=float, default=None, help="Privacy budget to spend (default: budget.default_query_epsilon)."
)
delta_option = click.option(
    "--delta",
    type=float,
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
    sql: str, config_path: str | None, analyst: str | None, epsilon: float | None, delta: float | None, fmt: str
) -> None:
    """Answer SQL with differential privacy, spending budget (use - to read SQL from stdin).

    \b
    Example:
      dpgateway query --epsilon 0.5 "SELECT sex, AVG(income) FROM pums GROUP BY sex"
    """
    with Gateway.from_config(config_path) as gw:
        result = gw.query(_sql_arg(sql), analyst=analyst, epsilon=epsilon, delta=delta)
    _print_result(result, fmt)


@cli.command()
@_sql_command
def explain(
    sql: str, config_path: str | None, analyst: str | None, epsilon: float | None, delta: float | None, fmt: str
) -> None:
    """Show the bounded SQL, mechanisms, cost and 95% accuracy of a query, without spending anything."""
    with Gateway.from_config(config_path) as gw:
        plan = gw.explain(_sql_arg(sql), analyst=analyst, epsilon=epsilon, delta=delta)
    _print_explanation(plan, fmt)


@cli.command()
@click.argument("table")
@config_option
@reports_errors
def prepare(table: str, config_path: str | None) -> None:
    """Materialize a copy of TABLE that later unfiltered queries read (spends nothing).

    Every row with a person is stored clustered by person, with the person's row count and the row's
    keyed-hash rank (what bounding computes on the fly), as Parquet in the config's cache_dir; the copy
    is ignored once the source file or the policy changes (run prepare again).
    """
    with Gateway.from_config(config_path) as gw:
        copy = gw.prepare(table)
    click.echo(f"prepared {copy.table}: {copy.path} (bounded to {copy.k} row(s) per unit when read)")


@cli.command()
@click.option("--epsilon", type=float, default=0.5, show_default=True, help="Budget per demo query.")
@click.option(
    "--init",
    "init_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Instead of running, copy the sample data and its dpgateway.yaml into this folder.",
)
@format_option()
@reports_errors
def demo(epsilon: float, init_dir: str | None, fmt: str) -> None:
    """Run example queries on the bundled PUMS sample (1,000 people, 1-4 rows each).

    Uses a throwaway ledger, so your own budget is untouched.
    """
    data = resources.files("dpgateway") / "data"
    if init_dir:
        target = Path(init_dir)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(data / "pums.csv"), target / "pums.csv")
        shutil.copyfile(str(data / "demo.yaml"), target / "dpgateway.yaml")
        click.echo(
            f'Wrote {target / "dpgateway.yaml"} and {target / "pums.csv"}; try:\n  cd {target} && dpgateway query "SELECT COUNT(*) FROM pums"'
        )
        return
    with resources.as_file(data / "demo.yaml") as config_file, tempfile.TemporaryDirectory() as tmp:
        config = load_config(config_file)
        config = dataclasses.replace(config, ledger=f"sqlite:///{Path(tmp) / 'demo-ledger.db'}")
        documents = []
        with Gateway(config) as gw:
            out = console()
            for title, sql in DEMO_QUERIES:
                with out.status(f"[dim]{title}"):
                    plan = gw.explain(sql, analyst="demo", epsilon=epsilon)
                    result = gw.query(sql, analyst="demo", epsilon=epsilon)
                if fmt == "json":
                    documents.append({"title": title, "sql": sql, **result.to_dict(), "accuracy_95": plan.accuracy})
                    continue
                out.print(Panel(sql, title=title, title_align="left", border_style="cyan"))
                _print_result(result, fmt, accuracy=plan.accuracy)
        if fmt == "json":
            render_rows([], [], "json", extra=documents)


def _sql_arg(sql: str) -> str:
    return sys.stdin.read() if sql == "-" else sql


def _print_result(result: Result, fmt: str, *, accuracy: dict[str, str] | None = None) -> None:
    if fmt != "table":
        render_rows(result.columns, result.rows, fmt, extra=result.to_dict() if fmt == "json" else None)
        return
    render_rows(result.columns, result.rows, fmt)
    analyst = result.remaining.get("analyst", {})
    cost = "replayed from cache: no cost" if result.replayed else f"spent ε={result.epsilon:.4g}, δ={result.delta:.3g}"
    line = f"[dim]{cost}; analyst budget left ε={analyst.get('epsilon', float('nan')):.4g}"
    if accuracy:
        line += "; 95% ± " + ", ".join(f"{name} {hw}" for name, hw in accuracy.items() if hw.startswith(("±", "≈")))
    console().print(line + "[/dim]")


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
    out.print(Panel(plan.bounded_sql, title="bounded SQL pushed to the backend", title_align="left"))
    render_rows(
        ["measurement", "mechanism", "epsilon", "sensitivity", "noise scale", "threshold"],
        rows,
        fmt,
        title=f"cost: ε={plan.epsilon:.4g}, δ={plan.delta:.3g} (nothing spent)",
    )
    render_rows(["column", "95% accuracy"], list(plan.accuracy.items()), fmt)
    for note in plan.notes:
        out.print(f"[dim]- {note}[/dim]")


def _register_admin_commands() -> None:
    from dpgateway.admin_cli import audit, budget

    cli.add_command(budget)
    cli.add_command(audit)
    from dpgateway.server_cli import serve, user

    cli.add_command(serve)
    cli.add_command(user)


_register_admin_commands()


def main() -> None:
    """Console-script entry point."""
    cli()
