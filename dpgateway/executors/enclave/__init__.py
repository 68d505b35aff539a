"""``enclave``: the plain path inside an enclave, the data key released only against a verified attestation.

Modules: report.py (the SEV-SNP report format), simulated.py (the simulated platform: the only backend these
machines run), verify.py (the attestation verifier), broker.py (the data owner's key broker), protocol.py
(report data, key wrap, sealed files, signed results), enclave.py (the process inside the boundary),
executor.py (the gateway's side). Threat model: docs/executors.md.
"""
