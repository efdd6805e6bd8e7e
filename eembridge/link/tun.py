"""`--link tun`: the host's side is a TUN device (layer 3), the board still speaks Ethernet.

Theory of operation
-------------------
The bridge and both data paths (Python and C) read and write whole Ethernet frames on
one descriptor, the TAP's. `TunLink` hands them one end of a
socketpair(AF_UNIX, SOCK_SEQPACKET) instead: one frame per datagram, read(2) and
write(2) as on a TAP, EAGAIN when empty or full. A pump thread runs
eembridge.core.l3.Translator between the other end and the TUN:

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

With the compiled data path, the common frames do not take the pump at all: the C fast
path (eembridge/_fast/tunlink.pyx, which says how and what it hands the pump instead)
writes device packets straight to the TUN and frames TUN packets straight into OUT
transfers, deciding from a snapshot of the translator's state the pump publishes
whenever it changes (`Translator.on_change`). The pump then translates what C hands it
on a second socketpair (the channel), its own frames still go on the first, and it reads
the TUN no more; the bridge installs the fast path in its data path at each connect
(`install_fast_path`).

With --dhcp the pump also runs eembridge.core.dhcp's client: its frames go to the bridge
as the translator's do, UDP to port 68 from the board goes to it instead of the TUN
(nothing on the host could listen there: the TUN has no link layer for a DHCP client),
and it learns of replugs from `set_carrier`. Its actions are carried out here: the
lease's address and prefix on the TUN, its routes (eembridge.core.dhcp.Lease.routes:
option 121's, or a default route through option 3's router) at metric
DHCP_ROUTE_METRIC, all removed when the lease is lost; one log line per state. Its DNS
servers and domain are only shown (stats section dhcp): the host's resolver is left
alone.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytun
from pyroute2 import NetlinkError
from pyroute2.netlink.rtnl import rt_scope

from ..core import dhcp
from ..core.l3 import Translator, link_local, stable_mac
from .netns import iproute, link_index
from .pump import close_quietly, frame_socketpair
from .tap import IPInterface, LinkStats, Tap, TapError

try:
    from .._fast.tunlink import HEADER as FAST_HEADER
    from .._fast.tunlink import TAGS as FAST_TAGS
    from .._fast.tunlink import TunFast
except ImportError:  # not built: the pump translates everything
    TunFast = None

log = logging.getLogger(__name__)

ADDRESS_REFRESH = 1.0  # seconds between reads of the interface's addresses
BURST = 64  # datagrams or packets moved per side before looking at the other
MAX_BACKLOG = 256  # frames kept for the bridge while its socket is full
CARRIER_WAIT = 0.5  # seconds set_carrier(True) waits for the kernel to mark the link up
# The board's router as the host's default route, behind any the host already has (those
# of DHCP on a LAN, NetworkManager's, are 100 to 600): a board should not take over the
# host's traffic because it offers itself as a router; it is there if nothing else is.
DHCP_ROUTE_METRIC = 1024
# The fast path's channel to the pump: room for a burst of handed-over frames and
# packets while the pump is busy (what does not fit is counted, fast_*_lost).
CHANNEL_BUFFER = 1 << 20


def handed_over(translator: Translator,
                message: memoryview) -> tuple[memoryview | None, list[bytes]]:
    """What the C fast path's message on the channel comes to: (packet for the TUN, or
    None; frames for the device), by the translator, at the time C saw it."""
    tag, now = FAST_HEADER.unpack_from(message)
    body = message[FAST_HEADER.size:]
    if tag == FAST_TAGS["packet"]:
        return None, translator.from_host(body, now)
    packet, replies = translator.from_device(body, now)
    return (None if tag == FAST_TAGS["delivered"] else packet), replies


def merged_counters(translator: dict[str, int], fast: dict[str, int]) -> dict[str, int]:
    """The translator's counters with the fast path's work in them: the same totals as
    if the translator had done it all, and the fast path's own as fast_*."""
    out = dict(translator)
    out["to_host_packets"] += fast["to_host_packets"]
    out["to_device_frames"] += fast["to_device_frames"]
    out.update(fast_to_host_packets=fast["to_host_packets"],
               fast_to_device_frames=fast["to_device_frames"], fast_notes=fast["notes"],
               fast_notes_lost=fast["note_errors"], fast_slow_frames=fast["slow_frames"],
               fast_handoffs=fast["handoffs"], fast_handoffs_lost=fast["handoff_errors"],
               fast_torn_reads=fast["torn"])
    return out


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


