"""The he demo's data-owner step: keys, then the owner bounds and encrypts the table (``dpgateway he keygen``,
``dpgateway he encrypt``).

What is encrypted follows from the policy: COUNT(*), and SUM and AVG of every bounded numeric column
(``averages=False``: SUM only, half the ciphertexts for a COUNT/SUM workload such as bench/executors.py), in
total and one-hot per value of every public-key column, so any unfiltered COUNT/SUM/AVG query with at most
one of those GROUP BY columns runs on he. The key holder's key file stays in ``he-keys`` (the gateway starts
the key holder from it and never reads it); the gateway's table names a source that does not exist on its
host, and the owner's bounded copy is deleted once encrypted.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpgateway.executors.he import cube, scheme
from dpgateway.policies.loader import parse_config

if scheme.seal is None:  # the optional extra; demo.preparer() names what to install
    raise ModuleNotFoundError("the he executor needs tenseal", name="tenseal")


def prepare(
    folder: Path, parquet: Path, table: str, policy: Mapping[str, Any], *, averages: bool = True
) -> dict[str, Any]:
    """Generate the keys, encrypt ``parquet``'s bounded contributions under ``policy`` and return the policy entries."""
    keys = folder / "he-keys"
    holder, public, gateway = keys / "holder.key", keys / "public.key", keys / "gateway.key"
    scheme.write_keys(scheme.generate(), holder, public, gateway)
    owner = parse_config(
        {
            "tables": {table: {"source": str(parquet), **policy}},
            "ledger": f"sqlite:///{folder / 'he-owner-ledger.db'}",
            "cache_dir": "he-owner-cache",
            "prepare": {"auto": False},
        },
        base_dir=folder,
    )
    spec = owner.table(table)
    assert spec is not None
    numeric = [c.name for c in spec.columns if c.is_numeric and c.bounds is not None and c.name != spec.privacy_unit]
    public_keys = [c.name for c in spec.columns if c.public_values is not None or c.type == "bool"]
    fields = cube.plan_fields(spec, sums=numeric, avgs=numeric if averages else [], variances=[], groupings=public_keys)
    copy = cube.owner_copy(owner, table)
    encrypted = cube.encrypt_table(
        spec, copy, scheme.read_keys(public), folder / "he-data" / table, fields=fields, key_digest=cube.key_id(public)
    )
    shutil.rmtree(folder / "he-owner-cache", ignore_errors=True)  # the owner's plaintext working copy
    return {
        "step": f"keygen, bound and encrypt ({encrypted.ciphertexts} ciphertexts, {len(fields)} fields per row)",
        "table": {"source": str(folder / f"{table}_at_owner.parquet"), "executor": "he"},
        "executors": {
            "he": {
                "key_holder": str(holder),
                "public_key": str(public),
                "gateway_key": str(gateway),
                "ciphertexts": str(folder / "he-data"),
            }
        },
    }
