"""Load and validate ``dpgateway.yaml`` into a frozen :class:`Config`.

Every problem is a :class:`ConfigError` naming the key path, the rule and the fix.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from dpgateway.errors import ConfigError
from dpgateway.policies.connections import connector_source, spark_settings
from dpgateway.policies.enclave import check_enclave_tables, enclave_settings
from dpgateway.policies.model import (
    EXECUTORS,
    Budget,
    Cap,
    Column,
    Config,
    CsvDialect,
    HeSettings,
    MpcSettings,
    PartySources,
    PathStep,
    PrepareConfig,
    ServerConfig,
    Table,
    table_key,
)

CONFIG_ENV = "DPGATEWAY_CONFIG"
DEFAULT_CONFIG_NAME = "dpgateway.yaml"
DEFAULT_CACHE_DIR = ".dpgateway-cache"

TABLE_KEYS = {
    "source",
    "privacy_unit",
    "max_rows_per_unit",
    "columns",
    "public",
    "domain",
    "csv",
    "executor",
    "executors_allowed",
}
MPC_KEYS = {"collusion_threshold", "units_disjoint", "timeout_s", "keys"}
HE_KEYS = {"key_holder", "public_key", "gateway_key", "ciphertexts", "timeout_s"}
CSV_KEYS = {"delimiter", "quote", "escape", "header", "comment", "null"}
UNIT_TYPES = ("int", "str")  # identifiers whose text round-trips exactly (docs: README.md, docs/privacy.md)
COLUMN_KEYS = {"type", "bounds", "public_values", "per_unit"}
COLUMN_TYPES = ("int", "float", "str", "bool", "date")
TOP_KEYS = {"tables", "budget", "ledger", "admins", "cache_dir", "server", "prepare", "executors", "spark"}
PREPARE_KEYS = {"auto", "after_queries", "filtered"}
SERVER_KEYS = {"host", "port", "tls_cert", "tls_key", "database"}
BUDGET_KEYS = {
    "window_days",
    "per_subject",
    "per_analyst",
    "per_query",
    "default_query_epsilon",
    "default_query_delta",
    "replay",
    "noise",
}
NOISE_CHOICES = ("auto", "laplace", "gaussian")
MAX_ROWS_PER_UNIT = 10_000


def find_config(path: str | os.PathLike[str] | None = None) -> Path:
    """The config path: explicit, else ``$DPGATEWAY_CONFIG``, else ``./dpgateway.yaml``."""
    chosen = path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME
    resolved = Path(chosen)
    if not resolved.is_file():
        raise ConfigError(
            f"Config file {str(resolved)!r} not found; pass --config PATH, set {CONFIG_ENV}, "
            f"or run `dpgateway demo` to try the bundled sample"
        )
    return resolved


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file."""
    resolved = find_config(path)
    try:
        raw = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read config {str(resolved)!r}: {exc}") from None
    return parse_config(raw, base_dir=resolved.resolve().parent)


def parse_config(raw: Any, *, base_dir: Path) -> Config:
    """Validate a config mapping (as read from YAML)."""
    raw = _mapping(raw, "the config file")
    _no_unknown(raw, TOP_KEYS, "top level")
    tables_raw = _mapping(raw.get("tables"), "tables")
    if not tables_raw:
        raise ConfigError("tables: declare at least one table")
    mpc = _mpc(raw.get("executors", {}), base_dir)
    enclave = enclave_settings(raw.get("executors", {}).get("enclave"), base_dir)
    tables = tuple(_table(str(name), spec, base_dir, mpc) for name, spec in tables_raw.items())
    check_enclave_tables(tables, enclave)
    seen: dict[str, str] = {}
    for table in tables:
        other = seen.setdefault(table_key(table.name), table.name)
        if other != table.name:
            raise ConfigError(f"tables.{table.name}: the same table as tables.{other} (`public.x` is `x`); keep one")
    tables = tuple(_with_path_domain(t, tables) for t in tables)
    admins = raw.get("admins", [])
    if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
        raise ConfigError("admins: must be a list of analyst names")
    ledger = raw.get("ledger", "sqlite:///dpgateway-ledger.db")
    if not isinstance(ledger, str):
        raise ConfigError("ledger: must be a URL such as sqlite:///dpgateway-ledger.db")
    cache_dir = raw.get("cache_dir", DEFAULT_CACHE_DIR)
    if not isinstance(cache_dir, str) or not cache_dir.strip():
        raise ConfigError("cache_dir: must be a folder path such as .dpgateway-cache")
    return Config(
        tables=tables,
        budget=_budget(raw.get("budget", {})),
        ledger=_ledger_url(ledger, base_dir),
        admins=tuple(admins),
        base_dir=base_dir,
        cache_dir=base_dir / cache_dir,
        server=_server(raw.get("server", {}), base_dir),
        prepare=_prepare(raw.get("prepare", {})),
        mpc=mpc,
        enclave=enclave,
        he=_he(raw.get("executors", {}), base_dir),
        spark=spark_settings(raw.get("spark")),
    )


