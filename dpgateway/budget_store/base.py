"""The ledger interface: two-phase spending of privacy budget, replay cache and audit log.

The gateway calls, per query::

    rid = store.reserve(Spend(...))     # atomic cap check; raises BudgetError / QueryCapError
    ... execute on the backend, add noise ...
    store.commit(rid, epsilon=..., delta=..., answer=...)   # debit before release
    # or, if anything failed once the backend was called (the failure may depend on the data):
    store.commit(rid, epsilon=..., delta=..., outcome="error", message="... SQLSTATE ...")   # charged

:meth:`BudgetStore.release` drops a reservation without charging it. It is only safe when nothing
data-dependent happened since the reservation; the gateway never calls it, since nothing that can fail
runs between its reservation and the backend call.

A reservation counts against every cap while pending, so concurrent queries can never overspend.
Scopes are named ``analyst:<name>`` and ``domain:<name>`` (see :func:`scope_name`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dpgateway.policies.model import Budget, Cap
from dpgateway.policies.model import ReplayScope as ReplayScope  # re-exported for the ledger API

Clock = Callable[[], float]
Outcome = Literal["released", "replayed", "refused", "error"]
CommitOutcome = Literal["released", "error"]
"""A debit releases its answer, or (``error``) the query failed after the backend ran: charged, nothing released."""
AuditOutcome = Literal["released", "replayed", "refused", "error", "abandoned", "admin"]
"""``error``: a failed query, charged when it failed after the backend ran (its message says which);
``abandoned``: a reservation never committed within its lease (charged); ``admin``: a cap change or reset."""
ScopeKind = Literal["analyst", "domain"]
SCOPE_KINDS: tuple[ScopeKind, ...] = ("analyst", "domain")


def scope_name(kind: ScopeKind, name: str) -> str:
    """The ledger name of a scope, e.g. ``analyst:alice`` or ``domain:pid``."""
    return f"{kind}:{name}"


def split_scope(scope: str) -> tuple[ScopeKind, str]:
    """Inverse of :func:`scope_name`."""
    kind, _, name = scope.partition(":")
    if kind == "analyst":
        return "analyst", name
    return "domain", name


@dataclass(frozen=True)
class Spend:
    """What one query asks to spend, and what the audit log records about it."""

    analyst: str
    domains: tuple[str, ...]
    epsilon: float
    delta: float
    query_key: str  # hash of (normalized SQL, parameters): the replay-cache key
    sql: str
    rewritten_sha256: str = ""


@dataclass(frozen=True)
class Usage:
    """Spent and remaining budget of one scope (an analyst or a subject domain) in the window."""

    scope: str
    cap: Cap
    spent_epsilon: float
    spent_delta: float
    next_expiry: float | None = None  # unix time when the oldest charge in the window leaves it

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self.cap.epsilon - self.spent_epsilon)

    @property
    def remaining_delta(self) -> float:
        return max(0.0, self.cap.delta - self.spent_delta)

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.remaining_epsilon, "delta": self.remaining_delta}


@dataclass(frozen=True)
class Charge:
    """One entry of the spending history: a debit, a pending or an abandoned reservation."""

    id: str
    at: float  # ledger (database) time the charge started counting (commit time, else reservation time)
    analyst: str
    scopes: tuple[str, ...]
    epsilon: float
    delta: float
    state: Literal["reserved", "committed", "abandoned"]


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit log."""

    at: float
    analyst: str
    sql: str
    rewritten_sha256: str
    epsilon: float
    delta: float
    outcome: AuditOutcome
    message: str = ""


@dataclass(frozen=True)
class Remaining:
    """Remaining budget for an analyst and each subject domain a query touches."""

    analyst: Usage
    domains: Mapping[str, Usage] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "analyst": self.analyst.as_dict(),
            "domains": {name: usage.as_dict() for name, usage in self.domains.items()},
        }


