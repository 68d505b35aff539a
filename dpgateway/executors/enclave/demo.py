"""The enclave demo's data-owner step: seal the sample under a fresh data key, then remove the plaintext copy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpgateway.executors.enclave import protocol


def prepare(folder: Path, parquet: Path, table: str, policy: Mapping[str, Any]) -> dict[str, Any]:
    """Seal ``parquet`` (its key file beside it) and return the policy entries of the simulated enclave."""
    key = protocol.new_key_file(folder / f"{table}.key")
    sealed = folder / f"{table}.parquet.sealed"
    sealed.write_bytes(protocol.seal(parquet.read_bytes(), key))
    source = folder / f"{table}_enclave.parquet"  # never exists on the gateway host: the enclave opens the sealed copy
    return {
        "step": "seal with a fresh data key",
        "table": {"source": str(source), "executor": "enclave"},
        "executors": {
            "enclave": {
                "backend": "simulated",
                "allow_simulated": True,
                "sealed": {table: {"file": str(sealed), "key": str(folder / f"{table}.key")}},
            }
        },
    }
