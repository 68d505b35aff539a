"""The attestation report: the AMD SEV-SNP ``ATTESTATION_REPORT`` layout (SEV-SNP ABI spec 56860, table 22).

A report is 0x4A0 bytes, little-endian. The platform signs bytes 0x000-0x29F with the VCEK (ECDSA P-384,
SHA-384); the signature at 0x2A0 holds R and S as 72-byte little-endian integers. The fields a verifier
checks (verify.py): ``version`` (2 or 3), ``signature_algo`` (1: ECDSA P-384 with SHA-384), ``policy`` (bit
19: debugging allowed), ``vmpl``, ``report_data`` (64 bytes chosen by the guest: here a hash binding the
verifier's nonce, the noise-plan fingerprint and the enclave's ephemeral keys), ``measurement`` (48 bytes:
the launch digest of the code), ``reported_tcb`` (the firmware versions the VCEK was derived for) and
``chip_id`` (64 bytes, matched against the VCEK certificate's hwID extension). Fields this gateway does not
use (family/image ids, host data, id/author key digests, report ids, committed/launch TCB, build numbers)
are parsed and carried, never trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SIZE = 0x4A0
SIGNED = 0x2A0  # bytes 0x000..0x29F are signed
COMPONENT = 72  # R and S: 72-byte little-endian integers
ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19
POLICY_RESERVED_ONE = 1 << 17  # must be set in a valid guest policy

# offset, struct format: the fields at fixed positions (everything else is reserved and must be zero)
_LAYOUT = {
    "version": (0x00, "<I"),
    "guest_svn": (0x04, "<I"),
    "policy": (0x08, "<Q"),
    "family_id": (0x10, "16s"),
    "image_id": (0x20, "16s"),
    "vmpl": (0x30, "<I"),
    "signature_algo": (0x34, "<I"),
    "current_tcb": (0x38, "<Q"),
    "platform_info": (0x40, "<Q"),
    "report_data": (0x50, "64s"),
    "measurement": (0x90, "48s"),
    "host_data": (0xC0, "32s"),
    "id_key_digest": (0xE0, "48s"),
    "author_key_digest": (0x110, "48s"),
    "report_id": (0x140, "32s"),
    "report_id_ma": (0x160, "32s"),
    "reported_tcb": (0x180, "<Q"),
    "chip_id": (0x1A0, "64s"),
    "committed_tcb": (0x1E0, "<Q"),
    "launch_tcb": (0x1F0, "<Q"),
}


@dataclass(frozen=True)
class Tcb:
    """A TCB_VERSION (Milan/Genoa layout): security patch levels of the boot loader, TEE, SNP firmware, microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def unpack(cls, value: int) -> Tcb:
        raw = value.to_bytes(8, "little")
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def pack(self) -> int:
        return int.from_bytes(bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]), "little")

    def at_least(self, other: Tcb) -> bool:
        return all(getattr(self, f) >= getattr(other, f) for f in ("bootloader", "tee", "snp", "microcode"))


@dataclass(frozen=True)
class Report:
    """A parsed report; ``body`` is the signed part, ``r``/``s`` the signature."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    body: bytes
    r: int
    s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse(raw: bytes) -> Report:
    """Parse a report (ValueError if it is not 0x4A0 bytes)."""
    if len(raw) != SIZE:
        raise ValueError(f"a report is {SIZE} bytes, not {len(raw)}")
    fields = {name: struct.unpack_from(fmt, raw, offset)[0] for name, (offset, fmt) in _LAYOUT.items()}
    r = int.from_bytes(raw[SIGNED : SIGNED + COMPONENT], "little")
    s = int.from_bytes(raw[SIGNED + COMPONENT : SIGNED + 2 * COMPONENT], "little")
    return Report(**fields, body=raw[:SIGNED], r=r, s=s)


def body(**fields: int | bytes) -> bytes:
    """The signed part of a report with ``fields`` set (the rest zero): what a platform signs."""
    unknown = set(fields) - set(_LAYOUT)
    if unknown:
        raise ValueError(f"unknown report fields: {sorted(unknown)}")
    raw = bytearray(SIGNED)
    for name, value in fields.items():
        offset, fmt = _LAYOUT[name]
        struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


def signed(unsigned: bytes, r: int, s: int) -> bytes:
    """``unsigned`` (the 0x2A0-byte body) with its signature appended and padded to 0x4A0 bytes."""
    sig = r.to_bytes(COMPONENT, "little") + s.to_bytes(COMPONENT, "little")
    return unsigned + sig + bytes(SIZE - SIGNED - len(sig))
