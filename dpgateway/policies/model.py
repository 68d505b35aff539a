"""The validated configuration: tables and their privacy policy, budget caps, ledger URL.

Everything here is frozen: a loaded config is a value that the planner reads and never changes.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ColumnType = Literal["int", "float", "str", "bool", "date"]
ReplayScope = Literal["analyst", "global", "off"]
FilteredBounding = Literal["filter_first", "bound_first"]
NUMERIC_TYPES: frozenset[str] = frozenset({"int", "float"})


@dataclass(frozen=True)
class Column:
    """One declared column; only declared columns can be queried.

    ``bounds`` are a numeric column's; a ``date`` column's declared bounds are ``date_bounds`` (a separate
    field, so no numeric code path can read a date as a number). ``per_unit``: the data owner declares that
    every row of a privacy unit has the same value (a person attribute), which lets grouped queries by it
    pre-aggregate per unit (passes/unit_grouped.py); privacy never depends on it being true.
    """

    name: str
    type: ColumnType
    bounds: tuple[float, float] | None = None
    public_values: tuple[Any, ...] | None = None
    date_bounds: tuple[dt.date, dt.date] | None = None
    per_unit: bool = False

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC_TYPES


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV source is read: fixed by the policy, never sniffed from the data (RFC 4180 defaults).

    ``quote`` and ``escape`` may be ``""`` (no quoting / escaping); ``comment`` ``""`` means no comment
    lines; an unquoted field equal to ``null`` is NULL (a quoted field is always a value).
    """

    delimiter: str = ","
    quote: str = '"'
    escape: str = '"'
    header: bool = True
    comment: str = ""
    null: str = ""


EXECUTORS = ("plain", "mpc", "he", "enclave")


@dataclass(frozen=True)
class PartySources:
    """A table whose rows are split across parties: one source per party, read only by that party.

    An entry is a file (the gateway starts that party as a local process reading it) or ``tcp://host:port``
    (a party already running, e.g. on another host, started with ``python -m dpgateway.executors.mpc.party``).
    """

    parties: tuple[str, ...]


@dataclass(frozen=True)
class MpcSettings:
    """The ``executors: mpc:`` section.

    ``collusion_threshold`` t: the guarantee holds while at most t parties (and the gateway) collude;
    ``units_disjoint``: each person's rows are at one party only, so the sensitivity is not multiplied by K;
    ``keys``: the folder of ``dpgateway mpc keygen`` (the gateway reads ``gateway.key``; parties it starts get
    ``party<i>.key``), required when a party runs elsewhere; without it the gateway makes a fresh set for the
    parties it starts.
    """

    collusion_threshold: int = 1
    units_disjoint: bool = False
    timeout_s: float = 30.0
    keys: Path | None = None


@dataclass(frozen=True)
class HeSettings:
    """The ``executors: he:`` section (docs/executors.md).

    ``key_holder``: the key holder's key file (the gateway starts it as its own process and never reads
    the file) or ``tcp://host:port`` of a running one; ``public_key``: the public key file; ``ciphertexts``:
    the folder holding one ``<table>/`` cube per table (written by ``dpgateway he encrypt``); ``gateway_key``:
    the gateway's request key (0600), with which it signs what it asks of the key holder.
    """

    key_holder: str = "keys/holder.key"
    public_key: Path = Path("keys/public.key")
    gateway_key: Path = Path("keys/gateway.key")
    ciphertexts: Path = Path("he-data")
    timeout_s: float = 60.0


@dataclass(frozen=True)
class PathStep:
    """One hop of a privacy unit reached through foreign keys: this table's ``from_`` equals ``table.to``."""

    from_: str
    table: str
    to: str


@dataclass(frozen=True)
class SealedSource:
    """A table's sealed copy (``dpgateway enclave seal``) and the key file the key broker releases it with."""

    file: Path
    key: Path


@dataclass(frozen=True)
class EnclaveSettings:
    """The ``executors: enclave:`` section (docs/executors.md).

    ``backend`` is ``simulated`` (the only one these machines run); ``allow_simulated: false`` (the default,
    production) refuses it; ``measurements`` is the allowlist (hex; empty: this installation's code);
    ``sealed`` maps a table to its sealed copy and data key.
    """

    backend: str = "simulated"
    allow_simulated: bool = False
    measurements: tuple[str, ...] = ()
    quote_ttl_s: float = 60.0
    timeout_s: float = 120.0
    sealed: tuple[tuple[str, SealedSource], ...] = ()

    def sealed_for(self, table: str) -> SealedSource | None:
        return dict(self.sealed).get(table)


