"""The ledger interface: two-phase spending of privacy budget, replay cache and audit log.

The gateway calls, per query::

    rid = store.reserve(Spend(...))     # atomic cap check; raises BudgetError / QueryCapError
    ... execute on the backend, add noise ...
    store.commit(rid, epsilon=..., delta=..., answer=...)   # debit before release
    # or, if the query failed before touching data:
    store.release(rid, outcome="error", message=...)

A reservation counts against every cap while pending, so concurrent queries can never overspend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dpgateway.policies.model import Budget, Cap

Clock = Callable[[], float]
Outcome = Literal["released", "replayed", "refused", "error"]


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
        """Atomically check every cap and hold ``spend``; return a reservation id."""

    @abstractmethod
    def commit(self, reservation_id: str, *, epsilon: float, delta: float, answer: Any = None) -> None:
        """Debit what the mechanisms consumed (at most what was reserved); store the answer for replay."""

    @abstractmethod
    def release(self, reservation_id: str, *, outcome: Outcome, message: str = "") -> None:
        """Drop a reservation of a query that failed before touching data."""

    @abstractmethod
    def cached_answer(self, analyst: str, query_key: str) -> Any | None:
        """A previously released answer to the same query, if the replay scope allows it."""

    @abstractmethod
    def remaining(self, analyst: str, domains: Sequence[str]) -> Remaining:
        """Budget left in the current window."""

    @abstractmethod
    def audit_event(self, spend: Spend, *, outcome: Outcome, message: str = "") -> None:
        """Record a query that never reserved (e.g. refused by the validator or replayed)."""

    @abstractmethod
    def secret_seed(self) -> bytes:
        """The secret seed of the keyed hash used for contribution bounding, created once."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> BudgetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
