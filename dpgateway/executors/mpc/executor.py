"""The gateway's side of ``mpc``: dispatch to the K parties, add their partial sums, decode the noisy total.

The gateway receives only partial sums of shares (party.py), never a party's aggregate or an unnoised total.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpgateway.errors import BackendError, InternalError
from dpgateway.executors.base import Evidence, Executor, NoisePlan, NoisyResult
from dpgateway.executors.mpc import field, wire
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
        """The parties' addresses, starting local parties (one process per file) on first use."""
        if not self._addresses:
            assert isinstance(self.table.source, PartySources)
            for entry in self.table.source.parties:
                self._addresses.append(entry if entry.startswith("tcp://") else self._spawn(entry))
        return self._addresses

    def _spawn(self, data: str) -> str:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dpgateway.executors.mpc.party",
                "--data",
                data,
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
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening "):
            raise BackendError(f"table {self.table.name}: a party did not start (check its Parquet file)")
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
        with ThreadPoolExecutor(max_workers=len(peers)) as pool:
            replies = list(pool.map(lambda i: self._ask(peers[i], {**message, "index": i}), range(len(peers))))
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

    def _ask(self, address: str, message: dict[str, Any]) -> dict[str, Any]:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        try:
            return wire.request((host, int(port)), message, self.settings.timeout_s + 5)
        except (OSError, ConnectionError, ValueError):
            return {"error": "unreachable"}

    def close(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self._processes.clear()
        self._addresses.clear()


def _saturate(value: int) -> int:
    return min(I64_MAX, max(-I64_MAX, value))
