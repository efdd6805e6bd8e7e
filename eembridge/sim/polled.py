"""A network side for the simulated device made of any TAP-like file, with no netlink.

`PolledNetworkSide` moves frames between the device and an object with `fileno()`,
`read_into(buffer)` (one frame, 0 when none waits, never blocking), `write(frame)`
(bytes written, 0 when refused) and `close()`: eembridge.link.tap.Tap for SimLink's TAP in its
namespace (link.TapNetworkSide), or a bare tun fd. It imports no pyroute2, so a device
started in a slow guest (tests/interop/ffs_eem_device.py) is up in a fraction of the
time; whoever created the interface configures it.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Any

from .device import NetworkSide

FRAME_BUFFER = 65536


class PolledNetworkSide(NetworkSide):
    """Frames to and from `tap`; a thread polls it and wakes the device."""

    def __init__(self, tap: Any, name: str) -> None:
        self.tap = tap
        self.name = name
        self._buffer = bytearray(FRAME_BUFFER)
        self._wake: Callable[[], None] = lambda: None
        self._drained = threading.Event()
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="sim-tap", daemon=True)
        self.write_drops = 0

    def attach(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._watcher.start()

    def _watch(self) -> None:
        """Tell the device when the TAP has frames; then wait until it took them all."""
        poller = select.poll()
        poller.register(self.tap.fileno(), select.POLLIN)
        while not self._closing:
            if not poller.poll(200):
                continue
            self._drained.clear()
            self._wake()
            self._drained.wait(0.2)

    def next_frames(self, max_frames: int) -> list[bytes]:
        frames: list[bytes] = []
        while len(frames) < max_frames:
            n = self.tap.read_into(self._buffer)
            if n == 0:
                self._drained.set()
                break
            frames.append(bytes(self._buffer[:n]))
        return frames

    def deliver(self, frame: bytes) -> None:
        if not self.tap.write(frame):
            self.write_drops += 1  # the kernel refused it; the TAP counts why

    def close(self) -> None:
        self._closing = True
        if self._watcher.is_alive():
            self._watcher.join(1.0)
        self.tap.close()
