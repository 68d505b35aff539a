"""``dpgateway serve`` and ``dpgateway user add|list|passwd|remove``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

from dpgateway.budget_store.users import UserStore, read_password
from dpgateway.cli_common import config_option, render_rows, reports_errors
from dpgateway.errors import InvalidParameterError
from dpgateway.gateway import ANALYST_ENV, Gateway, resolve_analyst
from dpgateway.policies.loader import load_config

F = TypeVar("F", bound=Callable[..., Any])


@click.command()
@config_option
@click.option("--host", default=None, help="Address to listen on (default: server.host, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="TCP port (default: server.port, else 6432).")
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Serve TLS with a self-signed certificate generated once into .dpgateway-tls/ beside the config.",
)
@click.option(
    "--no-catalog",
    is_flag=True,
    help="Do not start the row-less shadow PostgreSQL that answers catalog queries (\\dt, JDBC metadata, ...).",
)
@reports_errors
def serve(config_path: str | None, host: str | None, port: int | None, tls_self_signed: bool, no_catalog: bool) -> None:
    """Serve the gateway to PostgreSQL clients (psql, psycopg, JDBC, ...) with SCRAM-SHA-256 logins.

    Add users first with `dpgateway user add NAME`; each one's budget is spent as that analyst. Catalog queries
    go to a private PostgreSQL holding only the policy's schema, started here (docs/server.md, "Catalog").
    """
    from dpgateway.server.server import Server, ServerSettings, self_signed_context, tls_context
    from dpgateway.server.shadow import ShadowCluster, ShadowUnavailable

    config = load_config(config_path)
    section = config.server
    listen = host or section.host
    tls = None
    if tls_self_signed:
        tls = self_signed_context(config.base_dir / ".dpgateway-tls", listen)
    elif section.tls_cert is not None and section.tls_key is not None:
        tls = tls_context(section.tls_cert, section.tls_key)
    settings = ServerSettings(
        host=listen, port=section.port if port is None else port, database=section.database, tls=tls
    )
    shadow = None
    if not no_catalog:
        try:
            shadow = ShadowCluster(config, settings.database)
        except ShadowUnavailable as exc:
            click.echo(f"No catalog (\\dt, JDBC metadata and other catalog queries will fail): {exc}", err=True)
    with Gateway(config) as gateway, contextlib.ExitStack() as cleanup:
        if shadow is not None:
            cleanup.callback(shadow.stop)
        users = UserStore.beside(gateway.store, config.ledger)
        if not users.list():
            click.echo("No users yet: nobody can log in. Add one with `dpgateway user add NAME`.", err=True)
        server = Server(gateway, users, settings, shadow)

        async def run() -> None:
            await server.start()
            click.echo(
                f"dpgateway listening on {settings.host}:{server.port} (database {settings.database!r}, "
                f"TLS {'on' if tls else 'off'}); Ctrl-C or SIGTERM stops",
                err=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):  # also when started with SIGINT ignored (a background job)
                loop.add_signal_handler(signum, stop.set)
            try:
                await stop.wait()
            finally:
                await server.close()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())


@click.group()
def user() -> None:
    """Manage the users who log in to `dpgateway serve` (SCRAM-SHA-256 verifiers in the ledger database)."""


def _users(config_path: str | None) -> UserStore:
    return UserStore.open(load_config(config_path).ledger)


def _authorized(config_path: str | None, by: str | None, from_stdin: bool) -> UserStore:
    """The user store, once the acting admin has given their password (needed as soon as any admin exists;
    before that anyone with the ledger may add the first users). With ``--password-stdin`` the admin's password
    is the first line of stdin and a new password the second."""
    users = _users(config_path)
    if users.has_admin():
        name = resolve_analyst(by)
        users.authenticate_admin(name, read_password(f"Password of admin {name}", from_stdin))
    return users


def _by_option(func: F) -> F:
    return click.option(
        "--by",
        default=None,
        help=f"The admin acting (default: ${ANALYST_ENV}, else the OS user); asked for their password once an "
        "admin exists.",
    )(func)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = click.prompt("Password", hide_input=True)
    if click.prompt("Repeat password", hide_input=True) != first:
        raise InvalidParameterError("the two passwords differ; nothing was changed")
    return str(first)


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="The user may run admin actions.")
@click.option("--password-stdin", is_flag=True, help="Read the password(s) from stdin, one a line.")
@_by_option
@config_option
@reports_errors
def user_add(name: str, admin: bool, password_stdin: bool, by: str | None, config_path: str | None) -> None:
    """Add user NAME (only a SCRAM-SHA-256 verifier of the password is stored); needs an admin once one exists."""
    _authorized(config_path, by, password_stdin).add(name, _password(password_stdin), admin=admin)
    click.echo(f"added {'admin' if admin else 'user'} {name}")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password(s) from stdin, one a line.")
@_by_option
@config_option
@reports_errors
def user_passwd(name: str, password_stdin: bool, by: str | None, config_path: str | None) -> None:
    """Change the password of user NAME (needs an admin once one exists)."""
    _authorized(config_path, by, password_stdin).set_password(name, _password(password_stdin))
    click.echo(f"changed the password of {name}")


@user.command("remove")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the admin's password from the first line of stdin.")
@_by_option
@config_option
@reports_errors
def user_remove(name: str, password_stdin: bool, by: str | None, config_path: str | None) -> None:
    """Remove user NAME (their ledger history stays; needs an admin once one exists)."""
    _authorized(config_path, by, password_stdin).remove(name)
    click.echo(f"removed {name}")


@user.command("list")
@config_option
@reports_errors
def user_list(config_path: str | None) -> None:
    """List the users and their roles."""
    rows = [
        [u.name, "admin" if u.is_admin else "analyst", datetime.fromtimestamp(u.created, timezone.utc).isoformat()]
        for u in _users(config_path).list()
    ]
    render_rows(["name", "role", "created"], rows, "table")
