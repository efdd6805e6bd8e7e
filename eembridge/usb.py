"""The libusb transport for the bridge: find the selected EEM device, claim it, give it back.

connector(args) resolves the device once (a clear error now, not later in the bridge
thread) and returns connect(): each call finds the SAME device again (same serial, or
same port without one), detaches the kernel driver from its EEM interface, claims it
and returns a Transport; TransportGone while it is absent, so the bridge's reconnect
loop waits for it. close() releases the interface and re-attaches the driver it detached.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from . import discovery
from .discovery import EemInterface
from .errors import UserError
from .transport import DeviceInfo, Direction, Transport, TransportGone
from .usbselect import Selector, identity, select

log = logging.getLogger("eembridge.usb")


class ClaimedDevice(Transport):
    """A Transport over eembridge._usb.UsbTransport that gives the device back on close."""

    def __init__(self, record: EemInterface, tap: str) -> None:
        from ._usb import UsbError, UsbTransport

        self.record = record
        try:
            fd = os.open(record.node, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            raise UserError(
                f"{record.node}: permission denied opening {record.describe()}; run as root or "
                f'add a udev rule: SUBSYSTEM=="usb", ATTR{{idVendor}}=="{record.vid:04x}", '
                f'ATTR{{idProduct}}=="{record.pid:04x}", MODE="0660", GROUP="plugdev"'
            ) from None
        except FileNotFoundError:
            raise TransportGone(f"{record.node} is gone") from None
        info = DeviceInfo(max_packet=record.max_packet, speed=record.speed,
                          description=record.describe(), serial=record.serial)
        try:
            self._usb = UsbTransport(fd, record.interface, record.ep_in, record.ep_out, info)
        except OSError:
            os.close(fd)
            raise TransportGone(f"{record.node} could not be opened") from None
        self.info = info
        self.clear_halts = 0
        self._claim_file: str | None = None
        where = record.sysfs_interface
        try:
            if self._usb.detach_kernel_driver():
                log.info("detached %s from %s", record.driver or "kernel driver", where)
            self._usb.claim(record.alt_setting)
        except UsbError as exc:
            self.close()
            if "NO_DEVICE" in str(exc):
                raise TransportGone(str(exc)) from None
            raise UserError(f"cannot claim {where} ({record.describe()}): {exc}") from None
        self._write_claim(tap)

    def _write_claim(self, tap: str) -> None:
        path = discovery.claim_path(self.record.port, self.record.interface)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"pid": os.getpid(), "tap": tap, "serial": self.record.serial,
                           "description": self.record.describe()}, f)
            self._claim_file = path
        except OSError as exc:
            log.warning("could not record the claim in %s: %s (list will not show it)", path, exc)

    def fileno(self) -> int:
        return self._usb.fileno()

    def submit_in(self, buffer: memoryview, tag: int) -> None:
        self._usb.submit_in(buffer, tag)

    def submit_out(self, buffer: memoryview, tag: int) -> None:
        self._usb.submit_out(buffer, tag)

    def completions(self):  # -> list[Completion]
        return self._usb.completions()

    # The native data path (transport.NativeDataPath): transfers handled in C.
    def start_rx(self, rxpath: Any, in_flight: int) -> None:
        self._usb.start_rx(rxpath, in_flight)

    def rx_poll(self) -> tuple[list[Any], int, bool, int]:
        return self._usb.rx_poll()

    def rx_resume(self) -> None:
        self._usb.rx_resume()

    def rx_stats(self) -> dict[str, Any]:
        return self._usb.rx_stats()

    def start_tx(self, txpath: Any) -> None:
        self._usb.start_tx(txpath)

    @property
    def tx_wants_tap(self) -> bool:
        return self._usb.tx_wants_tap

    def tx_kick(self) -> None:
        self._usb.tx_kick()

    def tx_poll(self) -> tuple[int, bool]:
        return self._usb.tx_poll()

    def tx_resume(self) -> None:
        self._usb.tx_resume()

    def tx_stats(self) -> dict[str, Any]:
        return self._usb.tx_stats()

    def clear_halt(self, direction: Direction) -> None:
        self.clear_halts += 1
        self._usb.clear_halt(direction)

    def close(self) -> None:
        if self._claim_file:
            try:
                os.unlink(self._claim_file)
            except OSError:
                pass
            self._claim_file = None
        where = self.record.sysfs_interface
        for step in self._usb.close():
            if step == "reattached":
                log.info("re-attached %s to %s", self.record.driver or "kernel driver", where)
            elif step == "released":
                log.info("released %s", where)
            elif "NO_DEVICE" in step:  # unplugged: the kernel already dropped both
                log.info("%s: device gone, nothing to %s", where, step.split(":")[0].split()[0])
            else:
                log.warning("%s: %s", where, step)


def _find(selector: Selector) -> list[EemInterface]:
    return [r for r in discovery.find_eem_interfaces() if selector.matches(r)]


def _refuse_if_held(record: EemInterface) -> None:
    if record.held_by.startswith("eembridge") or record.held_by.startswith("usbfs"):
        raise UserError(f"{record.describe()} is already claimed by {record.held_by}")


def connector(args: argparse.Namespace) -> Callable[[], Transport]:
    selector = Selector.from_args(args)
    wait = getattr(args, "wait", False)
    records = discovery.find_eem_interfaces()
    if not records and not wait:
        raise UserError("no EEM devices found (use --wait to wait for one)")
    chosen: list[Selector] = []
    if records:
        try:
            record = select(records, selector)
        except UserError:
            if not wait or any(selector.matches(r) for r in records):
                raise
        else:
            _refuse_if_held(record)
            chosen.append(identity(record))
    if not chosen:
        log.info("waiting for an EEM device matching %s", selector)
    tap = args.tap

    def connect() -> Transport:
        wanted = chosen[0] if chosen else selector
        found = _find(wanted)
        if not found:
            raise TransportGone(f"no device matching {wanted}")
        if len(found) > 1:
            log.warning("%d devices match %s; taking %s", len(found), wanted, found[0].describe())
        record = found[0]
        if record.held_by.startswith("eembridge"):
            log.warning("%s is held by %s; waiting", record.describe(), record.held_by)
            raise TransportGone("held by another bridge")
        transport = ClaimedDevice(record, tap)
        if not chosen:
            chosen.append(identity(record))
        return transport

    return connect
