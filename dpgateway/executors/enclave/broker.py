"""The data owner's key broker: issues nonces, verifies evidence, and only then releases a data key.

Proof note (attestation gates the data): a data key leaves the broker only inside :meth:`KeyBroker.release`,
after :func:`~dpgateway.executors.enclave.verify.verify` accepted the report for the report data
``protocol.report_data(nonce, fingerprint, sql_sha256, kex_public, sig_public)`` and the nonce was one this
broker issued, unused and unexpired (consumed by the attempt, whatever its outcome, so a recorded report is
never accepted twice). The key is wrapped to the attested key-agreement key (protocol.wrap), so the party
forwarding the grant (the gateway) cannot read it. Everything checked here is independent of the data: a
refusal reveals nothing about any person. Tests: tests/executors/test_attestation.py.

In the simulated backend the broker runs inside the gateway process; in a deployment it is the data
owner's service (a KBS, or Azure Secure Key Release) and the gateway only forwards messages.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from dpgateway.executors.enclave import protocol
from dpgateway.executors.enclave.verify import Anchor, AttestationRefused, Claims, Policy, verify

MAX_NONCES = 4096
MAX_LOG = 10_000  # the most recent releases and refusals (a deployment's broker keeps its own durable log)


@dataclass(frozen=True)
class Evidence:
    """What the enclave sends: its report, the VCEK/ASK/ARK chain (PEM) and its two ephemeral public keys (DER)."""

    report: bytes
    chain: tuple[str, ...]
    kex_public: bytes
    sig_public: bytes


@dataclass(frozen=True)
class Grant:
    """A released data key, wrapped to the attested enclave, and the claims it was released on."""

    wrapped: Mapping[str, str]
    claims: Claims


@dataclass
class KeyBroker:
    """Holds the data keys of sealed tables and releases each only to attested enclaves."""

    keys: Mapping[str, bytes]
    anchors: Sequence[Anchor]
    policy: Policy
    nonce_ttl_s: float = 60.0
    clock: Callable[[], float] = time.time
    log: deque[tuple[str, str, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_LOG)
    )  # (table, fingerprint, outcome)
    _nonces: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def nonce(self) -> bytes:
        """A fresh nonce for one report, valid ``nonce_ttl_s`` seconds and for one release attempt."""
        value = secrets.token_bytes(32)
        with self._lock:
            while len(self._nonces) >= MAX_NONCES:
                self._nonces.popitem(last=False)
            self._nonces[value] = self.clock() + self.nonce_ttl_s
        return value

    def release(self, table: str, evidence: Evidence, *, nonce: bytes, fingerprint: str, sql_sha256: str) -> Grant:
        """Verify ``evidence`` for this nonce, noise plan and statement; return the wrapped key of ``table``."""
        with self._lock:
            expires = self._nonces.pop(nonce, None)
        try:
            if expires is None:
                raise AttestationRefused(
                    "attestation refused: the nonce was not issued by this key broker or was already used (replay)"
                )
            if self.clock() > expires:
                raise AttestationRefused("attestation refused: the nonce expired (the report is stale)")
            if table not in self.keys:
                raise AttestationRefused(f"attestation refused: the key broker holds no key for table {table}")
            try:
                chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in evidence.chain]
            except ValueError:
                raise AttestationRefused("attestation refused: the certificate chain does not parse") from None
            bound = protocol.report_data(nonce, fingerprint, sql_sha256, evidence.kex_public, evidence.sig_public)
            claims = verify(
                evidence.report, chain, expected_report_data=bound, anchors=self.anchors, policy=self.policy
            )
            try:
                wrapped = protocol.wrap(self.keys[table], evidence.kex_public, bound)
            except (protocol.ProtocolError, ValueError):
                raise AttestationRefused("attestation refused: the attested key-agreement key is unusable") from None
        except AttestationRefused as exc:
            self.log.append((table, fingerprint, exc.message))
            raise
        self.log.append((table, fingerprint, "released" + (" (simulated)" if claims.simulated else "")))
        return Grant(wrapped=wrapped, claims=claims)
