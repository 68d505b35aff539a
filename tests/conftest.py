"""Shared fixtures: a gateway over the bundled PUMS sample with a throwaway ledger; one throwaway PostgreSQL
server per session (the ledger and backend tests share it)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from pg_server import PostgresUnavailable, SystemPostgres, WheelPostgres, start_postgres

from dpgateway import Gateway
from dpgateway.policies.loader import load_config

DATA = resources.files("dpgateway") / "data"


@pytest.fixture
def demo_config_path(tmp_path: Path) -> Path:
    """The bundled demo policy and data, copied to a temporary folder (ledger beside them)."""
    (tmp_path / "pums.csv").write_bytes((DATA / "pums.csv").read_bytes())
    (tmp_path / "dpgateway.yaml").write_text((DATA / "demo.yaml").read_text())
    return tmp_path / "dpgateway.yaml"


@pytest.fixture
def demo_gateway(demo_config_path: Path) -> Iterator[Gateway]:
    """A gateway on the demo policy with a large budget, so tests are not limited by caps."""
    config = load_config(demo_config_path)
    budget = dataclasses.replace(
        config.budget,
        per_subject=dataclasses.replace(config.budget.per_subject, epsilon=1000.0, delta=0.1),
        per_analyst=dataclasses.replace(config.budget.per_analyst, epsilon=1000.0, delta=0.1),
        per_query=dataclasses.replace(config.budget.per_query, epsilon=10.0, delta=0.01),
    )
    with Gateway(dataclasses.replace(config, budget=budget)) as gw:
        yield gw


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[SystemPostgres | WheelPostgres]:
    """A throwaway PostgreSQL server for the whole session (see pg_server.py)."""
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL could not start, and CI must run the PostgreSQL tests: {exc}")
        pytest.skip(f"PostgreSQL could not start: {exc}")
    yield server
    server.stop()
