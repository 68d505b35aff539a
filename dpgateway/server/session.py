"""One authenticated session: the simple and extended query protocols over a :class:`~dpgateway.Gateway`.

Sans-I/O like the codec: :meth:`Session.handle` takes one frontend message and returns the backend messages
to send. It may block (a DP query), so the server calls it from a worker thread when :meth:`Session.may_block`
says so; :meth:`Session.now` answers from memory on the event loop (memory.py). One session handles one
message at a time.

DP over the wire: the analyst is the authenticated user, never a name the client types; ``SET dp.epsilon`` and
``SET dp.delta`` set the session's defaults; ``SHOW dp.budget`` is the remaining epsilon of the tightest cap;
``EXPLAIN`` plans and spends nothing; Describe plans and spends nothing (the query runs at the first Execute,
once per portal). Settings, DP parameters and transaction status live in :mod:`~dpgateway.server.state`.
A CancelRequest (:meth:`Session.interrupt`) interrupts the statement being handled (docs/server.md, "Cancel").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlglot import exp

from dpgateway import __version__
from dpgateway.budget_store.base import Remaining
from dpgateway.errors import DPGatewayError, UnsupportedError
from dpgateway.gateway import Gateway
from dpgateway.server import admin
from dpgateway.server import pgtypes as t
from dpgateway.server import protocol as p
from dpgateway.server import statements as st
from dpgateway.server.literals import MAX_LENGTH, literal_select
from dpgateway.server.memory import MAX_REPLAY_BYTES, Memory, Replay
from dpgateway.server.protocol import Field
from dpgateway.server.shadow import ShadowCluster, ShadowConnection, ShadowError
from dpgateway.server.state import (
    DP_SETTINGS,
    SERVER_VERSION,
    Outcome,
    SessionError,
    SessionState,
    show_field,
    tightest,
)

SHADOW_WORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "("})
LOCAL_SHOW = frozenset({"dp.budget", "dp.audit", *DP_SETTINGS, "transaction isolation level"})
CANCELED = "canceling statement due to user request"


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
        memory: Memory | None = None,
    ):
        """``memory``: the server's answers from memory (memory.py); None: every message goes to :meth:`handle`."""
        self.gateway = gateway
        self.memory = memory
        self.database = (client or {}).get("database", user)
        self.shadow = shadow
        self._conn: ShadowConnection | None = None
        self.user = user
        self.is_admin = is_admin
        budget = gateway.config.budget
        self.state = SessionState(
            user,
            is_admin=is_admin,
            client=client or {},
            defaults=(budget.default_query_epsilon, budget.default_query_delta),
        )
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.skipping = False
        self.cancel = threading.Event()  # set by a CancelRequest while a message is being handled
        self._lock = threading.Lock()
        self._thread: int | None = None  # the worker thread handling a message now

    @property
    def status(self) -> str:
        """Transaction status for ReadyForQuery: ``I`` idle, ``T`` in a transaction, ``E`` failed."""
        return self.state.status

    def startup_messages(self) -> list[bytes]:
        return self.state.startup_messages()

    # ---- messages ---------------------------------------------------------------------------------------

    def handle(self, message: p.Message) -> list[bytes]:
        """Answer one frontend message; raises :class:`~dpgateway.server.protocol.ProtocolViolation` for a
        message that ends the connection."""
        with self._lock:
            self._thread = threading.get_ident()
        try:
            return self._handle(message)
        finally:
            with self._lock:
                self._thread = None
                self.cancel.clear()

    # ---- answers from memory (on the event loop) -----------------------------------------------------------

    def now(self, message: p.Message) -> list[bytes] | Replay | None:
        """The answer to ``message`` if it needs no worker thread (memory.py): the messages of a literal-only
        statement, or a :class:`Replay` whose audit record the caller writes before :meth:`replayed`; else
        ``None`` (then call :meth:`handle`). Never blocks and never raises."""
        if message.type != b"Q" or self.memory is None or self.state.status == "E":
            return None
        body = message.body
        known = self.memory.literals.get(body)
        if known is not None:
            return [known, p.ready_for_query(self.state.status)]
        replay = self.memory.replays.get((self.user, body, self.state.epsilon, self.state.delta))
        if replay is not None:
            return replay
        if len(body) > MAX_LENGTH or body.find(b"\x00") != len(body) - 1:
            return None
        try:
            literal = literal_select(body[:-1].decode())
        except UnicodeDecodeError:
            return None
        if literal is None:
            return None
        answer = b"".join(
            [
                p.row_description(literal.fields),
                *_data_rows(literal.fields, [literal.row], (0,) * len(literal.fields)),
                p.command_complete("SELECT 1"),
            ]
        )
        self.memory.literals.put(body, answer)
        return [answer, p.ready_for_query(self.state.status)]

    def may_block(self, message: p.Message) -> bool:
        """Whether :meth:`handle` may block on ``message`` (run it in a worker thread then): a query, a Describe
        (it plans) or an Execute, and whatever goes to the shadow catalog (Parse and Bind when there is one; Close
        of a statement it parsed; Sync after messages sent to it). The rest is answered from the session's state."""
        kind = message.type
        if kind in b"QDE":
            return True
        if self.shadow is None:
            return False
        if kind in b"PB":
            return True
        if kind == b"S":
            return self._conn is not None and self._conn.dirty
        if kind == b"C":
            try:
                close = p.parse_close(message.body)
            except p.ProtocolViolation:
                return False  # handle raises it at once
            named = self.statements.get(close.name) if close.kind == "S" else self.portals.get(close.name)
            return named is not None and (named.shadow if isinstance(named, Prepared) else named.prepared.shadow)
        return False

    def replayed(self, replay: Replay, left: Remaining) -> list[bytes]:
        """The messages of a replay from memory, once its audit record is committed with the budget ``left``."""
        notice = _spend_notice(0.0, 0.0, left.as_dict(), True, replay.accuracy)
        return [notice, replay.answer, p.ready_for_query(self.state.status)]

    def failed(self, exc: DPGatewayError) -> list[bytes]:
        """The messages of a simple query whose audit record could not be written (as :meth:`handle` answers)."""
        self.state.fail()
        return [_error(exc), p.ready_for_query(self.state.status)]

    def interrupt(self) -> None:
        """A CancelRequest: stop the statement running now, if any (a backend query through the connector's
        cancel hook, a shadow statement through the shadow's own cancel); an idle session ignores it, as
        PostgreSQL does. The interrupted statement answers 57014; how its budget is accounted: docs/server.md."""
        with self._lock:
            if self._thread is None:
                return
            self.cancel.set()
            self.gateway.connector.interrupt(self._thread)
        if self._conn is not None:
            self._conn.cancel()

    def _handle(self, message: p.Message) -> list[bytes]:
        kind = message.type
        if kind == b"S":
            self.skipping = False
            if self._conn is not None:
                self._conn.sync()
            self.portals.pop("", None)
            return [p.ready_for_query(self.state.status)]
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
            self.state.fail()
            self.skipping = True
            return [_error(exc)]

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
                first = len(out)
                if outcome.fields is not None:
                    out.append(p.row_description(outcome.fields))
                    out.extend(_data_rows(outcome.fields, outcome.rows, (0,) * len(outcome.fields)))
                out.append(p.command_complete(outcome.tag))
                if outcome.replay is not None and len(statements) == 1 and self.memory is not None:
                    spend, accuracy = outcome.replay
                    answer = b"".join(out[first:])
                    if len(answer) <= MAX_REPLAY_BYTES:
                        key = (self.user, sql.encode() + b"\x00", self.state.epsilon, self.state.delta)
                        self.memory.replays.put(key, Replay(spend, answer, accuracy))
        except DPGatewayError as exc:
            self.state.fail()
            out.append(_error(exc))
        out.append(p.ready_for_query(self.state.status))
        return out

    def _parse(self, body: bytes) -> list[bytes]:
        message = p.parse_parse(body)
        if message.statement and message.statement in self.statements:
            raise SessionError("42P05", f'prepared statement "{message.statement}" already exists')
        statements = [s for s in st.split(message.query) if not s.is_empty] or [st.Statement("", "")]
        if len(statements) > 1:
            raise SessionError("42601", "cannot insert multiple commands into a prepared statement")
        statement = statements[0]
        self.state.check_not_failed(statement.keyword)
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
        self.state.check_not_failed(prepared.statement.keyword)
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
            self.state.check_not_failed(portal.prepared.statement.keyword)
            return self._shadow().extended(b"E", body)
        out: list[bytes] = []
        if portal.outcome is None:
            self.state.check_not_failed(portal.prepared.statement.keyword)
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
        self.state.check_not_failed(statement.keyword)
        if self.cancel.is_set():
            raise SessionError("57014", CANCELED)
        word = statement.keyword
        literal = literal_select(sql) if word == "SELECT" else None
        if literal is not None:
            return Outcome("SELECT 1", literal.fields, [literal.row])
        builtin = self._builtin(sql) if word == "SELECT" else None
        if builtin is not None:
            rows = builtin[1]()
            return Outcome(f"SELECT {len(rows)}", builtin[0], rows)
        if self._to_shadow(statement):
            return Outcome("", relayed=self._shadow().simple(sql))
        if word in st.TRANSACTION_WORDS:
            return self.state.transaction(word, sql)
        if word in ("SET", "RESET", "SHOW", "DISCARD"):
            return self._session_command(word, sql)
        if word == "EXPLAIN":
            return self._explain(st.explain_target(sql))
        return self._query(sql)

    def _query(self, sql: str) -> Outcome:
        try:
            result = self.gateway.query(sql, analyst=self.user, epsilon=self.state.epsilon, delta=self.state.delta)
        except DPGatewayError:
            if self.cancel.is_set():  # interrupted: the ledger was settled by Gateway.query (docs/server.md)
                raise SessionError("57014", CANCELED) from None
            raise
        plan = result.plan  # the plan that answered: types the columns (no second planning)
        fields = st.result_fields(sql, plan, self.gateway.config)
        if len(fields) != len(result.columns):  # a shape the static typing did not foresee: type by value
            fields = [_field_of(name, [row[i] for row in result.rows]) for i, name in enumerate(result.columns)]
        notices = []
        replay = None
        if plan is not None and not plan.passthrough:
            notices.append(
                _spend_notice(
                    result.epsilon, result.delta, result.remaining, result.replayed, result.accuracy
                )  # a replay: the first release's
            )
            if result.replayed and self.memory is not None:  # read from the ledger: answered the same from now on
                spend = self.gateway.replay_spend(
                    sql, plan, analyst=self.user, epsilon=self.state.epsilon, delta=self.state.delta
                )
                replay = (spend, dict(result.accuracy))
        return Outcome(f"SELECT {len(result.rows)}", fields, result.rows, notices, replay=replay)

    def _explain(self, sql: str) -> Outcome:
        e = self.gateway.explain(sql, analyst=self.user, epsilon=self.state.epsilon, delta=self.state.delta)
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
            return admin.AUDIT_FIELDS if name == "dp.audit" else [show_field(name)]
        literal = literal_select(prepared.sql) if word == "SELECT" else None
        if literal is not None:
            return literal.fields
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
        explanation = self.gateway.explain(sql, analyst=self.user, epsilon=self.state.epsilon, delta=self.state.delta)
        return st.result_fields(sql, explanation.plan, self.gateway.config)

    def _session_command(self, word: str, sql: str) -> Outcome:
        if word == "SHOW":
            name = st.parse_show(sql)
            if name == "dp.audit":
                return Outcome("SHOW", admin.AUDIT_FIELDS, admin.audit(self.gateway, self.user, self.is_admin))
            if name == "dp.budget":
                return Outcome("SHOW", [show_field(name)], [[f"{tightest(self.gateway.remaining(self.user)):g}"]])
            return Outcome("SHOW", [show_field(name)], [[self.state.show(name)]])
        if word == "DISCARD":
            if self._conn is not None:
                self._conn.simple("DISCARD ALL")
            self.statements.clear()
            self.portals.clear()
            self.state.dp.clear()
            return Outcome("DISCARD ALL")
        if word == "RESET":
            self.state.reset(st.parse_reset(sql))
            return Outcome("RESET")
        command = st.parse_set(sql)
        return Outcome("SET", notices=self.state.set(command.name, command.value))

    # ---- the shadow catalog -------------------------------------------------------------------------------

    def _to_shadow(self, statement: st.Statement) -> bool:
        """Whether the shadow catalog answers this statement: a query (or an unknown SHOW) that names no
        policy table. A statement naming one always takes the DP path (statements.names_policy_table)."""
        if self.shadow is None or statement.is_empty:
            return False
        if statement.keyword == "SHOW":
            name = st.parse_show(statement.text)
            return name not in LOCAL_SHOW and name not in self.state.settings and name != "all"
        return (
            statement.keyword in SHADOW_WORDS
            and not st.names_policy_table(statement.text, self.gateway.config)
            and literal_select(statement.text) is None
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
        types = {name: t.TEXT if what == "version" else t.NAME for name, what in functions}
        fields = [Field(name, types[name].oid, types[name].length) for name, _ in functions]
        return fields, lambda: [[values[what] for _, what in functions]]

    def _shadow(self) -> ShadowConnection:
        """This session's shadow connection, opened on first use (idle sessions hold none)."""
        assert self.shadow is not None
        if self._conn is None or self._conn.broken:
            self._conn = self.shadow.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- helpers ------------------------------------------------------------------------------------------

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


def _with_format(f: Field, fmt: int) -> Field:
    if not t.result_format_ok(f.type_oid, fmt):
        raise UnsupportedError(f"binary format is not supported for result column {f.name!r} of type {f.type_oid}")
    return Field(f.name, f.type_oid, f.type_len, f.type_mod, fmt)


def _data_rows(fields: list[Field], rows: list[list[Any]], formats: tuple[int, ...]) -> list[bytes]:
    for f, fmt in zip(fields, formats, strict=True):
        if fmt:
            _with_format(f, fmt)  # raises for a type without a binary form
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


def _placeholder(oid: int) -> Any:
    """A stand-in value of a parameter's type, for planning a statement that has no values yet."""
    if oid in t.INTEGERS:
        return 1
    if oid in (t.FLOAT4.oid, t.FLOAT8.oid, t.NUMERIC.oid):
        return 1.0
    if oid == t.BOOL.oid:
        return True
    return ""


def _spend_notice(
    epsilon: float, delta: float, remaining: dict[str, Any], replayed: bool, accuracy: dict[str, str]
) -> bytes:
    spent = "replayed an earlier answer: nothing spent" if replayed else f"spent epsilon {epsilon:g}, delta {delta:g}"
    detail = "; ".join(f"{name} {value}" for name, value in accuracy.items())
    text = f"dp: {spent}; remaining epsilon {tightest(remaining):g} (tightest cap)"
    return p.notice_response(text, detail=f"95% accuracy: {detail}" if detail else "")
