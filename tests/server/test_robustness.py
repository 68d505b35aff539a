"""Raw sockets: start-up packets that are malformed, oversized, truncated or silent never hang the server."""

from __future__ import annotations

import socket
import struct
import time

import psycopg2
from conftest import Running

from dpgateway.server import protocol as p


def connect(wire: Running) -> socket.socket:
    sock = socket.create_connection((wire.host, wire.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def startup(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


def still_serving(wire: Running) -> None:
    with psycopg2.connect(wire.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def test_oversized_startup_length_is_refused_at_once(wire: Running) -> None:
    with connect(wire) as sock:
        sock.sendall(struct.pack("!i", 1 << 30))
        answer = read_all(sock)
    assert answer.startswith(b"E") and b"C08P01\0" in answer and b"invalid length of startup packet" in answer
    still_serving(wire)


def test_truncated_startup_is_closed_after_the_deadline(wire: Running) -> None:
    started = time.monotonic()
    with connect(wire) as sock:
        sock.sendall(struct.pack("!i", 100) + b"\0\3\0\0user")  # announces 100 bytes, sends 12
        answer = read_all(sock)
    assert b"start-up timed out" in answer and time.monotonic() - started < 8
    still_serving(wire)


def test_ssl_and_gssenc_requests_answered_n_without_tls(wire: Running) -> None:
    with connect(wire) as sock:
        sock.sendall(startup(p.GSSENC_REQUEST_CODE))
        assert sock.recv(1) == b"N"
        sock.sendall(startup(p.SSL_REQUEST_CODE))
        assert sock.recv(1) == b"N"


def test_protocol_3_2_with_options_is_negotiated_down(wire: Running) -> None:
    body = b"user\0alice\0_pq_.frob\0x\0\0"
    with connect(wire) as sock:
        sock.sendall(struct.pack("!ii", len(body) + 8, (3 << 16) | 2) + body)
        answer = b""
        while p.auth_sasl(["SCRAM-SHA-256"]) not in answer:
            answer += sock.recv(4096)
    assert answer.startswith(p.negotiate_protocol_version(0, ["_pq_.frob"]))
    assert p.auth_sasl(["SCRAM-SHA-256"]) in answer


def test_garbage_after_startup_is_a_fatal_protocol_violation(wire: Running) -> None:
    with connect(wire) as sock:
        sock.sendall(startup(p.PROTOCOL_3_0, b"user\0alice\0\0"))
        sock.recv(4096)  # AuthenticationSASL
        sock.sendall(p.message(b"Q", b"SELECT 1\0"))  # not a SASL response
        answer = read_all(sock)
    assert b"SFATAL\0" in answer and b"C08P01\0" in answer and b"expected SASL response" in answer
    still_serving(wire)


def test_cancel_request_with_a_wrong_key_is_ignored(wire: Running) -> None:
    with connect(wire) as sock:
        sock.sendall(startup(p.CANCEL_REQUEST_CODE, struct.pack("!i", 1) + b"nope"))
        assert read_all(sock) == b""
    still_serving(wire)


def test_tls_with_a_self_signed_certificate(demo_gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_server

    from dpgateway.server.server import ServerSettings, self_signed_context

    settings = ServerSettings(port=0, tls=self_signed_context(tmp_path, "localhost"))
    for running in start_server(demo_gateway, settings):
        with psycopg2.connect(running.dsn(sslmode="require")) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,) and conn.info.ssl_in_use
        with psycopg2.connect(running.dsn(sslmode="disable")) as conn:
            assert not conn.info.ssl_in_use
