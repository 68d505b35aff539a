"""One authenticated session: the simple and extended query protocols over a :class:`~dpgateway.Gateway`.

Sans-I/O like the codec: :meth:`Session.handle` takes one frontend message and returns the backend messages
to send. It may block (a DP query), so the server calls it from a worker thread; one session handles one
message at a time.

DP over the wire: the analyst is the authenticated user, never a name the client types; ``SET dp.epsilon`` and
``SET dp.delta`` set the session's defaults; ``SHOW dp.budget`` is the remaining epsilon of the tightest cap;
``EXPLAIN`` plans and spends nothing; Describe plans and spends nothing (the query runs at the first Execute,
once per portal). Transactions are bookkeeping only: a ROLLBACK restores session settings but never returns
budget, because a released answer cannot be taken back.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlglot import exp

from dpgateway import __version__
from dpgateway.errors import DPGatewayError, InvalidParameterError, UnsupportedError
from dpgateway.gateway import Gateway
from dpgateway.server import admin
from dpgateway.server import pgtypes as t
from dpgateway.server import protocol as p
from dpgateway.server import statements as st
from dpgateway.server.protocol import Field
from dpgateway.server.shadow import ShadowCluster, ShadowConnection, ShadowError

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
SHADOW_WORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "("})
LOCAL_SHOW = frozenset({"dp.budget", "dp.audit", *DP_SETTINGS, "transaction isolation level"})


@dataclass
class Prepared:
    sql: str
    statement: st.Statement
    tree: exp.Expr | None
    param_types: tuple[int, ...]
    shadow: bool = False  # parsed by the shadow catalog, which answers Bind/Describe/Execute/Close for it


@dataclass
class Portal:
    prepared: Prepared
    sql: str
    result_formats: tuple[int, ...]
    outcome: Outcome | None = None
    sent: int = 0


@dataclass
class Outcome:
    """What one statement produced: a row set (``fields`` not None) or a command tag, plus notices."""

    tag: str
    fields: list[Field] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)
    empty: bool = False
    relayed: list[bytes] | None = None  # the shadow catalog's messages, sent as they are


class Session:
    """State of one client connection after authentication."""

    def __init__(
        self,
        gateway: Gateway,
        user: str,
        *,
        is_admin: bool = False,
        client: dict[str, str] | None = None,
        shadow: ShadowCluster | None = None,
    ):
        self.gateway = gateway
        self.database = (client or {}).get("database", user)
        self.shadow = shadow
        self._conn: ShadowConnection | None = None
        self.user = user
        self.is_admin = is_admin
        self.status = "I"
        self.settings = {name: default for name, (_, default, _) in SETTINGS.items()}
        self.settings.update({"is_superuser": "on" if is_admin else "off", "session_authorization": user})
        self.dp: dict[str, float] = {}
        self._snapshot: tuple[dict[str, str], dict[str, float]] | None = None
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.skipping = False
        self.cancel = threading.Event()
        for key, value in (client or {}).items():
            if key.lower() in SETTINGS and key.lower() not in READ_ONLY:
                try:
                    self._set(key.lower(), value)
                except DPGatewayError:
                    continue  # PostgreSQL also ignores a bad start-up option value with a warning

    def startup_messages(self) -> list[bytes]:
        """ParameterStatus for every reported setting (as PostgreSQL sends them after AuthenticationOk)."""
        reported = [(SETTINGS[n][0], v) for n, v in self.settings.items() if n in SETTINGS and SETTINGS[n][2]]
        reported += [("is_superuser", self.settings["is_superuser"]), ("session_authorization", self.user)]
        return [p.parameter_status(name, value) for name, value in sorted(reported)]

    # ---- messages ---------------------------------------------------------------------------------------

    def handle(self, message: p.Message) -> list[bytes]:
        """Answer one frontend message; raises :class:`~dpgateway.server.protocol.ProtocolViolation` for a
        message that ends the connection."""
        kind = message.type
        if kind == b"S":
            self.skipping = False
            if self._conn is not None:
                self._conn.sync()
            self.portals.pop("", None)
            return [p.ready_for_query(self.status)]
        if kind == b"H" or (self.skipping and kind != b"Q"):
            return []
        try:
            if kind == b"Q":
                return self._simple(p.parse_query(message.body))
            handler = self._EXTENDED.get(kind)
            if handler is None:
                if kind in (b"d", b"c", b"f"):
                    return []  # COPY messages outside COPY are ignored, as PostgreSQL does
                if kind == b"F":
                    raise UnsupportedError("function calls (FunctionCall message) are not supported")
                raise p.ProtocolViolation(f"invalid frontend message type {kind!r}")
            return handler(self, message.body)
        except DPGatewayError as exc:
            self._fail()
            self.skipping = True
            return [_error(exc)]
        finally:
            self.cancel.clear()

    def _simple(self, sql: str) -> list[bytes]:
        out: list[bytes] = []
        try:
            statements = st.split(sql)
            for statement in statements:
                outcome = self._run(statement, statement.text)
                out.extend(outcome.notices)
                if outcome.relayed is not None:
                    out.extend(outcome.relayed)
                    continue
                if outcome.empty:
                    out.append(p.EMPTY_QUERY)
                    continue
                if outcome.fields is not None:
                    out.append(p.row_description(outcome.fields))
                    out.extend(_data_rows(outcome.fields, outcome.rows, (0,) * len(outcome.fields)))
                out.append(p.command_complete(outcome.tag))
        except DPGatewayError as exc:
            self._fail()
            out.append(_error(exc))
        out.append(p.ready_for_query(self.status))
        return out

    def _parse(self, body: bytes) -> list[bytes]:
        message = p.parse_parse(body)
        if message.statement and message.statement in self.statements:
            raise SessionError("42P05", f'prepared statement "{message.statement}" already exists')
        statements = [s for s in st.split(message.query) if not s.is_empty] or [st.Statement("", "")]
        if len(statements) > 1:
            raise SessionError("42601", "cannot insert multiple commands into a prepared statement")
        statement = statements[0]
        self._check_not_failed(statement)
        if self._to_shadow(statement):
            answer = self._shadow().extended(b"P", body)
            self.statements[message.statement] = Prepared(statement.text, statement, None, (), shadow=True)
            return answer
        tree = None
        if statement.keyword not in st.TRANSACTION_WORDS | st.SESSION_WORDS and not statement.is_empty:
            tree = st.parse_statement(statement.text)
        types = st.parameter_types(tree, message.param_types, self.gateway.config) if tree is not None else ()
        self.statements[message.statement] = Prepared(statement.text, statement, tree, types)
        return [p.PARSE_COMPLETE]

    def _bind(self, body: bytes) -> list[bytes]:
        message = p.parse_bind(body)
        prepared = self._statement(message.statement)
        self._check_not_failed(prepared.statement)
        if prepared.shadow:
            if message.portal and message.portal in self.portals:
                raise SessionError("42P03", f'cursor "{message.portal}" already exists')
            answer = self._shadow().extended(b"B", body)
            self.portals[message.portal] = Portal(prepared, prepared.sql, message.result_formats)
            return answer
        if message.portal and message.portal in self.portals:
            raise SessionError("42P03", f'cursor "{message.portal}" already exists')
        if len(message.params) != len(prepared.param_types):
            raise SessionError(
                "08P01",
                f"bind message supplies {len(message.params)} parameters, but prepared statement "
                f'"{message.statement}" requires {len(prepared.param_types)}',
            )
        formats = p.formats_for(message.param_formats, len(message.params), "parameter")
        values = [
            None if data is None else t.decode_parameter(data, oid, fmt)
            for data, oid, fmt in zip(message.params, prepared.param_types, formats, strict=True)
        ]
        sql = st.bind_parameters(prepared.tree, values) if prepared.tree is not None and values else prepared.sql
        self.portals[message.portal] = Portal(prepared, sql, message.result_formats)
        return [p.BIND_COMPLETE]

    def _describe(self, body: bytes) -> list[bytes]:
        message = p.parse_describe(body)
        shadow = (self._statement(message.name) if message.kind == "S" else self._portal(message.name).prepared).shadow
        if shadow:
            return self._shadow().extended(b"D", body)
        if message.kind == "S":
            prepared = self._statement(message.name)
            fields = self._shape(prepared, None)
            described = [p.parameter_description(prepared.param_types)]
            return [*described, p.row_description(fields) if fields is not None else p.NO_DATA]
        portal = self._portal(message.name)
        fields = portal.outcome.fields if portal.outcome is not None else self._shape(portal.prepared, portal.sql)
        if fields is None:
            return [p.NO_DATA]
        formats = p.formats_for(portal.result_formats, len(fields), "result")
        return [p.row_description([_with_format(f, fmt) for f, fmt in zip(fields, formats, strict=True)])]

    def _execute(self, body: bytes) -> list[bytes]:
        message = p.parse_execute(body)
        portal = self._portal(message.portal)
        if portal.prepared.shadow:
            self._check_not_failed(portal.prepared.statement)
            return self._shadow().extended(b"E", body)
        out: list[bytes] = []
        if portal.outcome is None:
            self._check_not_failed(portal.prepared.statement)
            portal.outcome = self._run(portal.prepared.statement, portal.sql)
            out.extend(portal.outcome.notices)
        outcome = portal.outcome
        if outcome.empty:
            return [*out, p.EMPTY_QUERY]
        if outcome.fields is None:
            return [*out, p.command_complete(outcome.tag)]
        formats = p.formats_for(portal.result_formats, len(outcome.fields), "result")
        end = len(outcome.rows) if message.max_rows <= 0 else min(len(outcome.rows), portal.sent + message.max_rows)
        out.extend(_data_rows(outcome.fields, outcome.rows[portal.sent : end], formats))
        count, portal.sent = end - portal.sent, end
        if end < len(outcome.rows):
            return [*out, p.PORTAL_SUSPENDED]
        return [*out, p.command_complete(f"SELECT {count}")]

    def _close(self, body: bytes) -> list[bytes]:
        message = p.parse_close(body)
        named = self.statements.get(message.name) if message.kind == "S" else self.portals.get(message.name)
        if named is not None and (named.shadow if isinstance(named, Prepared) else named.prepared.shadow):
            self._shadow().extended(b"C", body)
        (self.statements if message.kind == "S" else self.portals).pop(message.name, None)  # type: ignore[attr-defined]
        return [p.CLOSE_COMPLETE]

    _EXTENDED: ClassVar[dict[bytes, Callable[[Session, bytes], list[bytes]]]] = {
        b"P": _parse,
        b"B": _bind,
        b"D": _describe,
        b"E": _execute,
        b"C": _close,
    }

    # ---- statements ---------------------------------------------------------------------------------------

    def _run(self, statement: st.Statement, sql: str) -> Outcome:
        if statement.is_empty:
            return Outcome("", empty=True)
        self._check_not_failed(statement)
        if self.cancel.is_set():
            raise SessionError("57014", "canceling statement due to user request")
        word = statement.keyword
        builtin = self._builtin(sql) if word == "SELECT" else None
        if builtin is not None:
            rows = builtin[1]()
            return Outcome(f"SELECT {len(rows)}", builtin[0], rows)
        if self._to_shadow(statement):
            return Outcome("", relayed=self._shadow().simple(sql))
        if word in st.TRANSACTION_WORDS:
            return self._transaction(word, sql)
        if word in ("SET", "RESET", "SHOW", "DISCARD"):
            return self._session_command(word, sql)
        if word == "EXPLAIN":
            return self._explain(st.explain_target(sql))
        return self._query(sql)

    def _query(self, sql: str) -> Outcome:
        result = self.gateway.query(sql, analyst=self.user, epsilon=self._eps(), delta=self._delta())
        explanation = self.gateway.explain(sql, analyst=self.user, epsilon=self._eps(), delta=self._delta())
        fields = st.result_fields(sql, explanation.plan, self.gateway.config)
        if len(fields) != len(result.columns):  # a shape the static typing did not foresee: type by value
            fields = [_field_of(name, [row[i] for row in result.rows]) for i, name in enumerate(result.columns)]
        notices = []
        plan = explanation.plan
        if plan is not None and not plan.passthrough:
            notices.append(
                _spend_notice(result.epsilon, result.delta, result.remaining, result.replayed, explanation.accuracy)
            )
        return Outcome(f"SELECT {len(result.rows)}", fields, result.rows, notices)

    def _explain(self, sql: str) -> Outcome:
        e = self.gateway.explain(sql, analyst=self.user, epsilon=self._eps(), delta=self._delta())
        lines = [f"epsilon: {e.epsilon:g}", f"delta: {e.delta:g}"]
        for m in e.mechanisms:
            threshold = f", threshold {m.threshold}" if m.threshold is not None else ""
            lines.append(
                f"mechanism {m.measurement}: {m.mechanism}, epsilon {m.epsilon:g}, sensitivity {m.sensitivity:g}, "
                f"noise scale {m.noise_scale:g}{threshold}"
            )
        lines += [f"accuracy (95%) {name}: {value}" for name, value in e.accuracy.items()]
        lines += [f"note: {note}" for note in e.notes]  # no bounded SQL: it names server files and hosts
        return Outcome("EXPLAIN", [Field("QUERY PLAN", t.TEXT.oid, t.TEXT.length)], [[line] for line in lines])

    def _shape(self, prepared: Prepared, sql: str | None) -> list[Field] | None:
        """The row shape of a statement without running it (Describe): planning only, nothing spent."""
        word = prepared.statement.keyword
        if word == "SHOW":
            name = st.parse_show(prepared.sql)
            return admin.AUDIT_FIELDS if name == "dp.audit" else [_show_field(name)]
        builtin = self._builtin(prepared.sql) if word == "SELECT" else None
        if builtin is not None:
            return builtin[0]
        if word == "EXPLAIN":
            return [Field("QUERY PLAN", t.TEXT.oid, t.TEXT.length)]
        if prepared.tree is None or not isinstance(prepared.tree, exp.Query):
            return None
        if sql is None:
            placeholders = [_placeholder(oid) for oid in prepared.param_types]
            sql = st.bind_parameters(prepared.tree, placeholders) if placeholders else prepared.sql
        explanation = self.gateway.explain(sql, analyst=self.user, epsilon=self._eps(), delta=self._delta())
        return st.result_fields(sql, explanation.plan, self.gateway.config)

    def _transaction(self, word: str, sql: str) -> Outcome:
        notices: list[bytes] = []
        rollback_to = word == "ROLLBACK" and " TO " in f" {sql.upper()} "
        if word in ("BEGIN", "START"):
            if self.status != "I":
                notices.append(_warning("25001", "there is already a transaction in progress"))
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
            notices.append(_warning("25P01", "there is no transaction in progress"))
        if (word in ("ROLLBACK", "ABORT") or failed) and self._snapshot is not None:
            self.settings, self.dp = self._snapshot
        self._snapshot = None
        self.status = "I"
        return Outcome("COMMIT" if word in ("COMMIT", "END") and not failed else "ROLLBACK", notices=notices)

    def _session_command(self, word: str, sql: str) -> Outcome:
        if word == "SHOW":
            name = st.parse_show(sql)
            if name == "dp.audit":
                return Outcome("SHOW", admin.AUDIT_FIELDS, admin.audit(self.gateway, self.user, self.is_admin))
            return Outcome("SHOW", [_show_field(name)], [[self._show(name)]])
        if word == "DISCARD":
            if self._conn is not None:
                self._conn.simple("DISCARD ALL")
            self.statements.clear()
            self.portals.clear()
            self.dp.clear()
            return Outcome("DISCARD ALL")
        if word == "RESET":
            name = st.parse_reset(sql)
            if name == "all":
                self.dp.clear()
                self.settings.update({n: d for n, (_, d, _) in SETTINGS.items() if n not in READ_ONLY})
            else:
                self._set(name, "DEFAULT")
            return Outcome("RESET")
        command = st.parse_set(sql)
        notices = self._set(command.name, command.value)
        return Outcome("SET", notices=notices)

    def _set(self, name: str, value: str) -> list[bytes]:
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

    def _show(self, name: str) -> str:
        if name == "dp.budget":
            remaining = self.gateway.remaining(self.user)
            return f"{_tightest(remaining):g}"
        if name in DP_SETTINGS:
            return f"{self._eps() if name == 'dp.epsilon' else self._delta():g}"
        if name == "transaction isolation level":
            return "read committed"
        if name in self.settings:
            return self.settings[name]
        raise SessionError("42704", f'unrecognized configuration parameter "{name}"')

    # ---- the shadow catalog -------------------------------------------------------------------------------

    def _to_shadow(self, statement: st.Statement) -> bool:
        """Whether the shadow catalog answers this statement: a query (or an unknown SHOW) that names no
        policy table. A statement naming one always takes the DP path (statements.names_policy_table)."""
        if self.shadow is None or statement.is_empty:
            return False
        if statement.keyword == "SHOW":
            name = st.parse_show(statement.text)
            return name not in LOCAL_SHOW and name not in self.settings and name != "all"
        return (
            statement.keyword in SHADOW_WORDS
            and not st.names_policy_table(statement.text, self.gateway.config)
            and self._builtin(statement.text) is None
        )

    def _builtin(self, sql: str) -> tuple[list[Field], Callable[[], list[list[Any]]]] | None:
        """Statements the session answers itself: admin functions and session functions (who logged in,
        this database, this version); their row shape and how to compute their rows."""
        called = admin.call(sql)
        if called is not None:
            function, args = called
            text = Field(function, t.TEXT.oid, t.TEXT.length)
            return [text], lambda: [[admin.run(self.gateway, self.user, self.is_admin, function, args)]]
        functions = st.session_functions(sql)
        if functions is None:
            return None
        values = {
            "user": self.user,
            "schema": "public",
            "database": self.database,
            "version": f"PostgreSQL {SERVER_VERSION} (dpgateway {__version__})",
        }
        fields = [Field(name, t.TEXT.oid, t.TEXT.length) for name, _ in functions]
        return fields, lambda: [[values[what] for _, what in functions]]

    def _shadow(self) -> ShadowConnection:
        """This session's shadow connection, opened on first use (idle sessions hold none)."""
        assert self.shadow is not None
        if self._conn is None or self._conn.broken:
            self._conn = self.shadow.connect()
        return self._conn

    def cancel_shadow(self) -> None:
        """Forward a CancelRequest to the shadow statement running now, if any."""
        if self._conn is not None:
            self._conn.cancel()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- helpers ------------------------------------------------------------------------------------------

    def _eps(self) -> float:
        return self.dp.get("dp.epsilon", self.gateway.config.budget.default_query_epsilon)

    def _delta(self) -> float:
        return self.dp.get("dp.delta", self.gateway.config.budget.default_query_delta)

    def _check_not_failed(self, statement: st.Statement) -> None:
        if self.status == "E" and statement.keyword not in END_WORDS:
            raise SessionError(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )

    def _fail(self) -> None:
        if self.status == "T":
            self.status = "E"

    def _statement(self, name: str) -> Prepared:
        if name not in self.statements:
            raise SessionError("26000", f'prepared statement "{name}" does not exist')
        return self.statements[name]

    def _portal(self, name: str) -> Portal:
        if name not in self.portals:
            raise SessionError("34000", f'portal "{name}" does not exist')
        return self.portals[name]


