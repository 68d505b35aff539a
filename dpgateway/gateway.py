"""The ``Gateway``: plan, then spend. ``explain`` never spends; ``query`` reserves, runs, commits, releases."""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from dpgateway import prepare
from dpgateway.answers import Explanation, Result, accuracies, avg_warnings, explanation
from dpgateway.budget_store.base import BudgetStore, Spend
from dpgateway.connectors.base import Connector, ExactAggregates
from dpgateway.connectors.routing import connector_for
from dpgateway.errors import (
    DPGatewayError,
    FileAccessError,
    InternalError,
    InvalidParameterError,
    UnknownTableError,
)
from dpgateway.executors import ExecutorPool
from dpgateway.executors.base import Executor, NoisePlan, accept
from dpgateway.noise import add_noise, release
from dpgateway.passes.bounding import prepared_copy_tree
from dpgateway.passes.context import PlanContext, PreparedCopy
from dpgateway.passes.rewrite import bounds_before_filter
from dpgateway.plan import DPPlan
from dpgateway.planner import PlanCache
from dpgateway.policies.loader import load_config
from dpgateway.policies.model import Config, Table
from dpgateway.postprocess import Released, post_process, run_sandboxed
from dpgateway.sqlcheck import VerifiedSQL, verify
from dpgateway.sqlparse import query_key

