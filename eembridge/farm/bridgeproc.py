"""One bridge for one board, as a child process: the command, start, wait, stop.

Both owners of a board's bridge use this: the exporter (started when a labgrid place
acquires the board, stopped at release) and the driver for a board on the client's own
host (started at activate, stopped at deactivate). The bridge is `python -m eembridge`
with the board's port path and the resource's TAP settings; "up" means its control
socket answers and says the device is claimed, "gone" means the process has exited
(it deletes its TAP and gives the interface back to cdc_eem on the way out).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labgrid.util.helper import get_free_port

from ..core.errors import UserError
from ..core.options import ifname_problem
from ..observe.control import RUN_DIR, query, socket_path

POLL = 0.2  # seconds between looks at a starting bridge's control socket
STOP_TIMEOUT = 20.0  # SIGTERM to exit: the bridge re-attaches cdc_eem first


def _items(value: Any) -> list[str]:
    """A YAML list or a comma-separated string (what crosses the coordinator, whose
    parameters are scalars only), as stripped strings."""
    if value is None or value == "":
        return []
    return [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]


def addresses_of(value: Any) -> tuple[str, ...]:
    """The TAP addresses as a tuple, each checked."""
    out = []
    for text in _items(value):
        try:
            if "/" not in text:  # the bridge's --ip wants the prefix too
                raise ValueError
            ipaddress.ip_interface(text)
        except ValueError:
            raise ValueError(f"EEM board address {text!r} is not ADDR/PREFIX") from None
        out.append(text)
    return tuple(out)


def forwards_of(value: Any) -> tuple[int, ...]:
    """The board's TCP ports to forward (`link: user`): "tcp:22,tcp:80" or 22, 80. TCP
    only: labgrid's proxy is SSH's -L, which carries TCP."""
    out = []
    for text in _items(value):
        port = text[4:] if text.startswith("tcp:") else text
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"EEM board forward {text!r} is not tcp:PORT (1 to 65535; TCP "
                             "only, as labgrid's SSH proxy carries)")
        out.append(int(port))
    return tuple(out)


def forwarded_of(value: Any) -> dict[int, int]:
    """The published forwards, "tcp:22=40123,..." (board port = the exporter's loopback
    port), as {22: 40123}; what crosses the coordinator is one string."""
    if isinstance(value, dict):
        return {int(k): int(v) for k, v in value.items()}
    out = {}
    for item in _items(value):
        board, _, host = item.removeprefix("tcp:").partition("=")
        out[int(board)] = int(host)
    return out


def published_forwards(forwarded: dict[int, int]) -> str:
    return ",".join(f"tcp:{board}={host}" for board, host in forwarded.items())


def choose_ports(board_ports: Sequence[int]) -> dict[int, int]:
    """A free loopback port for each board port, as labgrid's exporter picks ser2net's
    (the user link listens on 127.0.0.1 only: the board is not on the host's network)."""
    return {board: get_free_port() for board in board_ports}


def check_link(link: str) -> str:
    if link not in ("tap", "user"):
        raise ValueError(f"EEM board link {link!r} is not tap or user")
    return link


def check_tap(name: str) -> str:
    problem = ifname_problem(name)
    if problem:
        raise ValueError(f"EEM board tap: {problem}")
    return name


def bridge_command(*, tap: str, port: str, addresses: Sequence[str] = (), peer: str | None = None,
                   socket: str | None = None, args: Sequence[str] = (), link: str = "tap",
                   forwarded: dict[int, int] | None = None,
                   python: str = sys.executable) -> list[str]:
    """The bridge for the board at USB port path `port` (e.g. "1-1.2"), as argv; on the
    user link `forwarded` maps the board's TCP ports to the loopback ports reaching them."""
    if not port:
        raise UserError("EEM board has no USB port path (not plugged in?)")
    cmd = [python, "-m", "eembridge", "--tap", check_tap(tap), "--port", port,
           "--stats-socket", socket or socket_path(tap)]
    for address in addresses:
        cmd += ["--ip", address]
    if peer:
        cmd += ["--peer", peer]
    if link != "tap":
        cmd += ["--link", check_link(link)]
    for board_port, host_port in (forwarded or {}).items():
        cmd += ["--forward", f"tcp:{host_port}:{board_port}"]
    return cmd + [str(a) for a in args]


class BridgeProcess:
    """A bridge started by us; its output goes to `log` (appended)."""

    def __init__(self, command: list[str], *, socket: str, log: str | os.PathLike[str]) -> None:
        self.command = command
        self.socket = socket
        self.log = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # Its own session: a Ctrl-C meant for the exporter or the test does not
            # reach the bridge before we stop it in order.
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {self.log})"

    def wait_connected(self, timeout: float) -> dict[str, Any]:
        """The first stats snapshot with the device claimed; UserError (with the log's
        tail) if the bridge exits or `timeout` seconds pass first."""
        try:
            return wait_up(lambda: query(self.socket, timeout=2.0), timeout,
                           what=f"bridge for {self.socket}", exited=self._exited)
        except UserError as exc:
            raise UserError(f"{exc}; its log ends:\n{self.log_tail()}") from None

    def _exited(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"exited {self.proc.returncode} before the board was up"

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_up(fetch: Callable[[], dict[str, Any]], timeout: float, *, what: str,
            exited: Callable[[], str | None] = lambda: None) -> dict[str, Any]:
    """Poll `fetch` (a stats snapshot, or UserError) until the device is claimed; the
    snapshot. UserError naming `what` once `exited` says why or `timeout` s passed."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        why = exited()
        if why:
            raise UserError(f"{what} {why}")
        try:
            snapshot = fetch()
            if snapshot.get("connected"):
                return snapshot
            last = "device not claimed yet"
        except UserError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise UserError(f"{what} not up after {timeout:g} s ({last})")
        time.sleep(POLL)


def default_log(tap: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{tap}.log")
