"""The ledger on SQLAlchemy Core: one implementation, small per-dialect hooks (``sqlite.py``, ``postgres.py``).

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
releases the answer, so a crash at any point leaves either no released answer or a debit. A
reservation whose process died is indistinguishable from one whose query touched the data, so it is
never dropped: it keeps counting at its reserved amount until it leaves the window, and after the
lease it is marked ``abandoned`` in the ledger and the audit log. Test: ``tests/ledger/test_crash.py``.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, ClassVar, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql.expression import ClauseElement

from dpgateway.budget_store.base import (
    AuditOutcome,
    AuditRecord,
    BudgetStore,
    Charge,
    Clock,
    CommitOutcome,
    Outcome,
    Remaining,
    ReplayScope,
    ScopeKind,
    Spend,
    Usage,
    scope_name,
    split_scope,
)
from dpgateway.budget_store.ledger_time import ClockSkewError, check_skew, database_now, stamp
from dpgateway.errors import (
    BackendError,
    BudgetError,
    ConfigError,
    InternalError,
    InvalidParameterError,
    QueryCapError,
)
from dpgateway.policies.model import Budget, Cap

T = TypeVar("T")
C = TypeVar("C")

SCHEMA_VERSION = "2"  # 2: dp_charge_scopes carries the charge amounts (migrated from 1 on open)
DEFAULT_LEASE_SECONDS = 15 * 60.0
RELATIVE_TOLERANCE = 1e-12
"""Caps are compared with this relative slack so that float sums such as 10 x 0.1 fit a cap of 1.0."""
MAX_RETRIES = 20

metadata = sa.MetaData()
meta_table = sa.Table(
    "dp_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
charges = sa.Table(
    "dp_charges",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("analyst", sa.Text, nullable=False),
    sa.Column("query_key", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("rewritten_sha256", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("epsilon", sa.Double, nullable=False),
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("reserved_epsilon", sa.Double, nullable=False),
    sa.Column("reserved_delta", sa.Double, nullable=False),
    sa.Column("reserved_at", sa.Double, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Index("dp_charges_state", "state", "reserved_at"),
)
charge_scopes = sa.Table(
    "dp_charge_scopes",
    metadata,
    sa.Column("charge_id", sa.String(32), primary_key=True),
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("epsilon", sa.Double, nullable=False),  # dp_charges.epsilon, delta and at, kept in step
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Index("dp_charge_scopes_usage", "scope", "at", "epsilon", "delta"),
)
caps = sa.Table(
    "dp_caps",
    metadata,
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("epsilon", sa.Double, nullable=False),
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("updated_by", sa.Text, nullable=False),
)
answers = sa.Table(
    "dp_answers",
    metadata,
    sa.Column("charge_id", sa.String(32), primary_key=True),
    sa.Column("query_key", sa.Text, nullable=False),
    sa.Column("analyst", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Index("dp_answers_key", "query_key", "analyst"),
)
audit = sa.Table(
    "dp_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("analyst", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("rewritten_sha256", sa.String(64), nullable=False),
    sa.Column("epsilon", sa.Double, nullable=False),
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("query_key", sa.Text, nullable=False),
    sa.Column("charge_id", sa.String(32)),
    sa.Index("dp_audit_at", "at"),
)


# ---- hot-path statements, built once (their compiled form is cached by the engine) ---------------

_SCOPES: sa.BindParameter[Any] = sa.bindparam("scopes", expanding=True)
USAGES = sa.union_all(
    # the sums of the charges counting in the window, per scope (kind 0) ...
    sa.select(
        charge_scopes.c.scope,
        sa.func.coalesce(sa.func.sum(charge_scopes.c.epsilon), 0.0).label("epsilon"),
        sa.func.coalesce(sa.func.sum(charge_scopes.c.delta), 0.0).label("delta"),
        sa.func.min(charge_scopes.c.at).label("oldest"),
        sa.literal_column("0").label("kind"),
    )
    .where(charge_scopes.c.scope.in_(_SCOPES), charge_scopes.c.at > sa.bindparam("since", type_=sa.Double))
    .group_by(charge_scopes.c.scope),
    # ... and the cap overrides (kind 1), in the same statement
    sa.select(
        caps.c.scope,
        caps.c.epsilon,
        caps.c.delta,
        sa.null().label("oldest"),
        sa.literal_column("1").label("kind"),
    ).where(caps.c.scope.in_(_SCOPES)),
)
DATABASE_NOW = sa.select(database_now())
_LATEST = sa.select(sa.func.max(charge_scopes.c.at))  # the latest stamp of a charge of some scopes
RESERVE_TIME = sa.select(database_now(), _LATEST.where(charge_scopes.c.scope.in_(_SCOPES)).scalar_subquery())
_OWN = charge_scopes.alias("own")
COMMIT_TIME = sa.select(  # ... of every scope of the charge, its own reservation included
    database_now(),
    _LATEST.where(
        charge_scopes.c.scope.in_(sa.select(_OWN.c.scope).where(_OWN.c.charge_id == sa.bindparam("charge")))
    ).scalar_subquery(),
)
INSERT_CHARGE = sa.insert(charges)
INSERT_SCOPE = sa.insert(charge_scopes)
INSERT_AUDIT = sa.insert(audit)
SELECT_CHARGE = sa.select(
    charges.c.state, charges.c.reserved_epsilon, charges.c.reserved_delta, charges.c.reserved_at
).where(charges.c.id == sa.bindparam("charge"))
_DEBIT = (sa.bindparam("debit_epsilon", type_=sa.Double), sa.bindparam("debit_delta", type_=sa.Double))
_NOW = sa.bindparam("now", type_=sa.Double)
_DEBITED = {"epsilon": _DEBIT[0], "delta": _DEBIT[1], "at": _NOW}  # what a commit writes on the charge and its copies
COMMIT_RESERVED = (
    # the fast path of commit: a pending reservation, the debit within it (fits()), still in the window
    sa.update(charges)
    .where(
        charges.c.id == sa.bindparam("charge"),
        charges.c.state == "reserved",
        _DEBIT[0] <= charges.c.reserved_epsilon * sa.bindparam("slack", type_=sa.Double),
        _DEBIT[1] <= charges.c.reserved_delta * sa.bindparam("slack", type_=sa.Double),
        _NOW - charges.c.reserved_at < sa.bindparam("window", type_=sa.Double),
    )
    .values(state="committed", **_DEBITED)
)
COMMIT_ANY = sa.update(charges).where(charges.c.id == sa.bindparam("charge")).values(state="committed", **_DEBITED)
COMMIT_SCOPES = (  # the same debit on the charge's copies in dp_charge_scopes
    sa.update(charge_scopes).where(charge_scopes.c.charge_id == sa.bindparam("charge")).values(**_DEBITED)
)
_CHARGE = charges.c.id == sa.bindparam("charge")
INSERT_ANSWER = sa.insert(answers).from_select(
    ["charge_id", "query_key", "analyst", "answer", "at"],
    sa.select(
        charges.c.id, charges.c.query_key, charges.c.analyst, sa.bindparam("answer_json", type_=sa.Text), _NOW
    ).where(_CHARGE),
)
AUDIT_COMMIT = sa.insert(audit).from_select(
    ["at", "analyst", "sql", "rewritten_sha256", "epsilon", "delta", "outcome", "message", "query_key", "charge_id"],
    sa.select(
        _NOW,
        charges.c.analyst,
        charges.c.sql,
        charges.c.rewritten_sha256,
        _DEBIT[0],
        _DEBIT[1],
        sa.bindparam("outcome", type_=sa.String),
        sa.bindparam("audit_message", type_=sa.Text),
        charges.c.query_key,
        charges.c.id,
    ).where(_CHARGE),
)
CACHED_ANSWER = {
    "analyst": sa.select(answers.c.answer)
    .where(answers.c.query_key == sa.bindparam("query_key"), answers.c.analyst == sa.bindparam("analyst"))
    .order_by(answers.c.at.desc())
    .limit(1),
    "global": sa.select(answers.c.answer)
    .where(answers.c.query_key == sa.bindparam("query_key"))
    .order_by(answers.c.at.desc())
    .limit(1),
}
PREBUILT: tuple[ClauseElement, ...] = (
    USAGES,
    DATABASE_NOW,
    RESERVE_TIME,
    COMMIT_TIME,
    INSERT_CHARGE,
    INSERT_SCOPE,
    INSERT_AUDIT,
    SELECT_CHARGE,
    COMMIT_RESERVED,
    COMMIT_ANY,
    COMMIT_SCOPES,
    INSERT_ANSWER,
    AUDIT_COMMIT,
    *CACHED_ANSWER.values(),
)
"""The only statements work run by ``SQLBudgetStore._run_prebuilt`` may execute (SQLite runs them on its driver)."""
SLACK = 1.0 + RELATIVE_TOLERANCE


class Rows(Protocol):
    """What the hot path reads of a statement's result: a SQLAlchemy ``CursorResult`` or a ``sqlite3.Cursor``."""

    @property
    def rowcount(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...

    def fetchone(self) -> Any: ...


class Executor(Protocol):
    """Runs the :data:`PREBUILT` statements: a SQLAlchemy ``Connection``, or SQLite's driver (``sqlite.py``).

    Rows are read as tuples (unpacked or indexed), which both return.
    """

    def execute(self, statement: sa.Executable, parameters: Any = None, /) -> Rows: ...


def _migrate_from_1(conn: Connection) -> None:
    """Schema 1 -> 2: copy each charge's amounts and start onto its scope rows, in the open transaction.

    SQLite adds a NOT NULL column only with a default; the default counts as spending everything until
    the year 3000, so a scope row written by a process still running schema-1 code refuses queries on that
    scope (fail closed) instead of counting nothing.
    """
    double = sa.Double().compile(dialect=conn.dialect)
    for column, default in (("epsilon", "1e300"), ("delta", "1"), ("at", "32503680000")):
        conn.execute(sa.text(f"ALTER TABLE dp_charge_scopes ADD COLUMN {column} {double} NOT NULL DEFAULT {default}"))
    conn.execute(
        sa.update(charge_scopes).values(
            {
                # a scope row without its charge counted nothing (the old sums joined them): it still does
                name: sa.func.coalesce(
                    sa.select(charges.c[name]).where(charges.c.id == charge_scopes.c.charge_id).scalar_subquery(), 0.0
                )
                for name in ("epsilon", "delta", "at")
            }
        )
    )
    conn.execute(sa.text("DROP INDEX IF EXISTS dp_charge_scopes_scope"))
    conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version").values(value=SCHEMA_VERSION))


def fits(total: float, cap: float) -> bool:
    """``total <= cap`` up to :data:`RELATIVE_TOLERANCE` (so 10 x 0.1 fits 1.0)."""
    return total <= cap * (1.0 + RELATIVE_TOLERANCE)


def fmt(value: float) -> str:
    """A number for messages: ``inf`` for no cap, else 6 significant digits."""
    return "inf" if math.isinf(value) else f"{value:.6g}"


def fmt_time(unix: float) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM:SS UTC``."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class SQLBudgetStore(BudgetStore):
    """The ledger on one SQLAlchemy engine; subclasses provide the dialect hooks."""

    DIALECT: ClassVar[str] = ""

    def __init__(
        self,
        url: str,
        budget: Budget,
        *,
        clock: Clock = time.time,
        database_clock: Clock | None = None,
        replay: ReplayScope = "analyst",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        super().__init__(budget, clock=clock)
        self.database_clock = database_clock
        if replay not in ("analyst", "global", "off"):
            raise InvalidParameterError(f"replay scope {replay!r} is unknown; use 'analyst', 'global' or 'off'")
        if not lease_seconds > 0:
            raise InvalidParameterError(f"lease_seconds must be positive, not {lease_seconds!r}")
        self.url = url
        self.replay = replay
        self.lease_seconds = float(lease_seconds)
        self.window_seconds = budget.window_days * 86400.0
        self.engine = self._create_engine(url)
        self._seed: bytes | None = None
        self._run(self._create_schema)
        self.reap_abandoned()

    # ---- dialect hooks ---------------------------------------------------------------------

    def _create_engine(self, url: str) -> Engine:
        """The engine, configured for this dialect."""
        raise NotImplementedError

    @contextmanager
    def _transaction(self, *, write: bool | None) -> Iterator[Connection]:
        """A transaction; for ``write`` one that may take the locks of :meth:`_lock`; ``None``: the work
        is one read statement, which the database may run without an explicit transaction."""
        with self.engine.begin() as conn:
            yield conn

    def _prebuilt_transaction(self, *, write: bool | None) -> AbstractContextManager[Executor]:
        """A transaction like :meth:`_transaction` whose work executes only :data:`PREBUILT` statements."""
        return self._transaction(write=write)

    def _lock(self, conn: Executor, keys: Sequence[str]) -> None:
        """Serialize this transaction with every other one locking any of ``keys`` (scopes, or
        ``#schema`` / ``#reaper``), until it ends."""

    def _is_transient(self, exc: sa.exc.DBAPIError) -> bool:
        """Whether a failed transaction should simply be retried (lock timeout, deadlock)."""
        return False

    # ---- plumbing --------------------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], *, write: bool | None = True) -> T:
        """Run ``work`` in a transaction, retrying transient lock errors; map database errors to BackendError."""
        return self._retrying(lambda: self._transaction(write=write), work)

    def _run_prebuilt(self, work: Callable[[Executor], T], *, write: bool | None = True) -> T:
        """:meth:`_run` for the hot path: ``work`` executes only :data:`PREBUILT` statements."""
        return self._retrying(lambda: self._prebuilt_transaction(write=write), work)

    def _retrying(self, transaction: Callable[[], AbstractContextManager[C]], work: Callable[[C], T]) -> T:
        for attempt in range(MAX_RETRIES):
            try:
                with transaction() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as exc:
                if attempt + 1 < MAX_RETRIES and self._is_transient(exc):
                    time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + secrets.randbelow(1000) / 1000))
                    continue
                raise self._backend_error(exc) from None
            except sa.exc.SQLAlchemyError as exc:
                raise self._backend_error(exc) from None
        raise InternalError("unreachable: the retry loop always returns or raises")

    def _backend_error(self, exc: sa.exc.SQLAlchemyError) -> BackendError:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return BackendError(
            f"Ledger database {sa.make_url(self.url).render_as_string(hide_password=True)} failed: "
            f"{type(exc).__name__}: {detail}"
        )

    def _create_schema(self, conn: Connection) -> None:
        self._lock(conn, ["#schema"])
        for table in metadata.sorted_tables:
            conn.execute(CreateTable(table, if_not_exists=True))
        present = {key: value for key, value in conn.execute(sa.select(meta_table.c.key, meta_table.c.value))}
        version = present.get("schema_version", SCHEMA_VERSION)
        if version == "1":
            _migrate_from_1(conn)
        elif version != SCHEMA_VERSION:
            raise ConfigError(
                f"ledger {sa.make_url(self.url).render_as_string(hide_password=True)} has schema version "
                f"{version}, newer than this dpgateway knows ({SCHEMA_VERSION}): upgrade dpgateway"
            )
        for table in metadata.sorted_tables:
            for index in table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
        if "secret_seed" not in present:
            conn.execute(sa.insert(meta_table).values(key="secret_seed", value=secrets.token_hex(32)))
        if "schema_version" not in present:
            conn.execute(sa.insert(meta_table).values(key="schema_version", value=SCHEMA_VERSION))

    def _cap(self, conn: Connection, scope: str) -> Cap:
        row = conn.execute(sa.select(caps.c.epsilon, caps.c.delta).where(caps.c.scope == scope)).first()
        return self._default_cap(scope) if row is None else Cap(epsilon=row.epsilon, delta=row.delta)

    def _default_cap(self, scope: str) -> Cap:
        """The config's cap for ``scope``, where the admin set none."""
        kind, _ = split_scope(scope)
        return self.budget.per_analyst if kind == "analyst" else self.budget.per_subject

    def _now(self, conn: Executor) -> float:
        """Ledger time: the database's clock (or the test's ``database_clock``); see ``ledger_time.py``."""
        if self.database_clock is not None:
            return self.database_clock()
        return float(conn.execute(DATABASE_NOW).fetchone()[0])

    def _stamp(self, conn: Executor, statement: sa.Select[Any], params: dict[str, Any], *, check: bool) -> float:
        """A charge's stamp, by ``RESERVE_TIME`` or ``COMMIT_TIME``: the database's clock (or ``database_clock``),
        never before the latest charge of its scopes. ``check``: refuse when this host's clock is too far off.

        Proof note: see ``ledger_time.py``; tests/ledger/test_time.py fails without either part.
        """
        database, latest = conn.execute(statement, params).fetchone()
        if self.database_clock is not None:
            database = self.database_clock()
        if check:
            check_skew(self.clock(), float(database))
        return stamp(float(database), None if latest is None else float(latest))

    def _usages(self, conn: Executor, scopes: Sequence[str], now: float) -> dict[str, Usage]:
        """Spend of each scope counting at ``now`` (every charge, pending or not, inside the window), in one
        statement (sums grouped by scope, and their cap overrides)."""
        wanted = sorted(set(scopes))
        sums: dict[str, tuple[float, float, float | None]] = {}
        overrides: dict[str, Cap] = {}
        for scope, epsilon, delta, oldest, kind in conn.execute(
            USAGES, {"scopes": wanted, "since": now - self.window_seconds}
        ):
            if kind == 0:
                sums[scope] = (float(epsilon), float(delta), None if oldest is None else float(oldest))
            else:
                overrides[scope] = Cap(epsilon=epsilon, delta=delta)
        usages = {}
        for scope in wanted:
            spent_epsilon, spent_delta, oldest = sums.get(scope, (0.0, 0.0, None))
            usages[scope] = Usage(
                scope=scope,
                cap=overrides[scope] if scope in overrides else self._default_cap(scope),
                spent_epsilon=spent_epsilon,
                spent_delta=spent_delta,
                next_expiry=None if oldest is None else oldest + self.window_seconds,
            )
        return usages

    def _audit(
        self,
        conn: Executor,
        *,
        at: float,
        analyst: str,
        sql: str,
        rewritten_sha256: str,
        epsilon: float,
        delta: float,
        outcome: AuditOutcome,
        message: str,
        query_key: str = "",
        charge_id: str | None = None,
    ) -> None:
        conn.execute(
            INSERT_AUDIT,
            {
                "at": at,
                "analyst": analyst,
                "sql": sql,
                "rewritten_sha256": rewritten_sha256,
                "epsilon": epsilon,
                "delta": delta,
                "outcome": outcome,
                "message": message,
                "query_key": query_key,
                "charge_id": charge_id,
            },
        )

    def _audit_spend(self, spend: Spend, outcome: AuditOutcome, message: str) -> None:
        def work(conn: Executor) -> None:
            self._audit(
                conn,
                at=self._now(conn),
                analyst=spend.analyst,
                sql=spend.sql,
                rewritten_sha256=spend.rewritten_sha256,
                epsilon=spend.epsilon,
                delta=spend.delta,
                outcome=outcome,
                message=message,
                query_key=spend.query_key,
            )

        self._run_prebuilt(work)

    def _refusal(self, usage: Usage, spend: Spend, now: float) -> str:
        kind, name = split_scope(usage.scope)
        who = (
            f"analyst {name!r}"
            if kind == "analyst"
            else f"subject domain {name!r} (everyone in it, all analysts together)"
        )
        if usage.next_expiry is None:
            frees = "no charge in the window will expire: this query alone exceeds the cap"
        else:
            days = (usage.next_expiry - now) / 86400.0
            frees = f"budget next frees up at {fmt_time(usage.next_expiry)} (in {days:.3g} days)"
        return (
            f"Privacy budget of {who} would be exceeded: the query asks epsilon={fmt(spend.epsilon)}, "
            f"delta={fmt(spend.delta)} but only epsilon={fmt(usage.remaining_epsilon)}, "
            f"delta={fmt(usage.remaining_delta)} remain of the cap epsilon={fmt(usage.cap.epsilon)}, "
            f"delta={fmt(usage.cap.delta)} over a rolling {fmt(self.budget.window_days)}-day window; {frees}. "
            f"Ask for less, wait, or ask an admin to run `dpgateway budget grant {kind} {name} --epsilon E`"
        )

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
            self._run_prebuilt(work)
        except (BudgetError, ClockSkewError) as exc:
            self._audit_spend(spend, "refused", exc.message)
            raise
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
        self._run_prebuilt(work)

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

        return self._run_prebuilt(work)

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

        self._run(work)

    def cached_answer(self, analyst: str, query_key: str) -> Any | None:
        if self.replay == "off":
            return None
        query, params = CACHED_ANSWER[self.replay], {"query_key": query_key, "analyst": analyst}
        found = self._run_prebuilt(lambda conn: conn.execute(query, params).fetchone(), write=None)
        return None if found is None else json.loads(found[0])

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
