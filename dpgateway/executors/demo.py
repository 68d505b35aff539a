"""``dpgateway demo --executor NAME``: the bundled sample prepared for one executor, and the queries it answers.

Each entry of :data:`SETUPS` names a module with ``prepare(folder, parquet, table, policy) -> dict`` (the data
owner's steps: split, seal, encrypt, ... into ``folder``; ``policy`` is the table's ``privacy_unit``,
``max_rows_per_unit`` and ``columns``, which the he owner bounds with; it returns ``step`` (what it did),
``table`` (the table's source and executor) and ``executors`` (the config section)). bench/executors.py uses
the same entries.
An executor whose package is not installed is refused with the extra to install (:data:`EXTRAS`).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from dpgateway.errors import UnsupportedError

SETUPS: dict[str, str] = {
    "mpc": "dpgateway.executors.mpc.demo",
    "enclave": "dpgateway.executors.enclave.demo",
    "he": "dpgateway.executors.he.demo",
}
EXTRAS: dict[str, str] = {"he": "he", "enclave": "enclave"}  # pip install 'dpgateway[EXTRA]'
CHOICES = ("he", "mpc", "enclave")
QUERIES: tuple[tuple[str, str], ...] = (
    ("How many rows are in the sample?", "SELECT COUNT(*) AS people_rows FROM {table}"),
    (
        "Rows and total income by sex (public keys)",
        "SELECT sex, COUNT(*) AS n, SUM(income) AS total_income FROM {table} GROUP BY sex",
    ),
    ("Average age by marital status", "SELECT married, AVG(age) AS mean_age FROM {table} GROUP BY married"),
)
COLUMNS: dict[str, Any] = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "income": {"type": "float", "bounds": [0, 500000]},
    "sex": {"type": "int", "public_values": [0, 1]},
    "married": {"type": "int", "public_values": [0, 1]},
}
POLICY: dict[str, Any] = {"privacy_unit": "pid", "max_rows_per_unit": 3, "columns": COLUMNS}
Preparer = Callable[..., dict[str, Any]]  # (folder, parquet, table, policy, **options) -> the entries


@dataclass
class Setup:
    """The demo's config mapping and how long each data-owner step took."""

    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def preparer(name: str) -> Preparer:
    """Executor ``name``'s data-owner step, or UnsupportedError naming what to install."""
    if name not in SETUPS:
        extra = EXTRAS.get(name, name)
        raise UnsupportedError(
            f"the {name} executor is not part of this installation yet; it will need pip install 'dpgateway[{extra}]'"
        )
    try:
        prepare: Preparer = importlib.import_module(SETUPS[name]).prepare
    except ModuleNotFoundError as exc:
        raise UnsupportedError(
            f"the {name} executor needs the {exc.name} package: pip install 'dpgateway[{EXTRAS.get(name, name)}]'"
        ) from None
    return prepare


def setup(name: str, folder: Path, csv: Path) -> Setup:
    """Prepare the sample for executor ``name`` in ``folder``: a plain table ``pums_plain`` and ``pums`` on ``name``."""
    prepare = preparer(name)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    parquet = folder / "pums.parquet"
    con = duckdb.connect()
    con.read_csv(str(csv)).write_parquet(str(parquet))
    con.close()
    timings["owner: CSV to Parquet"] = time.perf_counter() - start
    start = time.perf_counter()
    spec = prepare(folder, parquet, "pums", POLICY)
    timings[f"owner: {spec.pop('step')}"] = time.perf_counter() - start
    config = {
        "tables": {
            "pums_plain": {"source": str(parquet), **POLICY},
            "pums": {**spec.pop("table"), **POLICY},
        },
        "executors": spec.pop("executors"),
        "ledger": f"sqlite:///{folder / 'demo-ledger.db'}",
        "budget": {"per_subject": {"epsilon": 100}, "per_analyst": {"epsilon": 100}, "per_query": {"epsilon": 5}},
    }
    return Setup(config=config, timings=timings)
