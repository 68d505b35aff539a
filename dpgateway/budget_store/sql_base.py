"""The ledger's plumbing on one SQLAlchemy engine: dialect hooks, transactions with retries, schema
creation and migration, ledger time, usage sums and audit rows. ``sql.py`` builds the ledger's
operations on it (proof notes there)."""

from __future__ import annotations

import secrets
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from dpgateway.budget_store.base import (
    AuditOutcome,
    BudgetStore,
    Clock,
    Remaining,
    ReplayScope,
    Spend,
    Usage,
    scope_name,
    split_scope,
)
from dpgateway.budget_store.group_commit import GroupCommit
from dpgateway.budget_store.ledger_time import check_skew, stamp
from dpgateway.budget_store.replays import ReplayMap
from dpgateway.budget_store.sql_schema import (
    DATABASE_NOW,
    DEFAULT_LEASE_SECONDS,
    INSERT_AUDIT,
    SCHEMA_VERSION,
    USAGES,
    Executor,
    caps,
    fmt,
    fmt_time,
    meta_table,
    metadata,
    migrate_from_1,
)
from dpgateway.errors import (
    BackendError,
    ConfigError,
    InternalError,
    InvalidParameterError,
)
from dpgateway.policies.model import Budget, Cap

T = TypeVar("T")
C = TypeVar("C")
MAX_RETRIES = 20


@dataclass(eq=False)
class AuditRow:
    """One group-committed audit record: its column values, and (``domains`` not None) a request for the budget
    left of its analyst and those domains, which the writing transaction fills in as ``remaining``."""

    values: dict[str, Any]
    domains: tuple[str, ...] | None = None
    remaining: Remaining | None = None


class SQLLedgerBase(BudgetStore):
    """The plumbing of :class:`~dpgateway.budget_store.sql.SQLBudgetStore`; subclasses provide the dialect hooks."""

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
        self._audit_batch: GroupCommit[AuditRow] = GroupCommit(self._write_audit)
        self._replays = ReplayMap()  # answers the ledger returned (replays.py)
        self._seed: bytes | None = None
        self._run(self._create_schema)
        self.reap_abandoned()

    @abstractmethod
    def reap_abandoned(self) -> int:
        """Mark reservations past their lease ``abandoned`` (``sql.py``); run on every open."""

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

    def _prebuilt_transaction(self, *, write: bool | None, synced: bool = True) -> AbstractContextManager[Executor]:
        """A transaction like :meth:`_transaction` whose work executes only :data:`PREBUILT` statements.

        ``synced=False`` (a reservation): the commit must be visible to every process and survive this process
        dying, but need not survive a power loss before a later synced commit (SQLite: ``synchronous=NORMAL``);
        stores without the distinction commit as usual."""
        return self._transaction(write=write)

    def _reserved(self, charge_id: str) -> None:
        """After a reservation's relaxed commit: begin making it durable while the backend runs (SQLite:
        ``wal_sync.py``); stores without the distinction do nothing."""

    def _reservation_on_disk(self, charge_id: str) -> bool:
        """Whether ``charge_id``'s reservation is known to be on disk, so that its debit may commit relaxed
        (waits for what :meth:`_reserved` began); False: the debit commits fully synced."""
        return False

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

    def _run_prebuilt(self, work: Callable[[Executor], T], *, write: bool | None = True, synced: bool = True) -> T:
        """:meth:`_run` for the hot path: ``work`` executes only :data:`PREBUILT` statements."""
        return self._retrying(lambda: self._prebuilt_transaction(write=write, synced=synced), work)

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
            migrate_from_1(conn)
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

    def _audit_spend(
        self, spend: Spend, outcome: AuditOutcome, message: str, *, remaining: Sequence[str] | None = None
    ) -> Remaining | None:
        """Audit a query that spends nothing (replayed, refused, public); returns once the record is committed.

        Concurrent calls are group-committed (``group_commit.py``): one transaction writes them all.
        ``remaining``: the subject domains whose budget left (and the analyst's) to read in that transaction."""
        row = self._audit_row(spend, outcome, message, remaining)
        self._audit_batch.submit(row)
        if remaining is not None and row.remaining is None:
            raise InternalError("the audit batch returned no budget left; this is a bug")
        return row.remaining

    @staticmethod
    def _audit_row(spend: Spend, outcome: AuditOutcome, message: str, remaining: Sequence[str] | None) -> AuditRow:
        return AuditRow(
            {
                "analyst": spend.analyst,
                "sql": spend.sql,
                "rewritten_sha256": spend.rewritten_sha256,
                "epsilon": spend.epsilon,
                "delta": spend.delta,
                "outcome": outcome,
                "message": message,
                "query_key": spend.query_key,
                "charge_id": None,
            },
            None if remaining is None else tuple(remaining),
        )

    def audit_replays(self, spends: Sequence[Spend]) -> list[Remaining]:
        """All the replays' records in one transaction (as one group-committed batch is written)."""
        rows = [self._audit_row(spend, "replayed", "", spend.domains) for spend in spends]
        self._write_audit(rows)
        if any(row.remaining is None for row in rows):
            raise InternalError("the audit batch returned no budget left; this is a bug")
        return [row.remaining for row in rows if row.remaining is not None]

    def _write_audit(self, rows: Sequence[AuditRow]) -> None:
        """Insert audit ``rows`` in one transaction, in order, stamped with its ledger time; then read, in the
        same transaction, the budget left of every row that asks for it (one statement for all of them)."""

        def work(conn: Executor) -> None:
            at = self._now(conn)
            conn.execute(INSERT_AUDIT, [{**row.values, "at": at} for row in rows])
            asking = [row for row in rows if row.domains is not None]
            if not asking:
                return
            scopes = {scope_name("analyst", row.values["analyst"]) for row in asking}
            scopes.update(scope_name("domain", d) for row in asking for d in row.domains or ())
            usages = self._usages(conn, sorted(scopes), at)
            for row in asking:
                row.remaining = Remaining(
                    analyst=usages[scope_name("analyst", row.values["analyst"])],
                    domains={d: usages[scope_name("domain", d)] for d in row.domains or ()},
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
