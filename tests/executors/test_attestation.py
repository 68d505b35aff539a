"""The attestation verifier and key broker against generated SEV-SNP-format reports, genuine and tampered."""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from dpgateway.executors.enclave import protocol, report, simulated
from dpgateway.executors.enclave.broker import Evidence, KeyBroker
from dpgateway.executors.enclave.report import Tcb
from dpgateway.executors.enclave.verify import Anchor, AttestationRefused, Policy, verify

MEASUREMENT = bytes(range(48))
FINGERPRINT = "ab" * 32
SQL_SHA = "cd" * 32
NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def platform() -> simulated.Hierarchy:
    return simulated.hierarchy()


@pytest.fixture(scope="module")
def keys() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]:
    return ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())


def _bound(nonce: bytes, keys: Any) -> bytes:
    kex, sig = keys
    return protocol.report_data(
        nonce, FINGERPRINT, SQL_SHA, protocol.public_der(kex.public_key()), protocol.public_der(sig.public_key())
    )


def _quote(platform: simulated.Hierarchy, data: bytes, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "report_data": data,
        "measurement": MEASUREMENT,
        "chip_id": platform.chip_id,
        "tcb": platform.tcb,
    }
    return simulated.sign_report(platform.vcek_key, **{**fields, **overrides})


def _policy(**changes: Any) -> Policy:
    return dataclasses.replace(Policy(measurements=frozenset({MEASUREMENT.hex()}), allow_simulated=True), **changes)


def _verify(raw: bytes, platform: simulated.Hierarchy, data: bytes, **kwargs: Any) -> Any:
    chain = kwargs.pop("chain", [platform.vcek, platform.ask, platform.ark])
    anchors = kwargs.pop("anchors", [Anchor(platform.ark, simulated=True)])
    return verify(
        raw, chain, expected_report_data=data, anchors=anchors, policy=kwargs.pop("policy", _policy()), **kwargs
    )


def test_a_genuine_report_verifies(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    claims = _verify(_quote(platform, data), platform, data)
    assert claims.measurement == MEASUREMENT.hex() and claims.simulated and claims.tcb == platform.tcb
    assert claims.chip_id == platform.chip_id.hex()


def test_the_layout_is_sev_snp(platform: simulated.Hierarchy) -> None:
    raw = _quote(platform, b"\x07" * 64)
    assert len(raw) == 0x4A0
    assert int.from_bytes(raw[0:4], "little") == 2 and int.from_bytes(raw[0x34:0x38], "little") == 1
    assert raw[0x50:0x90] == b"\x07" * 64 and raw[0x90:0xC0] == MEASUREMENT and raw[0x1A0:0x1E0] == platform.chip_id


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (0x2A0 + 5, "signature does not verify"),  # R
        (0x2A0 + 72 + 9, "signature does not verify"),  # S
        (0x90, "signature does not verify"),  # a measurement byte changed after signing
        (0x50, "signature does not verify"),  # a report-data byte changed after signing
    ],
)
def test_tampering_is_refused(platform: simulated.Hierarchy, keys: Any, at: int, why: str) -> None:
    data = _bound(b"n" * 32, keys)
    with pytest.raises(AttestationRefused, match=why):
        _verify(_flip(_quote(platform, data), at), platform, data)


def test_a_truncated_report_is_refused(platform: simulated.Hierarchy) -> None:
    with pytest.raises(AttestationRefused, match="a report is 1184 bytes"):
        _verify(_quote(platform, b"\0" * 64)[:-1], platform, b"\0" * 64)


