"""The simulated platform: a made-up AMD key hierarchy (ARK -> ASK -> VCEK) and a "secure processor" that signs
SEV-SNP-format reports. It runs on any machine and protects nothing.

Honesty rule: its root certificate says SIMULATED in its subject, the verifier accepts it only as a
*simulated* trust anchor (``allow_simulated``), and every answer, ``explain`` and audit record of the
enclave executor says simulated. On real hardware the AMD secure processor holds the VCEK and measures the
guest at launch; here the enclave process holds the VCEK private key itself and the measurement is a
digest of the installed code (see :func:`code_measurement`), so the host can read the data, the keys and
forge any report. What it is for: exercising the real protocol and the real verifier end to end.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from dpgateway.executors.enclave import report
from dpgateway.executors.enclave.report import Tcb

SIMULATED_MARK = "dpgateway SIMULATED"
# AMD's VCEK extensions (VCEK certificate and KDS interface specification 57230)
OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
TCB_OIDS = {"bootloader": OID_BL_SPL, "tee": OID_TEE_SPL, "snp": OID_SNP_SPL, "microcode": OID_UCODE_SPL}
DEFAULT_TCB = Tcb(bootloader=3, tee=0, snp=14, microcode=209)
DEPENDENCIES = ("duckdb", "opendp", "cryptography", "sqlglot")


@functools.lru_cache(maxsize=1)
def code_measurement() -> bytes:
    """SHA-384 over every module of the installed ``dpgateway`` package and the versions of what it runs on.

    The stand-in for a launch measurement: on a confidential VM, the digest covers the firmware, kernel,
    initrd and command line, and so the image holding this code (docs/executors.md).
    """
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha384(b"dpgateway-enclave-measurement-v1\0")
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    for package in DEPENDENCIES:
        digest.update(f"{package}=={importlib.metadata.version(package)}\0".encode())
    return digest.digest()


def der_integer(value: int) -> bytes:
    """A small non-negative integer as a DER INTEGER (how AMD encodes the SPL extensions)."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def der_octets(value: bytes) -> bytes:
    """A short byte string (under 128 bytes) as a DER OCTET STRING."""
    return bytes([0x04, len(value)]) + value


@dataclass(frozen=True)
class Hierarchy:
    """A key hierarchy: the root (ARK), the intermediate (ASK) and one chip's endorsement key (VCEK)."""

    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: Tcb

    def chain_pem(self) -> list[str]:
        """VCEK, ASK, ARK as PEM text (leaf first)."""
        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in (self.vcek, self.ask, self.ark)]


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIMULATED_MARK),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA384())


def hierarchy(
    *,
    product: str = "Milan",
    tcb: Tcb = DEFAULT_TCB,
    chip_id: bytes | None = None,
    now: datetime.datetime | None = None,
    vcek_days: int = 7 * 365,
    vcek_not_before: datetime.datetime | None = None,
) -> Hierarchy:
    """A fresh simulated hierarchy (ECDSA P-384 throughout; AMD's real ARK and ASK are RSA-4096 PSS keys,
    which the verifier also checks)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    long_ago, far = now - datetime.timedelta(days=1), now + datetime.timedelta(days=25 * 365)
    chip_id = chip_id or secrets.token_bytes(64)
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    ark_name, ask_name = _name(f"ARK-{product} ({SIMULATED_MARK})"), _name(f"SEV-{product} ({SIMULATED_MARK})")
    ark = _certificate(ark_name, ark_name, keys[0].public_key(), keys[0], ca=True, not_before=long_ago, not_after=far)
    ask = _certificate(ask_name, ark_name, keys[1].public_key(), keys[0], ca=True, not_before=long_ago, not_after=far)
    start = vcek_not_before or long_ago
    spl = tuple(x509.UnrecognizedExtension(oid, der_integer(getattr(tcb, field))) for field, oid in TCB_OIDS.items())
    vcek = _certificate(
        _name(f"SEV-VCEK ({SIMULATED_MARK})"),
        ask_name,
        keys[2].public_key(),
        keys[1],
        ca=False,
        not_before=start,
        not_after=start + datetime.timedelta(days=vcek_days),
        extensions=(*spl, x509.UnrecognizedExtension(OID_HWID, der_octets(chip_id))),
    )
    return Hierarchy(ark=ark, ask=ask, vcek=vcek, vcek_key=keys[2], chip_id=chip_id, tcb=tcb)


def sign_report(
    vcek_key: ec.EllipticCurvePrivateKey,
    *,
    report_data: bytes,
    measurement: bytes,
    chip_id: bytes,
    tcb: Tcb,
    policy: int = report.POLICY_RESERVED_ONE,
    vmpl: int = 0,
    version: int = 2,
) -> bytes:
    """A signed report, as the secure processor returns it to a guest asking with ``report_data``."""
    unsigned = report.body(
        version=version,
        policy=policy,
        vmpl=vmpl,
        signature_algo=report.ECDSA_P384_SHA384,
        current_tcb=tcb.pack(),
        report_data=report_data,
        measurement=measurement,
        report_id=secrets.token_bytes(32),
        reported_tcb=tcb.pack(),
        chip_id=chip_id,
        committed_tcb=tcb.pack(),
        launch_tcb=tcb.pack(),
    )
    r, s = decode_dss_signature(vcek_key.sign(unsigned, ec.ECDSA(hashes.SHA384())))
    return report.signed(unsigned, r, s)