def _prepare(spec: Any) -> PrepareConfig:
    spec = _mapping(spec, "prepare")
    _no_unknown(spec, PREPARE_KEYS, "prepare")
    default = PrepareConfig()
    auto, after, filtered = (spec.get(key, getattr(default, key)) for key in ("auto", "after_queries", "filtered"))
    if not isinstance(auto, bool):
        raise ConfigError("prepare.auto: must be true (prepare queried tables in the background) or false")
    if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after <= 1_000_000:
        raise ConfigError("prepare.after_queries: must be a whole number of queries from 1 to 1000000, such as 2")
    if filtered not in ("filter_first", "bound_first"):
        raise ConfigError(
            "prepare.filtered: must be filter_first (bound each person's matching rows) or bound_first (bound "
            "each person's rows, then filter; filtered queries can read prepared copies)"
        )
    return PrepareConfig(auto=auto, after_queries=after, filtered=filtered)


def _server(spec: Any, base_dir: Path) -> ServerConfig:
    spec = _mapping(spec, "server")
    _no_unknown(spec, SERVER_KEYS, "server")
    host, port, database = spec.get("host", "127.0.0.1"), spec.get("port", 6432), spec.get("database", "dpgateway")
    if not isinstance(host, str) or not host:
        raise ConfigError("server.host: must be a host name or address such as 127.0.0.1")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError("server.port: must be a port number from 0 to 65535, such as 6432")
    if not isinstance(database, str) or not database:
        raise ConfigError("server.database: must be the database name clients connect to, such as dpgateway")
    paths = {}
    for key in ("tls_cert", "tls_key"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"server.{key}: must be the path of a PEM file")
        paths[key] = None if value is None else base_dir / value
    if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        raise ConfigError("server: set both tls_cert and tls_key, or neither")
    return ServerConfig(host, port, paths["tls_cert"], paths["tls_key"], database)


