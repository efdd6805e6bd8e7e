"""Counters of a running bridge over a UNIX socket it owns (mode 0600).

A client connects and reads one JSON document; nothing is parsed from the client, so
the socket cannot be used to change anything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from .errors import UserError

RUN_DIR = "/run/eembridge"


def socket_path(tap: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{tap}.sock")


class StatsServer:
    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._snapshot = snapshot
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a bridge that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: counters are the owner's business
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve_one(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):  # a client that went away is its problem
                conn.sendall(json.dumps(self._snapshot(), default=str).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query(path: str, timeout: float = 3.0) -> dict[str, Any]:
    """Read one bridge's counters; UserError naming the socket if that fails."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except FileNotFoundError:
            raise UserError(f"no bridge stats socket at {path}: is the bridge running?") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied (the socket is mode 0600; run as its owner)") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise UserError(f"{path}: the bridge sent something that is not JSON") from None


def running_bridges(run_dir: str = RUN_DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "*.sock")))
