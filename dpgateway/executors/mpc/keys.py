"""The mpc deployment's keys: one request key per party (gateway and that party) and one key per pair of parties.

``dpgateway mpc keygen --parties K --out DIR`` writes ``DIR/gateway.key`` (the K request keys) and
``DIR/party<i>.key`` (party i's index, the number of parties, its request key and its K - 1 pair keys), every
file 0600 and each for its holder only. The gateway signs what it asks party i with request key i; party j
signs the share it sends party i with their pair key. So a party accepts a query only from the gateway (no
other party holds its request key: one party cannot ask the others for their partial sums) and a share only
from the party it names. Gateways that start their parties themselves (sources given as files) make a fresh
set in a private temporary folder when ``executors.mpc.keys`` is not set.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from dpgateway.errors import InvalidParameterError
from dpgateway.executors.signing import read_key_file, write_key_file

KEY_BYTES = 32


@dataclass(frozen=True)
class PartyKeys:
    """One party's key file: its index, the number of parties, its request key, its pair keys by peer index."""

    index: int
    parties: int
    request_key: bytes
    pair_keys: dict[int, bytes]


def gateway_file(folder: Path) -> Path:
    return folder / "gateway.key"


def party_file(folder: Path, index: int) -> Path:
    return folder / f"party{index}.key"


def generate(parties: int, folder: Path) -> None:
    """Write a fresh key set for ``parties`` parties into ``folder`` (refuses to overwrite one)."""
    if parties < 2:
        raise InvalidParameterError("an mpc deployment has two or more parties")
    if gateway_file(folder).exists():
        raise InvalidParameterError(f"{gateway_file(folder)} exists; move the old key set away first")
    requests = [secrets.token_bytes(KEY_BYTES) for _ in range(parties)]
    pairs = {(i, j): secrets.token_bytes(KEY_BYTES) for i in range(parties) for j in range(i + 1, parties)}
    for i in range(parties):
        parts = {"index": str(i).encode(), "parties": str(parties).encode(), "request_key": requests[i]}
        parts |= {f"pair{j}": pairs[min(i, j), max(i, j)] for j in range(parties) if j != i}
        write_key_file(party_file(folder, i), parts, 0o600)
    write_key_file(gateway_file(folder), {f"party{i}": key for i, key in enumerate(requests)}, 0o600)


def read_gateway(path: Path) -> list[bytes]:
    """The gateway's request keys, party 0 first."""
    parts = read_key_file(path, private=True)
    keys = [parts.get(f"party{i}") for i in range(len(parts))]
    if not keys or any(key is None or len(key) != KEY_BYTES for key in keys):
        raise InvalidParameterError(f"{path} is not the gateway.key of `dpgateway mpc keygen`")
    return [key for key in keys if key is not None]


def read_party(path: Path) -> PartyKeys:
    """A party's key file."""
    parts = read_key_file(path, private=True)
    try:
        index, parties = int(parts["index"]), int(parts["parties"])
        pairs = {j: parts[f"pair{j}"] for j in range(parties) if j != index}
        request_key = parts["request_key"]
    except (KeyError, ValueError):
        raise InvalidParameterError(f"{path} is not a party key file of `dpgateway mpc keygen`") from None
    return PartyKeys(index, parties, request_key, pairs)
