"""The ledger on SQLAlchemy Core: one implementation, small per-dialect hooks (``sqlite.py``, ``postgres.py``).

Modules: this one holds the ledger's operations (reserve, commit, release, admin); ``sql_schema.py`` the
tables below and the prebuilt hot-path statements; ``sql_base.py`` the plumbing (transactions with retries,
schema creation and migration, ledger time, usage sums, audit rows).

Tables (created on first open, idempotently, under a lock so that many processes may open at once):

- ``dp_charges``: one row per *counting* charge: a pending reservation (``reserved``), a debit
  (``committed``) or a reservation never committed within its lease (``abandoned``). ``at`` is when it
  started counting, in ledger time (the database's clock, ``ledger_time.py``); the charge counts against
  a cap while ``now - at < window``. A released
  reservation is deleted (its outcome stays in the audit log).
- ``dp_charge_scopes``: which scopes (``analyst:<name>``, ``domain:<name>``) a charge counts against,
  with a copy of the charge's ``epsilon``, ``delta`` and ``at`` so that the usage sums read one index
  (``scope, at, epsilon, delta``) instead of joining every charge in the window. The copy is written in
  the same transaction as the charge, every time (``reserve`` inserts both, ``commit`` updates both,
  ``release`` deletes both); ``tests/ledger/test_schema.py`` checks they agree after every operation.
- ``dp_caps``: admin overrides of the config's default caps.
- ``dp_answers``: released answers, for free replay of an identical query.
- ``dp_audit``: one row per query outcome and per admin action.
- ``dp_meta``: the secret seed and the schema version.

Proof note (no overspend). Invariant: for every scope ``s`` and time ``t``, the charges counting
against ``s`` at ``t`` sum to at most ``cap(s)`` (as it was when the last of them was reserved).
Times are ledger time: the database's clock, with the stamps of each scope non-decreasing in the order
the transactions holding its lock commit (``ledger_time.py``), whatever the writers' own clocks.

1. ``reserve`` reads the sums and inserts the new charge inside one transaction that holds the
   lock of every scope it touches (SQLite: the database write lock of ``BEGIN IMMEDIATE``;
   PostgreSQL: a transaction-level advisory lock per scope, taken in sorted order), so two
   reservations sharing a scope are serialized and each sees the other's committed row.
2. A charge only ever shrinks (``commit`` debits at most what was reserved, checked) and counts
   without a gap from its reservation until ``window`` after its commit (``commit`` refuses a
   reservation that already left the window, so a charge never starts counting again).
3. Hence at any time ``t`` take the latest-reserved charge ``R`` counting against ``s``: every other
   charge counting at ``t`` was reserved before ``R`` and counted at ``R``'s reservation, at an amount
   at least its current one, so the check made by ``R``'s ``reserve`` bounds the sum at ``t``.

Tests: ``tests/ledger/test_concurrency.py`` (exactly N of 400 racing reservations fit a cap of N) and
``tests/ledger/test_caps.py`` (window expiry, commit above the reservation is an internal error).

Proof note (crashes). ``commit`` (the debit) is a committed database transaction before the gateway
releases the answer, so a crash of the process at any point leaves either no released answer or a debit (a
power loss, on SQLite, either no released answer or a charge at least as large: below). A
reservation whose process died is indistinguishable from one whose query touched the data, so it is
never dropped: it keeps counting at its reserved amount until it leaves the window, and after the
lease it is marked ``abandoned`` in the ledger and the audit log. Test: ``tests/ledger/test_crash.py``.

A reservation's transaction is committed before the backend runs, visible to every process (the cap checks
of point 1 see it) and durable against this process dying, but on SQLite it is not forced to disk by its
commit (``synchronous=NORMAL`` for that one transaction; WAL mode writes it to the log file at commit). A
background fsync of the log (``wal_sync.py``) forces it to disk while the backend runs, and the debit waits
for that fsync before it commits; the debit then commits relaxed as well, since the reservation on disk
already charges the answer (proof note in ``wal_sync.py``: a crash may lose the debit's record, never the
charge). Where that fsync did not happen or failed, the debit commits fully synced, forcing the reservation
to disk with everything logged before it. Either way, the reservation is on disk before the answer leaves; no
fsync is left between the backend's answer and the release (about 1 ms per query on the benchmark machine).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dpgateway.budget_store.base import (
    AuditOutcome,
    AuditRecord,
    Charge,
    CommitOutcome,
    Outcome,
    Remaining,
    ScopeKind,
    Spend,
    Usage,
    scope_name,
    split_scope,
)
from dpgateway.budget_store.ledger_time import ClockSkewError
from dpgateway.budget_store.sql_base import SQLLedgerBase
from dpgateway.budget_store.sql_schema import (
    AUDIT_COMMIT,
    CACHED_ANSWER,
    COMMIT_ANY,
    COMMIT_RESERVED,
    COMMIT_SCOPES,
    COMMIT_TIME,
    INSERT_ANSWER,
    INSERT_CHARGE,
    INSERT_SCOPE,
    RESERVE_TIME,
    SELECT_CHARGE,
    SLACK,
    Executor,
    audit,
    caps,
    charge_scopes,
    charges,
    fits,
    fmt,
    meta_table,
)
from dpgateway.errors import (
    BudgetError,
    InternalError,
    InvalidParameterError,
    QueryCapError,
)
from dpgateway.policies.model import Cap


class SQLBudgetStore(SQLLedgerBase):
    """The ledger on one SQLAlchemy engine; subclasses provide the dialect hooks (``sqlite.py``, ``postgres.py``)."""

    # ---- the gateway's side ----------------------------------------------------------------

    def reserve(self, spend: Spend) -> str:
        for value, what in ((spend.epsilon, "epsilon"), (spend.delta, "delta")):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParameterError(f"{what} must be a finite number >= 0, not {value!r}")
        if spend.epsilon <= 0:
            raise InvalidParameterError(f"epsilon must be positive, not {spend.epsilon!r}")
        per_query = self.budget.per_query
        if not (fits(spend.epsilon, per_query.epsilon) and fits(spend.delta, per_query.delta)):
            message = (
                f"The query asks epsilon={fmt(spend.epsilon)}, delta={fmt(spend.delta)} but one query may spend "
                f"at most epsilon={fmt(per_query.epsilon)}, delta={fmt(per_query.delta)} (budget.per_query); "
                f"ask for less"
            )
            self._audit_spend(spend, "refused", message)
            raise QueryCapError(message)
        scopes = sorted({scope_name("analyst", spend.analyst), *(scope_name("domain", d) for d in spend.domains)})
        charge_id = uuid.uuid4().hex

        def work(conn: Executor) -> None:
            self._lock(conn, scopes)
            # read under the locks: the window is evaluated at the insertion time
            now = self._stamp(conn, RESERVE_TIME, {"scopes": scopes}, check=True)
            usages = self._usages(conn, scopes, now)
            for scope in scopes:
                usage = usages[scope]
                if not (
                    fits(usage.spent_epsilon + spend.epsilon, usage.cap.epsilon)
                    and fits(usage.spent_delta + spend.delta, usage.cap.delta)
                ):
                    raise BudgetError(self._refusal(usage, spend, now))
            conn.execute(
                INSERT_CHARGE,
                {
                    "id": charge_id,
                    "analyst": spend.analyst,
                    "query_key": spend.query_key,
                    "sql": spend.sql,
                    "rewritten_sha256": spend.rewritten_sha256,
                    "state": "reserved",
                    "epsilon": spend.epsilon,
                    "delta": spend.delta,
                    "reserved_epsilon": spend.epsilon,
                    "reserved_delta": spend.delta,
                    "reserved_at": now,
                    "at": now,
                },
            )
            conn.execute(
                INSERT_SCOPE,
                [
                    {"charge_id": charge_id, "scope": s, "epsilon": spend.epsilon, "delta": spend.delta, "at": now}
                    for s in scopes
                ],
            )

        try:
            self._run_prebuilt(work, synced=False)  # see the proof note (crashes): synced before the debit
        except (BudgetError, ClockSkewError) as exc:
            self._audit_spend(spend, "refused", exc.message)
            raise
        self._reserved(charge_id)
        return charge_id

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
        work = self._commit_work(
            reservation_id, epsilon=epsilon, delta=delta, answer=answer, outcome=outcome, message=message
        )
        self._run_prebuilt(work, synced=not self._reservation_on_disk(reservation_id))

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
        """The debit and the budget left after it, in one transaction (the debit is committed when this returns)."""
        commit = self._commit_work(
            reservation_id, epsilon=epsilon, delta=delta, answer=answer, outcome="released", message=message
        )

        def work(conn: Executor) -> Remaining:
            return self._remaining(conn, analyst, domains, commit(conn))

        return self._run_prebuilt(work, synced=not self._reservation_on_disk(reservation_id))

    def _commit_work(
        self,
        reservation_id: str,
        *,
        epsilon: float,
        delta: float,
        answer: Any,
        outcome: CommitOutcome,
        message: str,
    ) -> Callable[[Executor], float]:
        """Validate the arguments; return the transaction body of :meth:`commit` (it returns the debit's stamp)."""
        if not (math.isfinite(epsilon) and epsilon >= 0 and math.isfinite(delta) and delta >= 0):
            raise InternalError(f"commit of {reservation_id}: epsilon={epsilon!r}, delta={delta!r} must be >= 0")
        if outcome not in ("released", "error") or (outcome == "error" and answer is not None):
            raise InternalError(
                f"commit of {reservation_id} with outcome {outcome!r}"
                f"{' and an answer, which a failed query does not release' if answer is not None else ''}: this is a bug"
            )
        failure = f"charged, no answer released: {message}" if outcome == "error" else message
        try:
            answer_json = None if answer is None else json.dumps(answer, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InternalError(f"commit of {reservation_id}: the answer is not JSON-serializable ({exc})") from None

        def work(conn: Executor) -> float:
            now = self._stamp(conn, COMMIT_TIME, {"charge": reservation_id}, check=False)
            params = {"charge": reservation_id, "debit_epsilon": epsilon, "debit_delta": delta, "now": now}
            # Fast path: one UPDATE that only matches a pending reservation whose debit fits and that is
            # still in the window; the checks below run only when it matched nothing.
            fast = conn.execute(COMMIT_RESERVED, {**params, "slack": SLACK, "window": self.window_seconds})
            late = ""
            if fast.rowcount != 1:
                late = self._commit_slow(conn, reservation_id, epsilon=epsilon, delta=delta, now=now)
                conn.execute(COMMIT_ANY, params)
            conn.execute(COMMIT_SCOPES, params)
            if answer_json is not None:
                conn.execute(INSERT_ANSWER, {"charge": reservation_id, "answer_json": answer_json, "now": now})
            audit_message = "; ".join(part for part in (failure, late) if part)
            conn.execute(AUDIT_COMMIT, {**params, "outcome": outcome, "audit_message": audit_message})
            return now

        return work

    def _commit_slow(self, conn: Executor, reservation_id: str, *, epsilon: float, delta: float, now: float) -> str:
        """Why the fast commit matched nothing: raise the error, or return the audit message of a late commit."""
        row = conn.execute(SELECT_CHARGE, {"charge": reservation_id}).fetchone()
        if row is None or row[0] == "committed":
            state = "unknown" if row is None else "already committed"
            raise InternalError(f"commit of reservation {reservation_id!r}, which is {state}")
        state, reserved_epsilon, reserved_delta, reserved_at = row
        if not (fits(epsilon, reserved_epsilon) and fits(delta, reserved_delta)):
            raise InternalError(
                f"commit of reservation {reservation_id!r} debits epsilon={fmt(epsilon)}, delta={fmt(delta)}, "
                f"more than it reserved (epsilon={fmt(reserved_epsilon)}, delta={fmt(reserved_delta)})"
            )
        if now - reserved_at >= self.window_seconds:
            # Proof note, point 2: the charge stopped counting, so others may hold its budget.
            raise BudgetError(
                f"Reservation {reservation_id!r} was made more than the {fmt(self.budget.window_days)}-day window "
                f"ago and has expired; the answer must not be released. Run the query again"
            )
        if state == "reserved":  # unreachable unless the database rounds differently from Python
            return ""
        return "committed after its lease had run out"

    def release(self, reservation_id: str, *, outcome: Outcome, message: str = "") -> None:
        if outcome == "released":
            raise InternalError(f"release of {reservation_id!r} with outcome 'released': use commit()")

        def work(conn: Connection) -> None:
            row = conn.execute(sa.select(charges).where(charges.c.id == reservation_id)).first()
            if row is None or row.state == "committed":
                state = "unknown" if row is None else "committed: its debit stands"
                raise InternalError(f"release of reservation {reservation_id!r}, which is {state}")
            conn.execute(sa.delete(charge_scopes).where(charge_scopes.c.charge_id == reservation_id))
            conn.execute(sa.delete(charges).where(charges.c.id == reservation_id))
            self._audit(
                conn,
                at=self._now(conn),
                analyst=row.analyst,
                sql=row.sql,
                rewritten_sha256=row.rewritten_sha256,
                epsilon=row.reserved_epsilon,
                delta=row.reserved_delta,
                outcome=outcome,
                message=f"not charged, reservation released: {message}"
                if message
                else "not charged, reservation released",
                query_key=row.query_key,
                charge_id=reservation_id,
            )

        self._reservation_on_disk(reservation_id)  # forget its background fsync (this transaction syncs)
        self._run(work)

    def cached_answer(self, analyst: str, query_key: str) -> Any | None:
        """The first answer released under ``query_key`` (to ``analyst``, unless the scope is ``global``); from
        the process's replay map when the ledger already returned it (proof note in ``replays.py``)."""
        if self.replay == "off":
            return None
        slot = (analyst if self.replay == "analyst" else "", query_key)
        known = self._replays.get(slot)
        if known is not None:
            return known
        query, params = CACHED_ANSWER[self.replay], {"query_key": query_key, "analyst": analyst}
        found = self._run_prebuilt(lambda conn: conn.execute(query, params).fetchone(), write=None)
        if found is None:
            return None
        answer = json.loads(found[0])
        self._replays.remember(slot, answer)
        return answer

    def audit_and_remaining(
        self, spend: Spend, *, outcome: Outcome, message: str = "", domains: Sequence[str]
    ) -> Remaining:
        """One group-committed transaction: the audit record, and the budget left read after it."""
        left = self._audit_spend(spend, outcome, message, remaining=domains)
        assert left is not None  # _audit_spend raises otherwise
        return left

    def remaining(self, analyst: str, domains: Sequence[str]) -> Remaining:
        # two reads, the clock then the sums: no explicit transaction needed
        return self._run_prebuilt(lambda conn: self._remaining(conn, analyst, domains, self._now(conn)), write=None)

    def _remaining(self, conn: Executor, analyst: str, domains: Sequence[str], now: float) -> Remaining:
        mine = scope_name("analyst", analyst)
        usages = self._usages(conn, [mine, *(scope_name("domain", d) for d in domains)], now)
        return Remaining(analyst=usages[mine], domains={d: usages[scope_name("domain", d)] for d in domains})

    def audit_event(self, spend: Spend, *, outcome: Outcome, message: str = "") -> None:
        self._audit_spend(spend, outcome, message)

    def secret_seed(self) -> bytes:
        if self._seed is None:
            query = sa.select(meta_table.c.value).where(meta_table.c.key == "secret_seed")
            self._seed = bytes.fromhex(self._run(lambda conn: conn.execute(query).scalar_one(), write=False))
        return self._seed

    def reap_abandoned(self) -> int:
        """Mark reservations older than the lease ``abandoned`` (they keep counting); return how many."""

        def work(conn: Connection) -> int:
            self._lock(conn, ["#reaper"])
            now = self._now(conn)
            stale = charges.c.state == "reserved", charges.c.reserved_at <= now - self.lease_seconds
            rows = conn.execute(sa.select(charges).where(*stale)).all()
            for row in rows:
                self._audit(
                    conn,
                    at=now,
                    analyst=row.analyst,
                    sql=row.sql,
                    rewritten_sha256=row.rewritten_sha256,
                    epsilon=row.reserved_epsilon,
                    delta=row.reserved_delta,
                    outcome="abandoned",
                    message=(
                        f"reservation not committed or released within the {fmt(self.lease_seconds)} s lease "
                        f"(the process probably died); charged in full, as data may have been touched"
                    ),
                    query_key=row.query_key,
                    charge_id=row.id,
                )
            if rows:
                conn.execute(sa.update(charges).where(*stale).values(state="abandoned"))
            return len(rows)

        return self._run(work)

    def close(self) -> None:
        self.engine.dispose()

    # ---- the admin's side ------------------------------------------------------------------

    def cap(self, scope: str) -> Cap:
        return self._run(lambda conn: self._cap(conn, scope), write=False)

    def usage(self, kind: ScopeKind | None = None) -> list[Usage]:
        self.reap_abandoned()

        def work(conn: Connection) -> list[Usage]:
            now = self._now(conn)
            known = sa.union(sa.select(charge_scopes.c.scope), sa.select(caps.c.scope)).subquery()
            scopes = sorted(conn.execute(sa.select(known.c.scope)).scalars())
            if kind is not None:
                scopes = [s for s in scopes if split_scope(s)[0] == kind]
            usages = self._usages(conn, scopes, now)
            return [usages[s] for s in scopes]

        return self._run(work, write=False)

    def history(self, scope: str | None = None, *, since: float | None = None) -> list[Charge]:
        self.reap_abandoned()

        def work(conn: Connection) -> list[Charge]:
            query = sa.select(charges).order_by(charges.c.at, charges.c.id)
            if scope is not None:
                query = query.where(
                    charges.c.id.in_(sa.select(charge_scopes.c.charge_id).where(charge_scopes.c.scope == scope))
                )
            if since is not None:
                query = query.where(charges.c.at >= since)
            rows = conn.execute(query).all()
            links: dict[str, list[str]] = {}
            for charge_id, linked in conn.execute(
                sa.select(charge_scopes.c.charge_id, charge_scopes.c.scope).order_by(charge_scopes.c.scope)
            ):
                links.setdefault(charge_id, []).append(linked)
            return [
                Charge(
                    id=row.id,
                    at=row.at,
                    analyst=row.analyst,
                    scopes=tuple(links.get(row.id, ())),
                    epsilon=row.epsilon,
                    delta=row.delta,
                    state=row.state,
                )
                for row in rows
            ]

        return self._run(work, write=False)

    def _override(self, scope: str, new: Callable[[Cap], Cap], *, by: str, action: str) -> Cap:
        split_scope(scope)

        def work(conn: Connection) -> Cap:
            self._lock(conn, [scope])
            now = self._now(conn)
            old = self._cap(conn, scope)
            cap = new(old)
            if not (cap.epsilon >= 0 and 0 <= cap.delta <= 1 and not math.isnan(cap.epsilon)):
                raise InvalidParameterError(
                    f"cap of {scope} would become epsilon={fmt(cap.epsilon)}, delta={fmt(cap.delta)}; "
                    f"epsilon must be >= 0 and delta in [0, 1]"
                )
            conn.execute(sa.delete(caps).where(caps.c.scope == scope))
            conn.execute(
                sa.insert(caps).values(scope=scope, epsilon=cap.epsilon, delta=cap.delta, updated_at=now, updated_by=by)
            )
            self._audit(
                conn,
                at=now,
                analyst=by,
                sql="",
                rewritten_sha256="",
                epsilon=0.0,
                delta=0.0,
                outcome="admin",
                message=(
                    f"{action} {scope}: cap epsilon={fmt(old.epsilon)}, delta={fmt(old.delta)} -> "
                    f"epsilon={fmt(cap.epsilon)}, delta={fmt(cap.delta)}"
                ),
            )
            return cap

        return self._run(work)

    def grant(self, scope: str, *, epsilon: float = 0.0, delta: float = 0.0, by: str) -> Cap:
        if not (math.isfinite(epsilon) and epsilon >= 0 and math.isfinite(delta) and delta >= 0):
            raise InvalidParameterError(f"a grant adds epsilon, delta >= 0, not epsilon={epsilon!r}, delta={delta!r}")
        return self._override(scope, lambda old: Cap(old.epsilon + epsilon, old.delta + delta), by=by, action="grant")

    def set_cap(self, scope: str, *, epsilon: float | None = None, delta: float | None = None, by: str) -> Cap:
        def new(old: Cap) -> Cap:
            return Cap(
                old.epsilon if epsilon is None else float(epsilon),
                old.delta if delta is None else float(delta),
            )

        return self._override(scope, new, by=by, action="set-cap")

    def reset(self, scope: str, *, by: str) -> int:
        def work(conn: Connection) -> int:
            self._lock(conn, [scope])
            count = conn.execute(
                sa.select(sa.func.count()).select_from(charge_scopes).where(charge_scopes.c.scope == scope)
            ).scalar_one()
            conn.execute(sa.delete(charge_scopes).where(charge_scopes.c.scope == scope))
            self._audit(
                conn,
                at=self._now(conn),
                analyst=by,
                sql="",
                rewritten_sha256="",
                epsilon=0.0,
                delta=0.0,
                outcome="admin",
                message=f"reset {scope}: {count} charge(s) no longer count against it",
            )
            return int(count)

        return self._run(work)

    def audit_log(
        self,
        *,
        analyst: str | None = None,
        since: float | None = None,
        outcome: AuditOutcome | None = None,
        limit: int | None = 100,
    ) -> list[AuditRecord]:
        self.reap_abandoned()
        query = sa.select(audit).order_by(audit.c.at.desc(), audit.c.id.desc())
        if analyst is not None:
            query = query.where(audit.c.analyst == analyst)
        if since is not None:
            query = query.where(audit.c.at >= since)
        if outcome is not None:
            query = query.where(audit.c.outcome == outcome)
        if limit is not None:
            query = query.limit(limit)
        rows = self._run(lambda conn: conn.execute(query).all(), write=False)
        return [
            AuditRecord(
                at=row.at,
                analyst=row.analyst,
                sql=row.sql,
                rewritten_sha256=row.rewritten_sha256,
                epsilon=row.epsilon,
                delta=row.delta,
                outcome=row.outcome,
                message=row.message,
            )
            for row in rows
        ]