class BudgetStore(ABC):
    """A persistent ledger. Implementations: SQLite (default) and PostgreSQL."""

    def __init__(self, budget: Budget, *, clock: Clock = time.time) -> None:
        self.budget = budget
        self.clock = clock

    @abstractmethod
    def reserve(self, spend: Spend) -> str:
        """Atomically check every cap and hold ``spend``; return a reservation id.

        A refusal (BudgetError, QueryCapError) is written to the audit log here: do not
        also call :meth:`audit_event` for it.
        """

    @abstractmethod
    def commit(
        self,
        reservation_id: str,
        *,
        epsilon: float,
        delta: float,
        answer: Any = None,
        outcome: CommitOutcome = "released",
        message: str = "",
    ) -> None:
        """Debit what the mechanisms consumed (at most what was reserved); store the answer for replay.

        ``outcome="error"``: the query failed after the backend ran; the debit stands, no answer is stored, and
        the audit record (outcome ``error``) says it was charged, followed by ``message`` (a SQLSTATE, never
        backend text).
        """

    def commit_and_remaining(
        self,
        reservation_id: str,
        *,
        epsilon: float,
        delta: float,
        answer: Any = None,
        analyst: str,
        domains: Sequence[str],
        message: str = "",
    ) -> Remaining:
        """:meth:`commit`, then :meth:`remaining`; stores may do both in one transaction (one round trip)."""
        self.commit(reservation_id, epsilon=epsilon, delta=delta, answer=answer, message=message)
        return self.remaining(analyst, domains)

    @abstractmethod
    def release(self, reservation_id: str, *, outcome: Outcome, message: str = "") -> None:
        """Drop a reservation, uncharged: only for a caller that did nothing data-dependent since reserving it."""

    @abstractmethod
    def cached_answer(self, analyst: str, query_key: str) -> Any | None:
        """A previously released answer to the same query, if the replay scope allows it."""

    @abstractmethod
    def remaining(self, analyst: str, domains: Sequence[str]) -> Remaining:
        """Budget left in the current window."""

    @abstractmethod
    def audit_event(self, spend: Spend, *, outcome: Outcome, message: str = "") -> None:
        """Record a query that never reserved (e.g. refused by the validator or replayed)."""

    def audit_and_remaining(
        self, spend: Spend, *, outcome: Outcome, message: str = "", domains: Sequence[str]
    ) -> Remaining:
        """:meth:`audit_event`, then :meth:`remaining` of the spend's analyst; stores may do both in one
        transaction (a replay's or a free answer's whole ledger work)."""
        self.audit_event(spend, outcome=outcome, message=message)
        return self.remaining(spend.analyst, domains)

    def audit_replays(self, spends: Sequence[Spend]) -> list[Remaining]:
        """:meth:`audit_and_remaining` (outcome ``replayed``, the spend's domains) of several replays, for a
        caller that batches them itself (the wire server); returns once every record is committed, or raises.
        Stores may write them in one transaction."""
        return [self.audit_and_remaining(s, outcome="replayed", domains=s.domains) for s in spends]

    @abstractmethod
    def secret_seed(self) -> bytes:
        """The secret seed of the keyed hash used for contribution bounding, created once."""

    # Admin side: usage, history, cap overrides. ``by`` names the admin, for the audit log.

    @abstractmethod
    def cap(self, scope: str) -> Cap:
        """The cap in force for a scope: its override if an admin set one, else the config default."""

    @abstractmethod
    def usage(self, kind: ScopeKind | None = None) -> list[Usage]:
        """Usage of every analyst and domain the ledger knows (charged or with a cap override)."""

    @abstractmethod
    def history(self, scope: str | None = None, *, since: float | None = None) -> list[Charge]:
        """Charges (oldest first), optionally of one scope and from a time on."""

    @abstractmethod
    def grant(self, scope: str, *, epsilon: float = 0.0, delta: float = 0.0, by: str) -> Cap:
        """Raise a scope's cap by ``+epsilon``/``+delta``; return the new cap."""

    @abstractmethod
    def set_cap(self, scope: str, *, epsilon: float | None = None, delta: float | None = None, by: str) -> Cap:
        """Override a scope's cap (``None`` keeps that part); return the new cap."""

    @abstractmethod
    def reset(self, scope: str, *, by: str) -> int:
        """Stop every charge of a scope counting against it; return how many it had."""

    @abstractmethod
    def audit_log(
        self,
        *,
        analyst: str | None = None,
        since: float | None = None,
        outcome: AuditOutcome | None = None,
        limit: int | None = 100,
    ) -> list[AuditRecord]:
        """Audit records, newest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> BudgetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
