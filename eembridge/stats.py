"""The control socket of a running bridge: a UNIX socket it owns, mode 0600.

A client sends one JSON request line and reads JSON lines back:
  {"cmd": "stats"}                       -> one snapshot of every counter
  {"cmd": "echo", "count": N, "timeout": T, "interval": I}
                                         -> one line per Echo: {"seq", "rtt"} or {"seq", "error"}
Each connection is served in its own short-lived thread, so a slow echo never holds up
the bridge's data path; only the owner of the socket can ask anything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from .errors import UserError

RUN_DIR = "/run/eembridge"
MAX_REQUEST = 4096
MAX_ECHO_COUNT = 100000


def socket_path(tap: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{tap}.sock")


class ControlServer:
    def __init__(self, path: str, bridge: Any) -> None:
        self.path = path
        self._bridge = bridge
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a bridge that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: the counters and the device are the owner's
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="eembridge-control",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a client that went away is its problem
            conn.settimeout(5.0)
            request = _read_line(conn)
            for reply in self._replies(request):
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")

    def _replies(self, line: bytes) -> Iterator[dict[str, Any]]:
        try:
            request = json.loads(line or b'{"cmd": "stats"}')
            cmd = request.get("cmd", "stats")
        except (ValueError, AttributeError):
            yield {"error": "request is not a JSON object"}
            return
        if cmd == "stats":
            yield self._bridge.stats()
        elif cmd == "echo":
            count = min(int(request.get("count", 1)), MAX_ECHO_COUNT)
            timeout = float(request.get("timeout", 1.0))
            interval = float(request.get("interval", 0.2))
            for seq in range(count):
                try:
                    yield {"seq": seq, "rtt": self._bridge.echo(timeout=timeout)}
                except (TimeoutError, ConnectionError, ValueError) as exc:
                    yield {"seq": seq, "error": str(exc) or type(exc).__name__}
                if seq + 1 < count:
                    time.sleep(interval)
        else:
            yield {"error": f"unknown command {cmd!r}"}

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def request(path: str, payload: dict[str, Any], timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """Send one request to a bridge; yield its replies. UserError naming the socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
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
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc}") from None


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    for reply in request(path, {"cmd": "stats"}, timeout):
        return reply
    raise UserError(f"{path}: the bridge closed the connection without an answer")


def running_bridges(run_dir: str = RUN_DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "*.sock")))
