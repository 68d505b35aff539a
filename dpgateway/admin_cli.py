"""Admin commands: ``dpgateway budget show|history|grant|set-cap|reset`` and ``dpgateway audit``.

The root group (``dpgateway/cli.py``) adds the two objects exported here. Only analysts listed under
``admins:`` in the config may change caps; everyone who can read the config may read budgets and the
audit log. Errors print ``ERROR <SQLSTATE>: message`` (or ``{"error": {...}}`` with ``--format json``)
and exit with status 1.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dpgateway.budget_store import open_store
from dpgateway.budget_store.base import Charge, ScopeKind, Usage, scope_name, split_scope
from dpgateway.budget_store.sql import SQLBudgetStore
from dpgateway.budget_store.users import UserStore, read_password
from dpgateway.cli_common import NUMBER, config_option, format_option, print_csv, reports_errors
from dpgateway.errors import AuthenticationError, FileAccessError, InvalidParameterError, UnsupportedError
from dpgateway.gateway import ANALYST_ENV, resolve_analyst
from dpgateway.policies.loader import find_config, load_config
from dpgateway.policies.model import Config

F = TypeVar("F", bound=Callable[..., Any])

OUTCOMES = ("released", "replayed", "refused", "error", "abandoned", "admin")
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ---- shared options and plumbing ---------------------------------------------------------------


def _admin_option(func: F) -> F:
    func = click.option(
        "--password-stdin",
        is_flag=True,
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.__setitem__("password_stdin", value),
        help="Read the acting admin's password from the first line of stdin (else it is asked for).",
    )(func)
    return click.option(
        "--analyst",
        default=None,
        help=f"Who is acting (default: ${ANALYST_ENV}, else the OS user): an admin user (`dpgateway user add "
        "NAME --admin`), who must give their password; before any user exists, a name under `admins:`.",
    )(func)


def _scope_arguments(func: F) -> F:
    func = click.argument("name")(func)
    return click.argument("kind", type=click.Choice(["analyst", "domain"]))(func)


def _scope(kind: ScopeKind, name: str) -> str:
    """The ledger scope of KIND NAME, the name normalized as everywhere else (surrounding spaces stripped)."""
    if kind == "analyst":
        return scope_name(kind, resolve_analyst(name))
    if not name.strip():
        raise InvalidParameterError("a domain name must not be empty")
    return scope_name(kind, name.strip())


def _confirm_unknown(store: SQLBudgetStore, config: Config, scope: str, yes: bool) -> None:
    """Ask before changing the cap of a scope nobody has used: likely a typo (``alcie``) that would grant nothing.

    Known are the analysts and domains with charges or caps in the ledger, analysts with audit records,
    the config's admins and the policy's subject domains. Without a terminal the command refuses unless
    ``--yes`` is given, so scripts never hang on a prompt.
    """
    kind, name = split_scope(scope)
    known = {u.scope for u in store.usage(kind)}
    if kind == "analyst":
        known |= {scope_name("analyst", a) for a in config.admins}
        if store.audit_log(analyst=name, limit=1):
            known.add(scope)
    else:
        known |= {scope_name("domain", t.subject_domain) for t in config.tables if not t.public}
    if yes or scope in known:
        return
    question = f"{scope} matches no {kind} in the ledger or the policy (a typo?)"
    if not _interactive():
        raise InvalidParameterError(f"{question}; pass --yes to change its cap anyway")
    click.confirm(f"{question}. Change its cap anyway?", abort=True)


def _interactive() -> bool:
    """True when a person can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def _yes_option(func: F) -> F:
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation.")(func)


@contextmanager
def _open(config: Config) -> Iterator[SQLBudgetStore]:
    store = open_store(config.ledger, config.budget)
    try:
        yield store
    finally:
        store.close()