def test_a_measurement_outside_the_allowlist_is_refused(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    with pytest.raises(AttestationRefused, match="not in the allowlist"):
        _verify(_quote(platform, data, measurement=b"\x01" * 48), platform, data)


@pytest.mark.parametrize("what", ["nonce", "fingerprint", "statement", "keys"])
def test_report_data_must_bind_nonce_plan_statement_and_keys(
    platform: simulated.Hierarchy, keys: Any, what: str
) -> None:
    kex, sig = (protocol.public_der(k.public_key()) for k in keys)
    parts: dict[str, Any] = {"nonce": b"n" * 32, "fingerprint": FINGERPRINT, "sql_sha256": SQL_SHA}
    expected = protocol.report_data(parts["nonce"], parts["fingerprint"], parts["sql_sha256"], kex, sig)
    other = {
        "nonce": {**parts, "nonce": b"m" * 32},
        "fingerprint": {**parts, "fingerprint": "ef" * 32},
        "statement": {**parts, "sql_sha256": "01" * 32},
        "keys": parts,
    }[what]
    swapped = (sig, kex) if what == "keys" else (kex, sig)
    signed = protocol.report_data(other["nonce"], other["fingerprint"], other["sql_sha256"], *swapped)
    with pytest.raises(AttestationRefused, match="report data does not bind"):
        _verify(_quote(platform, signed), platform, expected)


def test_expired_and_not_yet_valid_certificates_are_refused(keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    expired = simulated.hierarchy(vcek_not_before=NOW - datetime.timedelta(days=30), vcek_days=10)
    with pytest.raises(AttestationRefused, match="VCEK certificate is not valid now"):
        _verify(_quote(expired, data), expired, data)
    future = simulated.hierarchy(vcek_not_before=NOW + datetime.timedelta(days=2))
    with pytest.raises(AttestationRefused, match="VCEK certificate is not valid now"):
        _verify(_quote(future, data), future, data)
    platform = simulated.hierarchy()
    with pytest.raises(AttestationRefused, match="ARK certificate is not valid now"):  # verified 30 years later
        _verify(_quote(platform, data), platform, data, now=NOW + datetime.timedelta(days=30 * 365))


def test_an_unpinned_root_or_a_broken_chain_is_refused(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    other = simulated.hierarchy()
    with pytest.raises(AttestationRefused, match="not a pinned root"):
        _verify(_quote(other, data), platform, data, chain=[other.vcek, other.ask, other.ark])
    with pytest.raises(AttestationRefused, match="ASK certificate is not signed by its issuer"):
        _verify(_quote(other, data), platform, data, chain=[other.vcek, other.ask, platform.ark])
    with pytest.raises(AttestationRefused, match="VCEK certificate is not signed by its issuer"):
        _verify(_quote(other, data), platform, data, chain=[other.vcek, platform.ask, platform.ark])
    with pytest.raises(AttestationRefused, match="expected the chain"):
        _verify(_quote(platform, data), platform, data, chain=[platform.vcek, platform.ark])


def test_the_vcek_must_match_the_reports_tcb_and_chip(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    older = dataclasses.replace(platform.tcb, snp=platform.tcb.snp - 1)
    with pytest.raises(AttestationRefused, match="issued for another snp version"):
        _verify(_quote(platform, data, tcb=older), platform, data)
    with pytest.raises(AttestationRefused, match="belongs to another chip"):
        _verify(_quote(platform, data, chip_id=secrets.token_bytes(64)), platform, data)


def test_guest_policy_is_enforced(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    debug = _quote(platform, data, policy=report.POLICY_RESERVED_ONE | report.POLICY_DEBUG)
    with pytest.raises(AttestationRefused, match="allows debugging"):
        _verify(debug, platform, data)
    assert _verify(debug, platform, data, policy=_policy(allow_debug=True)).simulated
    with pytest.raises(AttestationRefused, match="VMPL 1"):
        _verify(_quote(platform, data, vmpl=1), platform, data)
    newer = dataclasses.replace(platform.tcb, microcode=platform.tcb.microcode + 1)
    with pytest.raises(AttestationRefused, match="below the minimum"):
        _verify(_quote(platform, data), platform, data, policy=_policy(min_tcb=newer))
    with pytest.raises(AttestationRefused, match="not an SEV-SNP v2/v3 report"):
        _verify(_quote(platform, data, version=1), platform, data)


def test_production_refuses_simulated_evidence_only(platform: simulated.Hierarchy, keys: Any) -> None:
    data = _bound(b"n" * 32, keys)
    production = _policy(allow_simulated=False)
    with pytest.raises(AttestationRefused, match="SIMULATED platform, which production refuses"):
        _verify(_quote(platform, data), platform, data, policy=production)
    # the same checks pass for a root pinned as real (as AMD's ARK would be)
    assert not _verify(
        _quote(platform, data), platform, data, policy=production, anchors=[Anchor(platform.ark)]
    ).simulated


def _rsa_pss_ca(name: str, key: rsa.RSAPrivateKey, issuer: str, signer: rsa.RSAPrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 48))
    )


def test_an_amd_style_chain_with_rsa_pss_roots_verifies(keys: Any) -> None:
    """AMD's ARK and ASK are RSA-4096 keys signing with RSASSA-PSS (SHA-384, salt 48); smaller keys here."""
    ark_key, ask_key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    ark = _rsa_pss_ca("ARK-Test", ark_key, "ARK-Test", ark_key)
    ask = _rsa_pss_ca("SEV-Test", ask_key, "ARK-Test", ark_key)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    chip, tcb = secrets.token_bytes(64), Tcb(bootloader=4, tee=0, snp=22, microcode=213)
    spl = [
        x509.UnrecognizedExtension(oid, simulated.der_integer(getattr(tcb, f))) for f, oid in simulated.TCB_OIDS.items()
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "SEV-VCEK")]))
        .issuer_name(ask.subject)
        .public_key(vcek_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.UnrecognizedExtension(simulated.OID_HWID, simulated.der_octets(chip)), critical=False)
    )
    for extension in spl:
        builder = builder.add_extension(extension, critical=False)
    vcek = builder.sign(ask_key, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 48))
    data = _bound(b"n" * 32, keys)
    raw = simulated.sign_report(vcek_key, report_data=data, measurement=MEASUREMENT, chip_id=chip, tcb=tcb)
    claims = verify(
        raw,
        [vcek, ask, ark],
        expected_report_data=data,
        anchors=[Anchor(ark)],
        policy=_policy(allow_simulated=False),
    )
    assert claims.tcb == tcb and not claims.simulated


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _broker(platform: simulated.Hierarchy, clock: Clock, **policy: Any) -> KeyBroker:
    return KeyBroker(
        keys={"t": b"k" * 32},
        anchors=[Anchor(platform.ark, simulated=True)],
        policy=_policy(**policy),
        nonce_ttl_s=30,
        clock=clock,
    )


