"""Which connector a gateway opens: one per gateway, chosen from the tables' sources.

File sources (CSV, Parquet) are read by DuckDB; ``connector: postgres`` sources by PostgreSQL,
``connector: spark`` sources by Spark (the config's ``spark`` session). A gateway runs every query on one
backend, so a config mixing backends, or naming two PostgreSQL databases, is refused for now (a query reads one table, so routing per table is a later step).
"""

from __future__ import annotations

from dpgateway.connectors.base import Connector
from dpgateway.errors import ConfigError
from dpgateway.policies.model import Config


def connector_for(config: Config) -> Connector:
    """The connector for every table of ``config`` (a ConfigError if they need different backends)."""
    remote = [t for t in config.tables if isinstance(t.source, dict)]
    if not remote:
        from dpgateway.connectors.duckdb import DuckDBConnector

        return DuckDBConnector.for_config(config)
    files = [t.name for t in config.tables if not isinstance(t.source, dict)]
    if files:
        raise ConfigError(
            f"tables.{files[0]}: a gateway reads one backend, and tables.{remote[0].name} is on "
            f"{remote[0].source['connector']}; give the file a connector source too, or serve it from a second gateway"
        )
    kinds = {t.source["connector"] for t in remote}
    if len(kinds) > 1:
        raise ConfigError(
            f"tables: a gateway reads one backend, and these tables are on {' and '.join(sorted(kinds))}; "
            "serve them from two gateways"
        )
    if kinds == {"spark"}:
        from dpgateway.connectors.spark import SparkConnector

        return SparkConnector.for_config(config)
    first = remote[0].source
    for table in remote[1:]:
        spec = table.source
        if (spec["url"].reveal(), spec["statement_timeout_ms"]) != (
            first["url"].reveal(),
            first["statement_timeout_ms"],
        ):
            raise ConfigError(
                f"tables.{table.name}.source: every table of a gateway must use the same url and "
                f"statement_timeout_ms as tables.{remote[0].name}"
            )
    from dpgateway.connectors.postgres import PostgresConnector

    return PostgresConnector(first["url"], statement_timeout_ms=first["statement_timeout_ms"])
