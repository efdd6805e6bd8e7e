"""Find CDC-EEM interfaces on every USB device (pyusb descriptors + sysfs).

One record per EEM interface (class 0x02, subclass 0x0C, protocol 0x07), wherever it
sits in the device (composite CDC-ACM + EEM devices put it at interface 2). Reading
descriptors needs no access to /dev/bus/usb: libusb takes them from sysfs, and so do we
for the serial number and the driver bound to the interface.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

SYSFS = "/sys/bus/usb/devices"
CLAIMS_DIR = "/run/eembridge/claims"
EEM_CLASS = (0x02, 0x0C, 0x07)
SPEEDS = {1: "low", 2: "full", 3: "high", 4: "super", 5: "super+"}
# The interface string Linux's f_eem gadget function always gives its EEM interface
# (drivers/usb/gadget/function/f_eem.c). f_eem unpacks several EEM packets per OUT
# request, so such a device takes batched transfers (checked in CI against it).
LINUX_F_EEM_INTERFACE = "CDC Ethernet Emulation Model (EEM)"


@dataclass(frozen=True)
class EemInterface:
    bus: int
    address: int
    port: str  # sysfs port path, e.g. "1-2.3"
    vid: int
    pid: int
    serial: str | None
    speed: str
    configuration: int
    interface: int
    alt_setting: int
    ep_in: int
    ep_out: int
    max_packet: int
    driver: str | None  # kernel driver bound to the interface ("cdc_eem", "usbfs", ...)
    held_by: str  # "kernel:cdc_eem", "eembridge:TAP (pid N)", "usbfs" or "nobody"
    name: str | None = None  # the interface string (iInterface), as the kernel read it

    @property
    def takes_batches(self) -> bool:
        """Known to take several EEM packets per OUT transfer: Linux f_eem."""
        return self.name == LINUX_F_EEM_INTERFACE

    @property
    def vid_pid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    @property
    def node(self) -> str:
        return f"/dev/bus/usb/{self.bus:03d}/{self.address:03d}"

    @property
    def sysfs_interface(self) -> str:
        return f"{self.port}:{self.configuration}.{self.interface}"

    def describe(self) -> str:
        serial = f" serial {self.serial}" if self.serial else ""
        return (f"{self.vid_pid} bus {self.bus} addr {self.address} port {self.port} "
                f"interface {self.interface}{serial}")

    def as_json(self) -> dict[str, object]:
        record: dict[str, object] = asdict(self)
        record["vid_pid"] = self.vid_pid
        record["node"] = self.node
        record["takes_batches"] = self.takes_batches
        return record


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def interface_driver(sysfs_interface: str, sysfs: str = SYSFS) -> str | None:
    link = os.path.join(sysfs, sysfs_interface, "driver")
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def claim_path(port: str, interface: int, claims_dir: str = CLAIMS_DIR) -> str:
    return os.path.join(claims_dir, f"{port}:{interface}.json")


def read_claim_file(path: str) -> dict | None:
    """A claim record as written (alive or not); None if missing or not a record."""
    text = _read(path)
    if text is None:
        return None
    try:
        claim = json.loads(text)
        int(claim["pid"])
    except (ValueError, KeyError, TypeError):
        return None
    return claim if isinstance(claim, dict) else None


def claim_alive(claim: dict) -> bool:
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    return True


def read_claim(port: str, interface: int, claims_dir: str = CLAIMS_DIR) -> dict | None:
    """The running bridge that holds this interface, if its process is still alive."""
    claim = read_claim_file(claim_path(port, interface, claims_dir))
    return claim if claim is not None and claim_alive(claim) else None


def stale_claim(port: str, interface: int, claims_dir: str = CLAIMS_DIR) -> dict | None:
    """The record of a bridge that is gone without cleaning up (SIGKILL, crash)."""
    claim = read_claim_file(claim_path(port, interface, claims_dir))
    return claim if claim is not None and not claim_alive(claim) else None


def holder(driver: str | None, claim: dict | None, stale: dict | None = None) -> str:
    if claim is not None:
        return f"eembridge:{claim.get('tap')} (pid {claim.get('pid')})"
    if driver is None:
        if stale is not None and stale.get("detached"):
            # The kernel dropped the killed bridge's claim but does not re-probe the driver.
            return (f"nobody ({stale['detached']} left detached by eembridge pid "
                    f"{stale.get('pid')}, which is gone: `eembridge release` gives it back)")
        return "nobody"
    if driver == "usbfs":
        return "usbfs (another userspace program)"
    return f"kernel:{driver}"


def _port_path(device) -> str | None:
    numbers = device.port_numbers
    if not numbers:
        return None  # a root hub
    return f"{device.bus}-" + ".".join(str(n) for n in numbers)


def find_eem_interfaces(sysfs: str = SYSFS, claims_dir: str = CLAIMS_DIR) -> list[EemInterface]:
    import usb.core

    records = []
    for device in usb.core.find(find_all=True):
        port = _port_path(device)
        if port is None:
            continue
        active = _read(os.path.join(sysfs, port, "bConfigurationValue"))
        serial = _read(os.path.join(sysfs, port, "serial"))
        for config in device:
            if active and active.isdigit() and config.bConfigurationValue != int(active):
                continue
            for intf in config:
                if (intf.bInterfaceClass, intf.bInterfaceSubClass,
                        intf.bInterfaceProtocol) != EEM_CLASS:
                    continue
                ep_in = ep_out = None
                for ep in intf:
                    if ep.bmAttributes & 0x03 != 0x02:
                        continue  # bulk only
                    if ep.bEndpointAddress & 0x80:
                        ep_in = ep_in or ep
                    else:
                        ep_out = ep_out or ep
                if ep_in is None or ep_out is None:
                    continue  # an alt setting without endpoints
                number = intf.bInterfaceNumber
                sys_intf = f"{port}:{config.bConfigurationValue}.{number}"
                driver = interface_driver(sys_intf, sysfs)
                claim = read_claim(port, number, claims_dir)
                stale = stale_claim(port, number, claims_dir) if claim is None else None
                records.append(EemInterface(
                    bus=device.bus, address=device.address, port=port,
                    vid=device.idVendor, pid=device.idProduct, serial=serial,
                    speed=SPEEDS.get(device.speed or 0, "unknown"),
                    configuration=config.bConfigurationValue, interface=number,
                    alt_setting=intf.bAlternateSetting,
                    ep_in=ep_in.bEndpointAddress, ep_out=ep_out.bEndpointAddress,
                    max_packet=ep_in.wMaxPacketSize & 0x7FF,
                    driver=driver, held_by=holder(driver, claim, stale),
                    name=_read(os.path.join(sysfs, sys_intf, "interface")),
                ))
    return sorted(records, key=lambda r: (r.bus, r.port, r.interface))