def _ledger_url(url: str, base_dir: Path) -> str:
    """Resolve a relative SQLite path against the config file's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(base_dir / url[len(prefix) :])
    return url


def _table(name: str, spec: Any, base_dir: Path, mpc: MpcSettings) -> Table:
    where = f"tables.{name}"
    spec = _mapping(spec, where)
    _no_unknown(spec, TABLE_KEYS, where)
    if "source" not in spec:
        raise ConfigError(f"{where}: missing `source` (a CSV or Parquet path)")
    source = spec["source"]
    if isinstance(source, str):
        source = base_dir / source
    elif isinstance(source, dict) and "parties" in source:
        source = _parties(source, f"{where}.source", base_dir)
    elif isinstance(source, dict):
        source = connector_source(source, f"{where}.source")
    else:
        raise ConfigError(f"{where}.source: must be a file path or a connector mapping")
    public = spec.get("public", False)
    if not isinstance(public, bool):
        raise ConfigError(f"{where}.public: must be true or false")
    columns_raw = spec.get("columns", {})
    if not columns_raw and not public:
        raise ConfigError(f"{where}: declare its columns under {where}.columns")
    columns = tuple(
        _column(f"{where}.columns.{c}", str(c), s) for c, s in _mapping(columns_raw, f"{where}.columns").items()
    )
    unit = spec.get("privacy_unit")
    path: tuple[PathStep, ...] = ()
    if isinstance(unit, dict):
        unit, path = _unit_path(unit, f"{where}.privacy_unit", columns)
    elif unit is not None:
        if not isinstance(unit, str):
            raise ConfigError(
                f"{where}.privacy_unit: must be a column name, or {{column, path: [{{from, table, to}}]}}"
            )
        declared = next((c for c in columns if c.name == unit), None)
        if declared is None:
            raise ConfigError(f"{where}.privacy_unit: column {unit!r} is not declared under {where}.columns")
        if declared.type not in UNIT_TYPES:
            # Proof note: a float, bool or date unit merges distinct raw ids into one person (two float
            # ids above 2**53, '1' and 'yes'), which multiplies the real sensitivity. Test:
            # tests/test_sources.py::test_unit_type_must_round_trip.
            raise ConfigError(
                f"{where}.privacy_unit: column {unit!r} is {declared.type}; a privacy unit must be int or str "
                f"(identifiers that round-trip exactly); declare it `type: str` under {where}.columns.{unit}"
            )
    declared = next((c for c in columns if c.per_unit), None)
    if declared is not None and unit is None:
        raise ConfigError(
            f"{where}.columns.{declared.name}.per_unit: only a table with a privacy_unit has units whose rows could "
            f"share a value; remove per_unit, or declare {where}.privacy_unit"
        )
    k = spec.get("max_rows_per_unit", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ROWS_PER_UNIT:
        raise ConfigError(f"{where}.max_rows_per_unit: must be an integer from 1 to {MAX_ROWS_PER_UNIT}")
    if unit is None and k != 1:
        raise ConfigError(f"{where}.max_rows_per_unit: needs a privacy_unit (without one each row is a person)")
    domain = spec.get("domain", "")
    if not isinstance(domain, str):
        raise ConfigError(f"{where}.domain: must be a name")
    csv = _csv(spec.get("csv"), f"{where}.csv")
    if "csv" in spec and (not isinstance(source, Path) or source.suffix.lower() in (".parquet", ".pq")):
        raise ConfigError(f"{where}.csv: only a CSV file source takes csv options; remove {where}.csv")
    executor, allowed = _executors(spec, where, source, public)
    if isinstance(source, PartySources) and mpc.keys is None and any(p.startswith("tcp://") for p in source.parties):
        raise ConfigError(
            f"{where}.source: a party running elsewhere (tcp://) only answers requests signed with its key; run "
            "`dpgateway mpc keygen --parties K --out DIR` and set executors.mpc.keys: DIR"
        )
    if isinstance(source, PartySources) and mpc.collusion_threshold >= len(source.parties):
        raise ConfigError(
            f"{where}.source: {len(source.parties)} parties cannot tolerate executors.mpc.collusion_threshold "
            f"{mpc.collusion_threshold}; it must be below the number of parties"
        )
    return Table(
        name=name,
        source=source,
        columns=columns,
        privacy_unit=unit,
        max_rows_per_unit=k,
        public=public,
        domain=domain,
        csv=csv,
        executor=executor,
        executors_allowed=allowed,
        units_disjoint=mpc.units_disjoint,
        unit_path=path,
    )


def _unit_path(spec: dict[str, Any], where: str, columns: tuple[Column, ...]) -> tuple[str, tuple[PathStep, ...]]:
    """``{column, path: [{from, table, to}, ...]}``: the unit is ``column`` of the path's last table."""
    _no_unknown(spec, {"column", "path"}, where)
    column, hops = spec.get("column"), spec.get("path")
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{where}.column: must name the unit column of the path's last table")
    if not isinstance(hops, list) or not hops:
        raise ConfigError(
            f"{where}.path: list the foreign keys to follow, e.g. [{{from: l_orderkey, table: orders, to: o_orderkey}}]"
        )
    steps = []
    for i, hop in enumerate(hops):
        hop = _mapping(hop, f"{where}.path[{i}]")
        _no_unknown(hop, {"from", "table", "to"}, f"{where}.path[{i}]")
        if not all(isinstance(hop.get(key), str) and hop.get(key) for key in ("from", "table", "to")):
            raise ConfigError(f"{where}.path[{i}]: give from (a column here), table and to (a column there)")
        steps.append(PathStep(from_=hop["from"], table=hop["table"], to=hop["to"]))
    if not any(c.name == steps[0].from_ for c in columns):
        raise ConfigError(f"{where}.path[0].from: column {steps[0].from_!r} is not declared under the table's columns")
    return column, tuple(steps)


