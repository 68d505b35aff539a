"""Fixtures of the executor tests: the conformance data set and one gateway over all executors (common.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dpgateway.gateway import Gateway
from executors.common import GROUPS, HE_AVAILABLE, POLICY, Data, K, open_gateway, write_parquet


@pytest.fixture(scope="session")
def executor_data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    from dpgateway.executors.enclave import protocol

    folder = tmp_path_factory.mktemp("executors")
    parts = [[(1000 * i + j, GROUPS[j % 2], (7 * j + i) % 51) for j in range(200 + 50 * i)] for i in range(K)]
    for i, rows in enumerate(parts):
        write_parquet(folder / f"site{i}.parquet", rows)
    pooled = [r for rows in parts for r in rows]
    write_parquet(folder / "all.parquet", pooled)
    key = protocol.new_key_file(folder / "vault.key")
    (folder / "vault.sealed").write_bytes(protocol.seal((folder / "all.parquet").read_bytes(), key))
    if HE_AVAILABLE:  # the he owner's step of `dpgateway demo --executor he`: keys, bounding, encryption
        from dpgateway.executors.he.demo import prepare

        prepare(folder, folder / "all.parquet", "cipher", POLICY, averages=False)
    return Data(folder, pooled)


@pytest.fixture(scope="module")
def executor_gateway(executor_data: Data, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """One gateway per test module over all executors' tables (parties and enclave started once)."""
    with open_gateway(executor_data, f"{request.module.__name__}.db") as gw:
        yield gw
