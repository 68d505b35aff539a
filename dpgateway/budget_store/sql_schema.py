"""The ledger's tables and the hot path's prebuilt statements (``sql.py`` runs them; proof notes there)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ClauseElement

from dpgateway.budget_store.ledger_time import database_now

SCHEMA_VERSION = "2"  # 2: dp_charge_scopes carries the charge amounts (migrated from 1 on open)
DEFAULT_LEASE_SECONDS = 15 * 60.0
RELATIVE_TOLERANCE = 1e-12
"""Caps are compared with this relative slack so that float sums such as 10 x 0.1 fit a cap of 1.0."""

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
CACHED_ANSWER = {  # the first answer released under the key: it never changes afterwards (replays.py)
    "analyst": sa.select(answers.c.answer)
    .where(answers.c.query_key == sa.bindparam("query_key"), answers.c.analyst == sa.bindparam("analyst"))
    .order_by(answers.c.at, answers.c.charge_id)
    .limit(1),
    "global": sa.select(answers.c.answer)
    .where(answers.c.query_key == sa.bindparam("query_key"))
    .order_by(answers.c.at, answers.c.charge_id)
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


def migrate_from_1(conn: Connection) -> None:
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
