"""The gateway's side of ``he``: add the owner's ciphertexts, fold them, ask the key holder for noisy values.

The gateway holds the public key file only (encryption and rotation keys, no secret key); it reads the
cube's ciphertexts in batches from a memory map, adds them residue-wise, folds the sum so every slot holds
one field's total (scheme.py), and sends that one ciphertext to the key holder with the noise plan. What it
receives back is noisy integers (holder.py); it never sees a row, an exact total or the secret key.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import time
from typing import Any

from sqlglot import exp

from dpgateway.errors import BackendError, InvalidParameterError
from dpgateway.executors import signing
from dpgateway.executors.base import Evidence, Executor, NoisePlan, NoisyResult, stop_processes
from dpgateway.executors.he import scheme
from dpgateway.executors.he.cube import Cube, field_key, key_id, policy_digest
from dpgateway.executors.mpc import wire
from dpgateway.plan import DPPlan
from dpgateway.policies.model import HeSettings, Table

BATCH_CIPHERTEXTS = 1024  # about 256 MiB of ciphertext in memory at once


class HeExecutor(Executor):
    """Homomorphic aggregation of a table its owner encrypted with ``dpgateway he encrypt``."""

    name = "he"

    def __init__(self, table: Table, settings: HeSettings) -> None:
        self.table = table
        self.settings = settings
        self._evaluator: scheme.Evaluator | None = None
        self._key = b""
        self._process: subprocess.Popen[str] | None = None
        self._address = ""

    @property
    def cube(self) -> Cube:
        """The table's cube as its manifest says now (read per query: the owner may replace it)."""
        return Cube.load(self.settings.ciphertexts / self.table.name)

    def unsupported(self, plan: DPPlan, cube: Cube | None = None) -> str | None:
        where = f"table {self.table.name} runs on the he executor, which"
        if plan.selects_partitions:
            return f"{where} releases public groups only; declare public_values for the GROUP BY columns"
        if plan.relation is not None:
            return f"{where} reads its own encrypted rows only (no joins, unit paths or per-person subqueries)"
        if plan.where is not None:
            return f"{where} answers unfiltered queries only (the owner encrypted every row); remove the WHERE clause"
        if len(plan.group_keys) > 1:
            return f"{where} groups by one public column at a time"
        try:
            cube = cube or self.cube
        except InvalidParameterError as exc:
            return str(exc)
        if cube.policy != policy_digest(self.table):
            return (
                f"{where} holds ciphertexts encrypted under another policy; the owner runs `dpgateway he encrypt` again"
            )
        grouping = self._grouping(plan)
        if grouping == "":
            return f"{where} groups by a plain column only (GROUP BY column)"
        if grouping not in cube.groupings:
            return f"{where} has no encrypted grouping by {grouping}; the owner adds `--group-by {grouping}`"
        missing = [m.label for m in plan.measurements if None in self._slots(cube, plan, m, grouping)]
        if missing:
            return (
                f"{where} has no encrypted contributions for {', '.join(missing)}; the owner adds them to `he encrypt`"
            )
        return None

    def _grouping(self, plan: DPPlan) -> str | None:
        if not plan.group_keys:
            return None
        expr = plan.group_keys[0].expr
        while isinstance(expr, exp.Paren):
            expr = expr.this
        if not isinstance(expr, exp.Column):
            return ""
        column = self.table.column(expr.name)
        return column.name if column is not None else ""

    def _slots(self, cube: Cube, plan: DPPlan, m: Any, grouping: str | None) -> list[int | None]:
        cells = [None] if grouping is None else list(plan.group_keys[0].public_values or ())
        return [cube.slot(field_key(grouping, value, plan.rewrite, m)) for value in cells]

    def describe(self) -> str:
        return f"he (BFV, N={scheme.DEGREE}; the gateway adds ciphertexts, the key holder decrypts and noises)"

    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        cube = self.cube
        reason = self.unsupported(plan, cube)
        if reason is not None or noise.cells is None:
            raise BackendError(f"table {self.table.name}: {reason or 'public groups only'}")
        grouping = self._grouping(plan)
        slots = {m.name: self._slots(cube, plan, m, grouping) for m in plan.measurements}
        evaluator = self._evaluator_for(cube)
        total = scheme.sum_raw(cube.batches(BATCH_CIPHERTEXTS), evaluator.keys.primes)
        folded = evaluator.fold(evaluator.from_raw(total), cube.period)
        message: dict[str, Any] = {
            "type": "decrypt",
            "noise": noise.to_json(),
            "fingerprint": noise.fingerprint(),
            "ciphertext": base64.b64encode(evaluator.to_bytes(folded)).decode(),
            "period": cube.period,
            "slots": [slots[m.name] for m in noise.measurements],
            "bounds": [f.bound for f in cube.fields] + [0] * (cube.period - len(cube.fields)),
            "capacity": cube.capacity,
            "nonce": secrets.token_hex(16),  # the key holder answers each signed request once (holder.py, rule 0)
            "issued": time.time(),
        }
        message["mac"] = signing.sign(self._request_key(), message)
        reply = self.ask(message)
        if "values" not in reply or reply.get("fingerprint") != noise.fingerprint():
            raise BackendError(f"table {self.table.name}: the he key holder refused ({reply.get('error', 'no reply')})")
        values = {m.name: tuple(int(v) for v in reply["values"][m.name]) for m in noise.measurements}
        return NoisyResult(
            cells=noise.cells,
            values=values,
            noise_fingerprint=noise.fingerprint(),
            released_values=sum(len(v) for v in values.values()),
            evidence=Evidence(
                executor="he",
                noise_added_at="key holder (OpenDP discrete Laplace)",
                exact_values_seen_by="the key holder (final aggregates only); the gateway sees ciphertexts",
                details={"ciphertexts": str(cube.ciphertexts), "period": str(cube.period)},
            ),
        )

    def _request_key(self) -> bytes:
        if not self._key:
            self._key = scheme.read_request_key(self.settings.gateway_key)
        return self._key

    def _evaluator_for(self, cube: Cube) -> scheme.Evaluator:
        if self._evaluator is None:
            if key_id(self.settings.public_key) != cube.key_id:
                raise BackendError(
                    f"table {self.table.name}: its ciphertexts were made with another public key than "
                    f"{self.settings.public_key}"
                )
            self._evaluator = scheme.Evaluator(scheme.read_keys(self.settings.public_key))
        return self._evaluator

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request to the key holder (started from its key file on first use)."""
        host, _, port = self._holder_address().removeprefix("tcp://").rpartition(":")
        try:
            return wire.request((host, int(port)), message, self.settings.timeout_s)
        except (OSError, ConnectionError, ValueError):
            return {"error": "the key holder is unreachable"}

    def _holder_address(self) -> str:
        if not self._address:
            holder = self.settings.key_holder
            self._address = holder if holder.startswith("tcp://") else self._spawn(holder)
        return self._address

    def _spawn(self, key_file: str) -> str:
        """Start a local key holder process on ``key_file`` (the gateway passes the path, never reads it)."""
        process = subprocess.Popen(
            [sys.executable, "-m", "dpgateway.executors.he.holder", "--key", key_file],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._process = process
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening "):
            self.close()
            raise BackendError(
                f"table {self.table.name}: the he key holder did not start; {key_file} must hold the secret key "
                "`dpgateway he keygen` wrote and be readable by its owner only (mode 0600)"
            )
        return "tcp://" + line.split()[1]

    def close(self) -> None:
        process, self._process, self._address = self._process, None, ""
        if process is not None:
            stop_processes([process])
