"""Answers written by the worker that ran the statement (direct.py): in order whatever the pipelining and the
client's reading, bounded when the client stops reading, a failed write closes only its connection, and TLS
connections keep the event loop's writes.

The tests count the direct writes (and the sends the kernel took only in part) by wrapping
:meth:`DirectWriter.run`, so each shows the path it means to test was taken.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import struct
import threading
import time
from asyncio import selector_events
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg2
import pytest
from conftest import Running, start_server
from test_backpressure import login

from dpgateway import Gateway
from dpgateway.server import protocol as p
from dpgateway.server.direct import DirectWriter, PokingReader
from dpgateway.server.server import WRITE_HIGH_WATER, ServerSettings, self_signed_context


@dataclass
class Count:
    runs: int = 0
    partial: int = 0  # sends the kernel took only in part (the loop wrote the rest)
    busy: int = 0  # answers the loop wrote because the transport still had bytes to write
    errors: list[BaseException] = field(default_factory=list)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Count]:
    count = Count()
    run = DirectWriter.run

    def counting(self: DirectWriter, handle: Callable[[p.Message], list[bytes]], message: p.Message, head: bytes):  # type: ignore[no-untyped-def]
        count.runs += 1
        try:
            rest = run(self, handle, message, head)
        except ConnectionError as exc:
            count.errors.append(exc)
            raise
        count.partial += bool(rest)
        return rest

    ready = DirectWriter.ready

    def counting_ready(transport: asyncio.WriteTransport, codec: p.FrontendReader) -> bool:
        if codec.buffered == 0 and transport.get_write_buffer_size() > 0:
            count.busy += 1
        return ready(transport, codec)

    monkeypatch.setattr(DirectWriter, "run", counting)
    monkeypatch.setattr(DirectWriter, "ready", staticmethod(counting_ready))
    yield count


def query(sql: str) -> bytes:
    return p.message(b"Q", p.cstr(sql))


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from("!i", data, at + 1)
        out.append((data[at : at + 1], data[at + 5 : at + 1 + length]))
        at += 1 + length
    assert at == len(data), "the stream ends inside a message"
    return out


def data_row_values(body: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("!h", body)
    values, at = [], 2
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, at)
        values.append(body[at + 4 : at + 4 + length])
        at += 4 + length
    return values


def test_pipelined_answers_arrive_in_order(wire: Running, counted: Count) -> None:
    """Statements answered on the loop (``SELECT i``), in a worker (``SET``/``SHOW`` of a custom setting) and DP
    aggregates (NOTICE first), sent in random batches (sometimes cut inside a statement, sometimes waiting for
    the answers first); now and then the client stops reading while single statements with 100 KB answers keep
    coming, so that the kernel takes a direct write only in part and the transport is still buffering when the
    next worker's answer is ready. Every answer must arrive whole and in the order of the statements, and each
    of these paths must have been taken."""
    rng = random.Random(15)
    sock = login(wire)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)  # no autotuning to 32 MB: buffers fill
    big = "b" * 20_000
    expected: list[tuple[str, bytes]] = [("SET", b"")]  # per statement: kind and the value its row must hold
    statements = [query("SET my.pad = ''")]
    value = b""
    stalls: set[int] = set()  # the client stops reading before these statements and resumes after them
    for i in range(400):
        roll = rng.random()
        if roll < 0.02:  # a stall: 250 answers of 20 KB (5 MB), each statement alone, then 100 more
            value = big.encode()
            statements.append(query(f"SET my.pad = '{big}'"))
            expected.append(("SET", b""))
            stalls.add(len(statements))
            statements.extend([query("SHOW my.pad")] * 350)
            expected.extend([("SHOW", value)] * 350)
        elif roll < 0.1:
            value = f"v{i}-".encode() + b"x" * rng.choice([10, 5_000, 100_000])
            statements.append(query(f"SET my.pad = '{value.decode()}'"))
            expected.append(("SET", b""))
        elif roll < 0.5:
            statements.append(query("SHOW my.pad"))
            expected.append(("SHOW", value))
        elif roll < 0.9:
            statements.append(query(f"SELECT {i}"))
            expected.append(("SELECT", str(i).encode()))
        else:
            statements.append(query(f"SELECT COUNT(*) FROM pums WHERE age > {i % 90}"))
            expected.append(("DP", b""))
    assert stalls

    received = bytearray()
    answered = [0]  # ReadyForQuery messages received
    reading = threading.Event()
    reading.set()

    def read() -> None:
        sock.settimeout(30)
        at = 0  # the first byte of the message being parsed
        while answered[0] < len(expected):
            reading.wait(30)
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            received.extend(chunk)
            while len(received) >= at + 5:
                assert received[at] in b"CDENSTZ", "a message cut by another: the answers are out of order"
                (length,) = struct.unpack_from("!i", received, at + 1)
                if len(received) < at + 1 + length:
                    break
                answered[0] += received[at] == ord("Z")
                at += 1 + length

    def caught_up(n: int) -> None:
        deadline = time.monotonic() + 30
        while answered[0] < n:
            assert time.monotonic() < deadline and reader.is_alive(), "answers stopped coming"
            time.sleep(0.0005)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        at = 0
        while at < len(statements):
            if at in stalls:
                caught_up(at)
                reading.clear()
                for n, statement in enumerate(statements[at : at + 350]):
                    if n >= 250 and n % 5 == 0:  # then reads in bursts, while the server still has much to write
                        reading.set() if n % 10 else reading.clear()
                    sock.sendall(statement)
                    time.sleep(0.001)
                reading.set()
                at += 350
                continue
            step = rng.choice([1, 1, 1, 1, 1, 2, 5, 30])
            step = min([step, *(s - at for s in stalls if s > at)])
            chunk = b"".join(statements[at : at + step])
            at += step
            if rng.random() < 0.1:  # cut inside a statement
                cut = rng.randrange(len(chunk))
                sock.sendall(chunk[:cut])
                time.sleep(0.002)
                chunk = chunk[cut:]
            sock.sendall(chunk)
            if rng.random() < 0.4:  # as a client that waits for its answers: the next is a batch of its own
                caught_up(at)
            elif rng.random() < 0.5:
                time.sleep(rng.choice([0.0005, 0.005, 0.03]))
        reader.join(60)
        assert not reader.is_alive(), "not every answer arrived"
    finally:
        reading.set()
        sock.close()

    answers: list[list[tuple[bytes, bytes]]] = [[]]
    for kind, body in messages(bytes(received)):
        answers[-1].append((kind, body))
        if kind == b"Z":
            answers.append([])
    assert answers.pop() == []
    assert len(answers) == len(expected)
    for (what, value), answer in zip(expected, answers, strict=True):
        kinds = b"".join(kind for kind, _ in answer)
        if what == "SET":
            assert kinds == b"CZ", answer
        elif what == "DP":
            assert kinds == b"NTDCZ", answer  # the spend NOTICE before the rows
        else:
            assert kinds == b"TDCZ", answer
            assert data_row_values(answer[1][1]) == [value], (what, value[:20])
    assert counted.runs > 20  # worker answers went the direct way,
    assert counted.partial >= 1  # the kernel took one only in part (the loop wrote the rest),
    assert counted.busy >= 1  # and a worker's answer went the loop's way: the transport was still writing


def test_a_client_that_stops_reading_bounds_the_direct_writes(wire: Running, counted: Count) -> None:
    """Each ``SHOW my.pad`` (20 bytes) answers 100 KB from a worker; the client sends them one by one and reads
    nothing. The worker's sends come back partial once the kernel's buffers are full, the transport buffers the
    rest up to its high-water mark, the server stops reading: the client's sends stall, whatever it tries, the
    server's buffers for it stay bounded as they were, and other clients are served."""
    sock = login(wire)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)  # no autotuning to 32 MB
    pad = "x" * 100_000
    sock.sendall(query(f"SET my.pad = '{pad}'"))
    reply = b""
    while not reply.endswith(b"Z\x00\x00\x00\x05I"):
        reply += sock.recv(65536)
    sock.settimeout(0.2)
    sent = [0]
    stop = threading.Event()

    def pipeline() -> None:
        one = query("SHOW my.pad")
        at = 0  # bytes of the statement being sent
        while not stop.is_set():
            try:
                at += sock.send(one[at:])
            except TimeoutError:
                continue
            except OSError:
                return
            if at == len(one):
                sent[0], at = sent[0] + 1, 0
                if not counted.partial:  # one statement a read (a direct write) until the kernel is full
                    time.sleep(0.01)

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
        assert sent[0] == before, f"the server kept reading a client that reads nothing ({sent[0]} statements)"
        assert counted.partial >= 1  # the kernel took part of a direct write: the loop wrote the rest
        # what the server holds for it, as before direct writes: up to the high-water mark in the transport, then
        # one batch of answers (written once it passes the mark) on top
        transports = [t for t in gc.get_objects() if isinstance(t, selector_events._SelectorSocketTransport)]
        assert 0 < max(t.get_write_buffer_size() for t in transports) <= 2 * WRITE_HIGH_WATER + len(pad) + 100
        with psycopg2.connect(wire.dsn(user="bob")) as other, other.cursor() as cur:
            begun = time.monotonic()
            cur.execute("SELECT COUNT(*) FROM pums")
            assert cur.fetchone() is not None and time.monotonic() - begun < 2
    finally:
        stop.set()
        sock.close()
        sender.join(10)