class TunLink:
    """What the bridge takes for its TAP when --link tun: a frame descriptor (fileno),
    the interface's configuration (addresses, up, carrier, neighbours, counters) and the
    translator's counters (`l3_stats`)."""

    offload = False  # the bridge's data paths see plain frames

    def __init__(self, name: str, *, mtu: int = 1500, mac: str | None = None,
                 txqueuelen: int | None = None, persist: bool = False,
                 peer_mac: str | None = None, dhcp_client: bool = False,
                 dhcp_time_scale: float = 1.0) -> None:
        self.name = name
        host_mac = bytes.fromhex(mac.replace(":", "")) if mac else stable_mac(name)
        self.translator = Translator(
            host_mac, peer_mac=bytes.fromhex(peer_mac.replace(":", "")) if peer_mac else None)
        self.tun = Tun(name, mtu=mtu, txqueuelen=txqueuelen, persist=persist)
        self._mtu = mtu
        self._link_local = f"{link_local(host_mac)}/64"
        self._addresses: list[IPInterface] = []
        # The DHCP client's clock runs dhcp_time_scale times faster than the real one, for
        # tests: dnsmasq gives no lease under two minutes (BridgeOptions.dhcp_time_scale).
        self.dhcp = dhcp.DhcpClient(host_mac) if dhcp_client else None
        self._dhcp_scale = dhcp_time_scale
        self._carrier_events: deque[bool] = deque()
        self.dhcp_counters = {"config_errors": 0, "route_conflicts": 0}
        self._bridge_end, self._pump_end = frame_socketpair()
        self._fast: Any = None
        self._c_mode = False  # installed: C reads the TUN, the pump the channel
        # What the snapshot says: C may read the TUN (installed, and no backlog in the pump).
        self._tun_open = False
        self._dirty = True  # the translator changed since the last snapshot
        if TunFast is not None:
            self._chan_c, self._chan_py = frame_socketpair()
            self._chan_c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            self._epoll = select.epoll()
            self._epoll.register(self._bridge_end.fileno(), select.EPOLLIN)
            self._fast = TunFast(self.tun.fileno(), self._bridge_end.fileno(),
                                 self._chan_c.fileno(), self._epoll.fileno())
            self.translator.on_change = self._state_changed
        self.pump_counters = {"tun_write_errors": 0, "tun_read_errors": 0,
                              "backlog_dropped": 0, "pump_wakeups": 0}
        self._backlog: deque[bytes] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._pump_guarded, name=f"eembridge-tun-{name}",
                                         daemon=True)
        self.error: BaseException | None = None
        self._stopping = False
        try:
            self.tun.disable_address_generation()
        except BaseException:
            self.close()
            raise
        self._thread.start()

    # --- what the bridge uses ---------------------------------------------------------

    def fileno(self) -> int:
        return self._bridge_end.fileno()

    @property
    def ready_fd(self) -> int:
        """Readable when the data path has frames to fill: the pump's, or the TUN's once
        the fast path is installed."""
        return self._epoll.fileno() if self._fast is not None else self._bridge_end.fileno()

    def install_fast_path(self, rx: Any, tx: Any) -> None:
        """The C fast path becomes the link of the compiled data path's rx and tx (before
        the engine starts them); from now on C reads the TUN."""
        if self._fast is None:
            return
        self._fast.install(rx, tx)
        if not self._c_mode:
            log.info("TUN %s: the common frames translated in C (eembridge._fast.tunlink), "
                     "the rest by the pump", self.name)
            self._c_mode = True
            self._dirty = True
            self._wake()  # the pump stops reading the TUN, publishes, gives it to C

    @property
    def mac(self) -> str:
        return self.translator.host_mac.hex(":")

    def set_carrier(self, on: bool) -> None:
        """Carrier on returns once the kernel says the link is up: until its linkwatch
        work has run (a few ms) the TUN still has the no-op qdisc, which drops what the
        kernel sends, and a first packet sent on "connected" would be lost."""
        self.tun.set_carrier(on)
        if self.dhcp is not None:
            self._carrier_events.append(on)
            self._wake()
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
        """The translator's counters and drops (with the fast path's work), the pump's own."""
        if self._fast is None:
            return {**self.translator.counters(), **self.pump_counters}
        fast = self._fast.counters()
        pump = dict(self.pump_counters)
        pump["tun_write_errors"] += fast["tun_write_errors"]
        return {**merged_counters(self.translator.counters(), fast), **pump}

    def dhcp_stats(self) -> dict[str, Any]:
        """The DHCP client's state, lease and counters (stats section dhcp)."""
        assert self.dhcp is not None
        return {**self.dhcp.snapshot(self._dhcp_now()), **self.dhcp_counters}

    def addresses(self) -> list[IPInterface]:
        return self.tun.addresses()

    def _wake(self) -> None:
        """The pump looks at _stopping and the carrier events."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pump has wake-ups waiting already: it will look at everything

    def close(self) -> None:
        if self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(5)
        lease = self.dhcp.lease if self.dhcp is not None else None
        if lease is not None and not self._thread.is_alive() and self._persists():
            self._deconfigure(lease)  # a kept TUN keeps no address nobody renews
        close_quietly(self._wake_r, self._wake_w)
        self._bridge_end.close()
        self._pump_end.close()
        if self._fast is not None:
            self._epoll.close()
            self._chan_c.close()
            self._chan_py.close()
        self.tun.close()

    def _persists(self) -> bool:
        try:
            return self.tun.persistent
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"<TunLink {self.name} mac={self.mac}>"

    # --- the pump -------------------------------------------------------------------

    def _pump_guarded(self) -> None:
        try:
            self._pump()
        except BaseException as exc:
            self.error = exc
            log.error("TUN pump for %s stopped: %s", self.name, exc,
                      exc_info=not isinstance(exc, TapError))
            # The bridge polls its end: a hang-up there stops it with one line, as a
            # deleted TAP does, instead of a bridge that moves frames to nowhere.
            try:
                self._pump_end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
        poller.register(self._wake_r, select.POLLIN)
        poller.register(sock_fd, select.POLLIN)
        poller.register(tun_fd, select.POLLIN)
        chan_fd = -1
        if self._fast is not None:
            chan_fd = self._chan_py.fileno()
            poller.register(chan_fd, select.POLLIN)
            # A datagram from the fast path: a frame as above, or a TUN packet, behind
            # its header.
            chan_view = memoryview(bytearray(FAST_HEADER.size + max(len(frame_buf),
                                                                     len(packet_buf))))
        reading_tun = True
        writing = False  # waiting for room in the socket (POLLOUT)
        c_mode = False
        next_refresh = 0.0
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + ADDRESS_REFRESH
                self._refresh_addresses()
            self._send(translator.tick(now))
            dhcp_deadline = self._dhcp_tick()
            if self._c_mode and not c_mode:  # installed: the TUN is C's to read from now on
                c_mode = True
                reading_tun = False
                poller.modify(tun_fd, 0)  # its errors still say the TUN is gone
            blocked = bool(self._backlog)
            if c_mode:  # backlog: the TUN is closed to C (_publish_if_changed), wait for room
                self._publish_if_changed()
                if not blocked and not self._tun_open:
                    self._open_tun(tun_fd)
                if blocked != writing:
                    writing = blocked
                    poller.modify(sock_fd, select.POLLIN | (select.POLLOUT if blocked else 0))
            elif blocked == reading_tun:  # backlog: stop reading the TUN, wait for room
                reading_tun = not blocked
                writing = blocked
                poller.modify(tun_fd, select.POLLIN if reading_tun else 0)
                poller.modify(sock_fd, select.POLLIN | (select.POLLOUT if blocked else 0))
            deadline = min(d for d in (next_refresh, translator.next_deadline(), dhcp_deadline)
                           if d is not None)
            timeout = max(0, int((deadline - now) * 1000) + 1)
            events = poller.poll(timeout)
            self.pump_counters["pump_wakeups"] += 1
            for fd, mask in events:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 64):
                            pass
                    except BlockingIOError:
                        pass
                    if self._stopping:
                        return
                    self._dhcp_carrier()
                if fd == sock_fd:
                    if mask & select.POLLOUT:
                        self._send(())
                    if mask & select.POLLIN:
                        self._from_bridge(sock, frame_view, tun_fd)
                    if mask & (select.POLLHUP | select.POLLERR):
                        return  # the bridge closed its end
                elif fd == tun_fd:
                    if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        raise TapError(f"TUN {self.name} is gone (deleted while the bridge ran?)")
                    if not c_mode:
                        self._from_kernel(tun_fd, packet_view)
                elif fd == chan_fd:
                    self._from_fast(chan_view, tun_fd)
            self._publish_if_changed()  # after what was sent: see tunlink.pyx, Ordering

    def _from_bridge(self, sock: socket.socket, view: memoryview, tun_fd: int) -> None:
        now = time.monotonic()
        for _ in range(BURST):
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                return
            packet, replies = self.translator.from_device(view[:n], now)
            self._carry(packet, view[6:12], replies, tun_fd)

    def _from_fast(self, view: memoryview, tun_fd: int) -> None:
        """What the C fast path handed over: frames it did not carry, packets it could
        not resolve, frames it carried that change the translator's state."""
        source_at = FAST_HEADER.size + 6
        for _ in range(BURST):
            try:
                n = self._chan_py.recv_into(view)
            except BlockingIOError:
                return
            packet, frames = handed_over(self.translator, view[:n])
            self._carry(packet, view[source_at : source_at + 6], frames, tun_fd)

    def _carry(self, packet: memoryview | None, source_mac: memoryview, frames: list[bytes],
               tun_fd: int) -> None:
        """A packet to the TUN (or to the DHCP client), frames to the bridge."""
        if packet is not None and self.dhcp is not None and dhcp.is_dhcp_reply(packet):
            self._dhcp_do(self.dhcp.receive(packet, bytes(source_mac), self._dhcp_now()))
        elif packet is not None:
            try:
                os.write(tun_fd, packet)
            except OSError as exc:  # link down (EIO), queue full: a lost packet
                if exc.errno == errno.EBADF:
                    raise
                self.pump_counters["tun_write_errors"] += 1
        if frames:
            self._send(frames)

    # --- the fast path's snapshot (the pump's thread only: the translator is its) -----

    def _state_changed(self) -> None:
        self._dirty = True
        if threading.current_thread() is not self._thread:
            self._wake()  # (addresses added, a static neighbour): the pump publishes

    def _publish_if_changed(self) -> None:
        """A new snapshot for C if the translator changed. While frames wait in the
        backlog (the socket full) C reads no TUN packet, which a newer snapshot could
        send ahead of them: closed in the epoll set before the snapshot says so, so C is
        never woken for a TUN it may not read (it would spin)."""
        if not self._c_mode:
            return
        if self._backlog and self._tun_open:
            self._epoll.modify(self.tun.fileno(), 0)
            self._tun_open = False
            self._dirty = True
        if self._dirty:
            self._dirty = False
            self._fast.publish(**self.translator.decisive_state(), dhcp=self.dhcp is not None,
                               tun_open=self._tun_open)

    def _open_tun(self, tun_fd: int) -> None:
        """C may read the TUN again: the snapshot says so before the epoll set wakes it."""
        self._tun_open = True
        self._dirty = True
        self._publish_if_changed()
        try:
            self._epoll.modify(tun_fd, select.EPOLLIN)
        except FileNotFoundError:
            self._epoll.register(tun_fd, select.EPOLLIN)

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

    def _send(self, frames: Any) -> None:
        """Frames to the bridge, oldest first; what finds the socket full waits."""
        backlog = self._backlog
        backlog.extend(frames)
        while backlog:
            try:
                self._pump_end.send(backlog[0])
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. EMSGSIZE: the bridge could not take it either
                if exc.errno == errno.EBADF:
                    raise
                self.pump_counters["backlog_dropped"] += 1
            backlog.popleft()
        while len(backlog) > MAX_BACKLOG:
            backlog.pop()
            self.pump_counters["backlog_dropped"] += 1

    def _refresh_addresses(self) -> None:
        try:
            current = self.tun.addresses()
        except OSError as exc:
            log.debug("reading %s's addresses failed: %s", self.name, exc)
            return
        if set(current) != set(self._addresses):
            self._addresses = current
            self.translator.set_host_addresses(current)

    # --- the DHCP client (--dhcp) -------------------------------------------------------

    def _dhcp_now(self) -> float:
        return time.monotonic() * self._dhcp_scale

    def _dhcp_carrier(self) -> None:
        while self._carrier_events and self.dhcp is not None:
            self._dhcp_do(self.dhcp.carrier(self._carrier_events.popleft(), self._dhcp_now()))

    def _dhcp_tick(self) -> float | None:
        """Run the client's timers; when they are due next, by the real clock."""
        if self.dhcp is None:
            return None
        client = self.dhcp
        deadline = client.next_deadline()
        if deadline is not None and self._dhcp_now() >= deadline:
            self._dhcp_do(client.tick(self._dhcp_now()))
            deadline = client.next_deadline()
        return None if deadline is None else deadline / self._dhcp_scale

    def _dhcp_do(self, actions: list[dhcp.Action]) -> None:
        for action in actions:
            if isinstance(action, dhcp.Send):
                self._send((action.frame,))
            elif isinstance(action, dhcp.Changed):
                log.info("dhcp on %s: %s -> %s (%s)", self.name, action.old.name,
                         action.new.name, action.reason)
            elif isinstance(action, dhcp.Configure):
                self._configure(action.lease, action.previous)
            elif isinstance(action, dhcp.Deconfigure):
                log.warning("dhcp on %s: %s removed (%s)", self.name, action.lease.interface,
                            "lease expired" if action.reason == "expired" else "NAK")
                self._deconfigure(action.lease)
            else:
                continue
            self._refresh_addresses()  # answer ARP for the new address at once, not in 1 s

    def _configure(self, lease: dhcp.Lease, previous: dhcp.Lease | None) -> None:
        if previous is not None and previous.interface != lease.interface:
            self._deconfigure(previous)
        elif previous is not None:  # a renewal or a replug may bring other routes
            self._routes("del", [r for r in previous.routes if r not in lease.routes])
        try:
            self.tun.add_address(lease.interface)
        except (OSError, NetlinkError, TapError) as exc:
            self.dhcp_counters["config_errors"] += 1
            log.error("dhcp on %s: cannot configure %s: %s", self.name, lease.interface, exc)
            return
        # On-link routes first: a later route's router may be reachable only through one.
        self._routes("add", sorted(lease.routes, key=lambda r: r.router != dhcp.ON_LINK))

    def _deconfigure(self, lease: dhcp.Lease) -> None:
        # The kernel takes a route with the address its router was reached by, but not an
        # on-link one, nor one whose router is outside the lease's prefix.
        self._routes("del", lease.routes)
        try:
            self.tun.del_address(lease.interface)
        except (OSError, NetlinkError) as exc:
            self.dhcp_counters["config_errors"] += 1
            log.error("dhcp on %s: cannot remove %s: %s", self.name, lease.interface, exc)

    def _route_exists(self, ipr: Any, index: int, route: dhcp.Route) -> None:
        """The kernel has a route to route.destination at our metric already: ours (a
        renewal, a replug), or another interface's, which stays."""
        network = ipaddress.ip_network(route.destination)
        holders = {r.get_attr("RTA_OIF") for r in ipr.route(
            "dump", family=2, table=254, dst_len=network.prefixlen)
            if r.get_attr("RTA_PRIORITY") == DHCP_ROUTE_METRIC
            and (r.get_attr("RTA_DST") or "0.0.0.0") == str(network.network_address)}
        if index not in holders:
            self.dhcp_counters["route_conflicts"] += 1
            log.warning("dhcp on %s: the host has a route to %s at metric %d already, "
                        "through another interface: left as it is, the lease's is not added",
                        self.name, route.destination, DHCP_ROUTE_METRIC)

    def _routes(self, command: str, routes: Sequence[dhcp.Route]) -> None:
        """Add ("add") or remove ("del") the lease's routes, at DHCP_ROUTE_METRIC. A
        route the kernel refuses to add is counted and the others still go in; one
        already gone at "del" is not an error. A route the host already has to the same
        destination at the same metric through another interface is the user's: it is
        left as it is (route_conflicts), never replaced; one already ours (a renewal) is
        kept."""
        if not routes:
            return
        try:
            with iproute(self.tun.netns) as ipr:
                index = link_index(ipr, self.name)
                for route in routes:
                    # Scope link for an on-link route, as `ip route` gives one: the kernel
                    # takes a router only through a route of that scope.
                    via = {"scope": rt_scope["link"]} if route.router == dhcp.ON_LINK else \
                        {"gateway": route.router}
                    try:
                        ipr.route(command, dst=route.destination, oif=index,
                                  priority=DHCP_ROUTE_METRIC, **via)
                    except NetlinkError as exc:
                        if command == "add" and exc.code == errno.EEXIST:
                            self._route_exists(ipr, index, route)
                        elif command != "del":
                            self.dhcp_counters["config_errors"] += 1
                            log.error("dhcp on %s: cannot add route %s: %s", self.name, route,
                                      exc.args[-1])
        except (OSError, NetlinkError) as exc:  # the TUN itself is gone
            if command != "del":
                self.dhcp_counters["config_errors"] += 1
                log.error("dhcp on %s: cannot add routes: %s", self.name, exc)
