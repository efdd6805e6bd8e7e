"""Which of the board's frames may reach a user-mode network stack (sans-IO).

With `--link user` the board's frames end in libslirp (link/user.py), which with --nat
carries whatever the board starts (TCP connections, UDP flows, pings) out into the
host's network as the host's own sockets. A board should not reach a lab's network by
default: without --nat the stack runs `restricted`, and this filter, on the board's
side, says what was refused and why (libslirp counts nothing) and refuses a connection
at once. It lets through only what answers the host or asks the stack itself:

* ARP, and IPv4/IPv6 packets that are not a start: TCP segments other than a bare SYN
  (the rest of a connection the board did not start is answered by the stack with a
  reset), UDP answering a `--forward udp:` flow (below), DHCP requests (slirp's own
  server leases the board its address), ICMP errors and echo replies, and on IPv6 the
  neighbour discovery messages.
* Refused, each counted by kind: a SYN (answered with a TCP reset, so the board's
  connect() fails at once with "connection refused" instead of timing out), other UDP,
  ICMP echo requests and other queries, IP fragments (a non-first fragment carries no
  ports to judge by), other protocols and ethertypes.

UDP flows. With a `--forward udp:` libslirp cannot run restricted: restricted, it drops
every datagram of the board before looking for the forward's socket (udp.c: udp_input),
and it has no narrower mode (its guest forwards are TCP only). So this filter alone
keeps the board off the host: a datagram from the board passes only if it answers a
flow a forwarded client started. libslirp delivers a client's datagram from the address
and port it was sent from, the loopback address translated to the gateway's (socket.c:
sorecvfrom, sotranslate_in), and sends the board's datagrams from the forwarded port out
of the forward's own socket to wherever they are addressed, an address of the board's
network translated to loopback and the DNS address to the host's resolver (udp_input;
socket.c: sosendto, sotranslate_out). So `learn` sees every frame the stack sends the
board and keeps, for each datagram to a forwarded port, the flow (board address and
port, client address and port); `check` passes a datagram of the board only along a
flow it holds, reversed.
A flow lives UDP_FLOW_TIMEOUT after the client's last datagram, RFC 4787's NAT mapping
timer (REQ-5: two minutes at the least, five recommended), refreshed by the client's
datagrams only (its REQ-6 outbound refresh): the board's answers do not keep their own
permission open once the client is silent and its port may be another program's. At
most UDP_FLOW_LIMIT flows; a new one then pushes out the least recently refreshed.
Learned, expired and evicted flows are counted. Forwards are IPv4 (slirp_add_hostfwd
binds 127.0.0.1), so are the flows; the board's IPv6 UDP is refused.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .offload import ones_sum

ETH_HLEN = 14
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
SYN, RST, ACK = 0x02, 0x04, 0x10
ICMP_PASSED = frozenset((0, 3, 11, 12))  # echo reply, unreachable, time exceeded, parameter
ICMPV6_PASSED = frozenset((129, 133, 134, 135, 136, 137))  # echo reply, NDP; < 128: errors
DHCP_CLIENT, DHCP_SERVER = 68, 67

UDP_FLOW_TIMEOUT = 300.0  # seconds; see the module's docstring
UDP_FLOW_LIMIT = 1024

COUNTERS = ("refused_tcp", "refused_udp", "refused_icmp", "refused_fragments",
            "refused_other", "resets_sent", "udp_flows_learned", "udp_flows_expired",
            "udp_flows_evicted")


class Egress:
    """check(frame) -> (pass it on, frames to send back to the board); learn(frame) for
    each frame the stack sends the board."""

    def __init__(self, *, nat: bool, udp_forwards: Iterable[int] = (),
                 clock: Callable[[], float] = time.monotonic,
                 flow_timeout: float = UDP_FLOW_TIMEOUT, flow_limit: int = UDP_FLOW_LIMIT) -> None:
        """udp_forwards: the board's forwarded UDP ports, whose flows `learn` keeps."""
        self.nat = nat
        self.udp_forwards = frozenset(udp_forwards)
        self.clock, self.flow_timeout, self.flow_limit = clock, flow_timeout, flow_limit
        # flow (forwarded_datagram's key) -> when its client last sent; least recent first
        self._flows: OrderedDict[bytes, float] = OrderedDict()
        self.counts = dict.fromkeys(COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def learn(self, frame: bytes | bytearray | memoryview) -> None:
        """A frame the stack sends the board: a forwarded client's datagram starts or
        refreshes its flow."""
        flow = forwarded_datagram(frame, self.udp_forwards)
        if flow is None:
            return
        now = self.clock()
        self._expire(now)
        if flow in self._flows:
            self._flows.move_to_end(flow)
        else:
            self.counts["udp_flows_learned"] += 1
            if len(self._flows) >= self.flow_limit:
                self._flows.popitem(last=False)
                self.counts["udp_flows_evicted"] += 1
        self._flows[flow] = now

    def _expire(self, now: float) -> None:
        while self._flows:
            flow, seen = next(iter(self._flows.items()))
            if now - seen < self.flow_timeout:
                return
            del self._flows[flow]
            self.counts["udp_flows_expired"] += 1

    def _answers_a_flow(self, frame: memoryview, header: int) -> bool:
        """An IPv4 datagram of the board back along a flow it holds."""
        ip, udp = frame[ETH_HLEN:], frame[ETH_HLEN + header:]
        if header < 20 or struct.unpack_from("!H", udp, 0)[0] not in self.udp_forwards:
            return False
        self._expire(self.clock())
        return bytes(ip[12:16]) + bytes(udp[0:2]) + bytes(ip[16:20]) + bytes(udp[2:4]) \
            in self._flows

    def check(self, frame: bytes | bytearray | memoryview) -> tuple[bool, list[bytes]]:
        if self.nat:
            return True, []
        frame = memoryview(frame)
        if len(frame) < ETH_HLEN:
            return self._refuse("refused_other")
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_P_ARP:
            return True, []
        if ethertype == ETH_P_IP:
            return self._ipv4(frame)
        if ethertype == ETH_P_IPV6:
            return self._ipv6(frame)
        return self._refuse("refused_other")

    def _refuse(self, counter: str, replies: list[bytes] | None = None) -> tuple[bool, list[bytes]]:
        self.counts[counter] += 1
        return False, replies or []

    def _ipv4(self, frame: memoryview) -> tuple[bool, list[bytes]]:
        ip = frame[ETH_HLEN:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return self._refuse("refused_other")
        header = (ip[0] & 0x0F) * 4
        if struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:  # MF or an offset: a fragment
            return self._refuse("refused_fragments")
        return self._transport(frame, ip[9], header, v6=False)

    def _ipv6(self, frame: memoryview) -> tuple[bool, list[bytes]]:
        ip = frame[ETH_HLEN:]
        if len(ip) < 40 or ip[0] >> 4 != 6:
            return self._refuse("refused_other")
        # Extension headers (hop-by-hop on MLD reports, fragments) are not followed: none
        # of them is what a board needs of the stack.
        return self._transport(frame, ip[6], 40, v6=True)

    def _transport(self, frame: memoryview, protocol: int, header: int,
                   v6: bool) -> tuple[bool, list[bytes]]:
        l4 = frame[ETH_HLEN + header:]
        if protocol == TCP:
            if len(l4) < 20:
                return self._refuse("refused_tcp")
            if l4[13] & (SYN | ACK) == SYN:
                self.counts["resets_sent"] += 1
                return self._refuse("refused_tcp", [_reset(frame, header, v6)])
            return True, []
        if protocol == UDP:
            if len(l4) >= 8:
                if struct.unpack_from("!HH", l4, 0) == (DHCP_CLIENT, DHCP_SERVER):
                    return True, []
                if not v6 and self._answers_a_flow(frame, header):
                    return True, []
            return self._refuse("refused_udp")
        if protocol in (ICMP, ICMPV6) and len(l4) >= 1:
            passed = (l4[0] in ICMPV6_PASSED or l4[0] < 128) if v6 else l4[0] in ICMP_PASSED
            if passed and (protocol == ICMPV6) == v6:
                return True, []
            return self._refuse("refused_icmp")
        return self._refuse("refused_other")


def forwarded_datagram(frame: bytes | bytearray | memoryview,
                       forwards: frozenset[int]) -> bytes | None:
    """The flow of a frame towards the board if it is an IPv4 datagram (or its first
    fragment) to a forwarded port: board address and port, client address and port, as
    they are in the frame. _fast/slirp.pyx picks the same frames without the GIL."""
    frame = memoryview(frame)
    if len(frame) < ETH_HLEN + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[ETH_HLEN:]
    header = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or header < 20 or ip[9] != UDP or len(ip) < header + 8:
        return None
    if struct.unpack_from("!H", ip, 6)[0] & 0x1FFF:  # a later fragment: no ports in it
        return None
    udp = ip[header:]
    if struct.unpack_from("!H", udp, 2)[0] not in forwards:
        return None
    return bytes(ip[16:20]) + bytes(udp[2:4]) + bytes(ip[12:16]) + bytes(udp[0:2])


def _reset(frame: memoryview, header: int, v6: bool) -> bytes:
    """The RST|ACK a closed port sends for this SYN (RFC 9293 3.10.7.1), Ethernet and IP
    addresses swapped."""
    ip = frame[ETH_HLEN:]
    tcp = ip[header:]
    source_port, destination_port, seq = struct.unpack_from("!HHI", tcp, 0)
    segment = bytearray(struct.pack("!HHIIBBHHH", destination_port, source_port, 0,
                                    (seq + 1) & 0xFFFFFFFF, 5 << 4, RST | ACK, 0, 0, 0))
    if v6:
        source, destination = bytes(ip[8:24]), bytes(ip[24:40])
        pseudo = destination + source + struct.pack("!IxxxB", len(segment), TCP)
        ip_header = bytearray(struct.pack("!IHBB", 6 << 28, len(segment), TCP, 64) + destination
                              + source)
        ethertype = ETH_P_IPV6
    else:
        source, destination = bytes(ip[12:16]), bytes(ip[16:20])
        pseudo = destination + source + struct.pack("!xBH", TCP, len(segment))
        ip_header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), 0, 0x4000,
                                          64, TCP, 0) + destination + source)
        struct.pack_into("!H", ip_header, 10, ~ones_sum(ip_header) & 0xFFFF)
        ethertype = ETH_P_IP
    struct.pack_into("!H", segment, 16, ~ones_sum(segment, ones_sum(pseudo)) & 0xFFFF)
    ethernet = bytes(frame[6:12]) + bytes(frame[0:6]) + struct.pack("!H", ethertype)
    return ethernet + bytes(ip_header) + bytes(segment)
