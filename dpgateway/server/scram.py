"""SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, from stored verifiers only.

A verifier is PostgreSQL's format ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64).
The password never reaches the server: the client proves it knows ``ClientKey`` with
``ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)``; the server checks ``H(ClientKey) == StoredKey``.

Proof note (no user enumeration): :func:`fake_verifier` derives, from a server secret, a verifier for a name
that has no account; the exchange then runs exactly as for a real user (same iteration count, same messages,
one HMAC and one constant-time compare) and fails like a wrong password.
Test: tests/server/test_scram.py::test_unknown_user_exchange_looks_like_a_real_one and
tests/server/test_clients.py::test_unknown_user_and_wrong_password_are_indistinguishable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's scram_iterations default


class ScramError(Exception):
    """The exchange failed; the server answers FATAL 28P01 (or 08P01 for malformed messages)."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b64 = _b64
        return f"{MECHANISM}${self.iterations}:{b64(self.salt)}${b64(self.stored_key)}:{b64(self.server_key)}"

    @classmethod
    def decode(cls, text: str) -> Verifier:
        try:
            mechanism, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            if mechanism != MECHANISM:
                raise ValueError(mechanism)
            return cls(int(iterations), _unb64(salt), _unb64(stored), _unb64(server))
        except ValueError:
            raise ValueError("not a SCRAM-SHA-256 verifier") from None


def make_verifier(password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """The verifier of ``password`` (SASLprep-normalized as libpq does); the password itself is not kept."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return Verifier(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))


def fake_verifier(secret: bytes, user: str) -> Verifier:
    """A stable verifier for a user with no account, derived from the server secret (same for every try,
    so repeated attempts show the same salt, as for a real user); no password matches it."""
    material = _hmac(secret, b"dpgateway scram mock\x00" + user.encode("utf-8"))
    return Verifier(DEFAULT_ITERATIONS, material[:16], _hmac(material, b"stored"), _hmac(material, b"server"))


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep; a string it prohibits is used unchanged, as libpq and PostgreSQL do."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(c) for c in normalized for check in prohibited):
        return text
    if any(stringprep.in_table_d1(c) for c in normalized):
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return text
        if any(stringprep.in_table_d2(c) for c in normalized):
            return text
    return normalized


class ServerExchange:
    """One SCRAM-SHA-256 exchange: :meth:`first` answers client-first, :meth:`final` checks client-final."""

    def __init__(self, verifier: Verifier, *, nonce: str | None = None) -> None:
        self.verifier = verifier
        self.server_nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""

    def first(self, client_first: bytes) -> bytes:
        """Parse ``gs2-header client-first-bare``; return server-first."""
        text = _ascii(client_first)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message (client-first)", malformed=True)
        flag, authzid, bare = parts
        if flag == "p" or flag.startswith("p="):
            raise ScramError("channel binding is not offered by this server (no SCRAM-SHA-256-PLUS)", malformed=True)
        if flag not in ("n", "y") or authzid:
            raise ScramError("malformed SCRAM message (gs2 header)", malformed=True)
        attributes = bare.split(",")
        # libpq sends an empty name (n=): the user travelled in the start-up packet, which is what counts.
        if len(attributes) < 2 or not attributes[0].startswith("n=") or not attributes[1].startswith("r="):
            raise ScramError("malformed SCRAM message (client-first-bare)", malformed=True)
        client_nonce = attributes[1][2:]
        if not client_nonce or any(c == "," or not 0x21 <= ord(c) <= 0x7E for c in client_nonce):
            raise ScramError("malformed SCRAM nonce", malformed=True)
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self.server_nonce
        v = self.verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        """Check the proof in client-final; return server-final (``v=...``) or raise :class:`ScramError`."""
        text = _ascii(client_final)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        attributes = without_proof.split(",")
        if not sep or len(attributes) < 2 or not attributes[0].startswith("c=") or not attributes[1].startswith("r="):
            raise ScramError("malformed SCRAM message (client-final)", malformed=True)
        try:
            binding = base64.b64decode(attributes[0][2:], validate=True).decode("ascii")
            proof = base64.b64decode(proof_b64, validate=True)
        except (ValueError, UnicodeDecodeError):
            raise ScramError("malformed SCRAM message (base64)", malformed=True) from None
        if binding != self._gs2_header:
            raise ScramError("SCRAM channel binding check failed", malformed=True)
        if attributes[1][2:] != self._nonce:
            raise ScramError("SCRAM nonce does not match", malformed=True)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self.verifier
        signature = _hmac(v.stored_key, auth_message)
        client_key = (
            bytes(a ^ b for a, b in zip(proof, signature, strict=True)) if len(proof) == len(signature) else b""
        )
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise ScramError("password authentication failed")
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _ascii(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message (encoding)", malformed=True) from None
