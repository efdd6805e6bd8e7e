"""`eembridge-labgrid-exporter`: labgrid's exporter, with EEM boards among its exports.

labgrid's exporter knows its export classes from a dict in its own module
(`labgrid.remote.exporter.exports`, class name -> ResourceExport subclass) and offers
no entry point or config key to add one: a class it does not know is published
verbatim, always available, with nothing matched by udev and nothing started on
acquire. So this command is labgrid's exporter (`labgrid.remote.exporter.main`, same
options, same YAML) run after adding `EEMBoard` to that dict.

An `EEMBoard` export is labgrid's ser2net pattern: the board is matched by udev on
this host; while a place holds it, the exporter runs its bridge (started at acquire,
stopped at release, and stopped while the board is unplugged); clients see a
`RemoteEEMBoard` with the TAP's name and addresses and the control socket's path. With
`link: user` the bridge runs on libslirp with the board's `forwards` on loopback ports
picked at each start, published (`forwarded`) for the driver's connect().
"""

from __future__ import annotations

import atexit
import sys
from typing import Any

import attr
from labgrid.remote import exporter as lg_exporter

from ..observe.control import socket_path
from .bridgeproc import BridgeProcess, bridge_command, choose_ports, default_log, published_forwards
from .resource import EEMBoard

# Bridges of places still acquired when the exporter stops (SIGTERM, SIGINT: labgrid's
# exporter returns from main): stopped at interpreter exit, not left to run without it.
_running: set[BridgeProcess] = set()


@atexit.register
def _stop_all() -> None:
    for bridge in list(_running):
        bridge.stop()
        _running.discard(bridge)


@attr.s(eq=False)
class EEMBoardExport(lg_exporter.ResourceExport):
    """Publishes an EEMBoard; runs its bridge while acquired."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # mypy sees only our fields: labgrid's attrs bases (target, name) are untyped.
        self.local = EEMBoard(target=None, name=None, **self.local_params)  # type: ignore[call-arg]
        self.data["cls"] = "RemoteEEMBoard"
        self.socket = self.local.socket or socket_path(self.local.tap)
        self.bridge: BridgeProcess | None = None
        self.forwarded: dict[int, int] = {}  # chosen at each start, as ser2net's port is

    def _get_params(self) -> dict[str, Any]:
        board = self.local
        return {
            "host": self.host,
            "busnum": board.busnum,
            "devnum": board.devnum,
            "path": board.path,
            "vendor_id": board.vendor_id,
            "model_id": board.model_id,
            "serial": board.serial,
            "tap": board.tap,
            "addresses": ",".join(board.addresses),
            "peer": board.peer,
            "socket": self.socket,
            "python": sys.executable,  # what a client runs `eembridge stats` with, over SSH
            "link": board.link,
            "forwarded": published_forwards(self.forwarded),
        }

    def _get_start_params(self) -> dict[str, Any]:
        return {"path": self.local.path}

    def _start(self, start_params: dict[str, Any]) -> None:
        board = self.local
        self.forwarded = choose_ports(board.forwards)
        command = bridge_command(tap=board.tap, port=start_params["path"], addresses=board.addresses,
                                 peer=board.peer, socket=self.socket, args=board.args,
                                 link=board.link, forwarded=self.forwarded)
        self.bridge = BridgeProcess(command, socket=self.socket, log=default_log(board.tap))
        self.bridge.start()
        _running.add(self.bridge)
        self.logger.info("started bridge for %s: %s", start_params["path"], " ".join(command))

    def _stop(self, start_params: dict[str, Any]) -> None:
        if self.bridge is None:
            return
        code = self.bridge.stop()
        _running.discard(self.bridge)
        self.logger.info("stopped bridge for %s (exit %s)", start_params["path"], code)
        self.bridge = None
        self.forwarded = {}


def register() -> None:
    lg_exporter.exports["EEMBoard"] = EEMBoardExport


def main() -> None:
    register()
    lg_exporter.main()


if __name__ == "__main__":
    main()
