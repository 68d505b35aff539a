"""PostgreSQL frontend/backend protocol 3.0 as a sans-I/O codec: bytes in, events out; messages to bytes.

No sockets here (STYLE.md item 13, after h11): :class:`FrontendReader` buffers what the client sent and yields
parsed messages; the ``encode_*``/message functions build what the server sends. The asyncio loop in
``server.py`` only moves bytes.

Limits: a start-up packet is at most :data:`MAX_STARTUP_LENGTH` bytes (PostgreSQL's own limit) and a regular
message at most ``max_message`` bytes; a bad length is a :class:`ProtocolViolation` raised at once, before any
of the body is awaited, so a client can neither make the server buffer without limit nor wait forever for a
body that a lying length announced.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_LENGTH = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
DEFAULT_MAX_MESSAGE = 1 << 20  # 1 MiB: far above any DP query; PostgreSQL's own limit is 1 GB

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")


class ProtocolViolation(Exception):
    """The client broke the protocol (SQLSTATE 08P01); the connection is closed after the error is sent."""

    sqlstate = "08P01"


# ---- frontend events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSLRequest:
    """The client asks for TLS; answer ``S`` (then handshake) or ``N``."""


@dataclass(frozen=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; always answered ``N``."""


@dataclass(frozen=True)
class CancelRequest:
    """Cancel the running query of the session with this backend key (sent on a new connection)."""

    process_id: int
    secret_key: bytes


@dataclass(frozen=True)
class Startup:
    """The start-up message: protocol minor version, parameters (``user``, ``database``, ...) and the
    ``_pq_.`` protocol options the client asked for (which this server does not support)."""

    minor: int
    parameters: dict[str, str]
    protocol_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Message:
    """A regular message: its type byte and body (length word removed)."""

    type: bytes
    body: bytes


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | Startup


class FrontendReader:
    """Buffers client bytes; :meth:`next_startup` / :meth:`next_message` return one parsed item or ``None``."""

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self.max_message = max_message

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (must be 0 when TLS starts: no plaintext may be injected)."""
        return len(self._buffer)

    def next_startup(self) -> StartupEvent | None:
        """The next untyped start-up packet, or ``None`` until it is complete."""
        if len(self._buffer) < 4:
            return None
        (length,) = _I32.unpack_from(self._buffer)
        if length < 8 or length > MAX_STARTUP_LENGTH:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if len(self._buffer) < length:
            return None
        packet = bytes(self._buffer[4:length])
        del self._buffer[:length]
        return parse_startup(packet)

    def next_message(self) -> Message | None:
        """The next typed message, or ``None`` until it is complete."""
        if len(self._buffer) < 5:
            return None
        kind, length = _HEADER.unpack_from(self._buffer)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {kind!r}")
        if length > self.max_message:
            raise ProtocolViolation(f"message of {length} bytes is larger than the limit of {self.max_message}")
        if len(self._buffer) < length + 1:
            return None
        body = bytes(self._buffer[5 : length + 1])
        del self._buffer[: length + 1]
        return Message(kind, body)


def parse_startup(packet: bytes) -> StartupEvent:
    """Parse a start-up packet without its length word."""
    (code,) = _I32.unpack_from(packet)
    rest = packet[4:]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if rest:
            raise ProtocolViolation("invalid length of encryption request packet")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 8 <= len(rest) <= 4 + 256:  # process id, then a key of 4 bytes (3.0) up to 256 (3.2)
            raise ProtocolViolation("invalid length of cancel request packet")
        (pid,) = _I32.unpack_from(rest)
        return CancelRequest(pid, bytes(rest[4:]))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
    fields = rest.split(b"\x00")
    if len(fields) < 2 or fields[-1] != b"" or fields[-2] != b"" or len(fields) % 2:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parameters: dict[str, str] = {}
    options: list[str] = []
    for i in range(0, len(fields) - 2, 2):
        key, value = _text(fields[i]), _text(fields[i + 1])
        if key.startswith("_pq_."):
            options.append(key)
        else:
            parameters[key] = value
    return Startup(minor, parameters, tuple(options))


class UnsupportedProtocol(ProtocolViolation):
    """A protocol major version other than 3 (SQLSTATE 0A000)."""

    sqlstate = "0A000"


# ---- frontend message bodies ----------------------------------------------------------------------------


class BodyReader:
    """Reads the fields of one message body; running past its end is a :class:`ProtocolViolation`."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def int16(self) -> int:
        return self._unpack("!h", 2)

    def int32(self) -> int:
        return self._unpack("!i", 4)

    def byte(self) -> bytes:
        return self.bytes(1)

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise ProtocolViolation("message body is shorter than its fields")
        data = self.body[self.pos : self.pos + n]
        self.pos += n
        return data

    def cstring(self) -> str:
        end = self.body.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolViolation("unterminated string in message")
        data = self.body[self.pos : end]
        self.pos = end + 1
        return _text(data)

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolViolation("message body is longer than its fields")

    def _unpack(self, fmt: str, n: int) -> int:
        (value,) = struct.unpack(fmt, self.bytes(n))
        return int(value)


