"""The control socket of a running bridge: a UNIX socket it owns, mode 0600.

A client sends one JSON request line and reads JSON lines back:
  {"cmd": "stats"}                       -> one snapshot of every counter
  {"cmd": "echo", "count": N, "timeout": T, "interval": I}
                                         -> one line per Echo: {"seq", "rtt"} or {"seq", "error"}
Anything else gets one {"error": ...} line naming the problem. Connections, request
size and time, and the threads behind them are bounded (localserver.py); a client that
goes away ends its echo at once. The counters are the snapshot's servers.control.

The socket's path is the user's: only a stale socket of a dead bridge (one nobody
answers on) is ever replaced, and at exit only the socket we bound is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import math
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from ..core.errors import UserError
from .server import Busy, Connection, LocalServer, TooLong

log = logging.getLogger("eembridge.observe.control")

RUN_DIR = "/run/eembridge"
MAX_REQUEST = 4096
MAX_ECHO_COUNT = 100000
MAX_ECHO_SECONDS = 60.0  # the most a request may ask for --timeout and --interval
MAX_CONNECTIONS = 64
MAX_ECHO_SESSIONS = 8  # each keeps at most one Echo in flight to the device
MAX_STATS_THREADS = 4
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
HANGUP_POLL = 0.1  # seconds between checks for a half-closed client hanging up
MAX_DEPTH = 2  # a request is one flat object; anything deeper is refused unparsed


class StaleSocket(UserError):
    """A socket file nobody listens on: what a bridge killed with SIGKILL leaves."""


class BadRequest(ValueError):
    pass


def socket_path(tap: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{tap}.sock")


# -- requests ---------------------------------------------------------------------------

def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        above = f"more than {low:g}" if low_open else f"from {low:g}"
        raise BadRequest(f"{name}: expected a number {above} to {high:g}, got {value!r}")
    return float(value)


def echo_parameters(count: Any, timeout: Any, interval: Any) -> tuple[int, float, float]:
    """The checked numbers of an echo request (the server's rule, which clients share)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ECHO_COUNT:
        raise BadRequest(f"count: expected an integer from 1 to {MAX_ECHO_COUNT}, got {count!r}")
    return (count, _number("timeout", timeout, 0.0, MAX_ECHO_SECONDS, low_open=True),
            _number("interval", interval, 0.0, MAX_ECHO_SECONDS))


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a number JSON allows")


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line -> {"cmd": "stats"} or {"cmd": "echo", count, timeout, interval};
    BadRequest naming the problem for anything else."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        return {"cmd": "stats"}  # an empty line asks for the default
    # Strings taken out, the brackets left tell the depth: refused before the parser
    # recurses into them.
    bare = text.replace("\\\\", "").replace('\\"', "")
    bare = "".join(bare.split('"')[::2])
    depth = max(accumulate((c in "[{") - (c in "]}") for c in bare), default=0)
    if depth > MAX_DEPTH:
        raise BadRequest(f"request is nested {depth} deep: a request is one flat JSON object")
    try:
        request = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request is not a JSON object but a {type(request).__name__}")
    cmd = request.get("cmd", "stats")
    if not isinstance(cmd, str):
        raise BadRequest(f"cmd: expected a string, got {cmd!r}")
    fields = {"stats": {"cmd"}, "echo": {"cmd", "count", "timeout", "interval"}}.get(cmd)
    if fields is None:
        raise BadRequest(f"unknown command {cmd[:40]!r} (stats or echo)")
    unknown = sorted(set(request) - fields)
    if unknown:
        raise BadRequest(f"unknown field(s) for {cmd}: {', '.join(repr(k[:40]) for k in unknown)}")
    if cmd == "stats":
        return {"cmd": "stats"}
    count, timeout, interval = echo_parameters(request.get("count", 1), request.get("timeout", 1.0),
                                               request.get("interval", 0.2))
    return {"cmd": "echo", "count": count, "timeout": timeout, "interval": interval}


def _line(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


# -- the socket's path -----------------------------------------------------------------

def _claim(path: str) -> None:
    """Make `path` free for our socket, removing nothing but a stale socket."""
    if not path:
        raise UserError("stats socket: the path is empty")
    where = f"stats socket {path}"
    directory = os.path.dirname(os.path.abspath(path))
    if directory == RUN_DIR:  # ours to make; any other directory is the user's
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{where}: cannot create {directory}: {exc.strerror or exc}") from None
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise UserError(f"{where}: {directory} {what}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{where}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{where}: is a directory; name a socket file in it")
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{where}: exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            _connect(probe, path, 1.0)
        except ConnectionRefusedError:
            pass  # stale: nobody listens
        except TimeoutError:
            raise UserError(f"{where}: another bridge is listening on it (busy)") from None
        except OSError as exc:
            raise UserError(f"{where}: a socket that cannot be checked "
                            f"({exc.strerror or exc}); not removing it") from None
        else:
            raise UserError(f"{where}: another bridge is answering on it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("replaced the stale control socket %s (no bridge was listening on it)", path)


async def _gone(conn: Connection) -> None:
    """Returns once the client is gone, so that its echo stops at once, even mid-Echo.

    The client has nothing more to say: more bytes mean it misbehaves (gone as well).
    Its EOF alone may be a half-close (shutdown(SHUT_WR), as `nc -N` does) of a client
    still reading; gone is when both directions are (POLLHUP)."""
    try:
        if await conn.reader.read(1):
            return
    except (ConnectionError, OSError):
        return  # reset: it closed with our replies unread
    sock = conn.writer.get_extra_info("socket")
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    while not poller.poll(0):
        await asyncio.sleep(HANGUP_POLL)


class ControlServer:
    def __init__(self, path: str, bridge: Any, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_echo_sessions: int = MAX_ECHO_SESSIONS) -> None:
        self.path = path
        self._bridge = bridge
        self._max_echo_sessions = max_echo_sessions
        self._echo_sessions = 0
        _claim(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: the counters and the device are the owner's
        try:
            sock.bind(path)
            st = os.stat(path)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise UserError(f"stats socket {path}: cannot create it: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        self._bound = (st.st_dev, st.st_ino)
        self._server = LocalServer(
            sock, "eembridge-control", self._serve, max_connections=max_connections,
            request_timeout=request_timeout, write_timeout=write_timeout,
            max_threads=MAX_STATS_THREADS, limit=MAX_REQUEST,
            counters=("stats_requests", "echo_requests", "peer_gone"))
        servers = getattr(bridge, "servers", None)
        if isinstance(servers, dict):
            servers["control"] = self.counters

    def counters(self) -> dict[str, int]:
        return {**self._server.counters(), "echo_sessions": self._echo_sessions}

    async def _serve(self, server: LocalServer, conn: Connection) -> None:
        try:
            line = await server.read_until(conn, b"\n")
        except TooLong:
            line = None
        if line == b"":
            return  # connected and left: somebody checking that we are alive
        try:
            if line is None:
                raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
            request = parse_request(line.rstrip(b"\r\n"))
        except BadRequest as exc:
            server.count("bad_requests")
            await server.send(conn, _line({"error": str(exc)}))
            await server.linger(conn)
            return
        conn.serving = True
        if request["cmd"] == "stats":
            server.count("stats_requests")
            try:
                snapshot = await server.in_thread(self._bridge.stats)
            except Busy:
                await server.send(conn, _line({"error": "busy: too many requests at once; try again"}))
                return
            await server.send(conn, _line(snapshot))
            return
        server.count("echo_requests")
        if self._echo_sessions >= self._max_echo_sessions:
            server.count("busy")
            await server.send(conn, _line({"error": f"busy: {self._echo_sessions} echoes running, "
                                                    "the most at once; try again"}))
            return
        self._echo_sessions += 1
        try:
            await self._echo(server, conn, request["count"], request["timeout"], request["interval"])
        finally:
            self._echo_sessions -= 1

    async def _echo(self, server: LocalServer, conn: Connection, count: int, timeout: float,
                    interval: float) -> None:
        gone = asyncio.ensure_future(_gone(conn))
        try:
            for seq in range(count):
                echo = server.from_thread(self._bridge.echo_async(timeout=timeout))
                # The bridge expires its own wait; the extra second covers a bridge
                # thread that is not running at all.
                waited = asyncio.ensure_future(asyncio.wait_for(echo, timeout + 1.0))
                await asyncio.wait({waited, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    if waited.done() and not waited.cancelled():
                        waited.exception()  # retrieved: nobody is told of it any more
                    else:
                        waited.cancel()
                    server.count("peer_gone")
                    return
                try:
                    reply: dict[str, Any] = {"seq": seq, "rtt": waited.result()}
                except (asyncio.TimeoutError, TimeoutError):
                    reply = {"seq": seq, "error": "timed out"}
                except (ConnectionError, ValueError) as exc:
                    reply = {"seq": seq, "error": str(exc) or type(exc).__name__}
                await server.send(conn, _line(reply))
                if seq + 1 < count:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(gone), interval)
                    if gone.done():
                        server.count("peer_gone")
                        return
        finally:
            gone.cancel()

    def close(self) -> None:
        self._server.close()
        # Not kept alive in a cycle with the bridge: collected at exit with the bridge's
        # buffers, such a cycle crashed the interpreter (memoryviews cleared out of order).
        servers = getattr(self._bridge, "servers", None)
        if isinstance(servers, dict) and servers.get("control") == self.counters:
            del servers["control"]
        self._bridge = None
        # Only the socket we bound: the path may hold somebody else's file by now.
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# -- the client -------------------------------------------------------------------------

def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """connect() with a deadline: a UNIX socket whose listen queue is full refuses at
    once with EAGAIN (the bridge busy accepting a flood), so try again until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.005)


def request(path: str, payload: dict[str, Any], timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """Send one request to a bridge; yield its replies. UserError naming the socket
    (StaleSocket if nobody listens on it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, timeout)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            with sock.makefile("rb") as stream:
                for line in stream:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise UserError(f"{path}: the bridge sent something that is not JSON") from None
        except FileNotFoundError:
            raise UserError(f"no bridge control socket at {path}: is the bridge running?") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied (the socket is mode 0600; run as its owner)") from None
        except ConnectionRefusedError:
            raise StaleSocket(f"{path}: stale socket, no bridge is listening on it "
                              "(one that was killed left it)") from None
        except TimeoutError:
            raise UserError(f"{path}: the bridge did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc}") from None


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    for reply in request(path, {"cmd": "stats"}, timeout):
        if "error" in reply and "tap" not in reply:
            raise UserError(f"{path}: the bridge refused: {reply['error']}")
        return reply
    raise UserError(f"{path}: the bridge closed the connection without an answer")


def echo(path: str, count: int, timeout: float, interval: float,
         on_reply: Callable[[dict[str, Any]], None] | None = None,
         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`count` Echoes through the bridge at `path`: (every reply, the summary: sent,
    received, loss, rtt min/avg/max in ms), `on_reply` called as each arrives.
    UserError if the bridge refuses."""
    payload = {"cmd": "echo", "count": count, "timeout": timeout, "interval": interval}
    replies = []
    for reply in request(path, payload, timeout=timeout + interval + 5):
        if "error" in reply and "seq" not in reply:
            raise UserError(f"bridge refused: {reply['error']}")
        replies.append(reply)
        if on_reply is not None:
            on_reply(reply)
    rtts = [r["rtt"] for r in replies if "rtt" in r]
    summary = {
        "sent": len(replies),
        "received": len(rtts),
        "loss": (len(replies) - len(rtts)) / len(replies) if replies else 1.0,
        "rtt_min_ms": min(rtts) * 1000 if rtts else None,
        "rtt_avg_ms": sum(rtts) / len(rtts) * 1000 if rtts else None,
        "rtt_max_ms": max(rtts) * 1000 if rtts else None,
    }
    return replies, summary


def is_stale(path: str) -> bool:
    """True for a socket file nobody listens on (connecting is refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            _connect(sock, path, 1.0)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False  # missing, not ours, or busy: not known to be stale
    return False


def running_bridges(run_dir: str = RUN_DIR) -> list[str]:
    """The control sockets in `run_dir` (socket files only), live or stale."""
    paths = []
    for path in sorted(glob.glob(os.path.join(run_dir, "*.sock"))):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                paths.append(path)
    return paths