def _with_path_domain(table: Table, tables: tuple[Table, ...]) -> Table:
    """Check a unit path against the tables it crosses; the table shares the last table's domain."""
    if not table.unit_path:
        return table
    where = f"tables.{table.name}.privacy_unit"
    by_key = {table_key(t.name): t for t in tables}
    for i, step in enumerate(table.unit_path):
        target = by_key.get(table_key(step.table))
        if target is None or target is table:
            raise ConfigError(f"{where}.path[{i}].table: {step.table!r} is not another table of the policy")
        if target.column(step.to) is None:
            raise ConfigError(
                f"{where}.path[{i}].to: column {step.to!r} is not declared under tables.{target.name}.columns"
            )
        if i + 1 < len(table.unit_path) and target.column(table.unit_path[i + 1].from_) is None:
            raise ConfigError(
                f"{where}.path[{i + 1}].from: column {table.unit_path[i + 1].from_!r} is not declared under "
                f"tables.{target.name}.columns"
            )
    last = by_key[table_key(table.unit_path[-1].table)]
    if last.unit_path or last.privacy_unit is None or last.privacy_unit != table.privacy_unit:
        raise ConfigError(
            f"{where}.column: {table.privacy_unit!r} must be the privacy_unit column of tables.{last.name} "
            "(the path's last table, whose unit is a column of its own)"
        )
    if table.domain and table.domain != last.subject_domain:
        raise ConfigError(
            f"tables.{table.name}.domain: {table.domain!r} differs from {last.subject_domain!r}, the domain of "
            f"tables.{last.name} its unit path reaches; a unit reached through foreign keys is that table's person"
        )
    return replace(table, domain=last.subject_domain)


def _parties(spec: dict[str, Any], where: str, base_dir: Path) -> PartySources:
    _no_unknown(spec, {"parties"}, where)
    parties = spec["parties"]
    if not isinstance(parties, list) or len(parties) < 2 or not all(isinstance(p, str) and p for p in parties):
        raise ConfigError(f"{where}.parties: list two or more party sources (Parquet files or tcp://host:port)")
    return PartySources(tuple(p if p.startswith("tcp://") else str(base_dir / p) for p in parties))


def _executors(spec: dict[str, Any], where: str, source: Any, public: bool) -> tuple[str, tuple[str, ...]]:
    """The table's executor and the alternatives ``query --executor`` may pick (the data owner decides)."""
    split = isinstance(source, PartySources)
    executor = spec.get("executor", "mpc" if split else "plain")
    allowed = spec.get("executors_allowed", [])
    if executor not in EXECUTORS:
        raise ConfigError(f"{where}.executor: must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    if not isinstance(allowed, list) or any(a not in EXECUTORS for a in allowed):
        raise ConfigError(f"{where}.executors_allowed: must be a list of executors from {', '.join(EXECUTORS)}")
    for name in (executor, *allowed):
        if (name == "mpc") != split:
            raise ConfigError(
                f"{where}: executor {name!r} "
                + (
                    "cannot read rows split across parties; use executor: mpc"
                    if split
                    else "needs a source split across parties (source: {parties: [a.parquet, b.parquet]})"
                )
            )
    if public and executor != "plain":
        raise ConfigError(f"{where}.executor: a public table is read exactly; remove {where}.executor")
    return executor, tuple(dict.fromkeys(allowed))


def _mpc(raw: Any, base_dir: Path) -> MpcSettings:
    spec = _mapping(raw, "executors")
    _no_unknown(spec, {"mpc", "enclave", "he"}, "executors")
    mpc = _mapping(spec.get("mpc", {}), "executors.mpc")
    _no_unknown(mpc, MPC_KEYS, "executors.mpc")
    t = mpc.get("collusion_threshold", 1)
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ConfigError("executors.mpc.collusion_threshold: must be an integer >= 0 (parties that may collude)")
    disjoint = mpc.get("units_disjoint", False)
    if not isinstance(disjoint, bool):
        raise ConfigError("executors.mpc.units_disjoint: must be true or false")
    keys = mpc.get("keys")
    if keys is not None and (not isinstance(keys, str) or not keys.strip()):
        raise ConfigError("executors.mpc.keys: must be the folder of `dpgateway mpc keygen` (relative to the config)")
    return MpcSettings(
        t,
        disjoint,
        _positive(mpc.get("timeout_s", 30.0), "executors.mpc.timeout_s"),
        None if keys is None else base_dir / keys,
    )


def _he(raw: Any, base_dir: Path) -> HeSettings:
    spec = _mapping(_mapping(raw, "executors").get("he", {}), "executors.he")
    _no_unknown(spec, HE_KEYS, "executors.he")
    default = HeSettings()
    paths = {}
    for key in ("key_holder", "public_key", "gateway_key", "ciphertexts"):
        value = spec.get(key, str(getattr(default, key)))
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"executors.he.{key}: must be a path (relative to the config file)")
        paths[key] = value
    holder = paths["key_holder"]
    return HeSettings(
        key_holder=holder if holder.startswith("tcp://") else str(base_dir / holder),
        public_key=base_dir / paths["public_key"],
        gateway_key=base_dir / paths["gateway_key"],
        ciphertexts=base_dir / paths["ciphertexts"],
        timeout_s=_positive(spec.get("timeout_s", default.timeout_s), "executors.he.timeout_s"),
    )


