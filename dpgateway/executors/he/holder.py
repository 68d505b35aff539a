"""The key holder: decrypts only final aggregates, adds the planned OpenDP noise, returns noisy integers.

Run it as its own process beside its own key file (created 0600 by ``dpgateway he keygen``; refused if
others can read it): ``dpgateway he holder --key keys/holder.key --listen 127.0.0.1:0`` (it prints
``listening HOST:PORT``), or let the gateway start it from ``executors.he.key_holder``. The gateway never
opens the key file; it sends one request per query:
``{"type": "decrypt", "noise", "fingerprint", "ciphertext", "period", "slots", "bounds", "capacity", "nonce",
"issued", "mac"}``.

What the key holder checks before it releases anything (each refusal names its rule):

0. the request is signed by the gateway: ``mac`` is HMAC-SHA256 under the request key ``he keygen`` gave
   both (``gateway.key``), over the whole request, so only that gateway can have anything decrypted; and
   it is fresh: issued within ``FRESH_SECONDS`` of the key holder's clock, with a nonce not seen in that
   window, so a captured request replayed to the key holder gets no second, independently noised
   answer (a restarted key holder forgets the nonces of the last ``FRESH_SECONDS``: docs/executors.md);
1. the noise plan hashes to the fingerprint sent (the plan the ledger reserved for);
2. public cells only (no partition selection), every scale positive and finite, and every measurement's
   declared epsilon pays for its noise: ``epsilon >= sensitivity / scale`` (discrete Laplace), with the
   sensitivity at least one row's bound on every slot it reads;
3. no wrap-around: ``capacity * bound < t / 2`` for every slot read (scheme.py);
4. the ciphertext is a final aggregate: positive noise budget, and periodic with the cube's period (every
   slot ``j`` equals slot ``j mod period``, which the gateway's rotate-and-sum produces); a raw row, a
   partial accumulator or any unfolded ciphertext is refused, so the key holder is not a decryption
   oracle for row-level values;
5. it releases exactly cells x measurements values, each read from a distinct slot, each noised once.

Proof note (the release is the planned mechanism): the values decrypted are exact integer sums (scheme.py,
no wrap by check 3) of the owner's bounded per-row contributions (cube.py), the same integers the plain
executor's SQL returns; each released value is ``noisy_vector`` (OpenDP discrete Laplace at the planned
scale, the sampler ``plain`` uses) of one of them, so for an honest gateway the release has exactly the
plain executor's distribution and the accountant's epsilon holds (check 2 re-derives it from the plan).
The key holder sees the exact totals of every field of the cube (the whole folded ciphertext), never a
row. Tests: tests/executors/test_he.py (refusals, what crosses the gateway boundary, distribution).
"""

from __future__ import annotations

import argparse
import base64
import math
import threading
import time
from pathlib import Path
from typing import Any

from dpgateway.executors import signing
from dpgateway.executors.base import NoisePlan
from dpgateway.executors.he import scheme
from dpgateway.executors.mpc import wire
from dpgateway.mechanisms import noisy_vector

EPSILON_SLACK = 1e-9  # relative: floating-point rounding of epsilon * scale
FRESH_SECONDS = 300.0  # a request is answered only within this long of being issued, and only once


class Refused(Exception):
    """The key holder will not decrypt this request (the message names the rule)."""


