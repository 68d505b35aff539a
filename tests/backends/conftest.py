"""The conformance suite's backends: DuckDB over Parquet files, PostgreSQL on the session's throwaway
server with a least-privilege role (LOGIN, USAGE on one schema, SELECT on the loaded tables, nothing else),
and Spark over Parquet files on one local Spark session for the whole test run (``local[2]``, one shuffle
partition, no UI; each gateway takes its own ``newSession()`` of it).

``backend.load(name, frame)`` puts a table on the backend and returns its policy ``source``;
``backend.gateway(tables)`` opens a gateway on those tables with a large budget and a throwaway ledger.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psycopg2
import psycopg2.extras
import pytest
import sqlalchemy as sa
from pg_server import SystemPostgres, WheelPostgres

from dpgateway import Gateway
from dpgateway.connectors.base import ExactAggregates
from dpgateway.policies.loader import parse_config

PUMS = resources.files("dpgateway") / "data" / "pums.csv"
URL_ENV = "DPGATEWAY_TEST_BACKEND_URL"
READER = "dpgateway_reader"
PG_TYPES = {"int64": "bigint", "float64": "double precision", "object": "text", "str": "text", "bool": "boolean"}
PUMS_COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "income": {"type": "float", "bounds": [0, 500000]},
    "sex": {"type": "int", "public_values": [0, 1]},
    "married": {"type": "int", "public_values": [0, 1]},
    "educ": {"type": "int"},
    "race": {"type": "int"},
}
BIG = {"epsilon": 1000.0, "delta": 0.1}


@dataclasses.dataclass
class PostgresDatabase:
    admin_url: str  # the server's superuser, for loading tables
    reader_url: str  # the gateway's role: SELECT on the loaded tables only

    def load(self, name: str, frame: pd.DataFrame, types: dict[str, str] | None = None) -> None:
        types = types or {}
        columns = ", ".join(f'"{c}" {types.get(c, PG_TYPES[str(frame[c].dtype)])}' for c in frame.columns)
        # pandas 3's ``str`` columns hold NaN for a missing value: NULL, not the text 'NaN' (a float NaN stays)
        text = [str(frame[c].dtype) == "str" for c in frame.columns]
        rows = [
            tuple(None if v is None or v is pd.NA or (t and v != v) else v for v, t in zip(row, text, strict=True))
            for row in frame.itertuples(index=False)
        ]
        with psycopg2.connect(self.admin_url) as conn, conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS census."{name}"; CREATE TABLE census."{name}" ({columns})')
            if rows:
                psycopg2.extras.execute_values(cur, f'INSERT INTO census."{name}" VALUES %s', rows)
            cur.execute(f'GRANT SELECT ON census."{name}" TO {READER}')
        conn.close()


@pytest.fixture(scope="session")
def pg_database(postgres_server: SystemPostgres | WheelPostgres) -> PostgresDatabase:
    """A fresh database with schema ``census`` and the reader role (no password: the test server trusts)."""
    name = f"backends_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(postgres_server.url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
        cur.execute(f"DO $$ BEGIN CREATE ROLE {READER} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    admin.close()
    url = sa.make_url(postgres_server.url).set(database=name)
    database = PostgresDatabase(
        admin_url=url.render_as_string(hide_password=False),
        reader_url=url.set(username=READER, password=None).render_as_string(hide_password=False),
    )
    with psycopg2.connect(database.admin_url) as conn, conn.cursor() as cur:
        cur.execute(
            f"REVOKE ALL ON SCHEMA public FROM PUBLIC; CREATE SCHEMA census; GRANT USAGE ON SCHEMA census TO {READER}"
        )
    conn.close()
    return database


# Test data has a few thousand rows: one shuffle partition and no adaptive re-planning per stage (the same
# results; the stages just do less bookkeeping), no UI and no progress bars.
SPARK_CONF = {
    "spark.sql.shuffle.partitions": "1",
    "spark.sql.adaptive.enabled": "false",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "1g",
}


@pytest.fixture(scope="session")
def spark_session() -> Any:
    """One local Spark for the whole test run (starting it takes seconds; every Spark test shares it)."""
    pytest.importorskip("pyspark", reason="pip install 'dpgateway[spark]'")
    from dpgateway.connectors.spark import spark_session as start

    session = start("local[2]", SPARK_CONF)
    session.sparkContext.setLogLevel("OFF")  # Spark logs the refused queries' errors; the tests check them
    yield session
    session.stop()


class Backend:
    """One backend of the conformance suite."""

    def __init__(self, name: str, folder: Path, pg: PostgresDatabase | None, spark: Any = None) -> None:
        self.name, self.folder, self.pg, self.spark = name, folder, pg, spark
        self._gateways: list[Gateway] = []

    def load(self, name: str, frame: pd.DataFrame, types: dict[str, str] | None = None) -> Any:
        """Put ``frame`` on this backend as table ``name``; return the policy's ``source`` for it."""
        if self.pg is None:
            path = self.folder / f"{name}.parquet"
            with duckdb.connect() as con:  # pandas needs pyarrow for Parquet; DuckDB reads the frame itself
                con.register("frame", frame)
                con.execute(f"COPY frame TO '{path}' (FORMAT parquet)")
            return {"connector": "spark", "path": str(path), "format": "parquet"} if self.spark else str(path)
        self.pg.load(name, frame, types)
        return {"connector": "postgres", "url": {"$env": URL_ENV}, "table": f"census.{name}"}

    def gateway(self, tables: dict[str, Any]) -> Gateway:
        budget = {"per_subject": BIG, "per_analyst": BIG, "per_query": {"epsilon": 10.0, "delta": 0.01}}
        raw = {"tables": tables, "budget": budget, "ledger": f"sqlite:///{self.folder / 'ledger.db'}"}
        if self.spark is not None:
            from dpgateway.connectors.spark import SparkConnector

            config = parse_config(raw, base_dir=self.folder)
            connector = SparkConnector(self.spark, config.tables)
            for table in config.tables:
                connector.check_table(table)
            gateway = Gateway(config, connector=connector)
        else:
            gateway = Gateway(parse_config(raw, base_dir=self.folder))
        self._gateways.append(gateway)
        return gateway

    def close(self) -> None:
        for gateway in self._gateways:
            gateway.close()


@pytest.fixture(
    params=[
        "duckdb",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("spark", marks=pytest.mark.spark),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """Each backend in turn (PostgreSQL through the least-privilege role, URL by ``{$env: ...}``; Spark on
    the shared session, through a connector the test builds so the session is not the config's)."""
    pg = request.getfixturevalue("pg_database") if request.param == "postgres" else None
    spark = request.getfixturevalue("spark_session") if request.param == "spark" else None
    if pg is not None:
        monkeypatch.setenv(URL_ENV, pg.reader_url)
    chosen = Backend(request.param, tmp_path, pg, spark)
    yield chosen
    chosen.close()


def pums_frame() -> pd.DataFrame:
    return pd.read_csv(str(PUMS))


def exact(gateway: Gateway, sql: str) -> ExactAggregates:
    """The exact bounded aggregates of ``sql``: the planner's bounded SQL run on the gateway's connector."""
    plan = gateway.explain(sql).plan
    assert plan is not None
    return gateway.connector.execute(plan.bounded_sql, plan.settings)


def sorted_rows(result: ExactAggregates) -> list[tuple[Any, ...]]:
    return sorted(result.rows, key=lambda row: tuple((v is None, str(v)) for v in row))
