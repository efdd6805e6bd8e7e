"""The simulated device with a real network side: a TAP in its own network namespace.

This is the "measuring module" of the demo and the far end of the bridge tests: the
device's Ethernet side is a kernel interface in a namespace of its own, so a TCP server
there talks to clients on the host through the simulated USB link and the bridge, with
the kernel's TCP at both ends.
"""

from __future__ import annotations

from typing import Any

from ..link.netns import configure_link, create_netns, delete_netns, unique_name
from ..link.tap import Tap
from .device import SimDevice
from .faults import Faults
from .polled import PolledNetworkSide
from .transport import SimTransport


class TapNetworkSide(PolledNetworkSide):
    """Frames to and from a TAP that lives in namespace `namespace`."""

    def __init__(self, namespace: str, address: str, mtu: int = 1500) -> None:
        self.namespace = namespace
        # Created here, then moved: the fd keeps working in the other namespace.
        tap = Tap(unique_name("eemsim"), mode="create", mtu=mtu)
        super().__init__(tap, tap.name)
        tap.move_to_netns(namespace)
        configure_link(namespace, self.name, [address], up=True, mtu=mtu)
        self.mac = tap.mac


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