def test_a_direct_write_that_fails_closes_its_connection_only(
    wire: Running, counted: Count, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client resets the connection while its statement runs: the worker's send fails, the connection is
    closed and its session ended, and the server serves the next client."""
    run = DirectWriter.run

    def slow(self: DirectWriter, handle: Callable[[p.Message], list[bytes]], message: p.Message, head: bytes):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # a long statement: the reset arrives while it runs
        return run(self, handle, message, head)

    monkeypatch.setattr(DirectWriter, "run", slow)
    sock = login(wire)
    assert len(wire.server._sessions) == 1
    sock.sendall(query("SHOW dp.epsilon"))
    time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, not a FIN
    deadline = time.monotonic() + 5
    while wire.server._sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counted.runs == 1 and len(counted.errors) == 1  # the failure was the worker's own send
    assert not wire.server._sessions, "the connection whose write failed was not closed"
    with psycopg2.connect(wire.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM pums")
        assert cur.fetchone() is not None


def test_tls_connections_keep_the_loops_writes(demo_gateway: Gateway, tmp_path, counted: Count) -> None:  # type: ignore[no-untyped-def]
    settings = ServerSettings(port=0, tls=self_signed_context(tmp_path, "localhost"))
    for running in start_server(demo_gateway, settings):
        with psycopg2.connect(running.dsn(sslmode="require")) as conn, conn.cursor() as cur:
            assert conn.info.ssl_in_use
            for i in range(5):
                cur.execute(f"SELECT COUNT(*) FROM pums WHERE age > {i}")
                assert cur.fetchone() is not None and conn.notices
                cur.execute("SHOW dp.epsilon")
                assert cur.fetchone() is not None
        assert counted.runs == 0
        with psycopg2.connect(running.dsn(sslmode="disable")) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM pums")
            assert cur.fetchone() is not None
        assert counted.runs >= 1  # the same server writes directly on a plain connection


def test_direct_writes_off_writes_from_the_loop(demo_gateway: Gateway, counted: Count) -> None:
    for running in start_server(demo_gateway, ServerSettings(port=0, direct_write=False)):
        with psycopg2.connect(running.dsn()) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM pums")
            assert cur.fetchone() is not None
        assert counted.runs == 0


def test_a_send_the_kernel_cannot_take_returns_the_rest() -> None:
    server, client = socket.socketpair()
    server.setblocking(False)
    loop = asyncio.new_event_loop()
    try:
        writer = DirectWriter(server, PokingReader(loop=loop), loop)
        big = b"x" * (16 * 2**20)  # more than the socket pair's buffers
        rest = writer.run(lambda message: [big], p.Message(b"Q", b""), b"head")
        assert 0 < len(rest) < len(big) and rest == (b"head" + big)[-len(rest) :]
        assert writer.send(rest) == 0  # full: nothing taken, no blocking
        writer.close()
        with pytest.raises(ConnectionResetError, match="the connection was closed"):
            writer.send(b"more")
    finally:
        server.close()
        client.close()
        loop.close()


class Transport:
    def __init__(self, buffered: int, closing: bool) -> None:
        self.buffered, self.closing = buffered, closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


@pytest.mark.parametrize(
    ("unread", "unwritten", "closing", "direct"),
    [
        (b"", 0, False, True),
        (b"Q", 0, False, False),  # more from the client: the answer joins its batch, written by the loop
        (b"", 1, False, False),  # the transport still writes earlier answers: the worker's would overtake them
        (b"", 0, True, False),
    ],
)
def test_who_writes_an_answer(unread: bytes, unwritten: int, closing: bool, direct: bool) -> None:
    codec = p.FrontendReader()
    codec.feed(unread)
    assert DirectWriter.ready(Transport(unwritten, closing), codec) is direct  # type: ignore[arg-type]
