"""The ``Gateway``: plan, then spend. ``explain`` never spends; ``query`` reserves, runs, commits, releases."""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import math
import os
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from typing import Any

import pandas as pd
from sqlglot import exp

from dpgateway import prepare
from dpgateway.budget_store.base import BudgetStore, Spend
from dpgateway.connectors.base import Connector, ExactAggregates
from dpgateway.connectors.routing import connector_for
from dpgateway.errors import (
    DPGatewayError,
    InternalError,
    InvalidParameterError,
    UnknownTableError,
)
from dpgateway.mechanisms import laplace_half_width
from dpgateway.noise import add_noise
from dpgateway.passes.bounding import prepared_copy_sql
from dpgateway.passes.context import PlanContext, PreparedCopy
from dpgateway.plan import DPPlan
from dpgateway.planner import PlanCache
from dpgateway.policies.loader import load_config
from dpgateway.policies.model import Config
from dpgateway.postprocess import Released, post_process, run_sandboxed
from dpgateway.sqlparse import query_key

ANALYST_ENV = "DPGATEWAY_ANALYST"
REWRITE_NOTES = {
    "weighted": "bounding: each matching row weighted by k / max(rows of its unit, k) (at most k rows' worth per unit)",
    "rows": "bounding: each unit's rows ranked by a keyed hash, the first k kept",
    "unit_count": "bounding: per-unit pre-aggregation, SUM(LEAST(rows per unit, k)) (exactly the row-bounded count)",
}


@dataclass(frozen=True)
class Result:
    """A released answer and exactly what it cost.

    ``frame`` (pandas) and ``rows`` (plain, JSON-friendly values) are built from ``released`` when first read.
    """

    released: Released
    epsilon: float
    delta: float
    remaining: dict[str, Any]
    replayed: bool = False

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.released.columns]

    @cached_property
    def rows(self) -> list[list[Any]]:
        return _plain_rows(self.released.rows)

    @cached_property
    def frame(self) -> pd.DataFrame:
        return self.released.frame()

    def to_dict(self) -> dict[str, Any]:
        """The CLI's JSON shape."""
        return {
            "columns": self.columns,
            "rows": self.rows,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "remaining": self.remaining,
            "replayed": self.replayed,
        }


@dataclass(frozen=True)
class MechanismInfo:
    """One noisy measurement as EXPLAIN shows it (real units)."""

    measurement: str
    mechanism: str
    epsilon: float
    sensitivity: float
    noise_scale: float
    threshold: int | None = None


@dataclass(frozen=True)
class Explanation:
    """What a query would do and cost, computed without touching data or budget."""

    sql: str
    bounded_sql: str
    epsilon: float
    delta: float
    mechanisms: tuple[MechanismInfo, ...]
    accuracy: dict[str, str]
    notes: tuple[str, ...] = field(default=())
    plan: DPPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sql": self.sql,
            "bounded_sql": self.bounded_sql,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "mechanisms": [m.__dict__ for m in self.mechanisms],
            "accuracy_95": self.accuracy,
            "notes": list(self.notes),
        }


