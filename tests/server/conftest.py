"""A wire-protocol server started in-process on a free loopback port, over the demo gateway."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dpgateway
from dpgateway import Gateway
from dpgateway.budget_store.users import UserStore
from dpgateway.policies.loader import load_config
from dpgateway.server.server import Server, ServerSettings
from dpgateway.server.shadow import ShadowCluster, ShadowUnavailable

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
