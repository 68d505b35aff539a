"""What every planning pass may read besides the plan: the policy, the backend's SQL hooks, the seed,
and the prepared (pre-bounded) copies that are valid right now."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from dpgateway.connectors.base import SQLHooks
from dpgateway.policies.model import Config


@dataclass(frozen=True)
class PreparedCopy:
    """A materialized copy of ``table``, with unit row counts and ranks (see :mod:`dpgateway.prepare`), checked valid by the gateway."""

    table: str
    path: str
    k: int


@dataclass(frozen=True)
class PlanContext:
    """Read-only inputs of the planner (nothing per query lives here)."""

    config: Config
    hooks: SQLHooks
    seed: bytes = b""
    prepared: tuple[PreparedCopy, ...] = ()

    def prepared_copy(self, table: str) -> PreparedCopy | None:
        return next((p for p in self.prepared if p.table == table), None)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies everything a plan depends on besides the query: keys the plan cache."""
        parts = (repr(self.config), type(self.hooks).__qualname__, repr(self.prepared))
        digest = hashlib.sha256(self.seed)
        for part in parts:
            digest.update(b"\x1f" + part.encode())
        return digest.hexdigest()
