"""Ledger time: charges are stamped and windowed by the ledger database's clock, not each process's.

Proof note (clock skew). With a shared ledger every writer stamps its charges with one clock, the
database's, read inside the reserve or commit transaction (PostgreSQL: the server's
``clock_timestamp()``; SQLite has no server, so its ``julianday('now')`` is the clock of the host
running the process). On top of that, a stamp is never earlier than the latest stamp of any scope the
charge counts against (:func:`stamp`); those scopes are locked by the transaction, so per scope the
stamps are non-decreasing in the order the transactions commit. That order is all the no-overspend
proof in ``sql.py`` needs: a reservation's check counts every charge of its scopes that counts at any
later stamp, because a charge reserved earlier was stamped no later, and a commit stamped after it is
stamped no earlier (the commit's stamp is at least every stamp of its scopes, its own reservation's
included). So a writer whose clock lags can neither backdate a charge out of the window nor see
others' charges as expired early; a database clock stepped back (NTP) cannot either. A clock that
jumps ahead only makes the scope's later charges count longer (fail closed).

A reservation is also refused, nothing charged, when this host's clock and the database's differ by
more than :data:`MAX_CLOCK_SKEW_SECONDS` (:class:`ClockSkewError`): the ledger does not depend on the
local clock, but a host that far off is misconfigured (its admin commands' ``--since`` and the
gateway's other times would be wrong), and with PostgreSQL it may be talking to a server whose clock
is the wrong one. A commit is not refused for skew: its query may have touched the data, and its
stamp is the database's anyway.

Tests: ``tests/ledger/test_time.py`` (two writers with skewed clocks on one PostgreSQL ledger, a
clock stepped back, the refusal).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from dpgateway.errors import BackendError

MAX_CLOCK_SKEW_SECONDS = 300.0
"""A reservation is refused when this host's clock and the ledger database's differ by more than this."""


class ClockSkewError(BackendError):
    """This host's clock is too far from the ledger database's (SQLSTATE 58000, a :class:`BackendError`)."""


class database_now(FunctionElement[float]):  # a SQL function, lower case like sa.func.*
    """The ledger database's clock as unix seconds (a double)."""

    type = sa.Double()
    name = "database_now"
    inherit_cache = True


@compiles(database_now, "postgresql")
def _postgres_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    # clock_timestamp(), not now(): the time when read (after the scope locks), not when the transaction began
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(database_now, "sqlite")
def _sqlite_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    # julianday('now') has millisecond precision (unixepoch('subsec') needs SQLite 3.42)
    return "((julianday('now') - 2440587.5) * 86400.0)"


def stamp(now: float, latest: float | None) -> float:
    """A charge's stamp: the database's ``now``, but never before ``latest``, the latest stamp of its scopes."""
    return now if latest is None or latest <= now else float(latest)


def check_skew(local: float, database: float) -> None:
    """Refuse when the local clock and the database's differ by more than :data:`MAX_CLOCK_SKEW_SECONDS`."""
    if abs(local - database) > MAX_CLOCK_SKEW_SECONDS:
        raise ClockSkewError(
            f"This host's clock is {abs(local - database):.0f} s {'ahead of' if local > database else 'behind'} "
            f"the ledger database's, more than the {MAX_CLOCK_SKEW_SECONDS:.0f} s the ledger allows; nothing was "
            f"charged. Synchronize this host's clock (NTP) with the database server's, then run the query again"
        )