def _csv(raw: Any, where: str) -> CsvDialect:
    """The CSV dialect: RFC 4180 defaults, each key a single character (or "" for none) or a boolean."""
    if raw is None:
        return CsvDialect()
    raw = _mapping(raw, where)
    _no_unknown(raw, CSV_KEYS, where)
    default = CsvDialect()
    chars = {}
    for key in ("delimiter", "quote", "escape", "comment"):
        value = raw.get(key, raw.get("quote", default.quote) if key == "escape" else getattr(default, key))
        if not isinstance(value, str) or len(value) > 1 or value in ("\n", "\r") or (key == "delimiter" and not value):
            what = "one character" if key == "delimiter" else 'one character, or "" for none'
            raise ConfigError(f"{where}.{key}: must be {what} (not a line break), not {value!r}")
        chars[key] = value
    used = [chars[k] for k in ("delimiter", "quote", "comment") if chars[k]]
    if len(set(used)) != len(used):
        raise ConfigError(f"{where}: delimiter, quote and comment must be different characters")
    if chars["escape"] and not chars["quote"]:
        raise ConfigError(f'{where}.escape: needs a quote character; set {where}.escape to ""')
    header = raw.get("header", default.header)
    if not isinstance(header, bool):
        raise ConfigError(f"{where}.header: must be true or false, not {header!r}")
    null = raw.get("null", default.null)
    if not isinstance(null, str) or "\n" in null or "\r" in null:
        raise ConfigError(f"{where}.null: must be a string without line breaks, not {null!r}")
    return CsvDialect(header=header, null=null, **chars)


def _column(where: str, name: str, spec: Any) -> Column:
    spec = _mapping(spec, where)
    _no_unknown(spec, COLUMN_KEYS, where)
    ctype = spec.get("type")
    if ctype not in COLUMN_TYPES:
        raise ConfigError(f"{where}.type: must be one of {', '.join(COLUMN_TYPES)}, not {ctype!r}")
    bounds = spec.get("bounds")
    date_bounds = None
    if bounds is not None and ctype == "date":
        date_bounds, bounds = _date_bounds(bounds, where), None
    elif bounds is not None:
        if ctype not in ("int", "float"):
            raise ConfigError(f"{where}.bounds: only int, float and date columns take bounds")
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or not all(math.isfinite(b) for b in bounds)
            or bounds[0] >= bounds[1]
        ):
            raise ConfigError(f"{where}.bounds: must be [lo, hi] with finite numbers and lo < hi")
        if max(abs(bounds[0]), abs(bounds[1])) > 1e15:
            raise ConfigError(f"{where}.bounds: |bound| must be at most 1e15 to keep sums exact")
        bounds = (float(bounds[0]), float(bounds[1]))
    values = spec.get("public_values")
    if values is not None:
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.public_values: must be a non-empty list of distinct values")
        values = tuple(_coerce(v, ctype, f"{where}.public_values") for v in values)
        # Proof note: distinct *after* coercion to the column type, so no group is released twice with
        # independent noise ([1, 1.0] is one int). Test: tests/test_sources.py::test_public_values_distinct_after_coercion.
        duplicate = next((v for i, v in enumerate(values) if v in values[:i]), _NONE)
        if duplicate is not _NONE:
            raise ConfigError(
                f"{where}.public_values: {duplicate!r} is listed twice once read as {ctype}; list each value once"
            )
    per_unit = spec.get("per_unit", False)
    if not isinstance(per_unit, bool):
        raise ConfigError(
            f"{where}.per_unit: must be true (every row of a privacy unit has the same value) or false, "
            f"not {per_unit!r}"
        )
    return Column(
        name=name, type=ctype, bounds=bounds, public_values=values, date_bounds=date_bounds, per_unit=per_unit
    )