def _evidence(platform: simulated.Hierarchy, keys: Any, nonce: bytes, **overrides: Any) -> Evidence:
    kex, sig = (protocol.public_der(k.public_key()) for k in keys)
    raw = _quote(platform, protocol.report_data(nonce, FINGERPRINT, SQL_SHA, kex, sig), **overrides)
    return Evidence(report=raw, chain=tuple(platform.chain_pem()), kex_public=kex, sig_public=sig)


def test_the_broker_releases_the_key_only_to_the_attested_enclave(platform: simulated.Hierarchy, keys: Any) -> None:
    broker = _broker(platform, Clock())
    nonce = broker.nonce()
    grant = broker.release(
        "t", _evidence(platform, keys, nonce), nonce=nonce, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA
    )
    bound = _bound(nonce, keys)
    assert protocol.unwrap(dict(grant.wrapped), keys[0], bound) == b"k" * 32
    assert b"k" * 32 not in repr(grant.wrapped).encode()  # what the gateway forwards holds no key in the clear
    with pytest.raises(protocol.ProtocolError, match="not wrapped for this enclave"):
        protocol.unwrap(dict(grant.wrapped), ec.generate_private_key(ec.SECP384R1()), bound)
    assert broker.log[-1] == ("t", FINGERPRINT, "released (simulated)")


def test_the_broker_refuses_replayed_unknown_and_stale_nonces(platform: simulated.Hierarchy, keys: Any) -> None:
    clock = Clock()
    broker = _broker(platform, clock)
    nonce = broker.nonce()
    evidence = _evidence(platform, keys, nonce)
    broker.release("t", evidence, nonce=nonce, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA)
    with pytest.raises(AttestationRefused, match="already used"):  # a recorded report replayed
        broker.release("t", evidence, nonce=nonce, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA)
    made_up = secrets.token_bytes(32)
    with pytest.raises(AttestationRefused, match="not issued by this key broker"):
        broker.release(
            "t", _evidence(platform, keys, made_up), nonce=made_up, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA
        )
    stale = broker.nonce()
    clock.now += 31
    with pytest.raises(AttestationRefused, match="nonce expired"):
        broker.release("t", _evidence(platform, keys, stale), nonce=stale, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA)
    failed = broker.nonce()  # a failed attempt consumes its nonce too
    with pytest.raises(AttestationRefused, match="not in the allowlist"):
        broker.release(
            "t",
            _evidence(platform, keys, failed, measurement=b"\x02" * 48),
            nonce=failed,
            fingerprint=FINGERPRINT,
            sql_sha256=SQL_SHA,
        )
    with pytest.raises(AttestationRefused, match="already used"):
        broker.release(
            "t", _evidence(platform, keys, failed), nonce=failed, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA
        )
    other = broker.nonce()
    with pytest.raises(AttestationRefused, match="no key for table u"):
        broker.release("u", _evidence(platform, keys, other), nonce=other, fingerprint=FINGERPRINT, sql_sha256=SQL_SHA)


def test_sealed_files_open_only_with_their_key_and_unchanged() -> None:
    key = secrets.token_bytes(32)
    sealed = protocol.seal(b"rows" * 100, key)
    assert protocol.open_sealed(sealed, key) == b"rows" * 100 and b"rows" not in sealed
    with pytest.raises(protocol.ProtocolError, match="sealed under another key"):
        protocol.open_sealed(sealed, secrets.token_bytes(32))
    with pytest.raises(protocol.ProtocolError, match="changed after sealing"):
        protocol.open_sealed(_flip(sealed, 40), key)
    with pytest.raises(protocol.ProtocolError, match="not a sealed file"):
        protocol.open_sealed(b"PAR1" + sealed[4:], key)