@dataclass(frozen=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str


@dataclass(frozen=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True)
class Close:
    kind: str
    name: str


def parse_query(body: bytes) -> str:
    r = BodyReader(body)
    sql = r.cstring()
    r.end()
    return sql


def parse_parse(body: bytes) -> Parse:
    r = BodyReader(body)
    name, query = r.cstring(), r.cstring()
    types = tuple(r.int32() for _ in range(_count(r)))
    r.end()
    return Parse(name, query, types)


def parse_bind(body: bytes) -> Bind:
    r = BodyReader(body)
    portal, statement = r.cstring(), r.cstring()
    formats = tuple(r.int16() for _ in range(_count(r)))
    params: list[bytes | None] = []
    for _ in range(_count(r)):
        size = r.int32()
        params.append(None if size == -1 else r.bytes(size))
    results = tuple(r.int16() for _ in range(_count(r)))
    r.end()
    if any(f not in (0, 1) for f in formats + results):
        raise ProtocolViolation("format codes must be 0 (text) or 1 (binary)")
    return Bind(portal, statement, formats, tuple(params), results)


def parse_describe(body: bytes) -> Describe:
    r = BodyReader(body)
    kind, name = r.byte(), r.cstring()
    r.end()
    if kind not in (b"S", b"P"):
        raise ProtocolViolation(f"invalid DESCRIBE message subtype {kind!r}")
    return Describe(kind.decode(), name)


def parse_execute(body: bytes) -> Execute:
    r = BodyReader(body)
    portal, rows = r.cstring(), r.int32()
    r.end()
    return Execute(portal, rows)


def parse_close(body: bytes) -> Close:
    r = BodyReader(body)
    kind, name = r.byte(), r.cstring()
    r.end()
    if kind not in (b"S", b"P"):
        raise ProtocolViolation(f"invalid CLOSE message subtype {kind!r}")
    return Close(kind.decode(), name)


def formats_for(codes: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """Expand a format-code array: none = all text, one = all alike, else one per item."""
    if not codes:
        return (0,) * n
    if len(codes) == 1:
        return (codes[0],) * n
    if len(codes) != n:
        raise ProtocolViolation(f"bind message has {len(codes)} {what} formats but {n} {what}s")
    return tuple(codes)


def _count(r: BodyReader) -> int:
    n = r.int16()
    if n < 0:
        raise ProtocolViolation("negative count in message")
    return n


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid byte sequence for encoding UTF8") from None


# ---- backend messages ------------------------------------------------------------------------------------


def message(kind: bytes, body: bytes = b"") -> bytes:
    """One backend message: type byte, length (itself included), body."""
    return kind + _I32.pack(len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode("utf-8").replace(b"\x00", b"") + b"\x00"


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(0))


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return message(b"K", _I32.pack(process_id) + secret_key)


def ready_for_query(status: str) -> bytes:
    return message(b"Z", status.encode())


def negotiate_protocol_version(minor: int, options: Sequence[str]) -> bytes:
    return message(b"v", _I32.pack(minor) + _I32.pack(len(options)) + b"".join(cstr(o) for o in options))


@dataclass(frozen=True)
class Field:
    """One RowDescription column (table OID and attnum 0: see pgwire.md §2.5)."""

    name: str
    type_oid: int
    type_len: int
    type_mod: int = -1
    format: int = 0


def row_description(fields: Sequence[Field]) -> bytes:
    parts = [struct.pack("!h", len(fields))]
    for f in fields:
        parts.append(cstr(f.name) + struct.pack("!ihihih", 0, 0, f.type_oid, f.type_len, f.type_mod, f.format))
    return message(b"T", b"".join(parts))


def data_row(values: Sequence[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
    return message(b"D", b"".join(parts))


def parameter_description(oids: Sequence[int]) -> bytes:
    return message(b"t", struct.pack("!h", len(oids)) + b"".join(_I32.pack(o) for o in oids))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


EMPTY_QUERY = message(b"I")
PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
PORTAL_SUSPENDED = message(b"s")


@dataclass(frozen=True)
class Notice:
    """The fields of an ErrorResponse or NoticeResponse."""

    severity: str  # ERROR, FATAL, NOTICE, WARNING, ...
    sqlstate: str
    message: str
    detail: str = ""
    hint: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        parts = [b"S" + cstr(self.severity), b"V" + cstr(self.severity), b"C" + cstr(self.sqlstate)]
        parts.append(b"M" + cstr(self.message))
        if self.detail:
            parts.append(b"D" + cstr(self.detail))
        if self.hint:
            parts.append(b"H" + cstr(self.hint))
        parts.extend(code.encode() + cstr(value) for code, value in self.extra.items())
        kind = b"N" if self.severity in ("NOTICE", "WARNING", "INFO", "DEBUG", "LOG") else b"E"
        return message(kind, b"".join(parts) + b"\x00")


def error_response(sqlstate: str, text: str, *, severity: str = "ERROR", detail: str = "", hint: str = "") -> bytes:
    return Notice(severity, sqlstate, text, detail, hint).encode()


def notice_response(text: str, *, detail: str = "", sqlstate: str = "00000") -> bytes:
    """``Notice("NOTICE", sqlstate, text, detail).encode()``, built directly (one per DP answer)."""
    described = b"D" + cstr(detail) if detail else b""
    return message(b"N", b"SNOTICE\x00VNOTICE\x00C" + cstr(sqlstate) + b"M" + cstr(text) + described + b"\x00")
