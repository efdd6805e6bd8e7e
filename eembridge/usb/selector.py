"""Which EEM interface the user means: --device, --serial, --port, --interface over
discovery records."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..core.errors import UserError
from .discovery import EemInterface


@dataclass(frozen=True)
class Selector:
    vid_pid: tuple[int, int] | None = None
    bus_addr: tuple[int, int] | None = None
    serial: str | None = None
    port: str | None = None
    interface: int | None = None  # for a device with more than one EEM function

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selector:
        vid_pid = bus_addr = None
        device = getattr(args, "device", None)
        if device:
            left, sep, right = device.partition(":")
            try:
                if not sep:
                    raise ValueError
                if len(left) == 4 and len(right) == 4:
                    vid_pid = (int(left, 16), int(right, 16))
                else:
                    bus_addr = (int(left, 10), int(right, 10))
            except ValueError:
                raise UserError(f"--device {device}: expected VID:PID (1d6b:0104) or BUS:ADDR (1:3)") from None
        interface = getattr(args, "interface", None)
        if interface is not None and not 0 <= interface <= 255:
            raise UserError(f"--interface {interface}: expected an interface number 0..255")
        return cls(vid_pid, bus_addr, getattr(args, "serial", None), getattr(args, "port", None),
                   interface)

    def matches(self, record: EemInterface) -> bool:
        if self.vid_pid and (record.vid, record.pid) != self.vid_pid:
            return False
        if self.bus_addr and (record.bus, record.address) != self.bus_addr:
            return False
        if self.serial is not None and record.serial != self.serial:
            return False
        if self.interface is not None and record.interface != self.interface:
            return False
        return self.port is None or record.port == self.port

    def __str__(self) -> str:
        parts = []
        if self.vid_pid:
            parts.append("device {:04x}:{:04x}".format(*self.vid_pid))
        if self.bus_addr:
            parts.append("bus {} addr {}".format(*self.bus_addr))
        if self.serial is not None:
            parts.append(f"serial {self.serial}")
        if self.port is not None:
            parts.append(f"port {self.port}")
        if self.interface is not None:
            parts.append(f"interface {self.interface}")
        return ", ".join(parts) or "any EEM device"


def select(records: list[EemInterface], selector: Selector) -> EemInterface:
    """The one record the selector names; UserError for none or several."""
    found = [r for r in records if selector.matches(r)]
    if not found:
        seen = "; ".join(r.describe() for r in records) or "none"
        raise UserError(f"no EEM device matches {selector} (EEM devices present: {seen})")
    if len(found) > 1:
        listing = "; ".join(r.describe() for r in found)
        same_device = len({(r.bus, r.address) for r in found}) == 1
        raise UserError(f"{len(found)} EEM {'interfaces' if same_device else 'devices'} match "
                        f"{selector}: {listing} (choose one with "
                        f"{'--interface N' if same_device else '--serial, --port or --device BUS:ADDR'})")
    return found[0]


def identity(record: EemInterface) -> Selector:
    """What finds the SAME interface after a replug: the device's serial, else its port
    (+ VID:PID), and the interface number (a device may have two EEM functions)."""
    if record.serial:
        return Selector(vid_pid=(record.vid, record.pid), serial=record.serial,
                        interface=record.interface)
    return Selector(vid_pid=(record.vid, record.pid), port=record.port, interface=record.interface)
