"""Shared by the executor tests: one data set served by every executor: a table split across three parties (mpc), its pooled copy (plain),
the pooled copy sealed for the enclave and encrypted by its owner for he. Units are disjoint across parties, so
every executor's plan, noise and debit must equal plain's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from dpgateway.gateway import Gateway
from dpgateway.policies.loader import parse_config

K = 3
GROUPS = ["a", "b"]
HE_AVAILABLE = importlib.util.find_spec("tenseal") is not None
HE_MISSING = pytest.mark.skipif(not HE_AVAILABLE, reason="the he executor's extra (tenseal) is not installed")
# executor -> the conformance table that runs on it
TABLES = {"plain": "pooled", "mpc": "trial", "enclave": "vault", "he": "cipher"}
EXECUTORS = ["plain", "mpc", "enclave", pytest.param("he", marks=HE_MISSING)]
COLUMNS = {
    "pid": {"type": "int"},
    "g": {"type": "str", "public_values": GROUPS},
    "x": {"type": "int", "bounds": [0, 50]},
}
POLICY: dict[str, Any] = {"privacy_unit": "pid", "columns": COLUMNS}


@dataclass(frozen=True)
class Data:
    folder: Path
    rows: list[tuple[int, str, int]]

    def exact(self) -> dict[str, tuple[int, int]]:
        """Per group: the exact row count and sum of x (every unit has one row, x within bounds)."""
        return {g: (sum(1 for r in self.rows if r[1] == g), sum(r[2] for r in self.rows if r[1] == g)) for g in GROUPS}


def write_parquet(path: Path, rows: list[tuple[int, str, int]]) -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (pid BIGINT, g VARCHAR, x BIGINT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    con.table("t").write_parquet(str(path))
    con.close()


def executor_config(folder: Path, *, enclave: dict[str, Any] | None = None, **mpc: Any) -> dict[str, Any]:
    """The conformance policy: the same columns and bounds on every executor's table."""
    return {
        "tables": {
            "pooled": {"source": "all.parquet", **POLICY},
            "trial": {
                "source": {"parties": [f"site{i}.parquet" for i in range(K)]},
                "executor": "mpc",
                **POLICY,
            },
            # the source never exists on the gateway's host: only the enclave opens the sealed copy
            "vault": {
                "source": "vault.parquet",
                "executor": "enclave",
                **POLICY,
            },
            # its owner encrypted all.parquet into he-data/cipher (conftest.py, dpgateway/executors/he/demo.py)
            "cipher": {"source": "cipher_at_owner.parquet", "executor": "he", **POLICY},
        },
        "executors": {
            "mpc": {"units_disjoint": True, "timeout_s": 5, **mpc},
            "enclave": {
                "backend": "simulated",
                "allow_simulated": True,
                "sealed": {"vault": {"file": "vault.sealed", "key": "vault.key"}},
                **(enclave or {}),
            },
            "he": {
                "key_holder": "he-keys/holder.key",
                "public_key": "he-keys/public.key",
                "gateway_key": "he-keys/gateway.key",
                "ciphertexts": "he-data",
                "timeout_s": 30,
            },
        },
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
        "budget": {
            "per_subject": {"epsilon": 1e6},
            "per_analyst": {"epsilon": 1e6},
            "per_query": {"epsilon": 5},
            "replay": "off",
        },
    }


def open_gateway(data: Data, ledger: str, **kwargs: Any) -> Gateway:
    config = executor_config(data.folder, **kwargs)
    config["ledger"] = f"sqlite:///{data.folder / ledger}"
    return Gateway(parse_config(config, base_dir=data.folder))
