"""``plain``: the gateway's own backend computes the exact bounded aggregates and the gateway noises them.

Who sees what: the gateway process sees the exact bounded aggregates (never a row: the backend returns
aggregates only) and adds OpenDP discrete Laplace noise before anything leaves it.
"""

from __future__ import annotations

from dpgateway.connectors.base import Connector
from dpgateway.errors import InternalError
from dpgateway.executors.base import Evidence, Executor, NoisePlan, NoisyResult
from dpgateway.noise import draw_ahead, noisy_integers
from dpgateway.plan import DPPlan

EVIDENCE = Evidence(executor="plain", noise_added_at="gateway", exact_values_seen_by="gateway")


class PlainExecutor(Executor):
    """Today's path behind the executor interface."""

    name = "plain"
    KINDS = frozenset({"count", "sum", "count_distinct", "quantile"})  # the backend computes every kind

    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def execute(self, plan: DPPlan, noise: NoisePlan) -> NoisyResult:
        if plan.bounded_sql is None:
            raise InternalError("the plan has no verified backend SQL; this is a bug")
        draw_ahead(plan)  # the noise is drawn while the backend runs (dpgateway/noise_pool.py)
        exact = self.connector.execute(plan.bounded_sql, plan.settings)
        cells, values = noisy_integers(plan, exact)
        return NoisyResult(
            cells=tuple(cells),
            values={name: tuple(column) for name, column in values.items()},
            noise_fingerprint=noise.fingerprint(),
            released_values=len(cells) * len(values),
            evidence=EVIDENCE,
        )
