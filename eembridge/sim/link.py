"""The simulated device with a real network side: a TAP in its own network namespace.

This is the "measuring module" of the demo and the far end of the bridge tests: the
device's Ethernet side is a kernel interface in a namespace of its own, so a TCP server
there talks to clients on the host through the simulated USB link and the bridge, with
the kernel's TCP at both ends.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Any

from ..netns import configure_link, create_netns, delete_netns, unique_name
from ..tap import Tap
from .device import NetworkSide, SimDevice
from .faults import Faults
from .transport import SimTransport

FRAME_BUFFER = 65536


class TapNetworkSide(NetworkSide):
    """Frames to and from a TAP that lives in namespace `namespace`."""

    def __init__(self, namespace: str, address: str, mtu: int = 1500) -> None:
        self.namespace = namespace
        # Created here, then moved: the fd keeps working in the other namespace.
        self.tap = Tap(unique_name("eemsim"), mode="create", mtu=mtu)
        self.name = self.tap.name
        self.tap.move_to_netns(namespace)
        configure_link(namespace, self.name, [address], up=True, mtu=mtu)
        self.mac = self.tap.mac
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
            self.write_drops += 1  # the kernel refused it; its reason is in tap.write_errors

    def close(self) -> None:
        self._closing = True
        if self._watcher.is_alive():
            self._watcher.join(1.0)
        self.tap.close()


class SimLink:
    """A simulated EEM device whose network side is a TAP in a fresh namespace."""

    def __init__(
        self,
        address: str = "169.254.7.1/24",
        *,
        max_packet: int = 512,
        tx_crc: bool = False,
        batch: bool = False,
        loss: float = 0.0,
        flip: float = 0.0,
        mtu: int = 1500,
        seed: int | None = None,
        faults: Faults | None = None,
        **device_options: Any,
    ) -> None:
        self.address = address
        self.ip = address.split("/")[0]
        self.namespace = create_netns("eemsim-")
        try:
            self.network = TapNetworkSide(self.namespace, address, mtu)
            self.mac = self.network.mac
            faults = faults or Faults(loss=loss, flip=flip, seed=seed)
            self.device = SimDevice(self.network, max_packet=max_packet, batch=batch, crc=tx_crc,
                                    faults=faults, **device_options)
        except BaseException:
            delete_netns(self.namespace)
            raise

    def connect(self) -> SimTransport:
        return self.device.connect()

    def fault_counters(self) -> dict[str, int]:
        return self.device.fault_counters()

    def close(self) -> None:
        self.device.close()
        self.network.close()
        delete_netns(self.namespace)

    def __enter__(self) -> SimLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