def _date_bounds(bounds: Any, where: str) -> tuple[dt.date, dt.date]:
    """``[YYYY-MM-DD, YYYY-MM-DD]`` (YAML dates or ISO text), years 1 to 9999 (every backend's range), lo <= hi."""
    fix = (
        f"{where}.bounds: must be [lo, hi] with dates written YYYY-MM-DD and lo <= hi, such as [2020-01-01, 2024-12-31]"
    )
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(fix)
    days = []
    for b in bounds:
        if isinstance(b, str):
            try:
                b = dt.date.fromisoformat(b.strip()) if len(b.strip()) == 10 else None
            except ValueError:
                b = None
        if not isinstance(b, dt.date) or isinstance(b, dt.datetime):  # a timestamp is not a date bound
            raise ConfigError(fix)
        days.append(b)
    if days[0] > days[1]:
        raise ConfigError(f"{where}.bounds: {days[0]} is after {days[1]}; write [lo, hi] with lo <= hi")
    return days[0], days[1]


_NONE = object()


def _coerce(value: Any, ctype: str, where: str) -> Any:
    """A public value as the column's type, so it matches what the backend returns; NaN is refused."""
    converters: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool}
    if ctype not in converters or value is None:
        return value
    if isinstance(value, bool) != (ctype == "bool"):
        raise ConfigError(f"{where}: {value!r} is not a valid {ctype}")
    if (isinstance(value, float) and math.isnan(value)) or (ctype == "float" and str(value).strip().lower() == "nan"):
        raise ConfigError(f"{where}: NaN is not a value a row can have (the gateway reads NaN as NULL); remove it")
    try:
        converted = converters[ctype](value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {ctype}") from None
    if ctype == "int" and converted != value:
        raise ConfigError(f"{where}: {value!r} is not a valid int")
    return converted


def _budget(raw: Any) -> Budget:
    raw = _mapping(raw, "budget")
    _no_unknown(raw, BUDGET_KEYS, "budget")
    default = Budget()
    window = _positive(raw.get("window_days", default.window_days), "budget.window_days")
    eps = _positive(raw.get("default_query_epsilon", default.default_query_epsilon), "budget.default_query_epsilon")
    delta = raw.get("default_query_delta", default.default_query_delta)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 <= delta < 1:
        raise ConfigError("budget.default_query_delta: must be a number in [0, 1)")
    return Budget(
        window_days=window,
        per_subject=_cap(raw.get("per_subject"), "budget.per_subject", default.per_subject),
        per_analyst=_cap(raw.get("per_analyst"), "budget.per_analyst", default.per_analyst),
        per_query=_cap(raw.get("per_query"), "budget.per_query", default.per_query),
        default_query_epsilon=eps,
        default_query_delta=float(delta),
        replay=_replay(raw.get("replay", default.replay)),
        noise=_noise(raw.get("noise", default.noise)),
    )


def _noise(value: Any) -> Any:
    if value not in NOISE_CHOICES:
        raise ConfigError(f"budget.noise: must be one of {', '.join(NOISE_CHOICES)}, not {value!r}")
    return value


REPLAY_SCOPES = ("analyst", "global", "off")


def _replay(value: Any) -> Any:
    if value is False:  # YAML reads a bare `off` as false
        value = "off"
    if value not in REPLAY_SCOPES:
        raise ConfigError(f"budget.replay: must be one of {', '.join(REPLAY_SCOPES)}, not {value!r}")
    return str(value)


def _cap(raw: Any, where: str, default: Cap) -> Cap:
    if raw is None:
        return default
    raw = _mapping(raw, where)
    _no_unknown(raw, {"epsilon", "delta"}, where)
    eps = _positive(raw.get("epsilon", default.epsilon), f"{where}.epsilon")
    delta = raw.get("delta", default.delta)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 <= delta < 1:
        raise ConfigError(f"{where}.delta: must be a number in [0, 1)")
    return Cap(epsilon=eps, delta=float(delta))


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ConfigError(f"{where}: must be a positive number, not {value!r}")
    return float(value)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping (key: value), not {type(value).__name__}")
    return value


def _no_unknown(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, spec)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
