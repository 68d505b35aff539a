"""Validate the ``executors: enclave:`` section and the tables that run on the enclave executor."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpgateway.errors import ConfigError
from dpgateway.policies.model import EnclaveSettings, SealedSource, Table

ENCLAVE_KEYS = {"backend", "allow_simulated", "measurements", "quote_ttl_s", "timeout_s", "sealed"}
BACKENDS = ("simulated",)
WHERE = "executors.enclave"


def enclave_settings(raw: Any, base_dir: Path) -> EnclaveSettings:
    """The section as a value (defaults when absent)."""
    if raw is None:
        return EnclaveSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"{WHERE}: must be a mapping (key: value), not {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - ENCLAVE_KEYS)
    if unknown:
        raise ConfigError(f"{WHERE}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(ENCLAVE_KEYS))}")
    backend = raw.get("backend", "simulated")
    if backend not in BACKENDS:
        raise ConfigError(
            f"{WHERE}.backend: must be simulated, not {backend!r} (a confidential VM runs the whole gateway with "
            "the plain executor inside it: docs/executors.md)"
        )
    allow = raw.get("allow_simulated", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{WHERE}.allow_simulated: must be true (development, tests) or false (production)")
    measurements = raw.get("measurements", [])
    if not isinstance(measurements, list) or not all(
        isinstance(m, str) and re.fullmatch(r"[0-9a-fA-F]{96}", m) for m in measurements
    ):
        raise ConfigError(f"{WHERE}.measurements: must be a list of 96-hex-digit launch measurements (SHA-384)")
    sealed = raw.get("sealed", {})
    if not isinstance(sealed, dict):
        raise ConfigError(f"{WHERE}.sealed: must map table names to {{file: SEALED, key: KEYFILE}}")
    entries = []
    for table, spec in sealed.items():
        if (
            not isinstance(spec, dict)
            or set(spec) != {"file", "key"}
            or not all(isinstance(v, str) and v for v in spec.values())
        ):
            raise ConfigError(f"{WHERE}.sealed.{table}: must be {{file: SEALED, key: KEYFILE}} (two paths)")
        entries.append((str(table), SealedSource(base_dir / spec["file"], base_dir / spec["key"])))
    return EnclaveSettings(
        backend=backend,
        allow_simulated=allow,
        measurements=tuple(m.lower() for m in measurements),
        quote_ttl_s=_positive(raw.get("quote_ttl_s", 60.0), f"{WHERE}.quote_ttl_s"),
        timeout_s=_positive(raw.get("timeout_s", 120.0), f"{WHERE}.timeout_s"),
        sealed=tuple(entries),
    )


def check_enclave_tables(tables: Sequence[Table], settings: EnclaveSettings) -> None:
    """Every table that may run on the enclave has a Parquet source, a sealed copy, and a backend allowed here."""
    for table in tables:
        if "enclave" not in (table.executor, *table.executors_allowed):
            continue
        where = f"tables.{table.name}"
        if not isinstance(table.source, Path) or table.source.suffix.lower() not in (".parquet", ".pq"):
            raise ConfigError(f"{where}.source: the enclave executor reads Parquet sources (seal a .parquet file)")
        if settings.sealed_for(table.name) is None:
            raise ConfigError(
                f"{WHERE}.sealed.{table.name}: the enclave executor reads only a sealed copy; run `dpgateway enclave "
                f"seal {table.source.name} --key KEYFILE` and list {{file: ..., key: KEYFILE}} there"
            )
        if settings.backend == "simulated" and not settings.allow_simulated:
            raise ConfigError(
                f"{where}: executor enclave has only the simulated backend here, which gives no confidentiality and "
                f"is refused in production; set {WHERE}.allow_simulated: true for development and tests"
            )


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ConfigError(f"{where}: must be a positive number, not {value!r}")
    return float(value)
