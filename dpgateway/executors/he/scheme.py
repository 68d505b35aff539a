"""BFV over Microsoft SEAL (``tenseal.sealapi``): parameters, key files, packing, and additive aggregation.

Parameters (fixed, :data:`DEGREE` and :data:`COEFF_BITS`): ring degree N = 8192 with a 180-bit
coefficient modulus (two 60-bit data primes and one special prime for key switching), which SEAL
accepts at its 128-bit classical security level (HE standard: at most 218 bits for N = 8192); the
plaintext modulus ``t`` is a 50-bit prime with ``t = 1 mod 2N`` (batching: N integer slots, a 2 x N/2
matrix). A slot holds an integer mod ``t`` decoded as signed in ``(-t/2, t/2]``.

Proof note (no wrap-around): the gateway only adds ciphertexts and rotates;
every decrypted slot is therefore ``sum over rows of v_r mod t`` for one field, with ``|v_r| <= B_f``
(the field's per-row bound, from the policy's clamps and fixed-point scales). If ``rows * B_f < t / 2``
(checked by :func:`fits` at encryption and again by the key holder) the signed decoding of the sum is
the exact integer sum. BFV decryption is exact while the invariant noise budget is positive; the
parameters leave about 45 bits after summing 4000 ciphertexts and folding with 13 rotations, and the
key holder refuses a ciphertext whose budget is exhausted. (A plaintext mask is not used: a batch-encoded
0/1 vector is a polynomial with coefficients of the size of ``t`` and multiplying by it exhausts the
budget.) Tests: tests/executors/test_he.py::test_overflow_is_refused and
::test_noise_budget_after_a_large_sum (4000 ciphertexts, marked slow).

Ciphertexts are stored and summed as raw coefficient arrays (shape ``(2, 2, N)``, residues modulo the two
data primes; BFV ciphertexts are not in NTT form, so SEAL's addition is exactly this residue-wise
addition), which lets the gateway add thousands of them with numpy from a memory map.
"""

from __future__ import annotations

import os
import secrets
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpgateway.errors import InvalidParameterError
from dpgateway.executors.signing import read_key_file, write_key_file

try:
    import tenseal.sealapi as seal
    import zstandard
except ImportError:  # the optional extra: pip install 'dpgateway[he]'
    seal = None

DEGREE = 8192
COEFF_BITS = (60, 60, 60)
PLAIN_BITS = 50
ROW = DEGREE // 2  # slots per batching row
SUM_GROUP = 15  # residues < 2^60: 15 of them plus an accumulator stay below 2^64


def require() -> Any:
    """The SEAL binding, or a clear refusal naming the extra to install."""
    if seal is None:
        raise InvalidParameterError(
            "the he executor needs the homomorphic-encryption library; install it with pip install 'dpgateway[he]'"
        )
    return seal


def _bytes(obj: Any) -> bytes:
    """A SEAL object's serialization (SEAL saves to paths only)."""
    with tempfile.TemporaryDirectory(prefix="dpgateway-he-") as folder:
        path = os.path.join(folder, "obj")
        obj.save(path)
        return Path(path).read_bytes()


def _load(obj: Any, data: bytes, context: Any = None) -> Any:
    with tempfile.TemporaryDirectory(prefix="dpgateway-he-") as folder:
        path = os.path.join(folder, "obj")
        Path(path).write_bytes(data)
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    return obj


