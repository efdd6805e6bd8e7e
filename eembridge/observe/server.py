"""What a bridge serves to other local processes (the control socket, `--metrics`), on one
asyncio loop in one thread, bounded in every way a client could make it grow.

Theory of operation:
- At most `max_connections` are open. A connection beyond that makes room by dropping
  the oldest one that has not yet sent a whole request (idle or half-sent: the
  slowloris), counted `evicted`; if every open one is being served, the new one is
  closed at once, counted `refused`. So a client with a real request always gets in
  at once, however many idle connections somebody holds.
- A request must arrive whole within `request_timeout` of the accept, in at most the
  StreamReader's `limit` bytes per line; a reply must be taken by the client within
  `write_timeout`. Both end the connection, counted `timeouts`.
- Work that blocks (a stats snapshot waits for the bridge's thread) runs in a
  short-lived thread, at most `max_threads` at once; beyond that the caller answers
  busy. A server is thus one thread plus at most `max_threads`, whatever is thrown at
  it, and back to one when the work is done (no pool keeps idle threads).
- Futures completed by other threads (the bridge's Echo) come back with
  call_soon_threadsafe, so waiting for them costs no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger("eembridge.observe.server")

T = TypeVar("T")

# How long an error reply waits for the client to stop sending before the close: over
# TCP a close with unread input sends a reset, which may destroy the reply in flight.
LINGER_SECONDS = 0.5
LINGER_BYTES = 65536


class Dropped(Exception):
    """The connection is to be closed without (another) reply: timed out or gone."""


class TooLong(Exception):
    """A request line longer than the reader's limit."""


class Busy(Exception):
    """Every thread this server may start is at work."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 task: asyncio.Task[Any] | None, deadline: float) -> None:
        self.reader, self.writer, self.task = reader, writer, task
        self.deadline = deadline  # loop time by which the whole request must be in
        self.serving = False  # a whole request came: no longer dropped to make room


class LocalServer:
    """Serve `handler(server, connection)` for each connection on a listening socket."""

    def __init__(self, listener: socket.socket, name: str,
                 handler: Callable[[LocalServer, Connection], Awaitable[None]], *,
                 max_connections: int, request_timeout: float, write_timeout: float,
                 max_threads: int, limit: int, counters: tuple[str, ...] = ()) -> None:
        self.name = name
        self.max_connections, self.max_threads = max_connections, max_threads
        self.request_timeout, self.write_timeout, self.limit = request_timeout, write_timeout, limit
        self._handler = handler
        self._listener = listener
        self._counters = dict.fromkeys(
            ("connections", "refused", "evicted", "timeouts", "bad_requests", "busy", "errors",
             *counters), 0)  # every key made here: other threads copy the dict unlocked
        self._open: dict[Connection, None] = {}  # oldest first
        self._threads = 0
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    # -- for handlers (in the loop's thread) --------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    async def read_until(self, conn: Connection, separator: bytes) -> bytes:
        """The next bytes up to and with `separator`, before the request deadline. At
        EOF: what came (maybe b""). TooLong past the reader's limit; Dropped on timeout."""
        left = conn.deadline - self._loop.time()
        try:
            return await asyncio.wait_for(conn.reader.readuntil(separator), max(left, 0.0))
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError:
            raise TooLong from None
        except asyncio.TimeoutError:
            self.count("timeouts")
            raise Dropped from None

    async def send(self, conn: Connection, data: bytes) -> None:
        """Write `data`; Dropped if the client does not take it in time or is gone."""
        try:
            conn.writer.write(data)
            await asyncio.wait_for(conn.writer.drain(), self.write_timeout)
        except asyncio.TimeoutError:
            self.count("timeouts")
            raise Dropped from None
        except (ConnectionError, OSError):
            raise Dropped from None

    async def linger(self, conn: Connection) -> None:
        """After an error reply: no more from us; read and drop what the client still
        sends (a little, briefly), so that the close does not reset the reply away."""
        with contextlib.suppress(OSError, RuntimeError):
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
        left = LINGER_BYTES
        deadline = self._loop.time() + LINGER_SECONDS
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            while left > 0:
                chunk = await asyncio.wait_for(conn.reader.read(min(left, 16384)),
                                               max(deadline - self._loop.time(), 0.0))
                if not chunk:
                    break
                left -= len(chunk)

    def in_thread(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run blocking `work` in a thread of its own; Busy if max_threads are at work."""
        if self._threads >= self.max_threads:
            self.count("busy")
            raise Busy
        loop = self._loop
        result: asyncio.Future[T] = loop.create_future()
        self._threads += 1

        def finish(ok: bool, value: Any) -> None:
            self._threads -= 1
            if not result.done():  # cancelled if the server closed meanwhile
                if ok:
                    result.set_result(value)
                else:
                    result.set_exception(value)

        def run() -> None:
            value: Any
            try:
                value, ok = work(), True
            except BaseException as exc:  # handed to the awaiting handler
                value, ok = exc, False
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(finish, ok, value)

        threading.Thread(target=run, name=f"{self.name}-work", daemon=True).start()
        return result

    def from_thread(self, future: Future[T]) -> asyncio.Future[T]:
        """An awaitable for a concurrent Future another thread completes, without a
        thread of ours waiting for it."""
        loop = self._loop
        result: asyncio.Future[T] = loop.create_future()

        def copy(done: Future[T]) -> None:
            if result.done():
                return
            if done.cancelled():
                result.cancel()
            elif done.exception() is not None:
                result.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                result.set_result(done.result())

        def completed(done: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(copy, done)

        future.add_done_callback(completed)
        return result

    # -- from any thread ----------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {**self._counters, "open": len(self._open), "threads": self._threads}

    def close(self) -> None:
        stopping = self._stopping
        if stopping is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                self._loop.call_soon_threadsafe(stopping.set)
        self._thread.join(5.0)
        if self._thread.is_alive():
            log.error("%s did not stop within 5 s", self.name)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # raised by the constructor when it happens at start
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("%s stopped by an error: %s", self.name, exc)
        finally:
            self._listener.close()
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accepted, sock=self._listener, limit=self.limit)
        self._started.set()
        await self._stopping.wait()
        server.close()
        tasks = [conn.task for conn in self._open if conn.task is not None]
        for conn in list(self._open):
            self._drop(conn)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, conn: Connection) -> None:
        self._open.pop(conn, None)
        if conn.task is not None:
            conn.task.cancel()
        conn.writer.transport.abort()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count("connections")
        if len(self._open) >= self.max_connections:
            waiting = next((c for c in self._open if not c.serving), None)
            if waiting is None:
                self.count("refused")
                writer.transport.abort()
                return
            self.count("evicted")
            self._drop(waiting)
        conn = Connection(reader, writer, asyncio.current_task(),
                          self._loop.time() + self.request_timeout)
        self._open[conn] = None
        try:
            await self._handler(self, conn)
        except (Dropped, asyncio.CancelledError, ConnectionError, OSError):
            pass  # timed out, gone, dropped to make room, or the server is closing
        except Exception as exc:  # a bug of ours: one connection lost, the server lives on
            self.count("errors")
            log.exception("%s: error serving a connection: %s", self.name, exc)
        finally:
            self._open.pop(conn, None)
            writer.close()
