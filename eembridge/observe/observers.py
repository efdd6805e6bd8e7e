"""What the main job runs beside a bridge to be watched: --metrics, --pcap, --usb-pcap.

None of it touches the per-frame data path: metrics read the stats snapshot at scrape
time, --pcap reads the TAP through its own packet socket, --usb-pcap wraps the
transport (one record per transfer submission or completion).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ..core.transport import Transport

log = logging.getLogger("eembridge.observe.observers")


class Observers:
    """Set up before the bridge (wrap the connector), attach after it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..core.options import parse_address
        from .tapcapture import parse_rotate

        self.args = args
        # Check every argument before anything is opened: bad input is one line.
        if args.metrics:
            parse_address(args.metrics)
        self.rotate = parse_rotate(args.pcap_rotate) if args.pcap_rotate else None
        if self.rotate and not args.pcap:
            from ..core.errors import UserError

            raise UserError("--pcap-rotate needs --pcap FILE")
        self.recorder: Any = None
        self.capture: Any = None
        self.metrics: Any = None
        self._bridge: Any = None

    def wrap(self, connect: Callable[[], Transport], tap: str) -> Callable[[], Transport]:
        """The connector the bridge gets: records transfers, starts the TAP capture."""
        args = self.args
        if args.usb_pcap:
            from .recording import UsbRecorder

            self.recorder = UsbRecorder(args.usb_pcap)
            connect = self.recorder.wrap(connect)
        if args.pcap:
            from .tapcapture import RotatingPcap, TapCapture

            max_bytes, files = self.rotate or (None, 1)
            self.capture = TapCapture(RotatingPcap(args.pcap, max_bytes, files))
            inner = connect
            started: list[bool] = []

            def connect_captured() -> Transport:
                # The bridge's thread calls this once the TAP exists, before any transfer.
                if not started:
                    self.capture.start(tap)
                    started.append(True)
                return inner()

            connect = connect_captured
        return connect

    def attach(self, bridge: Any) -> None:
        if self.capture is not None:
            bridge.observers["pcap"] = self.capture.counters
        if self.recorder is not None:
            bridge.observers["usb_pcap"] = self.recorder.counters
        if self.args.metrics:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self.args.metrics, bridge.stats)
            bridge.servers["metrics"] = self.metrics.counters
            self._bridge = bridge
            log.info("Prometheus metrics on http://%s/metrics", self.args.metrics)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            # No cycle left (bridge -> servers -> metrics -> bridge.stats) for the
            # collector at exit: see ControlServer.close.
            self._bridge.servers.pop("metrics", None)
            self.metrics = None
        if self.capture is not None:
            self.capture.stop()
        if self.recorder is not None:
            self.recorder.close()


@contextlib.contextmanager
def observing(args: argparse.Namespace) -> Iterator[Observers]:
    observers = Observers(args)
    try:
        yield observers
    finally:
        observers.close()