def parameters() -> Any:
    s = require()
    parms = s.EncryptionParameters(s.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(DEGREE)
    parms.set_coeff_modulus(s.CoeffModulus.Create(DEGREE, list(COEFF_BITS)))
    parms.set_plain_modulus(s.PlainModulus.Batching(DEGREE, PLAIN_BITS))
    return parms


def rotation_steps() -> list[int]:
    """Galois elements for every power-of-two row rotation and the column swap (the rotate-and-sum steps)."""
    m = 2 * DEGREE
    return [pow(3, 1 << i, m) for i in range(ROW.bit_length() - 1)] + [m - 1]


@dataclass
class Keys:
    """Key material: the public part (encryption, rotations) and, for the key holder only, the secret key."""

    context: Any
    public_key: Any
    galois_keys: Any
    secret_key: Any = None
    request_key: bytes = b""  # the key holder's copy of the gateway's request key

    @property
    def plain_modulus(self) -> int:
        return int(self.context.first_context_data().parms().plain_modulus().value())

    @property
    def primes(self) -> np.ndarray:
        data = self.context.first_context_data().parms().coeff_modulus()
        return np.array([int(q.value()) for q in data], dtype=np.uint64)


def _context(parms: Any) -> Any:
    s = require()
    context = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise InvalidParameterError(f"BFV parameters rejected by SEAL: {context.parameters_error_message()}")
    return context


def generate() -> Keys:
    s = require()
    context = _context(parameters())
    generator = s.KeyGenerator(context)
    public = s.PublicKey()
    generator.create_public_key(public)
    galois = s.GaloisKeys()
    generator.create_galois_keys(rotation_steps(), galois)
    return Keys(context, public, galois, generator.secret_key())


def write_keys(keys: Keys, holder: Path, public: Path, gateway: Path) -> None:
    """The key holder's file (secret key and request key, 0600), the public file (owner and gateway) and the
    gateway's request key (0600), with which it signs every request the key holder accepts."""
    parts = {"params": _bytes(parameters()), "public_key": _bytes(keys.public_key), "galois": _bytes(keys.galois_keys)}
    request_key = secrets.token_bytes(32)
    write_key_file(holder, {**parts, "secret_key": _bytes(keys.secret_key), "request_key": request_key}, 0o600)
    write_key_file(public, parts, 0o644)
    write_key_file(gateway, {"request_key": request_key}, 0o600)


def read_request_key(path: Path) -> bytes:
    """The gateway's request key (``gateway.key`` from ``he keygen``; must be private)."""
    parts = read_key_file(path, private=True)
    if "request_key" not in parts:
        raise InvalidParameterError(f"{path} holds no request key; point executors.he.gateway_key at gateway.key")
    return parts["request_key"]


def read_keys(path: Path, *, secret: bool = False) -> Keys:
    """Load a key file; ``secret=True`` (the key holder) requires the secret key and a 0600 file."""
    s = require()
    raw = read_key_file(path, private=secret)
    if secret and ("secret_key" not in raw or "request_key" not in raw):
        raise InvalidParameterError(f"{path} holds no secret key; point the key holder at the file `he keygen` wrote")
    if not secret and "secret_key" in raw:
        raise InvalidParameterError(f"{path} holds the secret key; give the gateway and owners the public key file")
    if "params" not in raw:
        raise InvalidParameterError(f"{path} is not a key file of `dpgateway he keygen`")
    context = _context(_load(s.EncryptionParameters(s.SCHEME_TYPE.BFV), raw["params"]))
    keys = Keys(
        context,
        _load(s.PublicKey(), raw["public_key"], context),
        _load(s.GaloisKeys(), raw["galois"], context),
    )
    if secret:
        keys.secret_key = _load(s.SecretKey(), raw["secret_key"], context)
        keys.request_key = raw["request_key"]
    return keys


def fits(rows: int, bound: int, plain_modulus: int) -> bool:
    """Whether any sum of ``rows`` values of absolute value at most ``bound`` decodes exactly (no wrap)."""
    return rows * bound < (plain_modulus - 1) // 2


# SEAL's serialization of a BFV ciphertext (SEAL 4.x, as TenSEAL 0.3 ships it): a 16-byte header (magic
# 0xA15E, header size, version, compression mode, total size), then parms_id (32 bytes), is_ntt_form (1),
# size, N, number of primes (uint64 each), scale (double), correction factor (uint64), and the coefficient
# array (its own 16-byte header, a uint64 count, then count little-endian uint64 residues).
_HEADER = struct.Struct("<HBBBBHQ")
_MAGIC = 0xA15E
_PREFIX = 32 + 1 + 8 * 3 + 8 + 8
_RAW_SHAPE = (2, len(COEFF_BITS) - 1, DEGREE)


def _unpack(data: bytes) -> tuple[bytes, np.ndarray]:
    """A serialized ciphertext as (its version and metadata prefix, its coefficients of shape (2, primes, N))."""
    magic, header_size, major, minor, compression, _reserved, total = _HEADER.unpack_from(data)
    if magic != _MAGIC or header_size != _HEADER.size or total != len(data):
        raise InvalidParameterError("not a SEAL ciphertext")
    body = data[_HEADER.size :]
    if compression == 2:
        body = zstandard.ZstdDecompressor().decompress(
            body, max_output_size=_PREFIX + 32 + 8 * int(np.prod(_RAW_SHAPE))
        )
    elif compression != 0:
        raise InvalidParameterError("unsupported SEAL compression")
    size, degree, primes = struct.unpack_from("<QQQ", body, 33)
    count = struct.unpack_from("<Q", body, _PREFIX + _HEADER.size)[0]
    if (size, primes, degree) != _RAW_SHAPE or count != size * primes * degree:
        raise InvalidParameterError("a ciphertext of other parameters than this key's")
    start = _PREFIX + _HEADER.size + 8
    coefficients = np.frombuffer(body, dtype="<u8", count=count, offset=start).reshape(_RAW_SHAPE)
    return bytes([major, minor]) + body[:_PREFIX], coefficients


def _pack(prefix: bytes, coefficients: np.ndarray) -> bytes:
    """The uncompressed serialization of a ciphertext with ``prefix`` (from :func:`_unpack`) and these coefficients."""
    major, minor, meta = prefix[0], prefix[1], prefix[2:]
    data = np.ascontiguousarray(coefficients, dtype="<u8").tobytes()
    inner = _HEADER.pack(_MAGIC, _HEADER.size, major, minor, 0, 0, _HEADER.size + 8 + len(data))
    body = meta + inner + struct.pack("<Q", coefficients.size) + data
    return _HEADER.pack(_MAGIC, _HEADER.size, major, minor, 0, 0, _HEADER.size + len(body)) + body


class Encryptor:
    """Encrypts packed slot vectors with the public key, returning raw coefficient arrays."""

    def __init__(self, keys: Keys) -> None:
        s = require()
        self._s = s
        self._encoder = s.BatchEncoder(keys.context)
        self._encryptor = s.Encryptor(keys.context, keys.public_key)

    def encrypt(self, slots: np.ndarray) -> np.ndarray:
        """``slots``: DEGREE signed integers (each in (-t/2, t/2])."""
        plain = self._s.Plaintext()
        self._encoder.encode([int(v) for v in slots], plain)
        ciphertext = self._s.Ciphertext()
        self._encryptor.encrypt(plain, ciphertext)
        return _unpack(_bytes(ciphertext))[1]


def sum_raw(batches: Iterator[np.ndarray], primes: np.ndarray) -> np.ndarray:
    """Residue-wise sum modulo each data prime of stacks of raw ciphertexts ``(n, 2, primes, N)``."""
    q = primes.reshape(1, -1, 1)
    total = np.zeros((2, len(primes), DEGREE), dtype=np.uint64)
    for batch in batches:
        for start in range(0, len(batch), SUM_GROUP):
            total += np.asarray(batch[start : start + SUM_GROUP]).sum(axis=0, dtype=np.uint64)
            total %= q
    return total


class Evaluator:
    """The gateway's homomorphic operations: no secret key."""

    def __init__(self, keys: Keys) -> None:
        s = require()
        self._s = s
        self.keys = keys
        self._evaluator = s.Evaluator(keys.context)
        self._encoder = s.BatchEncoder(keys.context)
        zero = s.Ciphertext()
        s.Encryptor(keys.context, keys.public_key).encrypt_zero(zero)
        self._prefix = _unpack(_bytes(zero))[0]  # parms_id and sizes of a fresh ciphertext

    def from_raw(self, raw: np.ndarray) -> Any:
        return _load(self._s.Ciphertext(), _pack(self._prefix, raw), self.keys.context)

    def fold(self, ciphertext: Any, period: int) -> Any:
        """Rotate and add so every slot ``j`` holds the sum over all blocks of slot ``j mod period``."""
        step = period
        while step < ROW:
            rotated = self._s.Ciphertext()
            self._evaluator.rotate_rows(ciphertext, step, self.keys.galois_keys, rotated)
            self._evaluator.add_inplace(ciphertext, rotated)
            step *= 2
        swapped = self._s.Ciphertext()
        self._evaluator.rotate_columns(ciphertext, self.keys.galois_keys, swapped)
        self._evaluator.add_inplace(ciphertext, swapped)
        return ciphertext

    def to_bytes(self, ciphertext: Any) -> bytes:
        return _bytes(ciphertext)


class Decryptor:
    """The key holder's decryption: exact signed slots, refused when the noise budget is spent."""

    def __init__(self, keys: Keys) -> None:
        s = require()
        self._s = s
        self._keys = keys
        self._decryptor = s.Decryptor(keys.context, keys.secret_key)
        self._encoder = s.BatchEncoder(keys.context)

    def decrypt(self, data: bytes) -> tuple[list[int], int]:
        """The slots of a serialized ciphertext and its remaining noise budget in bits (0: garbage)."""
        ciphertext = _load(self._s.Ciphertext(), data, self._keys.context)
        budget = int(self._decryptor.invariant_noise_budget(ciphertext))
        plain = self._s.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return [int(v) for v in self._encoder.decode_int64(plain)], budget
