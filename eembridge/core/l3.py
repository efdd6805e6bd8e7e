"""Ethernet on the device's side, IP on the host's: the translation behind `--link tun`.

Sans-IO: frames and packets in, frames and packets out, time passed in; no descriptors,
no threads. eembridge.link.tun runs it between a TUN device and the bridge.

Theory of operation
-------------------
The board speaks Ethernet over EEM; a TUN (IFF_TUN | IFF_NO_PI) takes bare IP packets
and has no link layer, so the kernel does no ARP or NDP on it. This module is the
host's link layer in its place:

* device -> host (`from_device`): a frame for the host's MAC, or for a group address
  (broadcast, IPv4 and IPv6 multicast: DHCP, mDNS, router advertisements, MLD), that
  carries IPv4 or IPv6 loses its Ethernet header (and any padding beyond the IP length)
  and goes to the TUN. ARP, and Neighbor Solicitation / Advertisement carried directly
  in IPv6, are consumed here: a request for one of the host's addresses is answered
  with the host's MAC, and both teach the neighbour table. Anything else (VLAN tags,
  other ethertypes, 802.3 length frames, frames for another unicast MAC, malformed IP,
  ARP or NDP) is dropped and counted by reason; nothing raises.
* host -> device (`from_host`): an IP packet gets an Ethernet header. Group
  destinations map to their group MAC (01:00:5e + 23 bits, 33:33 + 32 bits,
  ff:ff:ff:ff:ff:ff for limited and directed broadcast). A unicast destination takes
  the neighbour table's MAC; unknown and off-link (not in a subnet of the host's
  addresses, nor link-local), it goes to the board's MAC (the TUN's routes point at
  the board: it is the only thing on the wire); otherwise an ARP request or Neighbor
  Solicitation is sent, a few packets per destination are held until the answer and
  the rest dropped, counted. `tick` resends unanswered solicitations and gives up
  (held packets dropped as "unresolved") after `retries`.
* The neighbour table holds at most `table_size` learned entries (the oldest is
  evicted), each valid `max_age` seconds after it was last confirmed by ARP, NDP or
  by traffic from that address with that MAC. Entries given with `add_static` never
  age. A claim for one of the host's own addresses is never learned (counted).
* The board's MAC (`peer_mac`) is the source of the last unicast-sourced frame it sent
  that was accepted, unless fixed by `--peer-mac`.

Replies are built here with their checksums (ICMPv6 over the pseudo-header, RFC 4443);
the sum itself is offload.ones_sum, the one the TAP's checksum offload uses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .offload import ones_sum

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
VLAN_TYPES = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad, the old QinQ tag
BROADCAST = b"\xff" * 6
ARP_REQUEST, ARP_REPLY = 1, 2
ICMPV6 = 58
NDP_NS, NDP_NA = 135, 136
OPT_SLLA, OPT_TLLA = 1, 2
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80, 0x40, 0x20
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
UNSPECIFIED6 = bytes(16)
CONFIRM_EVERY = 1.0  # seconds: traffic refreshes a neighbour's age at most this often
_LINK_LOCAL4 = (0xA9FE0000, 0xFFFF0000)  # 169.254.0.0/16
_LINK_LOCAL6 = (0xFE80 << 112, ((1 << 10) - 1) << 118)  # fe80::/10

# Why a frame or packet was not carried; every reason is always present in counters().
DROP_REASONS = (
    "runt",  # device: shorter than an Ethernet header
    "other_mac",  # device: unicast to a MAC that is not the host's
    "vlan",  # device: VLAN-tagged (a TUN has no VLANs)
    "non_ip",  # device: an ethertype other than IPv4, IPv6, ARP (LLDP, 802.3 length, ...)
    "bad_ip",  # device: IP header broken, or its length runs past the frame
    "bad_arp",  # device: ARP for another hardware/protocol, or an unknown opcode
    "bad_ndp",  # device: NS/NA with a wrong checksum, hop limit, code or option
    "not_ip",  # host: a TUN packet that is neither IPv4 nor IPv6
    "hold_full",  # host: destination being resolved already holds its share of packets
    "pending_full",  # host: too many destinations being resolved at once
    "unresolved",  # host: held packets of a destination that never answered
)
COUNTERS = (
    "to_host_packets",  # IP packets handed to the TUN
    "to_device_frames",  # IP packets sent towards the device with an Ethernet header
    "arp_answered",  # ARP requests for the host's addresses answered
    "arp_ignored",  # ARP requests for other addresses (not ours to answer)
    "arp_sent",  # our ARP requests (first tries and retries)
    "arp_replies",  # ARP replies from the device
    "ns_answered",  # Neighbor Solicitations for the host's addresses answered
    "ns_ignored",  # Neighbor Solicitations for other addresses
    "ns_sent",  # our Neighbor Solicitations
    "na_received",  # Neighbor Advertisements from the device
    "neighbours_learned",  # table entries added or changed
    "neighbours_evicted",  # entries pushed out by a full table
    "address_conflicts",  # the device claimed one of the host's addresses
    "held",  # packets held while their destination was resolved
    "released",  # held packets sent once it was
)


def stable_mac(name: str) -> bytes:
    """A locally administered unicast MAC that depends only on `name`, so the board's
    ARP and neighbour caches stay right across bridge restarts."""
    digest = bytearray(hashlib.sha256(b"eembridge-tun:" + name.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


def link_local(mac: bytes) -> ipaddress.IPv6Address:
    """fe80:: with the modified EUI-64 of `mac` (RFC 4291 2.5.1), as the kernel derives it."""
    eui = bytes((mac[0] ^ 0x02, *mac[1:3], 0xFF, 0xFE, *mac[3:6]))
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def multicast_mac(destination: bytes) -> bytes | None:
    """The group MAC of an IPv4 or IPv6 multicast address (RFC 1112, RFC 2464), or None."""
    if len(destination) == 4 and 224 <= destination[0] < 240:
        return bytes((0x01, 0x00, 0x5E, destination[1] & 0x7F, destination[2], destination[3]))
    if len(destination) == 16 and destination[0] == 0xFF:
        return b"\x33\x33" + destination[12:16]
    return None


def solicited_node(address: bytes) -> bytes:
    """ff02::1:ffXX:XXXX, where a Neighbor Solicitation for `address` goes."""
    return bytes.fromhex("ff0200000000000000000001ff") + address[13:16]


def icmpv6_checksum(source: bytes, destination: bytes,
                    message: bytes | bytearray | memoryview) -> int:
    """The ICMPv6 checksum of `message` (its own checksum field taken as is)."""
    pseudo = source + destination + struct.pack("!IxxxB", len(message), ICMPV6)
    return ~ones_sum(pseudo + bytes(message)) & 0xFFFF


def ethernet(destination: bytes, source: bytes, ethertype: int, payload: bytes) -> bytes:
    return destination + source + struct.pack("!H", ethertype) + payload


def arp_packet(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
               target_ip: bytes) -> bytes:
    return struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + sender_mac + sender_ip + \
        target_mac + target_ip


def ndp_packet(source: bytes, destination: bytes, icmp_type: int, flags: int, target: bytes,
               option: int, mac: bytes) -> bytes:
    """An IPv6 packet carrying one NS or NA with one link-layer address option."""
    body = bytearray(struct.pack("!BBHI", icmp_type, 0, 0, flags << 24) + target
                     + bytes((option, 1)) + mac)
    body[2:4] = struct.pack("!H", icmpv6_checksum(source, destination, body))
    return struct.pack("!IHBB", 6 << 28, len(body), ICMPV6, 255) + source + destination + body


@dataclass
class _Pending:
    """A destination being resolved: what waits for it, when to ask again."""

    packets: deque[bytes] = field(default_factory=deque)
    next_try: float = 0.0
    tries: int = 0


class Translator:
    """The host's link layer for a TUN: see the theory of operation above."""

    def __init__(self, host_mac: bytes, *, peer_mac: bytes | None = None,
                 table_size: int = 256, max_age: float = 300.0, hold: int = 4,
                 max_pending: int = 16, retry_interval: float = 1.0, retries: int = 3) -> None:
        if len(host_mac) != 6 or host_mac[0] & 1:
            raise ValueError("the host's MAC must be 6 bytes and unicast")
        self.host_mac = bytes(host_mac)
        self.peer_mac = peer_mac
        self._fixed_peer = peer_mac is not None
        self.table_size, self.max_age, self.hold = table_size, max_age, hold
        self.max_pending, self.retry_interval, self.retries = max_pending, retry_interval, retries
        self._table: dict[bytes, tuple[bytes, float]] = {}  # ip -> (mac, last confirmed)
        self._static: dict[bytes, bytes] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._own: set[bytes] = set()  # the host's addresses, packed
        self._own4: list[bytes] = []
        self._on_link: list[tuple[int, int, int]] = []  # (length, network, mask)
        self._broadcasts: set[bytes] = {b"\xff" * 4}
        self._link_local = link_local(self.host_mac).packed
        # Called after the state that decides a frame's or a packet's fate changed
        # (addresses, neighbours, pending destinations, the board's MAC): the TUN link's C
        # fast path (_fast/tunlink.pyx) decides from a copy of it.
        self.on_change: Callable[[], None] | None = None
        self.set_host_addresses(())
        self._counts = dict.fromkeys(COUNTERS, 0)
        self.drops = dict.fromkeys(DROP_REASONS, 0)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- configuration --------------------------------------------------------------

    def set_host_addresses(self, addresses: Iterable[str | ipaddress.IPv4Interface
                                                    | ipaddress.IPv6Interface]) -> None:
        """The host's addresses (ADDR/PREFIX): answered for, and their subnets on-link.
        The link-local address derived from the host's MAC is always one of them."""
        interfaces = [ipaddress.ip_interface(a) for a in addresses]
        interfaces.append(ipaddress.IPv6Interface(f"{ipaddress.IPv6Address(self._link_local)}/64"))
        self._own = {i.ip.packed for i in interfaces}
        self._own4 = [i.ip.packed for i in interfaces if i.version == 4]
        on_link = {(4, *_LINK_LOCAL4), (16, *_LINK_LOCAL6)}
        broadcasts = {b"\xff" * 4}
        for i in interfaces:
            net = i.network
            length = 4 if i.version == 4 else 16
            on_link.add((length, int(net.network_address), int(net.netmask)))
            if i.version == 4 and net.prefixlen < 31:
                broadcasts.add(net.broadcast_address.packed)
        self._on_link = sorted(on_link)
        self._broadcasts = broadcasts
        self._changed()

    @property
    def host_addresses(self) -> set[str]:
        return {str(ipaddress.ip_address(a)) for a in self._own}

    def add_static(self, ip: str, mac: bytes) -> None:
        """A neighbour that never ages (--peer with --peer-mac)."""
        self._static[ipaddress.ip_address(ip).packed] = bytes(mac)
        self._changed()

    def flush(self) -> None:
        """Forget every learned neighbour (as `ip neigh flush`); static ones stay. Safe
        from another thread: the table is replaced, not emptied under an iteration."""
        self._table = {}
        self._changed()

    def neighbours(self, now: float) -> dict[str, str]:
        """IP -> MAC of every valid entry, static ones included."""
        valid = {ip: mac for ip, (mac, seen) in self._table.items() if now - seen < self.max_age}
        valid.update(self._static)
        return {str(ipaddress.ip_address(ip)): mac.hex(":") for ip, mac in valid.items()}

    def decisive_state(self) -> dict[str, object]:
        """What decides a frame's or a packet's fate, for a copy that decides in its place
        (link/tun.py publishes it to the C fast path): keywords of TunFast.publish."""
        return {"host_mac": self.host_mac, "peer_mac": self.peer_mac,
                "fixed_peer": self._fixed_peer, "max_age": self.max_age,
                "confirm_every": CONFIRM_EVERY,
                "table": [(ip, mac, seen) for ip, (mac, seen) in self._table.items()],
                "statics": list(self._static.items()), "on_link": list(self._on_link),
                "broadcasts": list(self._broadcasts), "pending": list(self._pending)}

    def counters(self) -> dict[str, int]:
        out = dict(self._counts)
        out.update({f"dropped_{reason}": n for reason, n in self.drops.items()})
        out["neighbours"] = len(self._table) + len(self._static)
        out["pending"] = len(self._pending)
        return out

    # --- device -> host -------------------------------------------------------------

    def from_device(self, frame: bytes | bytearray | memoryview,
                    now: float) -> tuple[memoryview | None, list[bytes]]:
        """(IP packet for the TUN or None, frames to send back to the device). The packet
        is a view of `frame`: use it before `frame` changes."""
        view = memoryview(frame).cast("B")
        if len(view) < ETH_HLEN:
            return self._drop("runt")
        destination = view[0:6]
        if destination[0] & 1 == 0 and destination != self.host_mac:
            return self._drop("other_mac")
        ethertype = view[12] << 8 | view[13]
        payload = view[ETH_HLEN:]
        if ethertype == ETH_P_IP:
            packet = self._ipv4(payload)
        elif ethertype == ETH_P_IPV6:
            packet = self._ipv6(payload)
        elif ethertype == ETH_P_ARP:
            return None, self._arp(payload, bytes(view[6:12]), now)
        elif ethertype in VLAN_TYPES:
            return self._drop("vlan")
        else:
            return self._drop("non_ip")
        if packet is None:
            return self._drop("bad_ip")
        source_mac = bytes(view[6:12])
        sent: list[bytes] = []
        if not source_mac[0] & 1:
            if not self._fixed_peer and self.peer_mac != source_mac:
                self.peer_mac = source_mac
                self._changed()
            if ethertype == ETH_P_IPV6 and len(packet) >= 42 and packet[6] == ICMPV6 \
                    and packet[40] in (NDP_NS, NDP_NA):
                return None, self._ndp(packet, source_mac, now)
            source = bytes(packet[12:16] if ethertype == ETH_P_IP else packet[8:24])
            known = self._table.get(source)
            if known is not None and known[0] == source_mac and now - known[1] < CONFIRM_EVERY:
                pass  # confirmed a moment ago: not once per packet of a TCP stream
            elif known is not None or source in self._pending or self._is_on_link(source):
                sent = self._learn(source, source_mac, now)
        self._counts["to_host_packets"] += 1
        return packet, sent

    def _drop(self, reason: str) -> tuple[None, list[bytes]]:
        self.drops[reason] += 1
        return None, []

    @staticmethod
    def _ipv4(payload: memoryview) -> memoryview | None:
        if len(payload) < 20 or payload[0] >> 4 != 4:
            return None
        header = (payload[0] & 0x0F) * 4
        total = payload[2] << 8 | payload[3]
        if header < 20 or total < header or total > len(payload):
            return None
        return payload[:total]  # Ethernet pads short frames to 60 bytes

    @staticmethod
    def _ipv6(payload: memoryview) -> memoryview | None:
        if len(payload) < 40 or payload[0] >> 4 != 6:
            return None
        total = 40 + (payload[4] << 8 | payload[5])
        if total > len(payload):
            return None  # (a jumbogram's zero length is for links far beyond this one)
        return payload[:total]

    def _arp(self, payload: memoryview, source_mac: bytes, now: float) -> list[bytes]:
        if len(payload) < 28 or bytes(payload[0:6]) != b"\x00\x01\x08\x00\x06\x04":
            self.drops["bad_arp"] += 1
            return []
        op = payload[6] << 8 | payload[7]
        if op not in (ARP_REQUEST, ARP_REPLY):
            self.drops["bad_arp"] += 1
            return []
        sender_mac, sender_ip = bytes(payload[8:14]), bytes(payload[14:18])
        target_ip = bytes(payload[24:28])
        sent: list[bytes] = []
        if sender_ip != bytes(4) and not sender_mac[0] & 1:
            if not self._fixed_peer and self.peer_mac != source_mac:
                self.peer_mac = source_mac
                self._changed()
            sent = self._learn(sender_ip, sender_mac, now)
        if op == ARP_REPLY:
            self._counts["arp_replies"] += 1
        elif op == ARP_REQUEST:
            if target_ip in self._own and target_ip != sender_ip:
                reply = arp_packet(ARP_REPLY, self.host_mac, target_ip, sender_mac, sender_ip)
                sent.append(ethernet(sender_mac, self.host_mac, ETH_P_ARP, reply))
                self._counts["arp_answered"] += 1
            else:
                self._counts["arp_ignored"] += 1
        return sent

    def _ndp(self, packet: memoryview, source_mac: bytes, now: float) -> list[bytes]:
        """A Neighbor Solicitation or Advertisement (RFC 4861 7.1.1, 7.1.2 checks)."""
        source, destination = bytes(packet[8:24]), bytes(packet[24:40])
        message = packet[40:]
        if (packet[7] != 255 or len(message) < 24 or message[1] != 0
                or icmpv6_checksum(source, destination, message) != 0):
            self.drops["bad_ndp"] += 1
            return []
        target = bytes(message[8:24])
        options = self._ndp_options(message[24:])
        if options is None or target[0] == 0xFF:
            self.drops["bad_ndp"] += 1
            return []
        if message[0] == NDP_NA:
            self._counts["na_received"] += 1
            advertised = options.get(OPT_TLLA, source_mac)
            return self._learn(target, advertised, now) if not advertised[0] & 1 else []
        sent: list[bytes] = []
        mac = options.get(OPT_SLLA)
        if source == UNSPECIFIED6:
            if mac is not None:  # RFC 4861: no SLLA from the unspecified address
                self.drops["bad_ndp"] += 1
                return []
        elif not (mac or source_mac)[0] & 1:
            sent = self._learn(source, mac or source_mac, now)
        if target not in self._own:
            self._counts["ns_ignored"] += 1
            return sent
        # Answering DAD (from ::) goes to all nodes, unsolicited (RFC 4861 7.2.4).
        reply_to, flags = (ALL_NODES, NA_OVERRIDE) if source == UNSPECIFIED6 else \
            (source, NA_SOLICITED | NA_OVERRIDE)
        reply = ndp_packet(target, reply_to, NDP_NA, flags, target, OPT_TLLA, self.host_mac)
        mac_to = multicast_mac(reply_to) if reply_to == ALL_NODES else (mac or source_mac)
        assert mac_to is not None
        sent.append(ethernet(mac_to, self.host_mac, ETH_P_IPV6, reply))
        self._counts["ns_answered"] += 1
        return sent

    @staticmethod
    def _ndp_options(data: memoryview) -> dict[int, bytes] | None:
        """Link-layer address options by type; None if an option is malformed."""
        found: dict[int, bytes] = {}
        at = 0
        while at + 2 <= len(data):
            kind, length = data[at], data[at + 1] * 8
            if length == 0 or at + length > len(data):
                return None
            if kind in (OPT_SLLA, OPT_TLLA):
                if length != 8:
                    return None  # Ethernet's option is one unit: 6 bytes of MAC
                found[kind] = bytes(data[at + 2 : at + 8])
            at += length
        return found

    def _learn(self, ip: bytes, mac: bytes, now: float) -> list[bytes]:
        """Record ip -> mac; returns the frames that were waiting for it."""
        if ip in self._own:
            if mac != self.host_mac:
                self._counts["address_conflicts"] += 1
            return []
        previous = self._table.get(ip)
        if previous is None or previous[0] != mac:
            self._counts["neighbours_learned"] += 1
            if previous is None and len(self._table) >= self.table_size:
                oldest = min(self._table, key=lambda k: self._table[k][1])
                del self._table[oldest]
                self._counts["neighbours_evicted"] += 1
        self._table[ip] = (mac, now)
        pending = self._pending.pop(ip, None)
        self._changed()
        if pending is None:
            return []
        self._counts["released"] += len(pending.packets)
        self._counts["to_device_frames"] += len(pending.packets)
        ethertype = ETH_P_IP if len(ip) == 4 else ETH_P_IPV6
        return [ethernet(mac, self.host_mac, ethertype, p) for p in pending.packets]

    def _is_on_link(self, ip: bytes) -> bool:
        value = int.from_bytes(ip, "big")
        return any(length == len(ip) and value & mask == network
                   for length, network, mask in self._on_link)

    # --- host -> device -------------------------------------------------------------

    def from_host(self, packet: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Frames for the device: the packet with its Ethernet header, or a solicitation
        for its destination (the packet held), or nothing (dropped, counted)."""
        view = memoryview(packet).cast("B")
        version = view[0] >> 4 if len(view) else 0
        if version == 4 and len(view) >= 20:
            destination, ethertype = bytes(view[16:20]), ETH_P_IP
        elif version == 6 and len(view) >= 40:
            destination, ethertype = bytes(view[24:40]), ETH_P_IPV6
        else:
            self.drops["not_ip"] += 1
            return []
        mac = self._resolve(destination, now)
        if mac is None:
            return self._hold(destination, bytes(view), now)
        self._counts["to_device_frames"] += 1
        return [b"".join((self._header(mac, ethertype), view))]

    def _header(self, destination: bytes, ethertype: int) -> bytes:
        return destination + self.host_mac + struct.pack("!H", ethertype)

    def _resolve(self, destination: bytes, now: float) -> bytes | None:
        group = multicast_mac(destination)
        if group is not None:
            return group
        if destination in self._broadcasts:
            return BROADCAST
        static = self._static.get(destination)
        if static is not None:
            return static
        entry = self._table.get(destination)
        if entry is not None and now - entry[1] < self.max_age:
            return entry[0]
        if self.peer_mac is not None and not self._is_on_link(destination):
            return self.peer_mac  # routed through the board
        return None

    def _hold(self, destination: bytes, packet: bytes, now: float) -> list[bytes]:
        pending = self._pending.get(destination)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                self.drops["pending_full"] += 1
                return []
            pending = self._pending[destination] = _Pending()
            self._changed()
        if len(pending.packets) >= self.hold:
            self.drops["hold_full"] += 1
            return []
        pending.packets.append(packet)
        self._counts["held"] += 1
        if pending.tries:
            return []
        return self._solicit(destination, pending, now)

    def _solicit(self, destination: bytes, pending: _Pending, now: float) -> list[bytes]:
        pending.tries += 1
        pending.next_try = now + self.retry_interval
        if len(destination) == 4:
            self._counts["arp_sent"] += 1
            source = next((a for a in self._own4 if self._same_subnet(a, destination)),
                          self._own4[0] if self._own4 else bytes(4))
            request = arp_packet(ARP_REQUEST, self.host_mac, source, bytes(6), destination)
            return [ethernet(BROADCAST, self.host_mac, ETH_P_ARP, request)]
        self._counts["ns_sent"] += 1
        group = solicited_node(destination)
        request = ndp_packet(self._link_local, group, NDP_NS, 0, destination, OPT_SLLA,
                             self.host_mac)
        return [ethernet(b"\x33\x33" + group[12:16], self.host_mac, ETH_P_IPV6, request)]

    def _same_subnet(self, own: bytes, other: bytes) -> bool:
        a, b = int.from_bytes(own, "big"), int.from_bytes(other, "big")
        return any(length == 4 and a & mask == network and b & mask == network
                   for length, network, mask in self._on_link)

    # --- time ---------------------------------------------------------------------

    def tick(self, now: float) -> list[bytes]:
        """Solicitations to send again; destinations out of tries give up their packets.
        Call at `next_deadline()` (or more often)."""
        sent: list[bytes] = []
        for destination, pending in list(self._pending.items()):
            if now < pending.next_try:
                continue
            if pending.tries >= self.retries:
                self.drops["unresolved"] += len(pending.packets)
                del self._pending[destination]
                self._changed()
            else:
                sent += self._solicit(destination, pending, now)
        for ip in [ip for ip, (_mac, seen) in self._table.items() if now - seen >= self.max_age]:
            del self._table[ip]
            self._changed()
        return sent

    def next_deadline(self) -> float | None:
        """When `tick` has work next (a retry or a give-up), or None."""
        return min((p.next_try for p in self._pending.values()), default=None)
