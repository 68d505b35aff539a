"""The executor interface: a bounded plan and a fixed noise plan in, noisy integers and evidence out.

The accountant (passes/budget.py) calibrates every measurement before an executor is chosen; the
:class:`NoisePlan` is that calibration as a value, with a fingerprint. An executor computes the bounded
aggregates wherever it computes them (the gateway's backend, K parties, ...), adds exactly the planned
noise (discrete Laplace, or discrete Gaussian where the accountant chose it: ``MeasurementNoise.mechanism``)
and returns noisy integers in fixed-point units. Executors never choose noise.

Proof note (the gateway accepts only the planned release): :func:`accept` rejects a result whose noise-plan
fingerprint differs from the plan the ledger reserved for, whose measurement names differ, whose released
cells are not the plan's public cells (when the keys are public), or whose number of released values is not
cells x measurements, or a quantile index outside its public candidates. So an executor cannot release more
values, or values noised by another plan, than the debit paid for. Tests: tests/executors/test_base.py.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpgateway.errors import InternalError
from dpgateway.mechanisms import Mechanism, noise_half_width
from dpgateway.passes.groups import public_cells
from dpgateway.passes.quantiles import grid
from dpgateway.plan import DPPlan

Key = tuple[Any, ...]


@dataclass(frozen=True)
class MeasurementNoise:
    """The noise of one measurement: discrete Laplace of ``scale`` on an integer of L1 ``sensitivity``.

    With ``mechanism`` 'gaussian' it is OpenDP's discrete Gaussian of ``scale`` instead (zCDP), costing
    ``rho`` for an L2 ``sensitivity`` (``epsilon`` is then 0: the plan's Gaussians cost one (epsilon, delta)).

    A ``quantile`` measurement is instead OpenDP's quantile mechanism (dpgateway/quantile_mechanism.py):
    ``scale`` is its noisy max's, ``sensitivity`` the score's L-infinity sensitivity, and the released
    integer is the index of one of ``candidates`` grid values (``alpha`` the quantile's fraction).
    """

    name: str
    kind: str
    sensitivity: int
    scale: float
    epsilon: float
    threshold: int | None = None  # partition selection: released only where the noisy count reaches it
    alpha: float | None = None  # quantile only
    candidates: int | None = None  # quantile only: the grid's size (released indexes are below it)
    mechanism: Mechanism = "laplace"
    rho: float = 0.0  # gaussian only


@dataclass(frozen=True)
class NoisePlan:
    """Everything about the noise, fixed before dispatch; :meth:`fingerprint` identifies it.

    ``cells`` are the public groups released whole (``None`` when the keys are private and partition
    selection picks them); ``sql_sha256`` binds the plan to the bounded statement it noises.
    """

    measurements: tuple[MeasurementNoise, ...]
    cells: tuple[Key, ...] | None
    n_keys: int
    delta: float
    sql_sha256: str

    @classmethod
    def from_plan(cls, plan: DPPlan) -> NoisePlan:
        n_keys = len(plan.group_keys)
        cells = public_cells(plan.group_keys) if n_keys else [()]
        return cls(
            measurements=tuple(
                MeasurementNoise(
                    m.name,
                    m.kind,
                    m.sensitivity,
                    m.noise_scale,
                    m.epsilon,
                    m.threshold,
                    m.alpha,
                    grid(m, plan.table).size if m.kind == "quantile" and plan.table is not None else None,
                    m.mechanism,
                    m.rho,
                )
                for m in plan.measurements
            ),
            cells=None if cells is None else tuple(tuple(c) for c in cells),
            n_keys=n_keys,
            delta=plan.delta,
            sql_sha256=hashlib.sha256(plan.shown_sql.encode()).hexdigest(),
        )

    def to_json(self) -> dict[str, Any]:
        """The canonical, JSON-serializable form (floats as exact hex; key values type-tagged)."""
        return {
            "measurements": [
                [m.name, m.kind, m.sensitivity, float(m.scale).hex(), float(m.epsilon).hex(), m.threshold]
                + ([] if m.alpha is None else [float(m.alpha).hex(), m.candidates])  # quantiles only
                + ([] if m.mechanism == "laplace" else [{"mechanism": m.mechanism, "rho": float(m.rho).hex()}])
                for m in self.measurements
            ],
            "cells": None if self.cells is None else [[encode_value(v) for v in cell] for cell in self.cells],
            "n_keys": self.n_keys,
            "delta": float(self.delta).hex(),
            "sql_sha256": self.sql_sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NoisePlan:
        cells = data["cells"]
        return cls(
            measurements=tuple(_measurement_from_json(entry) for entry in data["measurements"]),
            cells=None if cells is None else tuple(tuple(decode_value(v) for v in cell) for cell in cells),
            n_keys=int(data["n_keys"]),
            delta=float.fromhex(data["delta"]),
            sql_sha256=str(data["sql_sha256"]),
        )

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form; computed once per plan (every field is immutable), since the
        executor and :func:`accept` both ask for it (about 0.1-0.4 ms for 50 public cells)."""
        known: str | None = self.__dict__.get("_fingerprint")
        if known is None:
            text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
            known = self.__dict__["_fingerprint"] = hashlib.sha256(text.encode()).hexdigest()
        return known


def _measurement_from_json(entry: list[Any]) -> MeasurementNoise:
    name, kind, sensitivity, scale, epsilon, threshold, *rest = entry
    noise: dict[str, Any] = rest.pop() if rest and isinstance(rest[-1], dict) else {}
    alpha, candidates = rest if rest else (None, None)
    mechanism = str(noise.get("mechanism", "laplace"))
    if mechanism not in ("laplace", "gaussian"):
        raise InternalError(f"unknown noise mechanism {mechanism!r} in a noise plan")
    return MeasurementNoise(
        name,
        kind,
        int(sensitivity),
        float.fromhex(scale),
        float.fromhex(epsilon),
        threshold,
        None if alpha is None else float.fromhex(alpha),
        None if candidates is None else int(candidates),
        "gaussian" if mechanism == "gaussian" else "laplace",
        float.fromhex(noise["rho"]) if "rho" in noise else 0.0,
    )


def encode_value(value: Any) -> list[Any]:
    """A group-key value as a JSON pair ``[type, value]`` (dates as ISO text)."""
    if isinstance(value, datetime.date):
        return ["date", value.isoformat()]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    raise InternalError(f"a group key of type {type(value).__name__} cannot be sent to an executor")


def decode_value(pair: list[Any]) -> Any:
    kind, value = pair
    return datetime.date.fromisoformat(value) if kind == "date" else value


@dataclass(frozen=True)
class Evidence:
    """Where the noise was added and who saw exact values (shown in the audit log and to tests)."""

    executor: str
    noise_added_at: str
    exact_values_seen_by: str
    simulated: bool = False
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NoisyResult:
    """Noisy integers (fixed-point units) per released cell and measurement; never an exact value."""

    cells: tuple[Key, ...]
    values: Mapping[str, tuple[int, ...]]
    noise_fingerprint: str
    released_values: int
    evidence: Evidence


class Executor(ABC):
    """Computes a bounded plan's aggregates somewhere and releases them noised by the given plan."""

    name: str = ""
    simulated: bool = False
    KINDS: frozenset[str] = frozenset({"count", "sum"})
    """Measurement kinds this executor computes: integer sums noised with discrete Laplace, unless it says more."""

    def unsupported(self, plan: DPPlan) -> str | None:
        """Why this executor cannot run ``plan`` (a message naming the fix), or None."""
        other = sorted({m.label for m in plan.measurements if m.kind not in self.KINDS})
        if other:
            return (
                f"the {self.name} executor computes integer sums and counts only, not {', '.join(other)} "
                "(quantiles, MIN/MAX and COUNT(DISTINCT) run on the plain executor); choose `--executor plain` "
                "where the table's policy allows it (tables.<name>.executors_allowed)"
            )
        return None

    def admit(self, plan: DPPlan, noise: NoisePlan) -> Executor:
        """Checks that read no data, run before the ledger reservation (the enclave's attestation and key
        release); returns the executor that runs this one query. A refusal here costs nothing."""
        return self

    @abstractmethod
    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        """Run ``plan`` and return its values noised exactly as ``noise`` says."""

    def half_width(self, scale: float, confidence: float = 0.95, mechanism: Mechanism = "laplace") -> int:
        """The released noise's half-width at ``confidence`` for a measurement planned with ``scale``."""
        return noise_half_width(scale, confidence, mechanism)

    def describe(self) -> str:
        """One line for ``explain`` and the audit log."""
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes and connections."""


def accept(noise: NoisePlan, result: NoisyResult) -> None:
    """Reject (InternalError, charged by the caller) a result that is not the planned release."""
    names = [m.name for m in noise.measurements]
    if result.noise_fingerprint != noise.fingerprint():
        raise InternalError(f"executor {result.evidence.executor} returned values for another noise plan")
    if sorted(result.values) != sorted(names):
        raise InternalError(f"executor {result.evidence.executor} returned other measurements than planned")
    n = len(result.cells)
    if noise.cells is not None and tuple(result.cells) != noise.cells:
        raise InternalError(f"executor {result.evidence.executor} released other groups than the public ones")
    expected = n * len(names)
    if result.released_values != expected or any(len(v) != n for v in result.values.values()):
        raise InternalError(
            f"executor {result.evidence.executor} released {result.released_values} values; the plan allows {expected}"
        )
    if any(type(v) is not int for column in result.values.values() for v in column):
        raise InternalError(f"executor {result.evidence.executor} released a value that is not an integer")
    for m in noise.measurements:  # a quantile releases the index of one of its public candidates
        if m.candidates is not None and any(not 0 <= v < m.candidates for v in result.values[m.name]):
            raise InternalError(f"executor {result.evidence.executor} released a quantile outside its candidates")


def stop_processes(processes: Iterable[subprocess.Popen[Any]]) -> None:
    """Stop helper processes (parties, key holder, enclave): terminate all, wait up to 5 s each (then kill),
    and close their pipes."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
