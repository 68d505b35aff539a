"""What a session keeps between statements: settings, DP parameters and transaction status.

``SET``/``RESET``/``SHOW`` and BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are answered here, without a backend.
Transactions are bookkeeping only: a ROLLBACK restores the session's settings but never returns budget,
because a released answer cannot be taken back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dpgateway import __version__
from dpgateway.budget_store.base import Spend
from dpgateway.errors import DPGatewayError, InvalidParameterError
from dpgateway.server import pgtypes as t
from dpgateway.server import protocol as p
from dpgateway.server.protocol import Field

SERVER_VERSION = "15.0"
END_WORDS = frozenset({"ROLLBACK", "ABORT", "COMMIT", "END"})


class SessionError(DPGatewayError):
    """A protocol-level error with its own SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# name (lower case) -> (reported name, default, sent as ParameterStatus)
SETTINGS: dict[str, tuple[str, str, bool]] = {
    "application_name": ("application_name", "", True),
    "client_encoding": ("client_encoding", "UTF8", True),
    "datestyle": ("DateStyle", "ISO, MDY", True),
    "default_transaction_read_only": ("default_transaction_read_only", "off", True),
    "in_hot_standby": ("in_hot_standby", "off", True),
    "integer_datetimes": ("integer_datetimes", "on", True),
    "intervalstyle": ("IntervalStyle", "postgres", True),
    "server_encoding": ("server_encoding", "UTF8", True),
    "server_version": ("server_version", f"{SERVER_VERSION} (dpgateway {__version__})", True),
    "standard_conforming_strings": ("standard_conforming_strings", "on", True),
    "timezone": ("TimeZone", "UTC", True),
    "extra_float_digits": ("extra_float_digits", "1", False),
    "search_path": ("search_path", '"$user", public', False),
    "statement_timeout": ("statement_timeout", "0", False),
    "lock_timeout": ("lock_timeout", "0", False),
    "idle_in_transaction_session_timeout": ("idle_in_transaction_session_timeout", "0", False),
    "client_min_messages": ("client_min_messages", "notice", False),
    "bytea_output": ("bytea_output", "hex", False),
    "default_transaction_isolation": ("default_transaction_isolation", "read committed", False),
    "transaction_isolation": ("transaction_isolation", "read committed", False),
    "max_identifier_length": ("max_identifier_length", "63", False),
}
READ_ONLY = frozenset(
    {"server_version", "server_encoding", "integer_datetimes", "in_hot_standby", "max_identifier_length"}
)
DP_SETTINGS = ("dp.epsilon", "dp.delta")


@dataclass
class Outcome:
    """What one statement produced: a row set (``fields`` not None) or a command tag, plus notices."""

    tag: str
    fields: list[Field] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)
    empty: bool = False
    relayed: list[bytes] | None = None  # the shadow catalog's messages, sent as they are
    replay: tuple[Spend, dict[str, str]] | None = None  # a replayed DP answer: its audit spend and accuracy


