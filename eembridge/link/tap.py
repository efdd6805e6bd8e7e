"""The link layer: a Linux TAP device, the bridge's door to the kernel's TCP/IP.

Theory of operation
-------------------
- The device is opened with python-pytun (TUNSETIFF, IFF_TAP | IFF_NO_PI): every read
  is one whole Ethernet frame (no 4-byte packet-info prefix), every write injects one.
  The fd is non-blocking so the bridge polls it with its USB completions; a read that
  finds nothing returns 0 instead of raising.
- Everything about the *interface* (MTU, MAC, up/down, addresses, neighbours, routes,
  counters) goes through rtnetlink with pyroute2, addressed by name in the namespace
  the interface lives in (``netns``; None is ours). The fd itself follows the device
  when it is moved to another namespace, so a TAP created here keeps working there.
- Carrier is separate from up/down: TUNSETCARRIER drops the carrier (the kernel reports
  NO-CARRIER, operstate DOWN) while the interface stays administratively up and keeps
  its addresses and routes. The bridge uses it to say "the USB device is unplugged".
- ``persist`` (TUNSETPERSIST) keeps the interface, its addresses and its neighbours
  when our fd closes, so a restarted bridge re-attaches to the same interface and
  applications bound to its address see only a carrier blip.
- ``offload`` adds IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO4 | TSO6): the kernel may
  then hand over TCP packets of up to 64 KB with checksums left to fill in, and every
  read and write starts with a 10-byte virtio_net_hdr (eembridge/core/offload.py). Only the
  C data path reads such a TAP; ``read_into``/``write`` pass the header through as is.
- NetworkManager, when present, is told to leave an interface we create alone
  (eembridge/link/networkmanager.py); when absent nothing happens (debug log). It is never
  a reason to fail.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytun
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
from pyroute2.netlink.rtnl.ndmsg import states as NUD_STATES

from ..core.errors import UserError
from ..core.ioctl import IOR, IOW
from ..core.offload import TUN_OFFLOADS
from ..core.options import IFNAMSIZ, ifname_problem
from . import networkmanager
from .netns import iproute, link_index

log = logging.getLogger(__name__)


TUN_DEVICE = "/dev/net/tun"
IFF_UP = 0x1
IFF_PERSIST = 0x0800  # reported by TUNGETIFF (include/uapi/linux/if_tun.h)

_SIZEOF_INT = struct.calcsize("i")
TUNSETPERSIST = IOW("T", 203, _SIZEOF_INT)
TUNGETIFF = IOR("T", 210, _SIZEOF_INT)  # (declared unsigned int; fills a struct ifreq)
TUNSETCARRIER = IOW("T", 226, _SIZEOF_INT)  # Linux >= 4.20; older kernels: EINVAL
TUNSETOFFLOAD = IOW("T", 208, _SIZEOF_INT)  # takes the flags by value
_IFREQ_SIZE = 40  # struct ifreq on 64- and 32-bit Linux alike (name[16] + 24-byte union)
# -------------------------------------------------------------------------------------

class TapError(UserError):
    """The TAP device could not be created, attached or configured; one-line message."""


class TapNameError(TapError, ValueError):
    """An interface name the kernel would refuse (or misread)."""


def validate_ifname(name: str) -> str:
    """Return ``name`` if the kernel accepts it as an interface name; else TapNameError."""
    problem = ifname_problem(name)
    if problem:
        raise TapNameError(problem)
    return name


# --- kernel interface counters ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LinkStats:
    """The kernel's own counters for an interface (IFLA_STATS64).

    rx is what the kernel received from us (frames we wrote into the TAP), tx what it
    sent towards us (frames we read, or dropped because we did not read them).
    """

    rx_packets: int
    rx_bytes: int
    rx_errors: int
    rx_dropped: int
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    tx_dropped: int

    @classmethod
    def from_netlink(cls, stats64: dict[str, int]) -> LinkStats:
        return cls(**{name: int(stats64.get(name, 0)) for name in cls.__slots__})

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def link_stats(ifname: str, netns: str | None = None) -> LinkStats:
    """Read the kernel's counters of ``ifname`` (in ``netns``) through netlink."""
    with iproute(netns) as ipr:
        msg = ipr.link("get", index=link_index(ipr, ifname))[0]
        return LinkStats.from_netlink(msg.get_attr("IFLA_STATS64") or {})


