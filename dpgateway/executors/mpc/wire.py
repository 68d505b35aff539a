"""Length-prefixed JSON messages over TCP (one request and one reply per connection)."""

from __future__ import annotations

import json
import socket
import struct
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


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