def _require_admin(config: Config, analyst: str | None, config_path: str | None) -> str:
    """The acting admin, authenticated.

    Once any user exists in the ledger database, the acting name must be a user with the admin flag and give
    their password (checked against the stored SCRAM verifier): a name typed on the command line proves
    nothing. Before that (a fresh install, no server users), a name listed under ``admins:`` in the config.
    Test: tests/server/test_server_cli.py::test_budget_admin_needs_the_admin_password.
    """
    analyst = resolve_analyst(analyst)
    users = UserStore.open(config.ledger)
    try:
        if users.list():
            return users.authenticate_admin(analyst, read_password(f"Password of {analyst}"))
    finally:
        users.engine.dispose()
    if analyst not in config.admins:
        raise AuthenticationError(
            f"Analyst {analyst!r} may not change budgets: only the admins listed under `admins:` in "
            f"{str(find_config(config_path))!r} may; pass --analyst NAME or set {ANALYST_ENV}"
        )
    return analyst


def _parse_since(value: str | None, now: float) -> float | None:
    """``7d``, ``12h``, ``30m``, ``2w`` ago, or an ISO date/time (UTC unless it says otherwise)."""
    if value is None:
        return None
    match = DURATION.match(value)
    if match:
        return now - float(match.group(1)) * SECONDS[match.group(2)]
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidParameterError(
            f"--since {value!r} is neither a duration (7d, 12h, 30m) nor an ISO date (2026-01-31 or 2026-01-31T12:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float) -> float | None:
    """JSON has no infinity: an unlimited cap is ``null``."""
    return None if math.isinf(value) else value


def _show_num(value: float) -> str:
    return "no cap" if math.isinf(value) else f"{value:.6g}"


def _print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table of literal text: names such as ``[red]x[/]`` print as typed, never as markup."""
    table = Table(title=Text(title))
    for header in headers:
        table.add_column(Text(header), overflow="fold")
    for row in rows:
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    Console(width=max(120, Console().width)).print(table)


# ---- budget ------------------------------------------------------------------------------------


@click.group("budget")
def budget() -> None:
    """Show and manage privacy budgets: spend, caps, history."""


def _usage_record(usage: Usage, config: Config, overridden: bool) -> dict[str, Any]:
    kind, name = split_scope(usage.scope)
    return {
        "kind": kind,
        "name": name,
        "spent": {"epsilon": usage.spent_epsilon, "delta": usage.spent_delta},
        "cap": {"epsilon": _num(usage.cap.epsilon), "delta": usage.cap.delta},
        "remaining": {"epsilon": _num(usage.remaining_epsilon), "delta": usage.remaining_delta},
        "cap_overridden": overridden,
        "window_days": config.budget.window_days,
        "next_expiry": _iso(usage.next_expiry),
    }


@budget.command("show")
@click.option("--kind", type=click.Choice(["analyst", "domain"]), default=None, help="Only analysts or domains.")
@config_option
@format_option("table", "json", "csv")
@reports_errors
def show(kind: ScopeKind | None, config_path: str | None, fmt: str) -> None:
    """Spent, remaining and cap of every analyst and subject domain in the rolling window."""
    config = load_config(config_path)
    with _open(config) as store:
        usages = store.usage(kind)
        defaults = {"analyst": config.budget.per_analyst, "domain": config.budget.per_subject}
        records = [_usage_record(u, config, u.cap != defaults[split_scope(u.scope)[0]]) for u in usages]
    if fmt == "json":
        click.echo(json.dumps({"window_days": config.budget.window_days, "scopes": records}, indent=2))
        return
    headers = [
        "kind",
        "name",
        "eps spent",
        "eps cap",
        "eps left",
        "delta spent",
        "delta cap",
        "delta left",
        "next expiry",
    ]
    if fmt == "csv":
        print_csv(
            [*headers, "cap overridden"],
            [
                [
                    *(r["kind"], r["name"], u.spent_epsilon, u.cap.epsilon, u.remaining_epsilon),
                    *(u.spent_delta, u.cap.delta, u.remaining_delta, r["next_expiry"] or "", r["cap_overridden"]),
                ]
                for r, u in zip(records, usages, strict=True)
            ],
        )
        return
    rows = [
        [
            r["kind"],
            r["name"],
            f"{u.spent_epsilon:.6g}",
            _show_num(u.cap.epsilon) + (" *" if r["cap_overridden"] else ""),
            _show_num(u.remaining_epsilon),
            f"{u.spent_delta:.3g}",
            f"{u.cap.delta:.3g}",
            f"{u.remaining_delta:.3g}",
            r["next_expiry"] or "-",
        ]
        for r, u in zip(records, usages, strict=True)
    ]
    window = f"{config.budget.window_days:g}"
    if not rows:
        click.echo(
            f"No analyst or domain has spent budget in the last {window} days. Default caps: analyst "
            f"epsilon={_show_num(config.budget.per_analyst.epsilon)}, delta={config.budget.per_analyst.delta:g}; "
            f"domain epsilon={_show_num(config.budget.per_subject.epsilon)}, delta={config.budget.per_subject.delta:g}"
        )
        return
    _print_table(f"Privacy budget over a rolling {window}-day window (* = cap set by an admin)", headers, rows)


def _in_window_series(charges: Sequence[Charge], window: float, now: float) -> tuple[list[float], list[float]]:
    """Epsilon counting in the window over time, as a step line (a point before and after each change)."""
    changes = sorted({c.at for c in charges} | {c.at + window for c in charges if c.at + window <= now})
    times: list[float] = []
    values: list[float] = []
    for t in [*changes, now]:
        if values:
            times.append(t)
            values.append(values[-1])
        times.append(t)
        values.append(sum(c.epsilon for c in charges if c.at <= t < c.at + window))
    return times, values


def _terminal_chart(times: Sequence[float], values: Sequence[float], cap: float | None, title: str) -> str:
    import plotext as plt

    labels = [datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M") for t in times]
    if hasattr(plt, "plot"):  # plotext 5
        plt.clear_figure()
        plt.plotsize(100, 20)
        plt.date_form("Y-m-d H:M")
        plt.plot(labels, list(values), label="epsilon in window")
        if cap is not None:
            plt.hline(cap)
        plt.title(title)
        return str(plt.uncolorize(plt.build()))
    figure = plt.figure  # plotext 6
    figure.clear()
    figure.plot_size(100, 20)
    figure.date().activate(form="%Y-%m-%d %H:%M")
    figure.draw(figure.signal(labels, list(values)).lines().label("epsilon in window"))
    if cap is not None:
        figure.draw(figure.signal(labels, [cap] * len(labels)).lines().label("cap"))
    figure.title(title)
    return str(plt.uncolorize(str(figure.build())))


def _pyplot() -> Any:
    """matplotlib's pyplot (headless), or a clear error naming the extra to install.

    ``pip install .`` does not install matplotlib (it is the ``plot`` extra: a large dependency only the PNG
    chart needs). Test: tests/ledger/test_admin_cli.py::test_png_without_matplotlib_is_a_clear_error.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise UnsupportedError(
            "--png needs matplotlib, which `pip install .` does not install; run `pip install 'dpgateway[plot]'` "
            "(or `pip install '.[plot]'` from a checkout), or leave out --png for the terminal chart"
        ) from None
    return pyplot


def _png_chart(
    pyplot: Any, path: str, times: Sequence[float], values: Sequence[float], cap: float | None, title: str
) -> None:
    fig, ax = pyplot.subplots(figsize=(9, 4))
    moments = [datetime.fromtimestamp(t, tz=timezone.utc) for t in times]
    ax.plot(moments, values, label="epsilon in window")
    if cap is not None:
        ax.axhline(cap, color="red", linestyle="--", label="cap")
    ax.set_title(title)
    ax.set_ylabel("epsilon")
    ax.legend()
    fig.autofmt_xdate()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise FileAccessError(f"--png {path!r}: cannot write the chart there ({exc.strerror})") from None
    finally:
        pyplot.close(fig)


@budget.command("history")
@click.argument("kind", type=click.Choice(["analyst", "domain"]), required=False)
@click.argument("name", required=False)
@click.option("--since", default=None, help="Only charges from then on: 7d, 12h, or an ISO date (UTC).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None, help="Also write a PNG chart.")
@config_option
@format_option("table", "json", "csv")
@reports_errors
def history(
    kind: ScopeKind | None, name: str | None, since: str | None, png_path: str | None, config_path: str | None, fmt: str
) -> None:
    """Charges over time, of everyone or of one analyst or domain (KIND NAME), with a spend chart."""
    if (kind is None) != (name is None):
        raise InvalidParameterError("give both KIND and NAME (e.g. `analyst alice`), or neither")
    pyplot = None if png_path is None else _pyplot()  # before any work: a missing extra is said at once
    config = load_config(config_path)
    with _open(config) as store:
        now = store.clock()
        scope = None if kind is None or name is None else _scope(kind, name)
        charges = store.history(scope, since=_parse_since(since, now))
        cap = None if scope is None else store.cap(scope).epsilon
    headers = ["time (UTC)", "analyst", "scopes", "epsilon", "delta", "state"]
    rows = [[_iso(c.at), c.analyst, " ".join(c.scopes), c.epsilon, c.delta, c.state] for c in charges]
    window = config.budget.window_days * 86400.0
    times, values = _in_window_series(charges, window, now)
    title = f"epsilon spent in the rolling {config.budget.window_days:g}-day window" + (f" ({scope})" if scope else "")
    cap = None if cap is None or math.isinf(cap) else cap
    if png_path is not None:
        _png_chart(pyplot, png_path, times, values, cap, title)
    if fmt == "json":
        records = [
            dict(zip(["at", "analyst", "scopes", "epsilon", "delta", "state"], row, strict=True)) for row in rows
        ]
        click.echo(json.dumps({"scope": scope, "charges": records}, indent=2))
    elif fmt == "csv":
        print_csv(headers, rows)
    elif not rows:
        click.echo("No charges" + (f" for {scope}" if scope else "") + " in the ledger.")
    else:
        click.echo(_terminal_chart(times, values, cap, title))
        _print_table("Charges", headers, [[*row[:3], f"{row[3]:.6g}", f"{row[4]:.3g}", row[5]] for row in rows])
    if png_path is not None and fmt == "table":
        click.echo(f"Chart written to {Path(png_path)}")


def _cap_changed(fmt: str, scope: str, epsilon: float, delta: float, verb: str) -> None:
    if fmt == "json":
        click.echo(json.dumps({"scope": scope, "cap": {"epsilon": _num(epsilon), "delta": delta}}))
    else:
        click.echo(f"{verb} {scope}: cap is now epsilon={_show_num(epsilon)}, delta={delta:g}")


@budget.command("grant")
@_scope_arguments
@click.option("--epsilon", type=NUMBER, default=0.0, help="Epsilon to add to the cap.")
@click.option("--delta", type=NUMBER, default=0.0, help="Delta to add to the cap.")
@_yes_option
@_admin_option
@config_option
@format_option("table", "json")
@reports_errors
def grant(
    kind: ScopeKind,
    name: str,
    epsilon: float,
    delta: float,
    yes: bool,
    analyst: str | None,
    config_path: str | None,
    fmt: str,
) -> None:
    """Raise the cap of an analyst or a subject domain by +epsilon / +delta (admins only).

    A NAME with no charges, cap, audit record or policy domain asks first (refuses without a terminal) unless --yes.
    """
    epsilon, delta = _amount("grant", epsilon, default=0.0), _amount("grant", delta, default=0.0)
    if epsilon == 0 and delta == 0:
        raise InvalidParameterError("nothing to grant: pass --epsilon E and/or --delta D")
    scope = _scope(kind, name)
    config = load_config(config_path)
    admin = _require_admin(config, analyst, config_path)
    with _open(config) as store:
        _confirm_unknown(store, config, scope, yes)
        cap = store.grant(scope, epsilon=epsilon, delta=delta, by=admin)
    _cap_changed(fmt, scope, cap.epsilon, cap.delta, "Granted")


@budget.command("set-cap")
@_scope_arguments
@click.option("--epsilon", type=NUMBER, default=None, help="New epsilon cap.")
@click.option("--delta", type=NUMBER, default=None, help="New delta cap.")
@_yes_option
@_admin_option
@config_option
@format_option("table", "json")
@reports_errors
def set_cap(
    kind: ScopeKind,
    name: str,
    epsilon: float | None,
    delta: float | None,
    yes: bool,
    analyst: str | None,
    config_path: str | None,
    fmt: str,
) -> None:
    """Override the cap of one analyst or subject domain (admins only; the config holds the defaults).

    A NAME with no charges, cap, audit record or policy domain asks first (refuses without a terminal) unless --yes.
    """
    if epsilon is None and delta is None:
        raise InvalidParameterError("nothing to set: pass --epsilon E and/or --delta D")
    epsilon, delta = _amount("set-cap", epsilon), _amount("set-cap", delta)
    scope = _scope(kind, name)
    config = load_config(config_path)
    admin = _require_admin(config, analyst, config_path)
    with _open(config) as store:
        _confirm_unknown(store, config, scope, yes)
        cap = store.set_cap(scope, epsilon=epsilon, delta=delta, by=admin)
    _cap_changed(fmt, scope, cap.epsilon, cap.delta, "Set")


def _amount(command: str, value: Any, default: float | None = None) -> Any:
    """A finite non-negative number (or None when not given); the ledger checks its own limits too."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise InvalidParameterError(f"budget {command}: --epsilon and --delta take finite numbers >= 0, not {value!r}")
    return float(value)


@budget.command("reset")
@_scope_arguments
@_yes_option
@_admin_option
@config_option
@format_option("table", "json")
@reports_errors
def reset(kind: ScopeKind, name: str, yes: bool, analyst: str | None, config_path: str | None, fmt: str) -> None:
    """Forget every charge of an analyst or subject domain, freeing its whole cap (admins only)."""
    scope = _scope(kind, name)
    config = load_config(config_path)
    admin = _require_admin(config, analyst, config_path)
    with _open(config) as store:
        if not yes:
            click.confirm(f"Forget every charge of {scope}? Its whole cap becomes available again", abort=True)
        count = store.reset(scope, by=admin)
    if fmt == "json":
        click.echo(json.dumps({"scope": scope, "charges_reset": count}))
    else:
        click.echo(f"Reset {scope}: {count} charge(s) no longer count against it")


# ---- audit -------------------------------------------------------------------------------------


@click.command("audit")
@click.option("--analyst", default=None, help="Only this analyst's queries.")
@click.option("--since", default=None, help="Only from then on: 7d, 12h, or an ISO date (UTC).")
@click.option("--outcome", type=click.Choice(OUTCOMES), default=None, help="Only this outcome.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@config_option
@format_option("table", "json", "csv")
@reports_errors
def audit(
    analyst: str | None, since: str | None, outcome: str | None, limit: int, config_path: str | None, fmt: str
) -> None:
    """The audit log, newest first: every query's outcome and every admin action."""
    with _open(load_config(config_path)) as store:
        records = store.audit_log(
            analyst=None if analyst is None else resolve_analyst(analyst),
            since=_parse_since(since, store.clock()),
            outcome=outcome,  # type: ignore[arg-type]
            limit=limit,
        )
    headers = ["time (UTC)", "analyst", "outcome", "epsilon", "delta", "sql", "rewritten sha256", "message"]
    rows = [
        [_iso(r.at), r.analyst, r.outcome, r.epsilon, r.delta, r.sql, r.rewritten_sha256, r.message] for r in records
    ]
    if fmt == "json":
        keys = ["at", "analyst", "outcome", "epsilon", "delta", "sql", "rewritten_sha256", "message"]
        click.echo(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
    elif fmt == "csv":
        print_csv(headers, rows)
    elif not rows:
        click.echo("No audit records match.")
    else:
        shown = [
            [
                _iso(r.at),
                r.analyst,
                r.outcome,
                f"{r.epsilon:.6g}",
                f"{r.delta:.3g}",
                r.sql,
                r.rewritten_sha256[:12],
                r.message,
            ]
            for r in records
        ]
        _print_table("Audit log (newest first)", headers, shown)


__all__ = ["audit", "budget"]
