"""What every planning pass may read besides the plan: the policy, the backend's SQL hooks, the seed."""

from __future__ import annotations

from dataclasses import dataclass

from dpgateway.connectors.base import SQLHooks
from dpgateway.policies.model import Config


@dataclass(frozen=True)
class PlanContext:
    """Read-only inputs of the planner (nothing per query lives here)."""

    config: Config
    hooks: SQLHooks
    seed: bytes = b""
