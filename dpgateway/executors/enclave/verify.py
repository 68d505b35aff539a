"""The attestation verifier: a SEV-SNP report and its VCEK -> ASK -> ARK chain against a pinned root and a policy.

Checks, each refusing with a message that names it (tests: tests/executors/test_attestation.py):

1. the report is 0x4A0 bytes, version 2 or 3, signature algorithm 1 (ECDSA P-384 / SHA-384);
2. the chain's root is byte-for-byte one of the pinned anchors and signs itself, the ASK is signed by the
   ARK, the VCEK by the ASK (RSA-PSS or ECDSA, as the issuer's key says), and every certificate is valid now;
3. the report body is signed by the VCEK's P-384 key;
4. the VCEK's TCB extensions equal the report's ``reported_tcb`` and its hwID the report's ``chip_id`` (the
   VCEK is derived per chip and firmware version, so a report signed under another TCB is refused);
5. policy: VMPL 0, debugging disallowed (unless allowed), ``reported_tcb`` at least the minimum;
6. the measurement is in the allowlist;
7. ``report_data`` equals what the verifier expects (nonce, noise plan, statement, keys: protocol.py);
8. a chain ending at a *simulated* anchor is accepted only when ``allow_simulated`` (never in production).

Nonce freshness (unknown, reused or expired nonces) is the key broker's check (broker.py), since only it
issues nonces.
"""

from __future__ import annotations

import datetime
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from dpgateway.errors import AuthenticationError
from dpgateway.executors.enclave import report
from dpgateway.executors.enclave.report import Tcb
from dpgateway.executors.enclave.simulated import OID_HWID, TCB_OIDS


class AttestationRefused(AuthenticationError):
    """The enclave's evidence failed a check; no key was released and no data was read."""


@dataclass(frozen=True)
class Anchor:
    """A pinned root certificate; ``simulated`` marks the simulated platform's made-up root."""

    certificate: x509.Certificate
    simulated: bool = False


@dataclass(frozen=True)
class Policy:
    """What the data owner accepts: allowlisted measurements (hex), simulation, debugging, minimum TCB."""

    measurements: frozenset[str]
    allow_simulated: bool = False
    allow_debug: bool = False
    min_tcb: Tcb | None = None


@dataclass(frozen=True)
class Claims:
    """What a verified report establishes."""

    measurement: str
    tcb: Tcb
    chip_id: str
    report_id: str
    simulated: bool


def verify(
    raw: bytes,
    chain: Sequence[x509.Certificate],
    *,
    expected_report_data: bytes,
    anchors: Sequence[Anchor],
    policy: Policy,
    now: datetime.datetime | None = None,
) -> Claims:
    """Verify a report and its chain (VCEK, ASK, ARK); return its claims or raise :class:`AttestationRefused`."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        parsed = report.parse(raw)
    except ValueError as exc:
        raise AttestationRefused(f"attestation refused: {exc}") from None
    if parsed.version not in (2, 3) or parsed.signature_algo != report.ECDSA_P384_SHA384:
        raise AttestationRefused(
            f"attestation refused: report version {parsed.version} / signature algorithm {parsed.signature_algo} "
            "is not an SEV-SNP v2/v3 report signed with ECDSA P-384"
        )
    anchor = _check_chain(chain, anchors, now)
    _check_signature(parsed, chain[0])
    _check_vcek_binding(parsed, chain[0])
    tcb = Tcb.unpack(parsed.reported_tcb)
    if parsed.vmpl != 0:
        raise AttestationRefused(f"attestation refused: the report was requested at VMPL {parsed.vmpl}, not 0")
    if parsed.debug and not policy.allow_debug:
        raise AttestationRefused("attestation refused: the guest policy allows debugging (its memory is readable)")
    if policy.min_tcb is not None and not tcb.at_least(policy.min_tcb):
        raise AttestationRefused(f"attestation refused: TCB {tcb} is below the minimum {policy.min_tcb}")
    measurement = parsed.measurement.hex()
    if measurement not in policy.measurements:
        raise AttestationRefused(
            f"attestation refused: measurement {measurement[:16]}... is not in the allowlist "
            "(executors.enclave.measurements)"
        )
    if not hmac.compare_digest(parsed.report_data, expected_report_data):
        raise AttestationRefused(
            "attestation refused: the report data does not bind this nonce, noise plan, statement and keys"
        )
    if anchor.simulated and not policy.allow_simulated:
        raise AttestationRefused(
            "attestation refused: the evidence comes from the SIMULATED platform, which production refuses "
            "(executors.enclave.allow_simulated is false)"
        )
    return Claims(
        measurement=measurement,
        tcb=tcb,
        chip_id=parsed.chip_id.hex(),
        report_id=parsed.report_id.hex(),
        simulated=anchor.simulated,
    )


def _check_chain(chain: Sequence[x509.Certificate], anchors: Sequence[Anchor], now: datetime.datetime) -> Anchor:
    if len(chain) != 3:
        raise AttestationRefused("attestation refused: expected the chain VCEK, ASK, ARK")
    vcek, ask, ark = chain
    anchor = next((a for a in anchors if a.certificate == ark), None)
    if anchor is None:
        raise AttestationRefused("attestation refused: the chain's root is not a pinned root (ARK)")
    for cert, issuer, what in ((ark, ark, "ARK"), (ask, ark, "ASK"), (vcek, ask, "VCEK")):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise AttestationRefused(
                f"attestation refused: the {what} certificate is not signed by its issuer"
            ) from None
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationRefused(
                f"attestation refused: the {what} certificate is not valid now "
                f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
    return anchor


def _check_signature(parsed: report.Report, vcek: x509.Certificate) -> None:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationRefused("attestation refused: the VCEK is not a P-384 key")
    try:
        key.verify(encode_dss_signature(parsed.r, parsed.s), parsed.body, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationRefused("attestation refused: the report signature does not verify with the VCEK") from None


def _check_vcek_binding(parsed: report.Report, vcek: x509.Certificate) -> None:
    tcb = Tcb.unpack(parsed.reported_tcb)
    for field, oid in TCB_OIDS.items():
        if _der_int(_extension(vcek, oid)) != getattr(tcb, field):
            raise AttestationRefused(
                f"attestation refused: the VCEK was issued for another {field} version than the report's TCB"
            )
    hwid = _extension(vcek, OID_HWID)
    if len(hwid) != 66 or hwid[:2] != b"\x04\x40" or not hmac.compare_digest(hwid[2:], parsed.chip_id):
        raise AttestationRefused("attestation refused: the VCEK belongs to another chip than the report's")


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        raise AttestationRefused(f"attestation refused: the VCEK lacks extension {oid.dotted_string}") from None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationRefused(f"attestation refused: malformed VCEK extension {oid.dotted_string}")
    return value.value


def _der_int(der: bytes) -> int:
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2:
        raise AttestationRefused("attestation refused: malformed VCEK TCB extension")
    return int.from_bytes(der[2:], "big", signed=True)
