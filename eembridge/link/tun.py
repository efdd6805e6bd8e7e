"""`--link tun`: the host's side is a TUN device (layer 3), the board still speaks Ethernet.

Theory of operation
-------------------
`TunLink` is a link.pump.FramePump: the bridge gets one end of a SEQPACKET socketpair
as its frame descriptor, and a pump thread runs eembridge.core.l3.Translator between
the other end and the TUN:

  bridge --frame--> socketpair --> pump: from_device --IP packet--> TUN --> kernel
  kernel --> TUN --IP packet--> pump: from_host --frame--> socketpair --> bridge

Backpressure carries through: when the bridge stops reading its end (OUT full), the
pump's writes find the socket full, it keeps what it could not send and stops reading
the TUN until the socket drains, so the TUN's queue (txqueuelen) fills and the kernel
slows TCP down, as with a TAP. Frames towards the host are written to the TUN at once
(a TUN write never blocks). ARP and NDP answers go back into the socket.

The interface itself is link.tap's machinery with IFF_TUN (`Tun`): addresses, up,
carrier, persist, the kernel's counters. The kernel generates no link-local address on
it (addr_gen_mode none); the one derived from the host's MAC, which the translator
answers Neighbor Solicitations for, is added instead. The translator learns the
interface's addresses at start and then once a second from netlink, so an address
added later with `ip addr` is answered for too. TAP offload (virtio_net_hdr) is off:
the frames the bridge sees are the translator's.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from pathlib import Path

import pytun

from ..core.l3 import Translator, link_local, stable_mac
from .pump import BURST, FramePump
from .tap import IPInterface, LinkStats, Tap, TapError

log = logging.getLogger(__name__)

ADDRESS_REFRESH = 1.0  # seconds between reads of the interface's addresses
CARRIER_WAIT = 0.5  # seconds set_carrier(True) waits for the kernel to mark the link up


class Tun(Tap):
    """A TUN interface (IFF_TUN | IFF_NO_PI): every read and write is one IP packet."""

    KIND = "TUN"
    MODE = pytun.IFF_TUN

    def disable_address_generation(self) -> None:
        """No kernel-made IPv6 link-local address (on a TUN the kernel picks a random
        one, which no board could derive from our MAC). Call before up()."""
        path = Path(f"/proc/sys/net/ipv6/conf/{self.name}/addr_gen_mode")
        try:
            path.write_text("1\n")  # IN6_ADDR_GEN_MODE_NONE
        except FileNotFoundError:
            log.debug("no IPv6 on %s: no link-local address to replace", self.name)


class TunLink(FramePump):
    """What the bridge takes for its TAP when --link tun: a frame descriptor (fileno),
    the interface's configuration (addresses, up, carrier, neighbours, counters) and the
    translator's counters (`l3_stats`)."""

    offload = False  # the bridge's data paths see plain frames
    KIND = "TUN"
    FATAL = (TapError,)

    def __init__(self, name: str, *, mtu: int = 1500, mac: str | None = None,
                 txqueuelen: int | None = None, persist: bool = False,
                 peer_mac: str | None = None) -> None:
        host_mac = bytes.fromhex(mac.replace(":", "")) if mac else stable_mac(name)
        self.translator = Translator(
            host_mac, peer_mac=bytes.fromhex(peer_mac.replace(":", "")) if peer_mac else None)
        self.tun = Tun(name, mtu=mtu, txqueuelen=txqueuelen, persist=persist)
        super().__init__(name)
        self._mtu = mtu
        self._link_local = f"{link_local(host_mac)}/64"
        self._addresses: list[IPInterface] = []
        self.pump_counters.update(tun_write_errors=0, tun_read_errors=0)
        try:
            self.tun.disable_address_generation()
        except BaseException:
            self.close()
            raise
        self.start()

    # --- what the bridge uses ---------------------------------------------------------

    @property
    def mac(self) -> str:
        return self.translator.host_mac.hex(":")

    def set_carrier(self, on: bool) -> None:
        """Carrier on returns once the kernel says the link is up: until its linkwatch
        work has run (a few ms) the TUN still has the no-op qdisc, which drops what the
        kernel sends, and a first packet sent on "connected" would be lost."""
        self.tun.set_carrier(on)
        deadline = time.monotonic() + CARRIER_WAIT
        while on and self.tun.operstate != "UP" and time.monotonic() < deadline:
            time.sleep(0.002)

    def add_address(self, address: str | IPInterface, *, nodad: bool = False) -> IPInterface:
        iface = self.tun.add_address(address, nodad=nodad)
        self._addresses.append(iface)
        self.translator.set_host_addresses(self._addresses)
        return iface

    def up(self) -> None:
        # nodad: the kernel's DAD probe for it would go to the board, whose answer
        # could only be about our own claim (the translator answers for it).
        self.tun.add_address(self._link_local, nodad=True)
        self.tun.up()

    def add_neighbour(self, ip: str, mac: str) -> None:
        """--peer with --peer-mac: a neighbour that never ages, in the translator (the
        kernel keeps no neighbours on a TUN)."""
        self.translator.add_static(ip, bytes.fromhex(mac.replace(":", "")))

    def kernel_stats(self) -> LinkStats:
        return self.tun.kernel_stats()

    def l3_stats(self) -> dict[str, int]:
        """The translator's counters and drops, and the pump's own."""
        return {**self.translator.counters(), **self.pump_counters}

    def addresses(self) -> list[IPInterface]:
        return self.tun.addresses()

    def close(self) -> None:
        self.stop_pump()
        self.tun.close()

    def __repr__(self) -> str:
        return f"<TunLink {self.name} mac={self.mac}>"

    # --- the pump -------------------------------------------------------------------

    def _pump(self) -> None:
        translator = self.translator
        tun_fd = self.tun.fileno()
        sock = self._pump_end
        sock_fd = sock.fileno()
        # A datagram the bridge writes is at most a frame of our MTU plus a VLAN tag; one
        # byte more shows a longer one as oversize to the translator (bad_ip: truncated).
        frame_buf = bytearray(self._mtu + 14 + 4 + 1)
        packet_buf = bytearray(self._mtu + 1)
        frame_view, packet_view = memoryview(frame_buf), memoryview(packet_buf)
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        poller.register(sock_fd, select.POLLIN)
        poller.register(tun_fd, select.POLLIN)
        reading_tun = True
        next_refresh = 0.0
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + ADDRESS_REFRESH
                self._refresh_addresses()
            self._send(translator.tick(now))
            blocked = bool(self._backlog)
            if blocked == reading_tun:  # backlog: stop reading the TUN, wait for room
                reading_tun = not blocked
                poller.modify(tun_fd, select.POLLIN if reading_tun else 0)
                poller.modify(sock_fd, select.POLLIN | (select.POLLOUT if blocked else 0))
            deadline = min(d for d in (next_refresh, translator.next_deadline()) if d is not None)
            timeout = max(0, int((deadline - now) * 1000) + 1)
            events = self._poll(poller, timeout)
            if events is None:
                return
            for fd, mask in events:
                if fd == sock_fd:
                    if not self._bridge_side(mask, lambda: self._from_bridge(sock, frame_view,
                                                                             tun_fd)):
                        return  # the bridge closed its end
                elif fd == tun_fd:
                    if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        raise TapError(f"TUN {self.name} is gone (deleted while the bridge ran?)")
                    self._from_kernel(tun_fd, packet_view)

    def _from_bridge(self, sock: socket.socket, view: memoryview, tun_fd: int) -> None:
        now = time.monotonic()
        for _ in range(BURST):
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                return
            packet, replies = self.translator.from_device(view[:n], now)
            if packet is not None:
                try:
                    os.write(tun_fd, packet)
                except OSError as exc:  # link down (EIO), queue full: a lost packet
                    if exc.errno == errno.EBADF:
                        raise
                    self.pump_counters["tun_write_errors"] += 1
            if replies:
                self._send(replies)

    def _from_kernel(self, tun_fd: int, view: memoryview) -> None:
        now = time.monotonic()
        for _ in range(BURST):
            if self._backlog:
                return
            try:
                n = os.readv(tun_fd, (view,))
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise
                self.pump_counters["tun_read_errors"] += 1
                return
            frames = self.translator.from_host(view[:n], now)
            if frames:
                self._send(frames)

    def _refresh_addresses(self) -> None:
        try:
            current = self.tun.addresses()
        except OSError as exc:
            log.debug("reading %s's addresses failed: %s", self.name, exc)
            return
        if set(current) != set(self._addresses):
            self._addresses = current
            self.translator.set_host_addresses(current)
