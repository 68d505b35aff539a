"""The enclave protocol's cryptography: what report_data binds, the key wrap, sealed files, signed results.

* ``report_data`` = SHA-512("dpgateway-enclave-quote-v1" || nonce || noise-plan fingerprint || SHA-256 of the
  bounded SQL || the enclave's ephemeral key-agreement key || its ephemeral signing key), 64 bytes, the size
  of the report's field. So a report vouches for one verifier nonce, one noise plan and one statement, and
  names the keys that alone can receive the data key and sign the result.
* Key release: the broker does ECDH (P-384) with the attested key-agreement key, derives an AES-256-GCM key
  with HKDF-SHA-384 over the report data, and encrypts the data key with the report data as associated
  data: only the process holding the attested private key can unwrap it, and only for that report.
* A sealed file is ``DPGSEAL1 || key id (16) || IV (12) || AES-256-GCM(plaintext)`` with the first 24 bytes
  as associated data; the key id is a hash of the key, so a wrong key is named as such, not as corruption.
  One AES-GCM message: files up to 2 GiB (larger ones would need chunking, not done).
* The enclave signs the released values (ECDSA P-384) with the attested signing key; the gateway checks
  that signature, so a result cannot come from anywhere but the attested enclave.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"DPGSEAL1"
KEY_BYTES = 32
MAX_SEALED = 2**31 - 1 - 16


class ProtocolError(Exception):
    """A protocol step failed (a bad key, a tampered message); the text names the step, never data."""


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ProtocolError("an enclave key must be an ECDSA/ECDH P-384 key")
    return key


def report_data(nonce: bytes, fingerprint: str, sql_sha256: str, kex_public: bytes, sig_public: bytes) -> bytes:
    """The 64 bytes a report must carry for this nonce, noise plan, statement and pair of keys."""
    digest = hashlib.sha512(b"dpgateway-enclave-quote-v1\0")
    for part in (nonce, bytes.fromhex(fingerprint), bytes.fromhex(sql_sha256), kex_public, sig_public):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()


def _wrap_key(shared: bytes, bound: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=b"dpgateway-key-release-v1\0" + bound)
    return AESGCM(derived.derive(shared))


def wrap(data_key: bytes, kex_public: bytes, bound: bytes) -> dict[str, str]:
    """``data_key`` encrypted to the holder of ``kex_public`` for the report carrying ``bound``."""
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    shared = ephemeral.exchange(ec.ECDH(), load_public(kex_public))
    iv = secrets.token_bytes(12)
    return {
        "broker_public": b64(public_der(ephemeral.public_key())),
        "iv": b64(iv),
        "wrapped": b64(_wrap_key(shared, bound).encrypt(iv, data_key, bound)),
    }


def unwrap(grant: dict[str, str], kex_private: ec.EllipticCurvePrivateKey, bound: bytes) -> bytes:
    """The data key from a broker's grant (ProtocolError if it was not wrapped for this key and report)."""
    shared = kex_private.exchange(ec.ECDH(), load_public(unb64(grant["broker_public"])))
    try:
        return _wrap_key(shared, bound).decrypt(unb64(grant["iv"]), unb64(grant["wrapped"]), bound)
    except InvalidTag:
        raise ProtocolError("the data key was not wrapped for this enclave and report") from None


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"dpgateway-seal-key-id\0" + key).digest()[:16]


def seal(plaintext: bytes, key: bytes) -> bytes:
    """``plaintext`` encrypted under ``key`` in the sealed-file format."""
    if len(key) != KEY_BYTES:
        raise ProtocolError(f"a data key is {KEY_BYTES} bytes")
    if len(plaintext) > MAX_SEALED:
        raise ProtocolError("files over 2 GiB cannot be sealed (one AES-GCM message)")
    header = MAGIC + key_id(key)
    iv = secrets.token_bytes(12)
    return header + iv + AESGCM(key).encrypt(iv, plaintext, header)


def open_sealed(sealed: bytes, key: bytes) -> bytes:
    """The plaintext of a sealed file (ProtocolError if the key is another or the file was changed)."""
    header, iv, body = sealed[:24], sealed[24:36], sealed[36:]
    if header[:8] != MAGIC:
        raise ProtocolError("not a sealed file (seal it with `dpgateway enclave seal`)")
    if header[8:] != key_id(key):
        raise ProtocolError("the sealed file was sealed under another key")
    try:
        return AESGCM(key).decrypt(iv, body, header)
    except InvalidTag:
        raise ProtocolError("the sealed file was changed after sealing") from None


def new_key_file(path: Path) -> bytes:
    """Create a key file (base64, mode 0600) with a fresh random key; never overwrite one."""
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(b64(key) + "\n")
    return key


def read_key_file(path: Path) -> bytes:
    key = base64.b64decode(path.read_text().strip(), validate=True)
    if len(key) != KEY_BYTES:
        raise ProtocolError(f"key file {path.name} does not hold a {KEY_BYTES}-byte key")
    return key


def result_message(fingerprint: str, nonce: bytes, cells: list[Any], values: dict[str, list[int]]) -> bytes:
    """The canonical bytes the enclave signs for a release."""
    body = {"fingerprint": fingerprint, "nonce": nonce.hex(), "cells": cells, "values": values}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> str:
    return b64(key.sign(message, ec.ECDSA(hashes.SHA384())))


def check_signature(public: bytes, message: bytes, signature: str) -> None:
    try:
        load_public(public).verify(unb64(signature), message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ProtocolError("the result is not signed by the attested enclave key") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
