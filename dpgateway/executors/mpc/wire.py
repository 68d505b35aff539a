"""Length-prefixed JSON messages over TCP: one request and one reply at a time on a connection kept open.

A server may open every connection with a challenge, ``{"type": "hello", "nonce": N}`` (N fresh from the
CSPRNG). A client that signs its requests (signing.py) puts ``"session": N`` and ``"seq": 0, 1, 2, ...`` in
each under the signature, and the server's :meth:`Session.fresh` accepts only this connection's nonce and the
next number: a signed request replayed on another connection, or twice on this one, is refused. Clients
keep connections in a :class:`Pool` (one connection per request in flight), so the set-up and the challenge
cost one round trip per connection, not per request.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpgateway.executors import signing

MAX_MESSAGE = 64 * 2**20
IDLE_S = 600.0  # a server closes a connection that sends nothing for this long (a pool then reconnects)


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def receive(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", _exactly(sock, 4))
    if size > MAX_MESSAGE:
        raise ConnectionError("message too large")
    message = json.loads(_exactly(sock, size))
    if not isinstance(message, dict):
        raise ConnectionError("malformed message")
    return message


def request(address: tuple[str, int], message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``message`` to ``address`` on a new connection and return the reply."""
    with socket.create_connection(address, timeout=timeout) as sock:
        send(sock, message)
        return receive(sock)


@dataclass
class Session:
    """One server-side connection's replay guard: its challenge nonce and the next sequence number."""

    nonce: str
    seq: int = 0

    def fresh(self, message: dict[str, Any]) -> bool:
        """Whether ``message`` names this connection's nonce and next number (then the number advances)."""
        if message.get("session") != self.nonce or message.get("seq") != self.seq:
            return False
        self.seq += 1
        return True


class Connection:
    """A client's connection; with ``challenge`` it reads the server's hello and signs with its nonce."""

    def __init__(self, address: tuple[str, int], timeout: float, *, challenge: bool = False) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.nonce: str | None = None
        self.seq = 0
        if challenge:
            try:
                hello = receive(self.sock)
            except (OSError, ValueError):
                self.close()
                raise
            if hello.get("type") != "hello" or not isinstance(hello.get("nonce"), str):
                self.close()
                raise ConnectionError("the server did not open with a challenge")
            self.nonce = hello["nonce"]

    def send(self, message: dict[str, Any], key: bytes | None = None) -> None:
        """Send ``message``, bound to this connection's nonce and next number and signed when ``key`` is given."""
        if key is not None:
            message = signing.signed(key, {**message, "session": self.nonce, "seq": self.seq})
            self.seq += 1
        send(self.sock, message)

    def receive(self) -> dict[str, Any]:
        return receive(self.sock)

    def idle_and_open(self) -> bool:
        """True unless the server closed the connection (or sent something unasked) while it sat in a pool."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable  # readable while idle: end of file or an error

    def close(self) -> None:
        self.sock.close()


class Pool:
    """Idle connections per address (thread-safe); :meth:`take` reuses one still open or connects anew."""

    def __init__(self, timeout: float, *, challenge: bool = False) -> None:
        self.timeout = timeout
        self.challenge = challenge
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._lock = threading.Lock()

    def take(self, address: tuple[str, int]) -> Connection:
        while True:
            with self._lock:
                idle = self._idle.get(address)
                connection = idle.pop() if idle else None
            if connection is None:
                return Connection(address, self.timeout, challenge=self.challenge)
            if connection.idle_and_open():
                return connection
            connection.close()

    def give(self, address: tuple[str, int], connection: Connection) -> None:
        """Return a connection whose last reply was read in full (one that failed is closed instead)."""
        with self._lock:
            self._idle.setdefault(address, []).append(connection)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


class MessageServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server answering each message with ``handle(message, session)``, one thread per connection.

    With ``challenge`` every connection starts with the server's hello (see the module docstring).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handle: Callable[[dict[str, Any], Session], dict[str, Any]],
        *,
        challenge: bool = False,
    ) -> None:
        self.respond = handle
        self.challenge = challenge
        super().__init__(address, _Handler)


def serve_announced(
    listen: str, handle: Callable[[dict[str, Any], Session], dict[str, Any]], *, challenge: bool = False
) -> None:
    """Serve ``handle`` on ``listen`` (``[tcp://]HOST:PORT``, port 0: any free port) until killed, printing
    ``listening HOST:PORT`` once ready (what a parent process reads to find the service)."""
    host, _, port = listen.removeprefix("tcp://").rpartition(":")
    with MessageServer((host, int(port)), handle, challenge=challenge) as server:
        bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
        sys.stdout.write(f"listening {bound_host}:{bound_port}\n")
        sys.stdout.flush()
        server.serve_forever()


class _Handler(socketserver.BaseRequestHandler):
    server: MessageServer

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(IDLE_S)
        session = Session(secrets.token_hex(16))
        try:
            if self.server.challenge:
                send(self.request, {"type": "hello", "nonce": session.nonce})
            while True:
                message = receive(self.request)
                send(self.request, self.server.respond(message, session))
        except (ConnectionError, ValueError, OSError):
            return


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