class Gateway:
    """Answers SQL with differential privacy. Create with :meth:`from_config`; close when done."""

    def __init__(self, config: Config, *, connector: Connector | None = None, store: BudgetStore | None = None):
        self.config = config
        self.connector = connector or connector_for(config)
        if store is None:
            from dpgateway.budget_store import open_store

            store = open_store(config.ledger, config.budget, replay=config.budget.replay)
        self.store = store
        if connector is None:
            for table in config.tables:
                self.connector.check_table(table)
        self._ctx = PlanContext(config=config, hooks=self.connector.hooks, seed=self.store.secret_seed())
        self._plans = PlanCache()
        self._sources = self._ctx.hooks.state()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Gateway:
        """Load ``dpgateway.yaml`` (or ``path``, or ``$DPGATEWAY_CONFIG``) and open backend and ledger."""
        return cls(load_config(path), **kwargs)

    def explain(
        self, sql: str, *, analyst: str | None = None, epsilon: float | None = None, delta: float | None = None
    ) -> Explanation:
        """The plan, its cost and 95% accuracy per output column; spends nothing, reads no data."""
        plan = self._plan(sql, *self._parameters(epsilon, delta))
        return _explain(plan)

    def query(
        self, sql: str, *, analyst: str | None = None, epsilon: float | None = None, delta: float | None = None
    ) -> Result:
        """Answer ``sql`` with DP, debiting the ledger before the answer is released."""
        who = resolve_analyst(analyst)
        eps, dlt = self._parameters(epsilon, delta)
        key = query_key(sql, eps, dlt)
        try:
            plan = self._plan(sql, eps, dlt)
        except DPGatewayError as exc:
            self.store.audit_event(_spend(who, None, sql, key), outcome="refused", message=_audit_text(exc))
            raise
        spend = _spend(who, plan, sql, key)
        if plan.passthrough:
            released = self._passthrough(plan)
            self.store.audit_event(spend, outcome="released", message="public data: no privacy cost")
            return Result(released, 0.0, 0.0, self.store.remaining(who, []).as_dict())
        if not plan.measurements:  # only public key values are listed: the data is not read
            keys_only = ExactAggregates(columns=tuple(k.name for k in plan.group_keys), rows=())
            released = post_process(plan, add_noise(plan, keys_only))
            self.store.audit_event(spend, outcome="released", message="public key domain only: no privacy cost")
            return Result(released, 0.0, 0.0, self.store.remaining(who, spend.domains).as_dict())
        cached = self.store.cached_answer(who, key)
        if cached is not None:
            self.store.audit_event(spend, outcome="replayed")
            released = Released(tuple(cached["columns"]), [tuple(row) for row in cached["rows"]])
            return Result(released, 0.0, 0.0, self.store.remaining(who, spend.domains).as_dict(), replayed=True)
        reservation = self.store.reserve(spend)  # refusals are audited by the store
        result = Result(self._run(plan, reservation), spend.epsilon, spend.delta, {})
        answer = {"columns": result.columns, "rows": result.rows}
        remaining = self.store.commit_and_remaining(
            reservation, epsilon=spend.epsilon, delta=spend.delta, answer=answer, analyst=who, domains=spend.domains
        )
        result.remaining.update(remaining.as_dict())  # known once the debit is committed; rows stay built once
        return result

    def prepare(self, table: str) -> PreparedCopy:
        """Materialize a copy of ``table`` that later unfiltered queries read (see dpgateway/prepare.py).

        Spends nothing and releases nothing; the copy is used only while its source and policy are unchanged.
        """
        policy = self.config.table(table)
        if policy is None:
            raise UnknownTableError(f'relation "{table}" does not exist in the policy')
        if policy.public or not policy.privacy_unit:
            raise InvalidParameterError(
                f"table {policy.name} has no privacy_unit: there is nothing to bound, so nothing to prepare"
            )
        state = prepare.source_state(policy)
        if state is None:
            raise InvalidParameterError(f"table {policy.name}: only file sources (CSV, Parquet) can be prepared")
        digest = prepare.policy_digest(policy, self._ctx.seed)
        folder = self.config.cache_folder
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{policy.name}-{digest[:16]}.parquet"
        partial = target.with_suffix(".parquet.tmp")
        rows = self.connector.materialize(prepared_copy_sql(policy, self._ctx), str(partial))
        os.replace(partial, target)
        prepare.write_manifest(folder, policy, file=target, source=state, policy=digest, rows=rows)
        return PreparedCopy(table=policy.name, path=str(target), k=policy.max_rows_per_unit)

    def remaining(self, analyst: str | None = None) -> dict[str, Any]:
        """Budget left for the analyst and every subject domain of the policy."""
        domains = sorted({t.subject_domain for t in self.config.tables if not t.public})
        return self.store.remaining(resolve_analyst(analyst), domains).as_dict()

    def close(self) -> None:
        self.connector.close()
        self.store.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _parameters(self, epsilon: float | None, delta: float | None) -> tuple[float, float]:
        budget = self.config.budget
        eps = budget.default_query_epsilon if epsilon is None else epsilon
        dlt = budget.default_query_delta if delta is None else delta
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise InvalidParameterError(f"epsilon must be a positive finite number, not {epsilon!r}")
        if isinstance(dlt, bool) or not isinstance(dlt, (int, float)) or not 0 <= dlt < 1:
            raise InvalidParameterError(f"delta must be a number in [0, 1), not {delta!r}")
        return float(eps), float(dlt)

    def _context(self) -> PlanContext:
        """The planning context, with the prepared copies that are valid right now."""
        copies = prepare.valid_copies(self.config, self._ctx.seed)
        sources = self._ctx.hooks.state()  # e.g. a CSV whose sniffed dialect no longer applies
        if copies != self._ctx.prepared or sources != self._sources:
            self._ctx, self._sources = dataclasses.replace(self._ctx, prepared=copies), sources
        return self._ctx

    def _plan(self, sql: str, epsilon: float, delta: float) -> DPPlan:
        try:
            return self._plans.build(sql, epsilon=epsilon, delta=delta, ctx=self._context())
        except DPGatewayError:
            raise
        except RecursionError:
            raise InvalidParameterError("the query is nested too deeply") from None
        except Exception as exc:  # a planner bug must surface as XX000, never as a traceback
            raise InternalError(f"planning failed: {type(exc).__name__}: {exc}") from exc

    def _run(self, plan: DPPlan, reservation: str) -> Released:
        """Execute, noise and post-process. A failure after the backend ran is still charged."""
        try:
            exact = self.connector.execute(plan.bounded_sql, plan.settings)
        except DPGatewayError:
            # Proof note: the backend may have failed because of the data; charging keeps the failure
            # itself inside the budget. Test: tests/test_gateway.py::test_backend_failure_is_charged.
            self.store.commit(reservation, epsilon=plan.spent_epsilon, delta=plan.delta)
            raise
        try:
            return post_process(plan, add_noise(plan, exact))
        except Exception as exc:
            self.store.commit(reservation, epsilon=plan.spent_epsilon, delta=plan.delta)
            if isinstance(exc, DPGatewayError):
                raise
            raise InternalError(f"noise or post-processing failed: {type(exc).__name__}") from exc

    def _passthrough(self, plan: DPPlan) -> Released:
        if plan.table is None:
            return run_sandboxed(plan.tree)
        tree = plan.tree.copy()
        for table in tree.find_all(exp.Table):
            source = self.connector.hooks.source(plan.table)
            source.set("alias", exp.TableAlias(this=exp.to_identifier(table.alias_or_name)))
            table.replace(source)
        exact = self.connector.execute(tree.sql(dialect=self.connector.hooks.DIALECT))
        return Released(exact.columns, list(exact.rows))


