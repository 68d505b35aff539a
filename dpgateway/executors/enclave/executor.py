"""The gateway's side of ``enclave``: start the enclave, forward its evidence to the key broker, check its result.

Per query (before the ledger reservation: :meth:`EnclaveExecutor.admit`): a nonce from the broker, a quote
from the enclave binding it to the noise plan and statement, the broker's verification and key release
(wrapped to the enclave). Then (after the reservation: :meth:`Admitted.execute`) the enclave opens the data,
computes, noises and returns signed noisy integers, whose signature the gateway checks against the attested
key. An attestation refusal reads no data and reserves nothing; a failure after the key release is
charged, like any failure after dispatch.
"""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
import threading
from typing import Any

from cryptography.hazmat.primitives import serialization

from dpgateway.errors import BackendError, ConfigError, InternalError
from dpgateway.executors.base import Evidence, Executor, NoisePlan, NoisyResult, decode_value, stop_processes
from dpgateway.executors.enclave import broker, protocol, simulated
from dpgateway.executors.enclave.verify import Anchor, Policy
from dpgateway.plan import DPPlan
from dpgateway.policies.model import EnclaveSettings


class EnclaveExecutor(Executor):
    """The plain path inside an enclave, the data key released only against a verified attestation report."""

    name = "enclave"
    simulated = True

    def __init__(self, settings: EnclaveSettings) -> None:
        self.settings = settings
        self.platform = simulated.hierarchy()  # the simulated manufacturer's hierarchy for this gateway
        keys = {}
        for table, sealed in settings.sealed:
            try:
                keys[table] = protocol.read_key_file(sealed.key)
            except (OSError, ValueError, protocol.ProtocolError) as exc:
                raise ConfigError(
                    f"executors.enclave.sealed.{table}.key: cannot read the data key {sealed.key.name} "
                    f"({type(exc).__name__}); create it with `dpgateway enclave seal`"
                ) from None
        measurements = frozenset(settings.measurements or (simulated.code_measurement().hex(),))
        self.broker = broker.KeyBroker(
            keys=keys,
            anchors=[Anchor(self.platform.ark, simulated=True)],
            policy=Policy(measurements=measurements, allow_simulated=settings.allow_simulated),
            nonce_ttl_s=settings.quote_ttl_s,
        )
        self._process: subprocess.Popen[str] | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._spawn()  # starts importing while the gateway plans

    def unsupported(self, plan: DPPlan) -> str | None:
        table = plan.table
        if table is None or self.settings.sealed_for(table.name) is None:
            return f"table {table.name if table else '?'} has no sealed copy under executors.enclave.sealed"
        return None

    def describe(self) -> str:
        return "enclave (backend: simulated, no hardware attestation, no confidentiality)"

    def admit(self, plan: DPPlan, noise: NoisePlan) -> Admitted:
        """Attest the enclave for this plan and have the broker release the table's key to it; reads no data."""
        table = plan.table
        sealed = self.settings.sealed_for(table.name) if table else None
        if table is None or sealed is None or plan.bounded_sql is None:
            raise InternalError("the enclave executor needs a sealed table and verified SQL; this is a bug")
        sql, fingerprint = str(plan.bounded_sql), noise.fingerprint()
        nonce = self.broker.nonce()
        quote = self._ask(
            {
                "op": "quote",
                "nonce": protocol.b64(nonce),
                "noise": noise.to_json(),
                "fingerprint": fingerprint,
                "sql": sql,
                "source": str(table.source),
                "sealed": str(sealed.file),
                "settings": [list(s) for s in plan.settings],
            }
        )
        evidence = broker.Evidence(
            report=protocol.unb64(quote["report"]),
            chain=tuple(self.platform.chain_pem()),
            kex_public=protocol.unb64(quote["kex_public"]),
            sig_public=protocol.unb64(quote["sig_public"]),
        )
        grant = self.broker.release(
            table.name,
            evidence,
            nonce=nonce,
            fingerprint=fingerprint,
            sql_sha256=hashlib.sha256(sql.encode()).hexdigest(),
        )
        return Admitted(self, str(quote["session"]), nonce, evidence.sig_public, grant)

    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        """Admit, then run (for callers that do not admit before reserving)."""
        return self.admit(plan, noise).execute(plan, noise)

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            process = self._start()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(json.dumps(message) + "\n")
                process.stdin.flush()
                line = self._line(process)
            except OSError:
                line = ""
            if not line:
                self._stop()
                raise BackendError(
                    "the enclave process stopped or did not answer within executors.enclave.timeout_s; it restarts "
                    "on the next query"
                )
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError:
            raise BackendError("the enclave sent a malformed reply") from None
        if "error" in reply:
            raise BackendError(str(reply["error"]))
        return reply

    def _start(self) -> subprocess.Popen[str]:
        """The running enclave process (started, and waited for, on first use or after it stopped)."""
        if self._process is None or self._process.poll() is not None:
            self._spawn()
        process = self._process
        assert process is not None and process.stdout is not None
        if not self._ready:
            line = self._line(process)
            if not line.startswith("{") or not json.loads(line).get("ready"):
                self._stop()
                raise BackendError("the enclave process did not start")
            self._ready = True
        return process

    def _line(self, process: subprocess.Popen[str]) -> str:
        """The enclave's next line, or "" if none comes within ``timeout_s`` (one request at a time: the reply
        is always the next whole line, so nothing waits in Python's buffer while ``select`` watches the pipe)."""
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], self.settings.timeout_s)
        return process.stdout.readline() if ready else ""

    def _spawn(self) -> None:
        """Start the enclave process and provision the simulated chip; does not wait for it (imports take seconds)."""
        process = subprocess.Popen(
            [sys.executable, "-m", "dpgateway.executors.enclave.enclave"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdin is not None
        key = self.platform.vcek_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        boot = {"vcek_key": key, "chip_id": self.platform.chip_id.hex(), "tcb": self.platform.tcb.__dict__}
        process.stdin.write(json.dumps(boot) + "\n")
        process.stdin.flush()
        self._process, self._ready = process, False

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_processes([process])

    def close(self) -> None:
        with self._lock:
            self._stop()


class Admitted(Executor):
    """One attested query: runs once, in the enclave that was attested, and checks the signed result."""

    name = "enclave"
    simulated = True

    def __init__(
        self, enclave: EnclaveExecutor, session: str, nonce: bytes, sig_public: bytes, grant: broker.Grant
    ) -> None:
        self.enclave, self.session, self.nonce, self.sig_public, self.grant = enclave, session, nonce, sig_public, grant

    def describe(self) -> str:
        return self.enclave.describe()

    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        reply = self.enclave._ask({"op": "run", "session": self.session, "grant": dict(self.grant.wrapped)})
        cells, values = reply["cells"], reply["values"]
        message = protocol.result_message(noise.fingerprint(), self.nonce, cells, values)
        try:
            protocol.check_signature(self.sig_public, message, str(reply["signature"]))
        except protocol.ProtocolError as exc:
            raise InternalError(f"executor enclave: {exc}") from None
        claims = self.grant.claims
        decoded = tuple(tuple(decode_value(v) for v in cell) for cell in cells)
        return NoisyResult(
            cells=decoded,
            values={name: tuple(column) for name, column in values.items()},
            noise_fingerprint=noise.fingerprint(),
            released_values=len(decoded) * len(values),
            evidence=Evidence(
                executor="enclave",
                noise_added_at="enclave (simulated)",
                exact_values_seen_by="the enclave (simulated: the host too)",
                simulated=claims.simulated,
                details={
                    "backend": "simulated",
                    "measurement": claims.measurement,
                    "tcb": str(claims.tcb),
                    "report_id": claims.report_id,
                },
            ),
        )
