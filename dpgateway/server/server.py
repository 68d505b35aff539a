"""The asyncio loop around the codec and sessions: start-up, TLS, SCRAM, then messages to sessions.

Per connection: the start-up and authentication phase has a deadline (a silent or truncated start-up packet
is closed, never waited on forever); after it, every message that may block is answered by :class:`Session` in
a worker thread, so a slow query never blocks other connections; literal-only statements, replays from memory
(their audit record committed by the ledger thread first) and messages that touch only the session's state are
answered on the loop (memory.py, docs/server.md "Answers from memory"). Output is written when the client's
pipelined input is used up (one write per batch, as PostgreSQL does) and the loop waits on ``drain`` before
reading more, so a client that stops reading stops being read: the server buffers at most one batch plus the
transport's high-water mark for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dpgateway.budget_store.base import Remaining, Spend
from dpgateway.budget_store.users import UserStore
from dpgateway.errors import ConfigError, DPGatewayError
from dpgateway.gateway import Gateway
from dpgateway.server import protocol as p
from dpgateway.server import scram
from dpgateway.server.memory import Memory, Replay, ReplayAudits
from dpgateway.server.session import Session
from dpgateway.server.shadow import ShadowCluster

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6432
DEFAULT_DATABASE = "dpgateway"
READ_SIZE = 65536
WRITE_HIGH_WATER = 256 * 1024
FAIR_SHARE = 64  # messages one connection answers on the loop before the others get a turn


@dataclass(frozen=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database: str = DEFAULT_DATABASE
    tls: ssl.SSLContext | None = None
    startup_timeout: float = 10.0  # seconds for start-up plus authentication
    max_message: int = p.DEFAULT_MAX_MESSAGE
    workers: int = 8


class Closed(Exception):
    """The connection is over (client left, or an answer that ends it was sent)."""


class Server:
    """Serves ``gateway`` to PostgreSQL clients authenticated against ``users``."""

    def __init__(
        self,
        gateway: Gateway,
        users: UserStore,
        settings: ServerSettings | None = None,
        shadow: ShadowCluster | None = None,
    ) -> None:
        """``shadow``: the row-less catalog server that answers statements naming no policy table (None: the
        gateway answers them, and catalog queries fail)."""
        self.gateway = gateway
        self.shadow = shadow
        self.users = users
        self.settings = settings or ServerSettings()
        self._secret = gateway.store.secret_seed()
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="dpgateway-query")
        self.memory = Memory()
        self._audits: ReplayAudits | None = None  # started on the loop, at the first replay from memory
        self._sessions: dict[int, tuple[bytes, Session]] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> asyncio.Server:
        """Listen; the bound port is ``self.port`` (useful with port 0)."""
        host, port = self.settings.host, self.settings.port
        try:
            self._server = await asyncio.start_server(self._connection, host, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host"
            ) from None
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._audits is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._audits.close)

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def _audit_replay(self, spend: Spend) -> Remaining:
        """Commit a replay's audit record (and read the budget left) in the ledger thread, batched with the
        records queued meanwhile (memory.ReplayAudits)."""
        if self._audits is None:
            self._audits = ReplayAudits(self.gateway.store, asyncio.get_running_loop())
        return await self._audits.write(spend)

    # ---- one connection ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        codec = p.FrontendReader(max_message=self.settings.max_message)
        key: int | None = None
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            session = await asyncio.wait_for(self._startup(codec, reader, writer), self.settings.startup_timeout)
            if session is None:
                return
            key = secrets.randbits(31)
            while key in self._sessions:
                key = secrets.randbits(31)
            secret = secrets.token_bytes(4)
            self._sessions[key] = (secret, session)
            writer.write(b"".join([p.auth_ok(), *session.startup_messages(), p.backend_key_data(key, secret)]))
            writer.write(p.ready_for_query(session.status))
            await self._messages(session, codec, reader, writer)
        except p.ProtocolViolation as exc:
            await _send_and_close(writer, p.error_response(exc.sqlstate, str(exc), severity="FATAL"))
        except (TimeoutError, asyncio.TimeoutError):
            await _send_and_close(writer, p.error_response("08P01", "start-up timed out", severity="FATAL"))
        except (Closed, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception:
            log.exception("internal error in a connection")  # the client gets no detail
            await _send_and_close(writer, p.error_response("XX000", "internal error", severity="FATAL"))
        finally:
            if task is not None:
                self._tasks.discard(task)
            if key is not None:
                _, ended = self._sessions.pop(key)
                ended.close()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)  # a TLS peer may never answer close_notify
            writer.transport.abort()

    async def _read(self, codec: p.FrontendReader, reader: asyncio.StreamReader) -> None:
        data = await reader.read(READ_SIZE)
        if not data:
            raise Closed
        codec.feed(data)

    async def _startup(
        self, codec: p.FrontendReader, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Session | None:
        encrypted = False
        while True:
            event = codec.next_startup()
            if event is None:
                await self._read(codec, reader)
                continue
            if isinstance(event, p.SSLRequest):
                if self.settings.tls is None or encrypted:
                    writer.write(b"N")
                    continue
                # Bytes already sent after SSLRequest would be read as if they came through TLS
                # (CVE-2021-23214): refuse them.
                if codec.buffered or len(getattr(reader, "_buffer", b"")):
                    raise p.ProtocolViolation("received unencrypted data after SSL request")
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self.settings.tls)
                encrypted = True
                continue
            if isinstance(event, p.GSSENCRequest):
                writer.write(b"N")
                continue
            if isinstance(event, p.CancelRequest):  # not in the query pool: it may be full of the queries to stop
                await asyncio.get_running_loop().run_in_executor(None, self._cancel, event)
                return None
            return await self._authenticate(event, codec, reader, writer)

    def _cancel(self, request: p.CancelRequest) -> None:
        """Interrupt the statement the session runs now, if the key matches (it is ignored otherwise, silently,
        as PostgreSQL does)."""
        entry = self._sessions.get(request.process_id)
        if entry is not None and hmac.compare_digest(entry[0], request.secret_key):
            entry[1].interrupt()

    async def _authenticate(
        self, startup: p.Startup, codec: p.FrontendReader, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Session:
        if startup.minor > 0 or startup.protocol_options:
            writer.write(p.negotiate_protocol_version(0, startup.protocol_options))
        user = startup.parameters.get("user", "")
        if not user:
            raise FatalError("28000", "no PostgreSQL user name specified in startup packet")
        record = await self._blocking(self.users.get, user)
        verifier = record.verifier if record is not None else scram.fake_verifier(self._secret, user)
        exchange = scram.ServerExchange(verifier)
        writer.write(p.auth_sasl([scram.MECHANISM]))
        try:
            body = p.BodyReader((await self._password_message(codec, reader, writer)).body)
            mechanism = body.cstring()
            if mechanism != scram.MECHANISM:
                raise FatalError("28000", "client selected an invalid SASL authentication mechanism")
            length = body.int32()
            writer.write(p.auth_sasl_continue(exchange.first(body.bytes(length))))
            final = exchange.final((await self._password_message(codec, reader, writer)).body)
        except scram.ScramError as exc:
            if exc.malformed:
                raise p.ProtocolViolation(str(exc)) from None
            raise FatalError("28P01", f'password authentication failed for user "{user}"') from None
        if record is None:  # unreachable with a fake verifier; kept so no path can ever log in without an account
            raise FatalError("28P01", f'password authentication failed for user "{user}"')
        database = startup.parameters.get("database") or user
        if database != self.settings.database:
            raise FatalError(
                "3D000", f'database "{database}" does not exist (this server serves "{self.settings.database}")'
            )
        writer.write(p.auth_sasl_final(final))
        return Session(
            self.gateway,
            record.name,
            is_admin=record.is_admin,
            client=startup.parameters,
            shadow=self.shadow,
            memory=self.memory,
        )

    async def _password_message(
        self, codec: p.FrontendReader, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> p.Message:
        await writer.drain()
        while True:
            message = codec.next_message()
            if message is not None:
                break
            await self._read(codec, reader)
        if message.type != b"p":
            raise p.ProtocolViolation(f"expected SASL response, got message type {message.type!r}")
        return message

    async def _messages(
        self, session: Session, codec: p.FrontendReader, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pending: list[bytes] = []
        size = 0  # bytes in pending
        inline = 0  # messages answered on the loop since this connection last let the others run
        while True:
            message = codec.next_message()
            if message is None:
                if pending:
                    writer.write(b"".join(pending))
                    pending.clear()
                    size = 0
                await writer.drain()
                await self._read(codec, reader)
                continue
            if message.type == b"X":
                raise Closed
            now = session.now(message)
            if isinstance(now, Replay):
                try:
                    answer = session.replayed(now, await self._audit_replay(now.spend))
                except DPGatewayError as exc:
                    answer = session.failed(exc)
                inline = 0
            elif now is not None:
                answer, inline = now, inline + 1
            elif session.may_block(message):
                answer, inline = await self._blocking(session.handle, message), 0
            else:
                answer, inline = session.handle(message), inline + 1
            pending.extend(answer)
            size += sum(map(len, answer))
            if size > WRITE_HIGH_WATER:
                writer.write(b"".join(pending))
                pending.clear()
                size = 0
                await writer.drain()
            if inline >= FAIR_SHARE:  # a client pipelining cheap statements must not hold the loop
                inline = 0
                await asyncio.sleep(0)


class FatalError(p.ProtocolViolation):
    """A FATAL error during start-up with its own SQLSTATE; the connection is closed after it."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


async def _send_and_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(Exception):
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 1.0)


# ---- TLS ----------------------------------------------------------------------------------------------------


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from PEM files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert/tls_key: cannot load {cert} and {key}: {exc.strerror or exc}") from None
    return context


def self_signed_context(folder: Path, host: str) -> ssl.SSLContext:
    """Generate (once, kept in ``folder``) a self-signed certificate for ``host`` and return its context."""
    cert, key = folder / "server.crt", folder / "server.key"
    if not (cert.exists() and key.exists()):
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise ConfigError(
                "--tls-self-signed needs the `cryptography` package (pip install cryptography); "
                "or set server.tls_cert and server.tls_key to a certificate and key"
            ) from None
        import datetime as dt

        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        now = dt.datetime.now(dt.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(private, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key.chmod(0o600)
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return tls_context(cert, key)
