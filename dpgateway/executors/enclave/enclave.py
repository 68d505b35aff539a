"""The enclave: the plain path (verified bounded SQL on DuckDB, OpenDP noise) behind an attestation boundary.

Run as its own process, ``python -m dpgateway.executors.enclave.enclave``; it speaks JSON lines on stdin and
stdout. The first line provisions the simulated platform (the chip key, from the simulated manufacturer:
simulated.py). Then, per query:

1. ``quote``: it checks the noise plan against its fingerprint and verifies the bounded SQL itself (the
   allowlisted nodes, reading only the table's source), makes two ephemeral P-384 keys (key agreement,
   signing) and asks the platform for a report whose report_data binds the broker's nonce, the fingerprint,
   the statement and both keys (protocol.report_data).
2. ``run``: with the broker's grant it unwraps the data key (only the attested key can), opens the sealed
   copy of the table, runs the statement on a DuckDB that may read only the decrypted file, adds exactly
   the planned OpenDP discrete Laplace noise (partition selection included, as plain does), signs the
   noisy integers with the attested signing key and returns only them. The decrypted file lives in a
   private temporary folder (``/dev/shm`` where it exists) for the length of the query.

What it releases is what the plain executor releases for the same plan: the same SQL, the same exact
aggregates, the same sampler and scales (noise.py, mechanisms.py), checked by the gateway (base.accept)
and by tests/executors/test_conformance.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlglot import exp

from dpgateway.connectors.base import ExactAggregates
from dpgateway.connectors.duckdb import DuckDBConnector, DuckDBHooks
from dpgateway.executors.base import NoisePlan, encode_value
from dpgateway.executors.enclave import protocol, simulated
from dpgateway.executors.enclave.report import Tcb
from dpgateway.mechanisms import noisy_vector
from dpgateway.noise import Key, exact_vectors, select_cells
from dpgateway.sqlcheck import VerifiedSQL, verify

SESSION_TTL_S = 120.0
MAX_SESSIONS = 64


class Refused(Exception):
    """The enclave will not run this request (its message names the rule, never a data value)."""


@dataclass
class Session:
    """One admitted query: its plan, statement and ephemeral keys, used once."""

    noise: NoisePlan
    fingerprint: str
    sql: str
    tree: exp.Expr  # the statement as verified at quote time
    source: str
    sealed: str
    settings: list[tuple[str, Any]]
    nonce: bytes
    bound: bytes
    kex: ec.EllipticCurvePrivateKey
    sig: ec.EllipticCurvePrivateKey
    expires: float


class Enclave:
    """The code inside the boundary (and, in the simulation, the platform that measures and signs for it)."""

    def __init__(self, vcek_key: ec.EllipticCurvePrivateKey, chip_id: bytes, tcb: Tcb) -> None:
        self.vcek_key, self.chip_id, self.tcb = vcek_key, chip_id, tcb
        self.measurement = simulated.code_measurement()  # the platform measures the code at launch
        self.sessions: dict[str, Session] = {}
        shm = Path("/dev/shm")  # memory-backed where it exists: decrypted rows never reach a disk
        self._folder = tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None, prefix="dpgateway-enclave-")
        self.folder = Path(self._folder.name)  # mode 0700
        self.connector = DuckDBConnector(allowed_directories=[self.folder])  # may read nothing else

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            if message.get("op") == "quote":
                return self._quote(message)
            if message.get("op") == "run":
                return self._run(message)
            return {"error": "unknown request"}
        except (Refused, protocol.ProtocolError) as exc:
            return {"error": f"enclave refused: {exc}"}
        except Exception as exc:  # never echo text that could hold a data value
            return {"error": f"enclave failed: {type(exc).__name__} (details withheld)"}

    def _quote(self, message: dict[str, Any]) -> dict[str, Any]:
        noise = NoisePlan.from_json(message["noise"])
        fingerprint = str(message["fingerprint"])
        if noise.fingerprint() != fingerprint:
            raise Refused("the noise plan does not match its fingerprint")
        if any(not m.scale > 0 for m in noise.measurements):
            raise Refused("every measurement needs a positive noise scale")
        sql, source = str(message["sql"]), str(message["source"])
        tree = _verified(sql, source)  # refuse before attesting to a statement it would not run
        kex, sig = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
        kex_public, sig_public = protocol.public_der(kex.public_key()), protocol.public_der(sig.public_key())
        nonce = protocol.unb64(message["nonce"])
        bound = protocol.report_data(nonce, fingerprint, _sha256(sql), kex_public, sig_public)
        raw = simulated.sign_report(
            self.vcek_key, report_data=bound, measurement=self.measurement, chip_id=self.chip_id, tcb=self.tcb
        )
        now = time.monotonic()
        for key in [k for k, s in self.sessions.items() if s.expires < now][: len(self.sessions)]:
            del self.sessions[key]
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        session = secrets.token_hex(16)
        self.sessions[session] = Session(
            noise=noise,
            fingerprint=fingerprint,
            sql=sql,
            tree=tree,
            source=source,
            sealed=str(message["sealed"]),
            settings=[(str(k), v) for k, v in message.get("settings", [])],
            nonce=nonce,
            bound=bound,
            kex=kex,
            sig=sig,
            expires=now + SESSION_TTL_S,
        )
        return {
            "session": session,
            "report": protocol.b64(raw),
            "kex_public": protocol.b64(kex_public),
            "sig_public": protocol.b64(sig_public),
        }

    def _run(self, message: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.pop(str(message["session"]), None)
        if session is None or session.expires < time.monotonic():
            raise Refused("no such admitted query (each attestation admits one run)")
        key = protocol.unwrap(message["grant"], session.kex, session.bound)
        plaintext = protocol.open_sealed(Path(session.sealed).read_bytes(), key)
        opened = self.folder / f"{hashlib.sha256(session.source.encode()).hexdigest()[:16]}.parquet"
        try:
            fd = os.open(opened, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(plaintext)
            del plaintext
            exact = _execute(self.connector, session, opened)
        finally:
            opened.unlink(missing_ok=True)  # the rows exist in the clear only while the query runs
        cells, values = noisy_release(session.noise, exact)
        encoded = [[encode_value(v) for v in cell] for cell in cells]
        body = protocol.result_message(session.fingerprint, session.nonce, encoded, values)
        return {"cells": encoded, "values": values, "signature": protocol.sign(session.sig, body)}

    def close(self) -> None:
        self.connector.close()
        self._folder.cleanup()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _verified(sql: str, source: str) -> exp.Expr:
    """The statement, verified as the gateway verified it: allowlisted nodes, reading only ``source``."""
    hooks = DuckDBHooks
    tree = sqlglot.parse_one(sql, dialect="duckdb")
    verify(
        tree,
        "duckdb",
        sources=[hooks().file_source(source)],
        nodes=hooks.BACKEND_NODES,
        functions=hooks.BACKEND_FUNCTIONS,
    )
    return tree


def _execute(connector: DuckDBConnector, session: Session, opened: Path) -> ExactAggregates:
    """Run the admitted statement with its source replaced by the decrypted file, verified again."""
    hooks = DuckDBHooks()
    original, replacement = hooks.file_source(session.source), hooks.file_source(str(opened))
    reader = original.this.sql(dialect="duckdb")
    tree = session.tree
    for node in list(tree.find_all(exp.Table)):
        if isinstance(node.this, exp.Func) and node.this.sql(dialect="duckdb") == reader:  # the source, by structure
            node.set("this", replacement.this.copy())
    checked: VerifiedSQL = verify(
        tree, "duckdb", sources=[replacement], nodes=DuckDBHooks.BACKEND_NODES, functions=DuckDBHooks.BACKEND_FUNCTIONS
    )
    return connector.execute(checked, tuple(session.settings))


def noisy_release(noise: NoisePlan, exact: ExactAggregates) -> tuple[list[Key], dict[str, list[int]]]:
    """The released cells and noisy integers for ``noise``: the plain path's noise.noisy_integers, driven by the
    noise plan instead of the DPPlan (public cells in plan order; private keys through the selecting threshold)."""
    n_keys, names = noise.n_keys, [m.name for m in noise.measurements]
    if len(exact.columns) != n_keys + len(names):
        raise Refused("the statement returned other columns than the noise plan")
    by_key: dict[Key, tuple[Any, ...]] = {tuple(row[:n_keys]): row for row in exact.rows}
    selected: dict[str, list[int]] = {}
    if noise.cells is None:
        index, selector = next((i, m) for i, m in enumerate(noise.measurements) if m.threshold is not None)
        assert selector.threshold is not None
        cells, selected[selector.name] = select_cells(by_key, n_keys + index, selector.scale, selector.threshold)
    else:
        cells = list(noise.cells)
    exact_values = exact_vectors(by_key, cells, n_keys, names)
    return cells, {
        m.name: selected[m.name] if m.name in selected else noisy_vector(exact_values[m.name], m.scale, m.mechanism)
        for m in noise.measurements
    }


def main() -> None:
    boot = json.loads(sys.stdin.readline())
    vcek = serialization.load_pem_private_key(boot["vcek_key"].encode(), password=None)
    assert isinstance(vcek, ec.EllipticCurvePrivateKey)
    enclave = Enclave(vcek, bytes.fromhex(boot["chip_id"]), Tcb(**boot["tcb"]))
    sys.stdout.write(json.dumps({"ready": True, "measurement": enclave.measurement.hex()}) + "\n")
    sys.stdout.flush()
    try:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                message = {}
            sys.stdout.write(json.dumps(enclave.handle(message if isinstance(message, dict) else {})) + "\n")
            sys.stdout.flush()
    finally:
        enclave.close()


if __name__ == "__main__":
    main()