ANALYST_ENV = "DPGATEWAY_ANALYST"
MIN_EPSILON = 1e-9
PUBLIC = "exact (public data)"
SIMULATED = "this answer was computed outside any protection; use it for development and tests only"
CACHED = ("columns", "rows", "accuracy_95", "half_width_95", "warnings")  # what a replay returns


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
                if table.executor != "enclave":  # only the enclave opens its (sealed) data
                    self.connector.check_table(table)
        self._ctx = PlanContext(config=config, hooks=self.connector.hooks, seed=self.store.secret_seed())
        self._plans = PlanCache()
        sources = prepare.connector_sources(config, self.connector.copy_source)  # e.g. Spark's local files
        self._copies = prepare.CopyCheck(config, self._ctx.seed, sources)  # which prepared copies are valid, per query
        kept = self.connector.copies  # copies kept in the backend's database (PostgreSQL), checked per query too
        self._db_copies = None if kept is None else prepare.DatabaseCopies(config, self._ctx.seed, kept)
        self._prepare_lock = threading.Lock()  # one build at a time (manual and automatic share the scratch names)
        self.auto_prepare = prepare.AutoPreparer(config.prepare, self.prepare, self._source_state)
        self.executors = ExecutorPool(config, self.connector)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Gateway:
        """Load ``dpgateway.yaml`` (or ``path``, or ``$DPGATEWAY_CONFIG``) and open backend and ledger."""
        return cls(load_config(path), **kwargs)

    def explain(
        self,
        sql: str,
        *,
        analyst: str | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        executor: str | None = None,
    ) -> Explanation:
        """The plan, its cost, its executor and 95% accuracy per output column; spends nothing, reads no data."""
        resolve_analyst(analyst)
        plan = self._plan(sql, *self._parameters(epsilon, delta))
        if plan.passthrough:
            return explanation(plan, None)
        return explanation(plan, self.executors.choose(plan, executor))

    def query(
        self,
        sql: str,
        *,
        analyst: str | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        executor: str | None = None,
    ) -> Result:
        """Answer ``sql`` with DP, debiting the ledger before the answer is released.

        ``executor`` overrides the table's executor where its policy allows it (``executors_allowed``).
        """
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
            left = self.store.audit_and_remaining(
                spend, outcome="released", message="public data: no privacy cost", domains=()
            )
            exact = {str(c): PUBLIC for c in released.columns}
            return Result(
                released, 0.0, 0.0, left.as_dict(), accuracy=exact, half_width=dict.fromkeys(exact, 0.0), plan=plan
            )
        try:
            runner = self.executors.choose(plan, executor)
        except DPGatewayError as exc:
            self.store.audit_event(spend, outcome="refused", message=_audit_text(exc))
            raise
        if not plan.measurements:  # only public key values are listed: the data is not read
            accuracy, half_width = accuracies(plan, runner)
            keys_only = ExactAggregates(columns=tuple(k.name for k in plan.group_keys), rows=())
            released = post_process(plan, add_noise(plan, keys_only))
            left = self.store.audit_and_remaining(
                spend, outcome="released", message="public key domain only: no privacy cost", domains=spend.domains
            )
            return Result(released, 0.0, 0.0, left.as_dict(), accuracy=accuracy, half_width=half_width, plan=plan)
        cached = self.store.cached_answer(who, key)
        if cached is not None:  # the audit record is committed (with the budget left read) before it is returned
            return self._replay(plan, runner, spend, cached)
        accuracy, half_width = accuracies(plan, runner)
        noise = plan.memo("noise", NoisePlan.from_plan)  # fixed before dispatch: the executor only applies it
        try:
            runner = runner.admit(plan, noise)  # e.g. attestation and key release: reads no data, costs nothing
        except DPGatewayError as exc:
            self.store.audit_event(spend, outcome="refused", message=f"executor {runner.name}: {_audit_text(exc)}")
            raise
        reservation = self.store.reserve(spend)  # refusals are audited by the store
        result, answer = self._run(plan, reservation, runner, noise, accuracy=accuracy, half_width=half_width)
        remaining = self.store.commit_and_remaining(
            reservation,
            epsilon=spend.epsilon,
            delta=spend.delta,
            answer=answer,
            analyst=who,
            domains=spend.domains,
            message=f"executor: {runner.describe()}",  # every audit record names the executor
        )
        result.remaining.update(remaining.as_dict())  # known once the debit is committed; rows stay built once
        if (
            runner.name == "plain"
            and plan.prepared is None
            and plan.table is not None
            and plan.relation is None  # joined relations never read copies (passes/prepared.py)
            and (plan.where is None or bounds_before_filter(plan, self._ctx))
        ):
            self.auto_prepare.queried(plan.table)  # starts a background build at most; never waits
        return result

    def prepare(self, table: str) -> PreparedCopy:
        """Materialize a copy of ``table`` that later unfiltered queries read (see dpgateway/prepare.py).

        Spends nothing and releases nothing; the copy is used only while its source and policy are unchanged.
        """
        policy = self.config.table(table)
        if policy is None:
            raise UnknownTableError(f'relation "{table}" does not exist in the policy')
        if policy.unit_path:
            raise InvalidParameterError(
                f"table {policy.name} reaches its privacy unit through foreign keys; its queries join on the fly, "
                "so there is no prepared copy to build"
            )
        if policy.executor != "plain":
            raise InvalidParameterError(
                f"table {policy.name} runs on the {policy.executor} executor: the gateway does not read its rows, so "
                "there is nothing to prepare"
            )
        if policy.public or not policy.privacy_unit:
            raise InvalidParameterError(
                f"table {policy.name} has no privacy_unit: there is nothing to bound, so nothing to prepare"
            )
        # A copy is safe only if the gateway can keep it private and tell, without reading rows, that its source
        # changed since it was taken: PostgreSQL keeps copies in its database (connectors/postgres_copy.py),
        # Spark decides per table and master (SparkConnector.copy_source: its local files, or 0A000 and why).
        store = self.connector.copies if isinstance(policy.source, dict) else None
        sources = self._copies.sources
        if isinstance(policy.source, dict) and store is None:
            sources = {policy.name: self.connector.copy_source(policy)}
        state = None if store is not None else prepare.source_state(policy, sources)
        if store is None and state is None:
            raise InvalidParameterError(
                f"table {policy.name}: only file sources (CSV, Parquet files or folders) that exist can be prepared"
            )
        digest = prepare.policy_digest(policy, self._ctx.seed)
        try:
            folder = prepare.private_folder(self.config.cache_folder)
        except OSError as exc:
            raise FileAccessError(
                f"cache_dir {str(self.config.cache_folder)!r} cannot be created ({exc.strerror}); set `cache_dir:` in "
                "the config to a folder dpgateway may write"
            ) from None
        hooks = self._ctx.hooks
        copy_sql = verify(
            hooks.finish(prepared_copy_tree(policy, self._ctx)),
            hooks.DIALECT,
            sources=[hooks.source(policy)],
            nodes=hooks.BACKEND_NODES,  # e.g. Spark's keyed hash, as passes/verify.py allows for queries
            functions=hooks.BACKEND_FUNCTIONS,
        )
        if state is None:  # no file state: a copy store keeps it in the database (connectors/postgres_copy.py)
            assert store is not None  # the check above: a table without either was refused
            with self._prepare_lock:
                built, rows = store.build(policy, copy_sql, digest)
                relation = store.relation(policy, digest)
                prepare.write_manifest(folder, policy, file=relation, source=built, policy=digest, rows=rows)
            return PreparedCopy(table=policy.name, path=relation, k=policy.max_rows_per_unit)
        target = folder / f"{policy.name}-{digest[:16]}.parquet"
        with self._prepare_lock, tempfile.TemporaryDirectory(dir=folder, prefix=".prepare-") as scratch:  # 0700
            partial = Path(scratch) / target.name
            rows = self.connector.materialize(copy_sql, str(partial))  # a file (DuckDB) or a folder (Spark)
            target = prepare.install_copy(partial, target)  # private, then moved into place
            previous = prepare.copy_name(folder, policy)
            prepare.write_manifest(folder, policy, file=target, source=state, policy=digest, rows=rows)
            prepare.prune_copies(folder, policy, keep={target.name, previous})
        return PreparedCopy(table=policy.name, path=str(target), k=policy.max_rows_per_unit)

    def remaining(self, analyst: str | None = None) -> dict[str, Any]:
        """Budget left for the analyst and every subject domain of the policy."""
        domains = sorted({t.subject_domain for t in self.config.tables if not t.public})
        return self.store.remaining(resolve_analyst(analyst), domains).as_dict()

    def close(self) -> None:
        self.auto_prepare.close()
        self.executors.close()
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
            raise InvalidParameterError(f"epsilon must be a positive finite number, not {eps!r}")
        if eps < MIN_EPSILON:  # its noise would be astronomically large, and splitting it would underflow to 0
            raise InvalidParameterError(
                f"epsilon {eps!r} is below the smallest epsilon dpgateway accepts ({MIN_EPSILON:g}): the answer "
                "would be pure noise; ask for a larger epsilon"
            )
        if isinstance(dlt, bool) or not isinstance(dlt, (int, float)) or not 0 <= dlt < 1:
            raise InvalidParameterError(f"delta must be a number in [0, 1), not {dlt!r}")
        return float(eps), float(dlt)

    def _source_state(self, table: Table) -> dict[str, Any] | None:
        """A table's source state for :class:`~dpgateway.prepare.AutoPreparer`: a file's or folder's stat, or the catalog's."""
        if isinstance(table.source, dict) and self._db_copies is not None:
            return self._db_copies.catalog_state(table)
        return prepare.source_state(table, self._copies.sources)  # a file, or a connector's local files (Spark)

    def _context(self) -> PlanContext:
        """The planning context, with the prepared copies that are valid right now."""
        copies = self._copies.valid()
        if self._db_copies is not None:
            copies += self._db_copies.valid()
        if copies != self._ctx.prepared:
            self._ctx = dataclasses.replace(self._ctx, prepared=copies)
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

    def _run(
        self,
        plan: DPPlan,
        reservation: str,
        executor: Executor,
        noise: NoisePlan,
        *,
        accuracy: dict[str, str],
        half_width: dict[str, float | None],
    ) -> tuple[Result, dict[str, Any]]:
        """Execute, noise and post-process: the result and the answer to commit. A failure is charged.

        The executor returns noisy integers for ``noise``; :func:`~dpgateway.executors.base.accept` rejects
        (charged, like any failure here) a result for another noise plan or with more values than planned.

        Proof note: from the backend call on, whether and how the query fails may depend on the data, so a
        failure is debited like an answer (the failure itself stays inside the budget) and audited ``error``
        with its SQLSTATE only, never the backend's text. Nothing that can fail runs between the reservation
        and the backend call, so the gateway never releases a reservation uncharged: an executor's admission
        checks (the enclave's attestation, which reads no data) run before the reservation, in ``query``. Tests (tests/test_gateway.py):
        test_backend_failure_is_charged_and_hides_values, test_any_failure_after_the_backend_ran_is_charged.
        """
        try:
            outcome = executor.execute(plan, noise)
            accept(noise, outcome)
            noisy = release(plan, list(outcome.cells), {k: list(v) for k, v in outcome.values.items()})
            released, warnings = post_process(plan, noisy), avg_warnings(plan, noisy, executor)
            if executor.simulated or outcome.evidence.simulated:  # every answer of a simulated executor says so
                warnings = (f"SIMULATED executor {executor.describe()}: {SIMULATED}", *warnings)
            result = Result(
                released,
                plan.spent_epsilon,
                plan.delta,
                {},
                accuracy=accuracy,
                half_width=half_width,
                warnings=warnings,
                plan=plan,
            )
            return result, {
                key: value for key, value in result.to_dict().items() if key in CACHED
            }  # rows made plain inside the charge
        except Exception as exc:
            error = exc if isinstance(exc, DPGatewayError) else InternalError(f"the query failed: {type(exc).__name__}")
            self.store.commit(
                reservation,
                epsilon=plan.spent_epsilon,
                delta=plan.delta,
                outcome="error",
                message=f"the query failed after the backend was called (SQLSTATE {error.sqlstate})"
                + ("" if executor.name == "plain" else f"; executor {executor.describe()}"),
            )
            if error is exc:
                raise
            raise error from exc

    def _replay(self, plan: DPPlan, runner: Executor, spend: Spend, cached: dict[str, Any]) -> Result:
        """An earlier release of the same query, free; audited (``replayed``) before it is returned.

        ``cached`` is shared with the store's replay map: only read here, its containers copied."""
        left = self.store.audit_and_remaining(spend, outcome="replayed", domains=spend.domains)
        if "accuracy_95" in cached and "half_width_95" in cached:  # the first release's noise is what applies
            accuracy, half_width = cached["accuracy_95"], cached["half_width_95"]
        else:  # an answer stored before accuracies were: today's statement of what is missing
            planned = accuracies(plan, runner)
            accuracy, half_width = cached.get("accuracy_95", planned[0]), cached.get("half_width_95", planned[1])
        return Result(
            Released(tuple(cached["columns"]), [tuple(row) for row in cached["rows"]]),
            0.0,
            0.0,
            left.as_dict(),
            replayed=True,
            accuracy=dict(accuracy),
            half_width=dict(half_width),
            warnings=tuple(cached.get("warnings", ())),
            plan=plan,
        )

    def replay_spend(
        self, sql: str, plan: DPPlan, *, analyst: str | None, epsilon: float | None, delta: float | None
    ) -> Spend:
        """What :meth:`query` audits (``replayed``) when it replays ``sql``, answered with ``plan``: for a caller
        that serves the same replay again from memory and writes this record itself (the wire server, see
        docs/server.md, "Answers from memory")."""
        eps, dlt = self._parameters(epsilon, delta)
        return _spend(resolve_analyst(analyst), plan, sql, query_key(sql, eps, dlt))

    def _passthrough(self, plan: DPPlan) -> Released:
        """Public data only: constants in the sandbox, or the verified statement over the public table."""
        if plan.table is None:
            return run_sandboxed(plan.post_sql, what="the constant expressions")
        exact = self.connector.execute(_backend_sql(plan))
        return Released(exact.columns, list(exact.rows))