# --- the TAP device ---------------------------------------------------------------------

OpenMode = Literal["open", "create", "attach"]
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _open_error(name: str, exc: OSError) -> TapError:
    code = exc.errno
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return TapError(f"{TUN_DEVICE} is missing: load the tun module (modprobe tun)")
    if code in (errno.EPERM, errno.EACCES):
        return TapError(f"opening TAP {name} needs CAP_NET_ADMIN (run as root)")
    if code == errno.EBUSY:
        return TapError(f"TAP {name} is already in use by another process")
    if code == errno.EINVAL:
        return TapError(
            f"{name} exists but is not a TAP device (or is a TAP with other flags)"
        )
    return TapError(f"cannot open TAP {name}: {exc.strerror or exc}")


class Tap:
    """One TAP interface and our file descriptor on it.

    mode: "open" creates the interface or attaches to an existing persistent one,
    "create" insists on a new one, "attach" on an existing one. ``persist`` sets
    TUNSETPERSIST (None leaves an attached TAP's setting as it is; a new TAP is not
    persistent). ``mtu``/``mac``/``txqueuelen`` are applied at once when given.
    """

    def __init__(
        self,
        name: str,
        *,
        mode: OpenMode = "open",
        persist: bool | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        txqueuelen: int | None = None,
        unmanage: bool = True,
        nm_run_dir: Path = networkmanager.RUN_DIR,
        nmcli: str | None = "auto",
        offload: bool = False,
    ) -> None:
        self.name = validate_ifname(name)
        self.netns: str | None = None  # namespace the interface lives in; None: ours
        self.write_errors: collections.Counter[str] = collections.Counter()
        self.read_errors: collections.Counter[str] = collections.Counter()
        self._nm: networkmanager.Unmanaged | None = None
        self._device: Any = None

        if mode not in ("open", "create", "attach"):
            raise ValueError(f"mode must be open, create or attach, not {mode!r}")
        exists = self._exists()
        if mode == "create" and exists:
            raise TapError(f"interface {name} already exists")
        if mode == "attach" and not exists:
            raise TapError(f"no interface {name} to attach to")
        if unmanage and not exists:
            self._nm = networkmanager.unmanage(name, nm_run_dir, nmcli)
        try:
            self._device = pytun.TunTapDevice(
                name=name,
                flags=pytun.IFF_TAP | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0),
            )
        except OSError as exc:  # pytun.Error is an OSError carrying errno
            if self._nm is not None:
                self._nm.forget()
            raise _open_error(name, exc) from None
        if self._nm is not None:
            self._nm.after_create()
        self.created = not exists
        self.offload = offload
        os.set_blocking(self._device.fileno(), False)
        try:
            if offload:
                fcntl.ioctl(self._device.fileno(), TUNSETOFFLOAD, TUN_OFFLOADS)
            if persist is not None:
                self.set_persist(persist)
            if mtu is not None:
                self.mtu = mtu
            if mac is not None:
                self.mac = mac
            if txqueuelen is not None:
                self.txqueuelen = txqueuelen
        except BaseException:
            self.close()
            raise
        log.debug("%s TAP %s (persist=%s)", "created" if self.created else "attached",
                  name, self.persistent)

    @classmethod
    def create(cls, name: str, **options: Any) -> Tap:
        return cls(name, mode="create", **options)

    @classmethod
    def attach(cls, name: str, **options: Any) -> Tap:
        return cls(name, mode="attach", **options)

    def _exists(self) -> bool:
        with iproute(self.netns) as ipr:
            return bool(ipr.link_lookup(ifname=self.name))

    # --- the fd: the bridge's data path ---------------------------------------------

    @property
    def closed(self) -> bool:
        return self._device is None

    def fileno(self) -> int:
        if self._device is None:
            raise ValueError(f"TAP {self.name} is closed")
        return int(self._device.fileno())

    def read_into(self, buffer: Any) -> int:
        """Read one frame into ``buffer`` (a writable buffer); 0 when none is waiting.

        ``buffer`` must hold MTU + 18 bytes (Ethernet and VLAN headers); the kernel
        truncates a frame that does not fit. Errors other than EAGAIN are counted in
        ``read_errors`` and raised: on a TAP they mean the interface is gone.
        """
        try:
            return os.readv(self.fileno(), (buffer,))
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.read_errors[_errno_name(exc.errno or 0)] += 1
            raise

    def write(self, buffer: Any) -> int:
        """Hand one Ethernet frame to the kernel; bytes written, or 0 if it was refused.

        A refusal (EIO while the interface is down, EINVAL for a runt, ENOMEM, EBADFD
        after the interface was deleted, ...) is a dropped frame, counted by errno in
        ``write_errors``, not an exception: the bridge must not stop for it. Only a
        closed fd (EBADF: our own bug) raises.
        """
        try:
            return os.write(self.fileno(), buffer)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise
            self.write_errors[_errno_name(exc.errno or 0)] += 1
            return 0

    # --- tun ioctls on our fd ---------------------------------------------------------

    def _tun_flags(self) -> int:
        if self._device is None:
            raise ValueError(f"TAP {self.name} is closed")
        return self._tun_flags_of(self._device)

    @property
    def persistent(self) -> bool:
        return bool(self._tun_flags() & IFF_PERSIST)

    def set_persist(self, persist: bool) -> None:
        """Keep the interface after our fd closes (True) or let close() delete it."""
        fcntl.ioctl(self.fileno(), TUNSETPERSIST, int(persist))

    def set_carrier(self, on: bool) -> None:
        """Raise or drop the carrier, keeping the interface up and its addresses."""
        try:
            fcntl.ioctl(self.fileno(), TUNSETCARRIER, struct.pack("i", int(on)))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise TapError(
                    "this kernel has no TUNSETCARRIER (Linux 4.20 or later needed)"
                ) from None
            raise

    # --- interface state through netlink --------------------------------------------

    def _link(self) -> Any:
        with iproute(self.netns) as ipr:
            return ipr.link("get", index=link_index(ipr, self.name))[0]

    def _set_link(self, **attrs: Any) -> None:
        try:
            with iproute(self.netns) as ipr:
                ipr.link("set", index=link_index(ipr, self.name), **attrs)
        except NetlinkError as exc:
            what = ", ".join(f"{k}={v}" for k, v in attrs.items())
            raise TapError(f"cannot set {what} on {self.name}: {exc.args[-1]}") from None

    @property
    def ifindex(self) -> int:
        return int(self._link()["index"])

    @property
    def mtu(self) -> int:
        return int(self._link().get_attr("IFLA_MTU"))

    @mtu.setter
    def mtu(self, value: int) -> None:
        self._set_link(mtu=int(value))

    @property
    def txqueuelen(self) -> int:
        """Frames the kernel queues for us to read. tun orphans what it queues, so TCP's
        small-queue limit does not apply and a long queue only adds delay under load."""
        return int(self._link().get_attr("IFLA_TXQLEN"))

    @txqueuelen.setter
    def txqueuelen(self, value: int) -> None:
        self._set_link(txqlen=int(value))

    @property
    def mac(self) -> str:
        return str(self._link().get_attr("IFLA_ADDRESS"))

    @mac.setter
    def mac(self, value: str) -> None:
        self._set_link(address=value.lower())

    def up(self) -> None:
        self._set_link(state="up")

    def down(self) -> None:
        self._set_link(state="down")

    @property
    def is_up(self) -> bool:
        return bool(self._link()["flags"] & IFF_UP)

    @property
    def carrier(self) -> bool:
        return bool(self._link().get_attr("IFLA_CARRIER"))

    @carrier.setter
    def carrier(self, on: bool) -> None:
        self.set_carrier(on)

    @property
    def operstate(self) -> str:
        """RFC 2863 state as the kernel reports it: UP, DOWN, LOWERLAYERDOWN, UNKNOWN..."""
        return str(self._link().get_attr("IFLA_OPERSTATE"))

    def kernel_stats(self) -> LinkStats:
        return link_stats(self.name, self.netns)

    def move_to_netns(self, netns: str) -> None:
        """Move the interface into ``netns``; our fd keeps working, netlink follows it."""
        try:
            with iproute(self.netns) as ipr:
                ipr.link("set", index=link_index(ipr, self.name), net_ns_fd=netns)
        except NetlinkError as exc:
            raise TapError(f"cannot move {self.name} to netns {netns}: {exc.args[-1]}") from None
        self.netns = netns

    # --- addresses, neighbours, routes ------------------------------------------------

    def add_address(self, address: str | IPInterface, *, nodad: bool = False) -> IPInterface:
        """Add ``addr/prefix`` (IPv4 or IPv6, link-local included); replace if present.

        nodad skips IPv6 duplicate address detection, so the address is usable at once
        (on a point-to-point link to one device there is nobody to collide with).
        """
        iface = ipaddress.ip_interface(address)
        spec: dict[str, Any] = {
            "address": str(iface.ip),
            "prefixlen": iface.network.prefixlen,
        }
        if nodad and iface.version == 6:
            spec["flags"] = IFA_F_NODAD
        try:
            with iproute(self.netns) as ipr:
                ipr.addr("replace", index=link_index(ipr, self.name), **spec)
        except NetlinkError as exc:
            raise TapError(f"cannot add {iface} to {self.name}: {exc.args[-1]}") from None
        return iface

    def del_address(self, address: str | IPInterface) -> None:
        iface = ipaddress.ip_interface(address)
        with iproute(self.netns) as ipr:
            ipr.addr(
                "del",
                index=link_index(ipr, self.name),
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )

    def addresses(self) -> list[IPInterface]:
        with iproute(self.netns) as ipr:
            msgs = ipr.addr("dump", index=link_index(ipr, self.name))
            return [
                ipaddress.ip_interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
                for m in msgs
            ]

    def add_neighbour(self, ip: str, mac: str) -> None:
        """A permanent neighbour entry ip -> mac: no ARP/ND needed to reach the peer."""
        try:
            with iproute(self.netns) as ipr:
                ipr.neigh(
                    "replace",
                    dst=str(ipaddress.ip_address(ip)),
                    lladdr=mac.lower(),
                    ifindex=link_index(ipr, self.name),
                    state=NUD_STATES["permanent"],
                )
        except NetlinkError as exc:
            raise TapError(f"cannot add neighbour {ip} on {self.name}: {exc.args[-1]}") from None

    def neighbours(self) -> list[tuple[str, str | None, int]]:
        """(ip, mac or None, NUD state bits) for every neighbour entry on this interface."""
        with iproute(self.netns) as ipr:
            msgs = ipr.neigh("dump", ifindex=link_index(ipr, self.name))
            return [
                (str(m.get_attr("NDA_DST")), m.get_attr("NDA_LLADDR"), int(m["state"]))
                for m in msgs
            ]

    def add_route(self, destination: str, gateway: str | None = None) -> None:
        """Route ``destination`` (a network) through this interface, optionally via a gateway."""
        spec: dict[str, Any] = {"dst": str(ipaddress.ip_network(destination))}
        if gateway is not None:
            spec["gateway"] = str(ipaddress.ip_address(gateway))
        try:
            with iproute(self.netns) as ipr:
                ipr.route("replace", oif=link_index(ipr, self.name), **spec)
        except NetlinkError as exc:
            raise TapError(
                f"cannot add route {destination} on {self.name}: {exc.args[-1]}"
            ) from None

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close our fd: the kernel deletes a non-persistent TAP, keeps a persistent one."""
        device, self._device = self._device, None
        if device is None:
            return
        try:
            persistent = bool(self._tun_flags_of(device) & IFF_PERSIST)
        except OSError:  # interface already deleted under us: nothing is left to keep
            persistent = False
        device.close()
        if not persistent and self._nm is not None:
            self._nm.forget()
        log.debug("closed TAP %s (%s)", self.name, "kept" if persistent else "removed")

    @staticmethod
    def _tun_flags_of(device: Any) -> int:
        ifreq = fcntl.ioctl(device.fileno(), TUNGETIFF, bytes(_IFREQ_SIZE))
        return int(struct.unpack_from("H", ifreq, IFNAMSIZ)[0])

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<Tap {self.name}{where} {state}>"


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete interface ``name`` (e.g. a persistent TAP nobody holds); False if absent."""
    with iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True