@dataclass(frozen=True)
class Table:
    """A table, its source and its privacy policy.

    ``privacy_unit`` is the column identifying the person (an ``int`` or ``str`` column: identifiers
    that round-trip exactly); ``None`` means each row is a person (row-level privacy,
    ``max_rows_per_unit`` is then 1). ``public`` tables carry no privacy. With a ``unit_path`` the
    unit is not a column of this table: ``privacy_unit`` names the unit column of the path's last
    table, reached by joining along the path (passes/relations.py).
    """

    name: str
    source: Any  # a Path for files, a dict for connector specs
    columns: tuple[Column, ...]
    privacy_unit: str | None = None
    max_rows_per_unit: int = 1
    public: bool = False
    domain: str = ""
    csv: CsvDialect = CsvDialect()  # read options of a CSV source (ignored for Parquet)
    executor: str = "plain"  # who computes and noises the aggregates (dpgateway/executors)
    executors_allowed: tuple[str, ...] = ()  # executors `query --executor` may choose instead
    units_disjoint: bool = False  # parties' tables: no person has rows at two parties
    unit_path: tuple[PathStep, ...] = ()  # foreign keys to the table holding the unit (empty: a column here)

    @property
    def cross_party_factor(self) -> int:
        """How many parties' local bounds one person can use: K for a party-split table, unless disjoint.

        Proof note: each party bounds a person to ``max_rows_per_unit`` rows locally; a person present at
        all K parties moves the total by K local bounds, so the accountant multiplies the sensitivity by
        K (passes/budget.py). Test: tests/executors/test_mpc.py::test_sensitivity_counts_every_party.
        """
        if isinstance(self.source, PartySources) and not self.units_disjoint:
            return len(self.source.parties)
        return 1

    def column(self, name: str) -> Column | None:
        lowered = name.lower()
        for col in self.columns:
            if col.name.lower() == lowered:
                return col
        return None

    @property
    def subject_domain(self) -> str:
        """Ledger name of the people this table describes (shared by tables with one unit)."""
        if self.domain:
            return self.domain
        return self.privacy_unit if self.privacy_unit else f"table:{self.name}"


@dataclass(frozen=True)
class Cap:
    """An (epsilon, delta) limit."""

    epsilon: float = math.inf
    delta: float = 0.0


@dataclass(frozen=True)
class Budget:
    """Budget caps over a rolling window, and per-query defaults."""

    window_days: float = 182.0
    per_subject: Cap = Cap(4.0, 1e-6)
    per_analyst: Cap = Cap(4.0, 1e-6)
    per_query: Cap = Cap(1.0, 1e-6)
    default_query_epsilon: float = 0.5
    default_query_delta: float = 1e-7
    replay: ReplayScope = "analyst"  # who gets a released answer again for free: analyst, global or off
    # which noise a query with delta > 0 may use (passes/budget.py): the more accurate of Laplace and Gaussian,
    # Laplace always (pure DP, delta left for partition selection), or Gaussian wherever it is possible
    noise: Literal["auto", "laplace", "gaussian"] = "auto"


@dataclass(frozen=True)
class ServerConfig:
    """The ``server:`` section: where ``dpgateway serve`` listens and what it serves."""

    host: str = "127.0.0.1"
    port: int = 6432
    tls_cert: Path | None = None
    tls_key: Path | None = None
    database: str = "dpgateway"  # the database name clients connect to


@dataclass(frozen=True)
class PrepareConfig:
    """The ``prepare:`` section: automatic prepared copies, and how filtered queries bound (docs/privacy.md)."""

    auto: bool = True  # build a table's prepared copy in the background after `after_queries` queries of it
    after_queries: int = 2
    filtered: FilteredBounding = "filter_first"  # bound_first: filtered queries bound over all of a unit's rows


@dataclass(frozen=True)
class Config:
    """A whole ``dpgateway.yaml``."""

    tables: tuple[Table, ...]
    budget: Budget = field(default_factory=Budget)
    ledger: str = "sqlite:///dpgateway-ledger.db"
    admins: tuple[str, ...] = ()
    base_dir: Path = Path(".")
    cache_dir: Path | None = None  # prepared copies (`dpgateway prepare`); None: .dpgateway-cache in base_dir
    server: ServerConfig = field(default_factory=ServerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    mpc: MpcSettings = field(default_factory=MpcSettings)
    enclave: EnclaveSettings = field(default_factory=EnclaveSettings)
    he: HeSettings = field(default_factory=HeSettings)
    spark: dict[str, Any] = field(default_factory=dict)  # {master, conf}: the Spark session (connectors/spark.py)

    @property
    def cache_folder(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.base_dir / ".dpgateway-cache"

    def table(self, name: str) -> Table | None:
        """The table named ``name`` (case-insensitive; see :func:`table_key` for schema prefixes)."""
        wanted = table_key(name)
        for table in self.tables:
            if table_key(table.name) == wanted:
                return table
        return None


def table_key(name: str) -> str:
    """How table names are matched: case-insensitive, and ``public.x`` is ``x`` (PostgreSQL's default schema).

    ``clinic.visits`` matches only ``clinic.visits``; an unqualified ``visits`` matches a policy table
    ``visits`` or ``public.visits``, never ``clinic.visits``, so tables of one name in two schemas never
    collide.
    """
    lowered = name.lower()
    return lowered.removeprefix("public.")
