"""A client that pipelines statements and never reads cannot make the server buffer without limit, even when
every statement is answered on the event loop (``SELECT 1``, docs/server.md "Answers from memory"); and while
it pipelines, other connections are still served.

The client logs in over a raw socket (SCRAM-SHA-256 done here), then sends ``SELECT 1`` simple queries as fast
as the socket takes them and reads nothing. Once the server's output for it passes the transport's high-water
mark, the server stops reading that connection, the kernel buffers fill, and the client's sends stall: it makes
no more progress, however long it tries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import threading
import time

import psycopg2
from conftest import PASSWORD, Running

from dpgateway.server import protocol as p


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _exactly(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _exactly(sock, length - 4)


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def login(wire: Running, user: str = "alice", password: str = PASSWORD) -> socket.socket:
    """A raw protocol 3.0 connection after SCRAM-SHA-256 and the first ReadyForQuery."""
    sock = socket.create_connection((wire.host, wire.port), timeout=10)
    body = struct.pack("!i", 196608) + p.cstr("user") + p.cstr(user) + p.cstr("database") + p.cstr("dpgateway")
    sock.sendall(struct.pack("!i", len(body) + 5) + body + b"\x00")
    kind, body = _read_message(sock)
    assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = b"n,," + first_bare.encode()
    sock.sendall(p.message(b"p", p.cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first))
    kind, body = _read_message(sock)
    assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 11
    server_first = body[4:].decode()
    fields = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    final_bare = f"c=biws,r={fields['r']}"
    signature = hmac.new(
        hashlib.sha256(client_key).digest(),
        f"{first_bare},{server_first},{final_bare}".encode(),
        hashlib.sha256,
    ).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
    sock.sendall(p.message(b"p", f"{final_bare},p={proof}".encode()))
    while True:
        kind, body = _read_message(sock)
        assert kind != b"E", body
        if kind == b"Z":
            return sock


def test_a_client_that_stops_reading_stops_being_read(wire: Running) -> None:
    sock = login(wire)
    sock.settimeout(0.5)
    batch = p.message(b"Q", p.cstr("SELECT 1")) * 2000  # 28 KB of statements; ~130 KB of answers
    sent = [0]
    stop = threading.Event()

    def pipeline() -> None:
        while not stop.is_set():
            try:
                sent[0] += sock.send(batch)
            except TimeoutError:
                continue  # the socket is full: try again
            except OSError:
                return

    sender = threading.Thread(target=pipeline, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        before = -1
        while time.monotonic() < deadline:  # until the client makes no more progress for 2 s
            time.sleep(2)
            if sent[0] == before:
                break
            before = sent[0]
        assert sent[0] == before, f"the server kept reading a client that reads nothing ({sent[0]} bytes)"
        assert sent[0] < 64 * 2**20  # the kernel's socket buffers and one high-water mark, not everything
        with psycopg2.connect(wire.dsn(user="bob")) as other, other.cursor() as cur:  # others are served
            begun = time.monotonic()
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,) and time.monotonic() - begun < 2
    finally:
        stop.set()
        sock.close()
        sender.join(10)