class Holder:
    """The key holder's logic (thread-safe: the decryptor is read-only)."""

    def __init__(self, key_file: Path) -> None:
        self.keys = scheme.read_keys(key_file, secret=True)
        self.decryptor = scheme.Decryptor(self.keys)
        self._seen: dict[str, float] = {}  # nonce -> issued, for the requests of the last FRESH_SECONDS
        self._lock = threading.Lock()

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("type") != "decrypt":
            return {"error": "unknown message"}
        try:
            return self._decrypt(message)
        except Refused as exc:
            return {"error": f"key holder refused: {exc}"}
        except Exception as exc:  # never echo data-dependent text
            return {"error": f"key holder failed: {type(exc).__name__}"}

    def _decrypt(self, message: dict[str, Any]) -> dict[str, Any]:
        if not signing.signed_by(self.keys.request_key, message):
            raise Refused("the request is not signed by the gateway this key holder serves")
        self._once(message)
        noise = NoisePlan.from_json(message["noise"])
        fingerprint = noise.fingerprint()
        if fingerprint != message.get("fingerprint"):
            raise Refused("the noise plan does not match its fingerprint")
        if noise.cells is None:
            raise Refused("private group keys (partition selection) are not supported")
        period, capacity = int(message["period"]), int(message["capacity"])
        slots, bounds = message["slots"], message["bounds"]
        n_cells = len(noise.cells)
        if len(slots) != len(noise.measurements) or any(len(s) != n_cells for s in slots):
            raise Refused("the slots asked for are not cells x measurements")
        flat = [int(s) for column in slots for s in column]
        if len(set(flat)) != len(flat) or not all(0 <= s < period for s in flat):
            raise Refused("each released value must come from its own slot of one period")
        if period < 1 or period & (period - 1) or period > scheme.ROW:
            raise Refused("the period must be a power of two within one ciphertext row")
        t = self.keys.plain_modulus
        for m, column in zip(noise.measurements, slots, strict=True):
            if not (m.scale > 0 and math.isfinite(m.scale)) or m.threshold is not None:
                raise Refused(f"measurement {m.name} needs a positive, finite noise scale")
            if m.mechanism == "gaussian":  # rho = d^2 / (2 s^2) (zCDP) instead of epsilon = d / s
                if m.rho < m.sensitivity**2 / (2 * m.scale**2) * (1 - EPSILON_SLACK):
                    raise Refused(f"measurement {m.name}: its noise does not pay for its declared rho")
            elif m.epsilon < (m.sensitivity / m.scale) * (1 - EPSILON_SLACK):
                raise Refused(f"measurement {m.name}: its noise does not pay for its declared epsilon")
            for s in column:
                bound = int(bounds[s])
                if m.sensitivity < bound:
                    raise Refused(f"measurement {m.name}: sensitivity below one row's bound")
                if not scheme.fits(capacity, bound, t):
                    raise Refused(f"{capacity} rows of values up to {bound} could wrap the plaintext modulus")
        values, budget = self.decryptor.decrypt(base64.b64decode(message["ciphertext"]))
        if budget <= 0:
            raise Refused("the ciphertext's noise budget is exhausted (not decryptable exactly)")
        if any(values[j] != values[j % period] for j in range(period, len(values))):
            raise Refused("not a final aggregate (the ciphertext is not folded to one period)")
        released = {
            m.name: noisy_vector([values[int(s)] for s in column], m.scale, m.mechanism)
            for m, column in zip(noise.measurements, slots, strict=True)
        }
        return {"values": released, "fingerprint": fingerprint}

    def _once(self, message: dict[str, Any]) -> None:
        """Refuse a stale request or one whose nonce was already answered (rule 0)."""
        nonce, issued, now = message.get("nonce"), message.get("issued"), time.time()
        if not isinstance(nonce, str) or not isinstance(issued, (int, float)) or abs(now - issued) > FRESH_SECONDS:
            raise Refused("the request is not fresh (no nonce, or issued too long ago)")
        with self._lock:
            self._seen = {n: t for n, t in self._seen.items() if now - t <= FRESH_SECONDS}
            if nonce in self._seen:
                raise Refused("the request was already answered (a replay)")
            self._seen[nonce] = float(issued)


def serve(key_file: Path, listen: str) -> None:
    """Run the key holder until killed, printing ``listening HOST:PORT`` once ready."""
    holder = Holder(key_file)
    wire.serve_announced(listen, lambda message, _: holder.handle(message))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgateway.executors.he.holder")
    parser.add_argument("--key", required=True, type=Path, help="the key holder's key file (0600)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    args = parser.parse_args(argv)
    serve(args.key, args.listen)


if __name__ == "__main__":
    main()
