"""Length-prefixed JSON messages over TCP (one request and one reply per connection)."""

from __future__ import annotations

import json
import socket
import socketserver
import struct
from collections.abc import Callable
from typing import Any

MAX_MESSAGE = 64 * 2**20


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
    """Send ``message`` to ``address`` and return the reply."""
    with socket.create_connection(address, timeout=timeout) as sock:
        send(sock, message)
        return receive(sock)


class MessageServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server answering each connection's one message with ``handle(message)``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.respond = handle
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: MessageServer

    def handle(self) -> None:
        try:
            message = receive(self.request)
        except (ConnectionError, ValueError, OSError):
            return
        send(self.request, self.server.respond(message))


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
