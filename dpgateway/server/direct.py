"""The worker that ran a statement writes its answer to the client's socket itself (plain TCP only).

Why: the answer of a statement run in a worker thread used to go back to the event loop, which wrote it; that
hand-back is two thread wake-ups (0.4 ms on a loaded 2-core VM, bench/README.md "Fresh DP over the wire").
Written by the worker, the answer is on its way before the loop hears that the statement is done.

Rules that keep one writer and the order of the bytes (checked by :meth:`DirectWriter.ready`, on the loop,
before the statement goes to the worker):

- the transport has nothing buffered: every earlier answer is in the kernel already, so the worker's bytes
  come after them; while the worker runs, the connection's task awaits it, and only that task writes to the
  connection, so nothing can be written between;
- the client has sent nothing more that is not yet answered (the codec holds no byte): the answer is the last
  of its batch and would be written at once anyway (server.py writes once per batch, as PostgreSQL does);
- not TLS (the TLS transport owns the record layer; docs/server.md).

The worker sends once, without blocking (the socket is non-blocking); what the kernel does not take is
returned, and the loop writes it through the transport, which buffers it under the usual high-water mark
(a client that stops reading stops being read, as before). A send that fails with a connection error raises
it in the connection's task, which closes the connection as any failed write does.

The worker sends on a duplicate of the socket's descriptor, closed by :meth:`DirectWriter.close` under the lock
the send holds: if the transport closes its socket meanwhile (a reset), the descriptor number cannot be reused
by another connection under a send in flight.

The loop hears of a statement answered in full lazily (:meth:`DirectWriter.answer`): the worker wakes it only
when the loop has something to do (a rest to write, an error, or bytes, end of file or a reset that arrived from
the client while the statement ran: :class:`PokingReader`); else the task resumes when the client's next bytes
arrive, in the same wake-up that reads them, so each statement costs the loop one wake-up, not two.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, SupportsIndex

from dpgateway.server import protocol as p


class PokingReader(asyncio.StreamReader):
    """A stream reader that tells its connection's :class:`DirectWriter` when the client sent bytes, ended or
    failed (on the loop, from the protocol's callbacks)."""

    direct: DirectWriter | None = None

    @property
    def idle(self) -> bool:
        """Nothing received and not yet read, no end of file, no error."""
        return not self._buffer and not self._eof and self._exception is None  # type: ignore[attr-defined]

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        super().feed_data(data)
        if self.direct is not None:
            self.direct.poke()

    def feed_eof(self) -> None:
        super().feed_eof()
        if self.direct is not None:
            self.direct.poke()

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        if self.direct is not None:
            self.direct.poke()


class DirectWriter:
    """A worker thread's own non-blocking handle on one plain TCP connection."""

    def __init__(self, sock: socket.socket, reader: PokingReader, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._reader = reader
        self._loop = loop
        self._send_lock = threading.Lock()  # held by a send; close waits for it
        self._closed = False
        self._lock = threading.Lock()  # the state below, shared by the loop and the worker
        self._waiter: asyncio.Future[None] | None = None  # the task awaiting a statement's outcome
        self._poked = False  # the client sent something (or left) while the statement ran
        self._outcome: tuple[bytes, BaseException | None] | None = None  # the worker's: rest, or an error

    @classmethod
    def attach(cls, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> DirectWriter | None:
        """A writer for ``transport``'s socket, read through ``reader``; ``None`` for TLS (or any transport
        without a TCP socket, or a reader that does not poke)."""
        if transport.get_extra_info("ssl_object") is not None or not isinstance(reader, PokingReader):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or sock.type != socket.SOCK_STREAM:
            return None
        duplicate: socket.socket = sock.dup()
        duplicate.setblocking(False)  # the descriptor's file status is shared: it is non-blocking already
        reader.direct = cls(duplicate, reader, asyncio.get_running_loop())
        return reader.direct

    @staticmethod
    def ready(transport: asyncio.WriteTransport, codec: p.FrontendReader) -> bool:
        """Whether the answer to the message just taken from ``codec`` may be written by the worker."""
        return codec.buffered == 0 and transport.get_write_buffer_size() == 0 and not transport.is_closing()

    async def answer(
        self, pool: Executor, handle: Callable[[p.Message], list[bytes]], message: p.Message, head: bytes
    ) -> bytes:
        """On the loop: :meth:`run` in a worker of ``pool``; what the kernel did not take (for the loop to write).
        Returns once the worker is done and the loop has a reason to run (see the module's docstring)."""
        waiter = self._loop.create_future()
        with self._lock:
            self._waiter, self._poked, self._outcome = waiter, not self._reader.idle, None
        pool.submit(self._work, handle, message, head)
        try:
            await waiter
        finally:
            with self._lock:
                self._waiter = None
        outcome = self._outcome
        assert outcome is not None, "the waiter is set only once the worker is done"
        rest, error = outcome
        if error is not None:
            raise error
        return rest

    def _work(self, handle: Callable[[p.Message], list[bytes]], message: p.Message, head: bytes) -> None:
        """In the worker: answer, send, and wake the loop if it has something to do."""
        try:
            outcome: tuple[bytes, BaseException | None] = (self.run(handle, message, head), None)
        except BaseException as exc:  # handed to the task, which raises it
            outcome = (b"", exc)
        with self._lock:
            self._outcome = outcome
            wake = self._poked or bool(outcome[0]) or outcome[1] is not None
            waiter = self._waiter
        if wake and waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    def poke(self) -> None:
        """On the loop: the client sent bytes, ended or failed. Wakes the task if its statement is done; if it
        is still running, its worker will wake the task when done."""
        with self._lock:
            self._poked = True
            done = self._outcome is not None
            waiter = self._waiter
        if done and waiter is not None:
            _resolve(waiter)

    def run(self, handle: Callable[[p.Message], list[bytes]], message: p.Message, head: bytes) -> bytes:
        """In the worker: answer ``message``, send ``head`` (answers already due) then the answer; return what
        the kernel did not take. Raises what ``handle`` raises (nothing sent then), and
        :class:`ConnectionError` when the connection failed."""
        data = b"".join([head, *handle(message)])
        return data[self.send(data) :]

    def send(self, data: bytes) -> int:
        """Send without blocking; the number of bytes the kernel took (0 when its buffer is full)."""
        if not data:
            return 0
        with self._send_lock:
            if self._closed:
                raise ConnectionResetError("the connection was closed")
            try:
                return self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                return 0
            except ConnectionError:
                raise
            except OSError as exc:  # e.g. ENOTCONN: the connection is gone all the same
                raise ConnectionAbortedError(str(exc)) from exc

    def close(self) -> None:
        """Close the duplicate descriptor; a send in flight finishes first, none starts after."""
        with self._send_lock:
            self._closed = True
            self._sock.close()
        self._reader.direct = None


def _resolve(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
