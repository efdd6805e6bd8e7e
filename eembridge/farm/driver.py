"""`EEMBridgeDriver`: a board's network for a labgrid test, with the link's counters.

Bound to an `EEMBoard` (on the client's own host) the driver owns the bridge: started
at activate, waited for until the device is claimed, stopped at deactivate (the TAP
is gone, cdc_eem has the interface back). Bound to a `RemoteEEMBoard` the exporter
owns it (running while the place is acquired): activate waits until it is up.

The test gets `tap`, `addresses`, `peer` and `host` (where the TAP is), `connect(port)`
(with `link: user`: where this client reaches the board's TCP port), `stats()`
(the bridge's snapshot, as `eembridge stats --json` prints it for one TAP) and
`echo()` (EEM Echo round trips, `eembridge echo --json`'s summary). On the exporter's
own host they talk to the control socket; from elsewhere they run `eembridge stats` /
`eembridge echo` on the exporter through labgrid's SSH connection (the resource's
`command_prefix`), as labgrid's drivers run their tools there.
"""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any

import attr
from labgrid.driver.common import Driver
from labgrid.factory import target_factory
from labgrid.resource.common import NetworkResource
from labgrid.step import step
from labgrid.util.proxy import proxymanager

from ..core.errors import UserError
from ..observe import control
from .bridgeproc import BridgeProcess, bridge_command, choose_ports, default_log, wait_up
from .resource import EEMBoard


def on_this_host(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn())


@target_factory.reg_driver
@attr.s(eq=False)
class EEMBridgeDriver(Driver):
    """Brings an EEM board's link up and reports on it.

    Args:
        timeout (float): seconds for the bridge to claim the board at activate
    """

    bindings = {"board": {"EEMBoard", "RemoteEEMBoard"}}
    timeout: float = attr.ib(default=60.0, converter=float)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.bridge: BridgeProcess | None = None
        self._forwarded: dict[int, int] = {}  # a local EEMBoard's, chosen at activate

    # -- where the bridge is --------------------------------------------------------

    @property
    def socket(self) -> str:
        return self.board.socket or control.socket_path(self.board.tap)

    @property
    def local(self) -> bool:
        """The control socket is reachable here (no SSH to the exporter needed)."""
        if isinstance(self.board, EEMBoard):
            return True
        extra = getattr(self.board, "extra", None) or {}
        return not extra.get("proxy_required") and on_this_host(self.board.host)

    @property
    def host(self) -> str:
        return socket.gethostname() if isinstance(self.board, EEMBoard) else self.board.host

    @property
    def tap(self) -> str:
        return self.board.tap

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.board.addresses

    @property
    def peer(self) -> str | None:
        return self.board.peer

    @property
    def forwarded(self) -> dict[int, int]:
        """`link: user`: the board's TCP port -> the loopback port on `host` reaching it."""
        return self._forwarded if isinstance(self.board, EEMBoard) else self.board.forwarded

    # -- life cycle ------------------------------------------------------------------

    def on_activate(self) -> None:
        if isinstance(self.board, EEMBoard):
            board = self.board
            self._forwarded = choose_ports(board.forwards)
            command = bridge_command(tap=board.tap, port=board.path, addresses=board.addresses,
                                     peer=board.peer, socket=self.socket, args=board.args,
                                     link=board.link, forwarded=self._forwarded)
            self.bridge = BridgeProcess(command, socket=self.socket, log=default_log(board.tap))
            self.bridge.start()
            try:
                self.bridge.wait_connected(self.timeout)
            except Exception:
                self.bridge.stop()
                self.bridge = None
                raise
        else:
            wait_up(self._stats, self.timeout, what=f"bridge for {self.tap} on {self.board.host}")

    def on_deactivate(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
            self._forwarded = {}

    # -- what a test asks --------------------------------------------------------------

    @Driver.check_active
    @step(args=["board_port"], result=True)
    def connect(self, board_port: int) -> tuple[str, int]:
        """(host, port) on which a TCP connection from this client reaches the board's
        `board_port` (a `forwards` entry of a `link: user` board). The forward listens on
        the exporter's loopback only, so off the exporter it goes through labgrid's SSH
        proxy to that host (`ssh -L`, kept for the session as labgrid keeps its forwards)."""
        forwarded = self.forwarded
        if board_port not in forwarded:
            have = ", ".join(f"tcp:{p}" for p in forwarded) or "none"
            raise UserError(f"EEM board {self.tap}: no forward to its port {board_port} "
                            f"(forwards: {have}; they need link: user)")
        port = forwarded[board_port]
        if self.local:
            return "127.0.0.1", port
        extra = getattr(self.board, "extra", None) or {}
        exporter = extra.get("proxy") if extra.get("proxy_required") else self.board.host
        listener = NetworkResource(None, None, host="127.0.0.1")
        listener.extra = {"proxy": exporter, "proxy_required": True}  # loopback: via its host
        return proxymanager.get_host_and_port(listener, force_port=port)

    @Driver.check_active
    @step()
    def stats(self) -> dict[str, Any]:
        """Every counter of the board's bridge (one `eembridge stats --json` entry)."""
        return self._stats()

    @Driver.check_active
    @step(args=["count"])
    def echo(self, count: int = 4, timeout: float = 1.0, interval: float = 0.2) -> dict[str, Any]:
        """`count` EEM Echoes to the board: sent, received, loss, rtt_*_ms, replies."""
        if self.local:
            replies, summary = control.echo(self.socket, count, timeout, interval)
            return {"replies": replies, **summary}
        out = self._remote(["echo", "--json", "--socket", self.socket, "-c", str(count),
                            "-W", str(timeout), "-i", str(interval)], ok=(0, 1))
        return dict(out)

    def _stats(self) -> dict[str, Any]:
        if self.local:
            return control.query(self.socket)
        out = self._remote(["stats", "--json", "--socket", self.socket])
        try:
            return dict(out[self.tap])
        except (KeyError, TypeError):
            raise UserError(f"{self.board.host}: no stats for {self.tap} in {out!r:.200}") from None

    def _remote(self, argv: list[str], ok: tuple[int, ...] = (0,)) -> Any:
        """`eembridge ARGV` on the exporter through labgrid's SSH connection; its JSON."""
        command = self.board.command_prefix + [self.board.python, "-m", "eembridge", *argv]
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode not in ok:
            raise UserError(f"{self.board.host}: eembridge {argv[0]} exited {proc.returncode}: "
                            f"{proc.stderr.strip()[-300:]}")
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise UserError(f"{self.board.host}: eembridge {argv[0]} printed no JSON: "
                            f"{proc.stdout.strip()[-300:]}") from None