class SessionState:
    """Settings, DP parameters (``dp.epsilon``/``dp.delta``) and transaction status (``I``, ``T``, ``E``)."""

    def __init__(self, user: str, *, is_admin: bool, client: dict[str, str], defaults: tuple[float, float]) -> None:
        self.user = user
        self.status = "I"
        self.settings = {name: default for name, (_, default, _) in SETTINGS.items()}
        self.settings.update({"is_superuser": "on" if is_admin else "off", "session_authorization": user})
        self.dp: dict[str, float] = {}
        self._defaults = defaults
        self._snapshot: tuple[dict[str, str], dict[str, float]] | None = None
        for key, value in client.items():
            if key.lower() in SETTINGS and key.lower() not in READ_ONLY:
                try:
                    self.set(key.lower(), value)
                except DPGatewayError:
                    continue  # PostgreSQL also ignores a bad start-up option value with a warning

    def startup_messages(self) -> list[bytes]:
        """ParameterStatus for every reported setting (as PostgreSQL sends them after AuthenticationOk)."""
        reported = [(SETTINGS[n][0], v) for n, v in self.settings.items() if n in SETTINGS and SETTINGS[n][2]]
        reported += [("is_superuser", self.settings["is_superuser"]), ("session_authorization", self.user)]
        return [p.parameter_status(name, value) for name, value in sorted(reported)]

    @property
    def epsilon(self) -> float:
        return self.dp.get("dp.epsilon", self._defaults[0])

    @property
    def delta(self) -> float:
        return self.dp.get("dp.delta", self._defaults[1])

    # ---- transactions -----------------------------------------------------------------------------------

    def check_not_failed(self, keyword: str) -> None:
        if self.status == "E" and keyword not in END_WORDS:
            raise SessionError(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )

    def fail(self) -> None:
        if self.status == "T":
            self.status = "E"

    def transaction(self, word: str, sql: str) -> Outcome:
        notices: list[bytes] = []
        rollback_to = word == "ROLLBACK" and " TO " in f" {sql.upper()} "
        if word in ("BEGIN", "START"):
            if self.status != "I":
                notices.append(warning("25001", "there is already a transaction in progress"))
            else:
                self._snapshot = (dict(self.settings), dict(self.dp))
            self.status = "T"
            return Outcome("BEGIN" if word == "BEGIN" else "START TRANSACTION", notices=notices)
        if word in ("SAVEPOINT", "RELEASE") or rollback_to:
            if self.status == "I":
                raise SessionError(
                    "25P01",
                    f"{'ROLLBACK TO SAVEPOINT' if rollback_to else word} can only be used in transaction blocks",
                )
            self.status = "T"
            return Outcome("ROLLBACK" if rollback_to else word)
        failed = self.status == "E"
        if self.status == "I":
            notices.append(warning("25P01", "there is no transaction in progress"))
        if (word in ("ROLLBACK", "ABORT") or failed) and self._snapshot is not None:
            self.settings, self.dp = self._snapshot
        self._snapshot = None
        self.status = "I"
        return Outcome("COMMIT" if word in ("COMMIT", "END") and not failed else "ROLLBACK", notices=notices)

    # ---- settings -----------------------------------------------------------------------------------------

    def reset(self, name: str) -> None:
        if name == "all":
            self.dp.clear()
            self.settings.update({n: d for n, (_, d, _) in SETTINGS.items() if n not in READ_ONLY})
        else:
            self.set(name, "DEFAULT")

    def set(self, name: str, value: str) -> list[bytes]:
        """Change a setting; the ParameterStatus to send, if it is reported."""
        default = value.upper() == "DEFAULT"
        if name in DP_SETTINGS:
            if default:
                self.dp.pop(name, None)
            else:
                self.dp[name] = _dp_value(name, value)
            return []
        if name not in SETTINGS:
            if "." in name:  # a custom setting, as PostgreSQL allows
                self.settings[name] = value
                return []
            raise SessionError("42704", f'unrecognized configuration parameter "{name}"')
        if name in READ_ONLY:
            raise SessionError("55P02", f'parameter "{name}" cannot be changed')
        reported, fallback, report = SETTINGS[name]
        value = fallback if default else value
        if name == "client_encoding" and value.upper().replace("-", "") not in ("UTF8", "UNICODE"):
            raise InvalidParameterError(f'client_encoding "{value}" is not supported: the server speaks UTF8 only')
        if name == "client_encoding":
            value = "UTF8"
        if name == "datestyle" and not value.upper().startswith("ISO"):
            raise InvalidParameterError(f'DateStyle "{value}" is not supported: only ISO date styles are')
        self.settings[name] = value
        return [p.parameter_status(reported, value)] if report else []

    def show(self, name: str) -> str:
        """The value of a setting (``dp.budget`` is answered by the session, which knows the ledger)."""
        if name in DP_SETTINGS:
            return f"{self.epsilon if name == 'dp.epsilon' else self.delta:g}"
        if name == "transaction isolation level":
            return "read committed"
        if name in self.settings:
            return self.settings[name]
        raise SessionError("42704", f'unrecognized configuration parameter "{name}"')


def warning(sqlstate: str, text: str) -> bytes:
    return p.Notice("WARNING", sqlstate, text).encode()


_SHOW_NAMES = {"transaction isolation level": "transaction_isolation", "time zone": "TimeZone"}


def show_field(name: str) -> Field:
    """The column of ``SHOW name``: named as PostgreSQL names it (the setting's own spelling)."""
    if name == "dp.budget":
        return Field(name, t.NUMERIC.oid, t.NUMERIC.length)
    column = SETTINGS[name][0] if name in SETTINGS else _SHOW_NAMES.get(name, name)
    return Field(column, t.TEXT.oid, t.TEXT.length)


def tightest(remaining: dict[str, Any]) -> float:
    """The remaining epsilon of the tightest cap (the analyst's or a subject domain's)."""
    caps = [remaining["analyst"]["epsilon"], *(d["epsilon"] for d in remaining.get("domains", {}).values())]
    return float(min(caps))


def _dp_value(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if name == "dp.epsilon" and not (number > 0 and math.isfinite(number)):
        raise InvalidParameterError(f"dp.epsilon must be a positive finite number, not {value!r}")
    if name == "dp.delta" and not 0 <= number < 1:
        raise InvalidParameterError(f"dp.delta must be a number in [0, 1), not {value!r}")
    return number
