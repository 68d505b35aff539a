"""Connector sources in the config, and secrets by reference: ``{$env: NAME}`` reads ``NAME`` from the environment.

A :class:`Secret` never shows its value: ``repr`` and ``str`` name only where it came from, so a config
printed, logged, audited or hashed into a cache key cannot carry a password. Only a connector calls
:meth:`Secret.reveal`, to open its connection. Test: tests/backends/test_postgres_config.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from dpgateway.errors import ConfigError

ENV_KEY = "$env"


@dataclass(frozen=True)
class Secret:
    """A value read from the environment variable ``name`` (``""``: written inline in the config); never shown."""

    name: str
    value: str = field(repr=False, compare=False)

    def reveal(self) -> str:
        return self.value

    def __str__(self) -> str:
        return f"{{{ENV_KEY}: {self.name}}}" if self.name else "<inline secret>"

    def __repr__(self) -> str:
        return f"Secret({ENV_KEY}={self.name!r})" if self.name else "Secret(inline)"


def resolve_secret(value: Any, where: str) -> Secret:
    """An inline string or ``{$env: NAME}`` read now, as a Secret (a ConfigError names the variable, never a value)."""
    if isinstance(value, str):
        return Secret(name="", value=value)
    if isinstance(value, dict) and set(value) == {ENV_KEY} and isinstance(value[ENV_KEY], str):
        name = value[ENV_KEY]
        found = os.environ.get(name)
        if not found:
            raise ConfigError(f"{where}: environment variable {name} is not set; export it before starting the gateway")
        return Secret(name=name, value=found)
    raise ConfigError(f"{where}: must be a string or {{{ENV_KEY}: VARIABLE_NAME}}")


POSTGRES_KEYS = {"connector", "url", "table", "statement_timeout_ms", "copy_schema"}
COPY_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEFAULT_STATEMENT_TIMEOUT_MS = 60_000
_IDENTIFIER_PART = "a schema or table name without dots or double quotes"


def connector_source(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a connector mapping; return it with ``url`` resolved to a :class:`Secret`.

    ``{connector: postgres, url: ..., table: schema.table}`` with an optional ``statement_timeout_ms``
    (default 60000) and ``copy_schema`` (the gateway's own schema for prepared copies, default dpgateway), or a Spark source (:func:`spark_source`).
    """
    kind = spec.get("connector")
    if kind == "spark":
        return spark_source(spec, where)
    if kind != "postgres":
        raise ConfigError(f"{where}.connector: must be postgres or spark (or give the source as a CSV or Parquet path)")
    unknown = sorted(set(map(str, spec)) - POSTGRES_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(POSTGRES_KEYS))}")
    if "url" not in spec:
        raise ConfigError(f"{where}.url: missing; give a postgresql:// URL, best as {{{ENV_KEY}: VARIABLE_NAME}}")
    url = resolve_secret(spec["url"], f"{where}.url")
    if not url.reveal().startswith(("postgresql://", "postgres://")):
        origin = f"environment variable {url.name}" if url.name else "the URL"
        raise ConfigError(f"{where}.url: {origin} must start with postgresql://")
    table = spec.get("table")
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(p and '"' not in p and "\x00" not in p for p in parts):
        raise ConfigError(f"{where}.table: must be table or schema.table, each {_IDENTIFIER_PART}")
    timeout = spec.get("statement_timeout_ms", DEFAULT_STATEMENT_TIMEOUT_MS)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86_400_000:
        raise ConfigError(f"{where}.statement_timeout_ms: must be an integer from 1 to 86400000 (milliseconds)")
    schema = spec.get("copy_schema", "dpgateway")
    if not isinstance(schema, str) or not COPY_SCHEMA.match(schema):
        raise ConfigError(
            f"{where}.copy_schema: must be a lower-case schema name (letters, digits, _), such as dpgateway: the "
            "gateway's own schema for prepared copies (docs/backends.md)"
        )
    return {"connector": kind, "url": url, "table": table, "statement_timeout_ms": timeout, "copy_schema": schema}


SPARK_KEYS = {"connector", "path", "format", "table"}
SPARK_FORMATS = ("parquet", "csv")
SPARK_TOP_KEYS = {"master", "conf"}
# Settings the gateway owns on its Spark session (connectors/spark.py): a config may not change them.
SPARK_OWNED_CONF = frozenset({"spark.sql.ansi.enabled"})


def spark_source(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """``{connector: spark, path: ..., format: parquet|csv}`` or ``{connector: spark, table: db.events}``."""
    unknown = sorted(set(map(str, spec)) - SPARK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(SPARK_KEYS))}")
    path, table = spec.get("path"), spec.get("table")
    if (path is None) == (table is None):
        raise ConfigError(f"{where}: give either path (with format) or table, not both or neither")
    if table is not None:
        parts = table.split(".") if isinstance(table, str) else []
        if not 1 <= len(parts) <= 2 or not all(p and "`" not in p and "\x00" not in p for p in parts):
            raise ConfigError(f"{where}.table: must be table or db.table, each a name without dots or backquotes")
        if "format" in spec:
            raise ConfigError(f"{where}.format: only a path source takes a format; remove it")
        return {"connector": "spark", "table": table}
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ConfigError(f"{where}.path: must be a file or folder path or URL such as s3a://bucket/events/")
    fmt = spec.get("format", "parquet")
    if fmt not in SPARK_FORMATS:
        raise ConfigError(f"{where}.format: must be one of {', '.join(SPARK_FORMATS)}")
    return {"connector": "spark", "path": path, "format": fmt}


def spark_settings(spec: Any) -> dict[str, Any]:
    """The top-level ``spark: {master: local[*], conf: {...}}`` (master: ``local[N]``, ``spark://``,
    ``yarn``, ``k8s://`` or a Spark Connect ``sc://`` URL), validated; conf values become strings."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError("spark: must be a mapping such as {master: 'local[*]', conf: {...}}")
    unknown = sorted(set(map(str, spec)) - SPARK_TOP_KEYS)
    if unknown:
        raise ConfigError(f"spark: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(SPARK_TOP_KEYS))}")
    master = spec.get("master", "local[*]")
    if not isinstance(master, str) or not master:
        raise ConfigError("spark.master: must be a master URL such as local[*], spark://host:7077 or sc://host:15002")
    conf = spec.get("conf", {})
    if not isinstance(conf, dict) or not all(isinstance(k, str) for k in conf):
        raise ConfigError("spark.conf: must map Spark setting names to values")
    owned = sorted(set(conf) & SPARK_OWNED_CONF)
    if owned:
        raise ConfigError(
            f"spark.conf.{owned[0]}: the gateway sets this itself (it keeps row expressions total); remove it"
        )
    values = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in conf.items()}
    return {"master": master, "conf": values}