def _error(exc: DPGatewayError) -> bytes:
    if isinstance(exc, ShadowError):
        return b"".join([*exc.before, exc.raw])
    return p.error_response(exc.sqlstate, exc.message)


def _warning(sqlstate: str, text: str) -> bytes:
    return p.Notice("WARNING", sqlstate, text).encode()


def _with_format(f: Field, fmt: int) -> Field:
    if not t.result_format_ok(f.type_oid, fmt):
        raise UnsupportedError(f"binary format is not supported for result column {f.name!r} of type {f.type_oid}")
    return Field(f.name, f.type_oid, f.type_len, f.type_mod, fmt)


def _data_rows(fields: list[Field], rows: list[list[Any]], formats: tuple[int, ...]) -> list[bytes]:
    for f, fmt in zip(fields, formats, strict=True):
        _with_format(f, fmt)
    return [
        p.data_row([t.encode_value(v, f.type_oid, fmt) for v, f, fmt in zip(row, fields, formats, strict=True)])
        for row in rows
    ]


def _field_of(name: str, values: list[Any]) -> Field:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        pg = t.BOOL
    elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        pg = t.INT8
    elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        pg = t.FLOAT8
    else:
        pg = t.TEXT
    return Field(name, pg.oid, pg.length)


def _show_field(name: str) -> Field:
    if name == "dp.budget":
        return Field(name, t.NUMERIC.oid, t.NUMERIC.length)
    return Field(name.replace(" ", "_"), t.TEXT.oid, t.TEXT.length)


def _placeholder(oid: int) -> Any:
    """A stand-in value of a parameter's type, for planning a statement that has no values yet."""
    if oid in t.INTEGERS:
        return 1
    if oid in (t.FLOAT4.oid, t.FLOAT8.oid, t.NUMERIC.oid):
        return 1.0
    if oid == t.BOOL.oid:
        return True
    return ""


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


def _tightest(remaining: dict[str, Any]) -> float:
    caps = [remaining["analyst"]["epsilon"], *(d["epsilon"] for d in remaining.get("domains", {}).values())]
    return float(min(caps))


def _spend_notice(
    epsilon: float, delta: float, remaining: dict[str, Any], replayed: bool, accuracy: dict[str, str]
) -> bytes:
    spent = "replayed an earlier answer: nothing spent" if replayed else f"spent epsilon {epsilon:g}, delta {delta:g}"
    detail = "; ".join(f"{name} {value}" for name, value in accuracy.items())
    text = f"dp: {spent}; remaining epsilon {_tightest(remaining):g} (tightest cap)"
    return p.notice_response(text, detail=f"95% accuracy: {detail}" if detail else "")
