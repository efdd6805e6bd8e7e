"""The libusb transport for the bridge: find the selected EEM device, claim it, give it back.

connector(args) resolves the device once (a clear error now, not later in the bridge
thread) and returns connect(): each call finds the SAME device again (same serial, or
same port without one), detaches the kernel driver from its EEM interface, claims it
and returns a Transport; TransportGone while it is absent, so the bridge's reconnect
loop waits for it. close() releases the interface and re-attaches the driver it detached.

A bridge killed by SIGKILL cannot re-attach: the kernel then drops its claim when the
fd closes but does not probe the interface again, so cdc_eem stays unbound (checked
in the guest, tests/interop/NOTES.md). The claim record under /run/eembridge/claims
names the driver the bridge detached; reattach_stale() (`eembridge release`) reads the
records of bridges that are gone and asks the kernel to bind a driver again.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import UserError
from ..core.ioctl import IO, IOWR
from ..core.transport import BUSY_POLLS, DeviceInfo, Direction, Transport, TransportGone
from ..link import privileges
from . import discovery
from .discovery import EemInterface
from .selector import Selector, identity, select

log = logging.getLogger("eembridge.usb.device")


def permission_hint(record: EemInterface) -> str:
    """The one line for EACCES on the node: which node, which device, and the fix."""
    return (f"{record.node}: permission denied opening {record.describe()}; run as root or "
            f'add a udev rule: SUBSYSTEM=="usb", ATTR{{idVendor}}=="{record.vid:04x}", '
            f'ATTR{{idProduct}}=="{record.pid:04x}", MODE="0660", GROUP="plugdev" '
            "(and be in group plugdev)")


class ClaimedDevice(Transport):
    """A Transport over eembridge._fast.usb.UsbTransport that gives the device back on close."""

    def __init__(self, record: EemInterface, tap: str, busy_polls: int = BUSY_POLLS) -> None:
        from .._fast.usb import ERROR_NO_DEVICE, UsbError, UsbTransport

        self.record = record
        try:
            fd = os.open(record.node, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            raise UserError(permission_hint(record)) from None
        except FileNotFoundError:
            raise TransportGone(f"{record.node} is gone") from None
        info = DeviceInfo(max_packet=record.max_packet, speed=record.speed,
                          description=record.describe(), serial=record.serial,
                          takes_batches=record.takes_batches)
        try:
            self._usb = UsbTransport(fd, record.interface, record.ep_in, record.ep_out, info,
                                     busy_polls)
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
            if exc.code == ERROR_NO_DEVICE:
                raise TransportGone(str(exc)) from None
            raise UserError(f"cannot claim {where} ({record.describe()}): {exc}") from None
        self._write_claim(tap)

    def _write_claim(self, tap: str) -> None:
        path = discovery.claim_path(self.record.port, self.record.interface)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                # "detached": what `eembridge release` gives the interface back to if
                # this process dies without closing (SIGKILL).
                json.dump({"pid": os.getpid(), "tap": tap, "serial": self.record.serial,
                           "description": self.record.describe(),
                           "interface": self.record.sysfs_interface,
                           "detached": (self.record.driver or "kernel driver")
                           if self._usb.detached else None}, f)
            self._claim_file = path
        except OSError as exc:
            log.warning("could not record the claim in %s: %s (list will not show it)", path, exc)

    @property
    def busy_polls(self) -> int:
        return self._usb.busy_polls

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

    def tx_poll(self) -> tuple[int, bool]:
        return self._usb.tx_poll()

    def tx_resume(self) -> None:
        self._usb.tx_resume()

    def tx_stats(self) -> dict[str, Any]:
        return self._usb.tx_stats()

    def loop_stats(self) -> dict[str, int]:
        return self._usb.loop_stats()

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
        from .._fast.usb import ERROR_NO_DEVICE, error_name

        for step, code in self._usb.close():
            if step == "cancel":
                log.warning("%s: %d transfers did not end after cancel", where, code)
            elif code == ERROR_NO_DEVICE:  # unplugged: the kernel already dropped both
                log.info("%s: device gone, nothing to %s", where, step)
            elif code:
                log.warning("%s: %s failed: %s", where, step, error_name(code))
            elif step == "reattach":
                log.info("re-attached %s to %s", self.record.driver or "kernel driver", where)
            else:
                log.info("released %s", where)


def _find(selector: Selector) -> list[EemInterface]:
    return [r for r in discovery.find_eem_interfaces() if selector.matches(r)]


def _refuse_if_held(record: EemInterface) -> None:
    if record.held_by.startswith("eembridge") or record.held_by.startswith("usbfs"):
        raise UserError(f"{record.describe()} is already claimed by {record.held_by}")


def board_connector(device: str | None = None, *, serial: str | None = None,
                    port: str | None = None, interface: int | None = None,
                    name: str = "usb0", wait: bool = False) -> Callable[[], Transport]:
    """`connector` for Python callers (Bridge's first argument): the board chosen as the
    command line's --device (VID:PID or BUS:ADDR), --serial, --port, --interface and
    --wait choose it; name is the bridge's link name, for the claim and the logs."""
    return connector(argparse.Namespace(device=device, serial=serial, port=port,
                                        interface=interface, tap=name, wait=wait))


def connector(args: argparse.Namespace) -> Callable[[], Transport]:
    selector = Selector.from_args(args)
    wait_timeout: float | None = getattr(args, "wait_timeout", None)
    wait = getattr(args, "wait", False) or wait_timeout is not None
    if wait_timeout is not None and wait_timeout <= 0:
        raise UserError(f"--wait-timeout {wait_timeout:g}: must be more than 0 seconds")
    started = time.monotonic()
    # The first pyusb call starts libusb's own thread: let it be born without capabilities.
    records = privileges.run_without_capabilities(discovery.find_eem_interfaces)
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
            _note_stale_claim(record)
            chosen.append(identity(record))
    if not chosen:
        log.info("waiting%s for an EEM device matching %s",
                 f" up to {wait_timeout:g} s" if wait_timeout else "", selector)
    tap = args.tap
    busy_polls = getattr(args, "busy_poll", BUSY_POLLS)
    connected: list[bool] = []

    def connect() -> Transport:
        wanted = chosen[0] if chosen else selector
        if (wait_timeout is not None and not connected
                and time.monotonic() - started > wait_timeout):
            what = "was free to claim" if chosen else "appeared"
            raise UserError(f"--wait-timeout {wait_timeout:g} s expired: no EEM device "
                            f"matching {wanted} {what}")
        transport = _connect(wanted)
        connected.append(True)
        return transport

    def _connect(wanted: Selector) -> Transport:
        found = _find(wanted)
        if not found:
            raise TransportGone(f"no device matching {wanted}")
        if len(found) > 1:
            log.warning("%d devices match %s; taking %s", len(found), wanted, found[0].describe())
        record = found[0]
        if record.held_by.startswith("eembridge"):
            log.warning("%s is held by %s; waiting", record.describe(), record.held_by)
            raise TransportGone("held by another bridge")
        transport = ClaimedDevice(record, tap, busy_polls)
        if not chosen:
            chosen.append(identity(record))
        return transport

    return connect


def _note_stale_claim(record: EemInterface) -> None:
    stale = discovery.stale_claim(record.port, record.interface)
    if stale is not None and stale.get("detached"):
        log.info("%s: eembridge pid %s is gone and left %s detached; taking the interface over",
                 record.sysfs_interface, stale.get("pid"), stale["detached"])


# <linux/usbdevice_fs.h>: USBDEVFS_IOCTL = _IOWR('U', 18, struct usbdevfs_ioctl), the struct
# being {int ifno; int ioctl_code; void *data}; USBDEVFS_CONNECT = _IO('U', 23).
_USBDEVFS_IOCTL_ARG = "iiP"
USBDEVFS_IOCTL = IOWR("U", 18, struct.calcsize(_USBDEVFS_IOCTL_ARG))
USBDEVFS_CONNECT = IO("U", 23)


def bind_kernel_driver(record: EemInterface) -> None:
    """Ask the kernel to probe drivers for the interface again (what libusb's
    attach_kernel_driver does): through the device node, so a udev rule's access is enough."""
    try:
        fd = os.open(record.node, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise UserError(permission_hint(record)) from None
    try:
        request = bytearray(struct.pack(_USBDEVFS_IOCTL_ARG, record.interface, USBDEVFS_CONNECT, 0))
        fcntl.ioctl(fd, USBDEVFS_IOCTL, request, True)
    except OSError as exc:
        raise UserError(f"{record.sysfs_interface}: the kernel would not bind a driver: "
                        f"{exc.strerror}") from None
    finally:
        os.close(fd)


def reattach_stale(selector: Selector, claims_dir: str = discovery.CLAIMS_DIR) -> list[str]:
    """Give back interfaces that bridges now gone (SIGKILL, crash) left detached.

    One line per claim record looked at; a record is removed once nothing is left to do.
    """
    done = []
    records = {(r.port, r.interface): r for r in discovery.find_eem_interfaces(claims_dir=claims_dir)}
    for path in sorted(glob.glob(os.path.join(claims_dir, "*.json"))):
        claim = discovery.read_claim_file(path)
        if claim is None or discovery.claim_alive(claim):
            continue  # a running bridge's: stop it instead, it gives the device back
        port, _, number = os.path.basename(path).removesuffix(".json").rpartition(":")
        record = records.get((port, int(number))) if number.isdigit() else None
        where = claim.get("interface") or f"{port} interface {number}"
        if record is None:
            if selector == Selector():
                done.append(f"{where}: device gone; removed the record of eembridge pid "
                            f"{claim.get('pid')}")
                _unlink(path)
            continue
        if not selector.matches(record):
            continue
        detached = claim.get("detached")
        if record.driver is not None:
            if record.driver != "usbfs":
                done.append(f"{where}: already bound to {record.driver}")
                _unlink(path)
            else:
                done.append(f"{where}: held by another program (usbfs), left alone")
            continue
        if not detached:
            done.append(f"{where}: eembridge pid {claim.get('pid')} had detached no driver; "
                        "nothing to give back")
            _unlink(path)
            continue
        bind_kernel_driver(record)
        now = discovery.interface_driver(record.sysfs_interface)
        if now is None:
            raise UserError(f"{where}: asked the kernel to bind {detached} again, but no driver "
                            "took the interface (is the module loaded?)")
        done.append(f"{where}: re-attached {now} (left detached by eembridge pid "
                    f"{claim.get('pid')}, which is gone)")
        log.info("%s", done[-1])
        _unlink(path)
    return done


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)
