"""The gateway's side of ``mpc``: dispatch to the K parties, add their partial sums, decode the noisy total.

The gateway receives only partial sums of shares (party.py), never a party's aggregate or an unnoised total.
It signs each party's request with that party's request key (keys.py) on a connection kept open across
queries (wire.py), sends all K requests before reading any reply so the parties work at once, and takes a
partial sum only if the party signed it for this request.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dpgateway.errors import BackendError, ConfigError, InternalError
from dpgateway.executors import signing
from dpgateway.executors.base import Evidence, Executor, NoisePlan, NoisyResult, stop_processes
from dpgateway.executors.mpc import field, keys, wire
from dpgateway.mechanisms import I64_MAX, Mechanism, laplace_half_width
from dpgateway.plan import DPPlan
from dpgateway.policies.model import MpcSettings, PartySources, Table


class MpcExecutor(Executor):
    """Secret-shared aggregation across the parties of one table (see party.py for the proof note)."""

    name = "mpc"

    def __init__(self, table: Table, settings: MpcSettings) -> None:
        if not isinstance(table.source, PartySources):
            raise InternalError(f"table {table.name} is not split across parties")
        self.table = table
        self.settings = settings
        self._processes: list[subprocess.Popen[str]] = []
        self._addresses: list[str] = []
        self._keys: list[bytes] = []
        self._key_folder: tempfile.TemporaryDirectory[str] | None = None
        self.pool = wire.Pool(settings.timeout_s + 5, challenge=True)

    @property
    def parties(self) -> int:
        assert isinstance(self.table.source, PartySources)
        return len(self.table.source.parties)

    def unsupported(self, plan: DPPlan) -> str | None:
        reason = super().unsupported(plan)  # integer sums only: no quantiles, no distinct counts
        if reason is not None:
            return reason
        if any(m.mechanism != "laplace" for m in plan.measurements):  # the planner keeps Laplace for mpc tables
            return f"table {self.table.name} runs on the mpc executor, whose parties add discrete Laplace noise only"
        if plan.selects_partitions:
            return (
                f"table {self.table.name} runs on the mpc executor, which releases public groups only; declare "
                "public_values for the GROUP BY columns"
            )
        return None

    def half_width(self, scale: float, confidence: float = 0.95, mechanism: Mechanism = "laplace") -> int:
        """Noise is a sum of t + 1 central draws: a union bound gives (t + 1) * w at ``1 - alpha / (t + 1)``."""
        if mechanism != "laplace":
            raise InternalError("the mpc executor adds discrete Laplace noise only; this is a bug")
        n = self.settings.collusion_threshold + 1
        return n * laplace_half_width(scale, 1 - (1 - confidence) / n)

    def describe(self) -> str:
        return (
            f"mpc ({self.parties} parties, collusion threshold {self.settings.collusion_threshold}, "
            f"units {'disjoint' if self.table.units_disjoint else 'may repeat'} across parties)"
        )

    def addresses(self) -> list[str]:
        """The parties' addresses, starting local parties (one process per file, all at once) on first use."""
        if not self._addresses:
            assert isinstance(self.table.source, PartySources)
            folder = self._key_set()
            started = {
                i: self._spawn(entry, folder, i)
                for i, entry in enumerate(self.table.source.parties)
                if not entry.startswith("tcp://")
            }
            try:
                addresses = [
                    self._listening(started[i]) if i in started else entry
                    for i, entry in enumerate(self.table.source.parties)
                ]
            except BackendError:
                self.close()  # no half-started set: the next query starts them all again
                raise
            self._addresses = addresses
        return self._addresses

    def _key_set(self) -> Path:
        """The key folder: ``executors.mpc.keys``, or a fresh set (0600, private folder) for parties started here."""
        folder = self.settings.keys
        if folder is None:
            self._key_folder = tempfile.TemporaryDirectory(prefix="dpgateway-mpc-keys-")
            folder = Path(self._key_folder.name)
            keys.generate(self.parties, folder)
        self._keys = keys.read_gateway(keys.gateway_file(folder))
        if len(self._keys) != self.parties:
            raise ConfigError(
                f"executors.mpc.keys: {folder} holds keys for {len(self._keys)} parties; table {self.table.name} has "
                f"{self.parties} (run `dpgateway mpc keygen --parties {self.parties}`)"
            )
        return folder

    def _spawn(self, data: str, folder: Path, index: int) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dpgateway.executors.mpc.party",
                "--data",
                data,
                "--key",
                str(keys.party_file(folder, index)),
                "--collusion-threshold",
                str(self.settings.collusion_threshold),
                "--timeout",
                str(self.settings.timeout_s),
                "--threads",  # local parties share this host's cores: no oversubscription
                str(max(1, (os.cpu_count() or 1) // self.parties)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._processes.append(process)
        return process

    def _listening(self, process: subprocess.Popen[str]) -> str:
        """The address a started party prints once it listens."""
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening "):
            raise BackendError(f"table {self.table.name}: a party did not start (check its Parquet file and key)")
        return "tcp://" + line.split()[1]

    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        if plan.bounded_sql is None or noise.cells is None:
            raise InternalError("the mpc executor needs verified SQL and public groups")
        peers = self.addresses()
        message: dict[str, Any] = {
            "type": "query",
            "qid": secrets.token_hex(16),
            "sql": str(plan.bounded_sql),
            "noise": noise.to_json(),
            "fingerprint": noise.fingerprint(),
            "collusion_threshold": self.settings.collusion_threshold,
            "peers": peers,
        }
        replies = self._ask_all(peers, message)
        for i, reply in enumerate(replies):
            if "partial" not in reply or reply.get("fingerprint") != noise.fingerprint():
                raise BackendError(f"table {self.table.name}: mpc party {i} aborted the query ({reply.get('error')})")
        total = [field.decode(v) for v in field.add([r["partial"] for r in replies])]
        n = len(noise.cells)
        if len(total) != n * len(noise.measurements):
            raise InternalError("the parties returned another number of values than planned")
        values = {
            m.name: tuple(_saturate(v) for v in total[j * n : (j + 1) * n]) for j, m in enumerate(noise.measurements)
        }
        return NoisyResult(
            cells=noise.cells,
            values=values,
            noise_fingerprint=noise.fingerprint(),
            released_values=len(total),
            evidence=Evidence(
                executor="mpc",
                noise_added_at=f"parties 0..{self.settings.collusion_threshold} (OpenDP discrete Laplace each)",
                exact_values_seen_by="each party its own local aggregates only; nobody sees a total",
                details={"parties": str(len(peers))},
            ),
        )

    def _ask_all(self, peers: list[str], message: dict[str, Any]) -> list[dict[str, Any]]:
        """Every party's signed request sent first, then the replies read: the K parties work at once."""
        replies: list[dict[str, Any]] = [{"error": "unreachable"} for _ in peers]
        waiting: list[tuple[int, wire.Connection, int]] = []
        for i, peer in enumerate(peers):
            try:
                connection = self.pool.take(_address(peer))
            except (OSError, ValueError):
                continue
            seq = connection.seq
            try:
                connection.send({**message, "index": i}, self._keys[i])
            except OSError:
                connection.close()
                continue
            waiting.append((i, connection, seq))
        for i, connection, seq in waiting:
            try:
                reply = connection.receive()
            except (OSError, ValueError):
                connection.close()
                continue
            self.pool.give(_address(peers[i]), connection)
            if "partial" in reply and not (
                signing.signed_by(self._keys[i], reply)
                and reply.get("qid") == message["qid"]
                and reply.get("seq") == seq
            ):
                reply = {"error": "its reply is not signed by it for this request"}
            replies[i] = reply
        return replies

    def close(self) -> None:
        self.pool.close()
        stop_processes(self._processes)
        self._processes.clear()
        self._addresses.clear()
        if self._key_folder is not None:
            self._key_folder.cleanup()
            self._key_folder = None


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def _saturate(value: int) -> int:
    return min(I64_MAX, max(-I64_MAX, value))