def resolve_analyst(analyst: str | None) -> str:
    """The analyst: explicit, else ``$DPGATEWAY_ANALYST``, else the OS user."""
    name = analyst or os.environ.get(ANALYST_ENV) or getpass.getuser()
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidParameterError("analyst must be a non-empty name of at most 200 characters")
    return name


def _spend(analyst: str, plan: DPPlan | None, sql: str, key: str) -> Spend:
    if plan is None or plan.passthrough or plan.table is None:
        return Spend(analyst=analyst, domains=(), epsilon=0.0, delta=0.0, query_key=key, sql=sql)
    return Spend(
        analyst=analyst,
        domains=(plan.table.subject_domain,),
        epsilon=plan.spent_epsilon,
        delta=plan.delta,
        query_key=key,
        sql=sql,
        rewritten_sha256=hashlib.sha256(plan.bounded_sql.encode()).hexdigest(),
    )


def _audit_text(exc: DPGatewayError) -> str:
    return f"{exc.sqlstate}: {exc.message}"


def _plain_rows(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as JSON-friendly lists (what the CLI prints and the replay cache stores)."""
    return [[v if type(v) is int or type(v) is str else _plain(v) for v in row] for row in rows]


def _plain(value: Any) -> Any:
    """A JSON-friendly Python value (NaN and NA become None)."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, Decimal):  # DuckDB's type for arithmetic with decimal literals, e.g. COUNT(*) + 0.5
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _explain(plan: DPPlan) -> Explanation:
    if plan.passthrough:
        return Explanation(
            plan.sql, plan.tree.sql(dialect="postgres"), 0.0, 0.0, (), {}, ("public data: exact, no cost",)
        )
    k = plan.table.max_rows_per_unit if plan.table else 1
    mechanisms = tuple(
        MechanismInfo(
            measurement=m.label,
            mechanism="discrete Laplace threshold (partition selection)"
            if m.threshold is not None
            else "discrete Laplace",
            epsilon=m.epsilon,
            sensitivity=m.sensitivity / m.scale,
            noise_scale=m.noise_scale / m.scale,
            threshold=m.threshold,
        )
        for m in plan.measurements
    )
    accuracy = {o.name: _accuracy(plan, o.kind, o.measurements) for o in plan.outputs}
    notes = [f"each privacy unit contributes at most {k} row(s)' worth; values are clamped to the declared bounds"]
    notes.append(REWRITE_NOTES.get(plan.rewrite, plan.rewrite))
    notes.extend(plan.notes)  # e.g. reads a prepared copy
    if plan.selects_partitions:
        notes.append("group keys are private: only groups whose noisy count passes the threshold are released")
    return Explanation(
        plan.sql, plan.bounded_sql, plan.spent_epsilon, plan.delta, mechanisms, accuracy, tuple(notes), plan
    )


def _accuracy(plan: DPPlan, kind: str, used: tuple[str, ...]) -> str:
    """95% half-width of one output column (exact for COUNT/SUM, per group size n for AVG)."""
    ms = [plan.measurement(n) for n in used]
    widths = {m.name: laplace_half_width(m.noise_scale) / m.scale for m in ms}
    if kind == "key":
        return "exact key" if not plan.selects_partitions else "exact key (released by partition selection)"
    if kind in ("count", "sum") and len(ms) == 1:
        return f"±{widths[ms[0].name]:.6g}"
    if kind == "avg" and len(ms) == 2:
        total = next(m for m in ms if m.kind == "sum")
        return f"≈ ±{widths[total.name]:.6g} / n (n = rows in the group)"
    return "depends on the data (derived from several noisy measurements)"
