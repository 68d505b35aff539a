"""A wire-protocol server started in-process on a free loopback port, over the demo gateway; and the reference
PostgreSQL 15 the differential tests compare it with (the session's throwaway server, tests/pg_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg2
import pytest
from pg_server import SystemPostgres, WheelPostgres
from psycopg2 import sql

import dpgateway
from dpgateway import Gateway
from dpgateway.budget_store.users import UserStore
from dpgateway.policies.loader import load_config
from dpgateway.server.server import Server, ServerSettings
from dpgateway.server.shadow import OWNER, ShadowCluster, ShadowUnavailable

PASSWORD = "correct-horse-battery"


@dataclass
class Running:
    server: Server
    loop: asyncio.AbstractEventLoop
    host: str
    port: int

    def dsn(self, user: str = "alice", password: str = PASSWORD, **extra: str) -> str:
        parts = {"host": self.host, "port": str(self.port), "user": user, "password": password, "dbname": "dpgateway"}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())


def start_server(gateway: Gateway, settings: ServerSettings, shadow: ShadowCluster | None = None) -> Iterator[Running]:
    users = UserStore.beside(gateway.store, gateway.config.ledger)
    if users.get("alice") is None:
        users.add("alice", PASSWORD)
        users.add("bob", PASSWORD)
        users.add("root", PASSWORD, admin=True)
    server = Server(gateway, users, settings, shadow)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield Running(server, loop, settings.host, server.port)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def wire(demo_gateway: Gateway) -> Iterator[Running]:
    yield from start_server(demo_gateway, ServerSettings(port=0, startup_timeout=2.0))


@pytest.fixture(scope="session")
def shadow_cluster() -> Iterator[ShadowCluster]:
    """The row-less catalog server over the demo policy, shared by the session's tests."""
    try:
        cluster = ShadowCluster(load_config(Path(dpgateway.__file__).parent / "data" / "demo.yaml"), "dpgateway")
    except ShadowUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the shadow catalog must start in CI: {exc}")
        pytest.skip(f"no PostgreSQL binaries for the shadow catalog: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def catalog_wire(demo_gateway: Gateway, shadow_cluster: ShadowCluster) -> Iterator[Running]:
    """A server whose catalog queries go to the shadow."""
    yield from start_server(demo_gateway, ServerSettings(port=0, startup_timeout=2.0), shadow_cluster)


REFERENCE_TYPES = {"int": "bigint", "float": "double precision", "str": "text", "bool": "boolean", "date": "date"}


@pytest.fixture(scope="session")
def reference_pg(postgres_server: SystemPostgres | WheelPostgres) -> Running:
    """A real PostgreSQL 15 serving what the gateway serves: database ``dpgateway``, the demo policy's tables as
    the shadow catalog declares them (``int`` bigint, ``float`` double precision, owner ``dpgateway``) with the
    demo's rows, and the login users of :func:`start_server`. Its ``server`` is None (it is no gateway)."""
    config = load_config(Path(dpgateway.__file__).parent / "data" / "demo.yaml")
    admin = psycopg2.connect(postgres_server.url)
    admin.autocommit = True
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = 'dpgateway'")
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(OWNER)))
            for user in ("alice", "bob", "root"):
                cur.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), sql.Literal(PASSWORD))
                )
            cur.execute(sql.SQL("CREATE DATABASE dpgateway OWNER {}").format(sql.Identifier(OWNER)))
            with psycopg2.connect(postgres_server.url, dbname="dpgateway") as conn, conn.cursor() as db:
                for table in config.tables:
                    columns = sql.SQL(", ").join(
                        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(REFERENCE_TYPES[c.type]))
                        for c in table.columns
                    )
                    name = sql.Identifier(table.name)
                    db.execute(sql.SQL("CREATE TABLE {} ({})").format(name, columns))
                    db.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(name, sql.Identifier(OWNER)))
                    db.execute(sql.SQL("GRANT SELECT ON {} TO PUBLIC").format(name))
                    header = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
                    data = (resources.files("dpgateway") / "data" / "pums.csv").read_text()
                    db.copy_expert(
                        sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv, HEADER true)")
                        .format(name, header)
                        .as_string(db),
                        _reordered(data, [c.name for c in table.columns]),
                    )
    host, port = _host_port(postgres_server)
    return Running(None, None, host, port)  # type: ignore[arg-type]


def _host_port(server: SystemPostgres | WheelPostgres) -> tuple[str, int]:
    if isinstance(server, SystemPostgres):
        return "127.0.0.1", server.port
    parts = psycopg2.extensions.parse_dsn(server.url)
    return parts["host"], int(parts.get("port", 5432))


def _reordered(csv_text: str, columns: list[str]) -> io.StringIO:
    """The CSV with its columns in the declared order."""
    rows = list(csv.reader(io.StringIO(csv_text)))
    order = [rows[0].index(name) for name in columns]
    out = io.StringIO()
    csv.writer(out).writerows([[row[i] for i in order] for row in rows])
    out.seek(0)
    return out