def _backend_sql(plan: DPPlan) -> VerifiedSQL:
    if plan.bounded_sql is None:
        raise InternalError("the plan has no verified backend SQL; this is a bug")
    return plan.bounded_sql


def resolve_analyst(analyst: str | None) -> str:
    """The analyst: explicit, else ``$DPGATEWAY_ANALYST``, else the OS user; surrounding whitespace stripped.

    Every way a name enters (Python, CLI options, admin commands) goes through here, so ``" alice "`` and
    ``"alice"`` are one analyst with one budget. Test: tests/test_cli.py::test_analyst_names_are_normalized.
    """
    name = analyst if analyst is not None else (os.environ.get(ANALYST_ENV) or getpass.getuser())
    if not isinstance(name, str):
        raise InvalidParameterError(f"analyst must be a name (a string), not {type(name).__name__}")
    name = name.strip()
    if not name or len(name) > 200 or not name.isprintable():
        raise InvalidParameterError(
            f"analyst {name!r} is not a usable name: give 1 to 200 printable characters (no control characters)"
        )
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
        # the placeholder rendering: the same hash wherever the source lives (no host path, key or option)
        rewritten_sha256=plan.memo("shown_sha256", lambda p: hashlib.sha256(p.shown_sql.encode()).hexdigest()),
    )


def _audit_text(exc: DPGatewayError) -> str:
    return f"{exc.sqlstate}: {exc.message}"
