"""The mpc demo's set-up: the sample split across three parties by person (units disjoint), and their keys
(``dpgateway mpc keygen``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb

from dpgateway.executors.mpc import keys

PARTIES = 3


def prepare(folder: Path, parquet: Path, table: str, policy: Mapping[str, Any]) -> dict[str, Any]:
    """Write one Parquet file per party (each person's rows at one party) and a key set, return the policy entries."""
    con = duckdb.connect()
    files = []
    for i in range(PARTIES):
        target = folder / f"{table}_site{i}.parquet"
        con.sql("SELECT * FROM read_parquet($1) WHERE pid % $2 = $3", params=[str(parquet), PARTIES, i]).write_parquet(
            str(target)
        )
        files.append(str(target))
    con.close()
    keys.generate(PARTIES, folder / "mpc-keys")
    return {
        "step": f"split across {PARTIES} parties, keys for the gateway and each party",
        "table": {"source": {"parties": files}, "executor": "mpc"},
        "executors": {"mpc": {"collusion_threshold": 1, "units_disjoint": True, "keys": str(folder / "mpc-keys")}},
    }
