"""Which of the board's frames may reach a user-mode network stack (sans-IO).

With `--link user` the board's frames end in libslirp (link/user.py), which with --nat
carries whatever the board starts (TCP connections, UDP flows, pings) out into the
host's network as the host's own sockets. A board should not reach a lab's network by
default: without --nat the stack runs `restricted`, and this filter, on the board's
side, says what was refused and why (libslirp counts nothing) and refuses a connection
at once. It lets through only what answers the host or asks the stack itself:

* ARP, and IPv4/IPv6 packets that are not a start: TCP segments other than a bare SYN
  (the rest of a connection the board did not start is answered by the stack with a
  reset), UDP from a forwarded board port to the stack's address (the board's replies
  on a `--forward udp:` flow), DHCP requests (slirp's own server leases the board its address), ICMP errors
  and echo replies, and on IPv6 the neighbour discovery messages.
* Refused, each counted by kind: a SYN (answered with a TCP reset, so the board's
  connect() fails at once with "connection refused" instead of timing out), other UDP,
  ICMP echo requests and other queries, IP fragments (a non-first fragment carries no
  ports to judge by), other protocols and ethertypes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .offload import ones_sum

ETH_HLEN = 14
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
SYN, RST, ACK = 0x02, 0x04, 0x10
ICMP_PASSED = frozenset((0, 3, 11, 12))  # echo reply, unreachable, time exceeded, parameter
ICMPV6_PASSED = frozenset((129, 133, 134, 135, 136, 137))  # echo reply, NDP; < 128: errors
DHCP_CLIENT, DHCP_SERVER = 68, 67

COUNTERS = ("refused_tcp", "refused_udp", "refused_icmp", "refused_fragments",
            "refused_other", "resets_sent")


class Egress:
    """check(frame) -> (pass it on, frames to send back to the board)."""

    def __init__(self, *, nat: bool, udp_reply_ports: Iterable[int] = (),
                 gateway: bytes = b"") -> None:
        """udp_reply_ports: the board's forwarded UDP ports; their replies pass when they go
        to `gateway` (the stack's IPv4 address, where forwarded datagrams come from)."""
        self.nat = nat
        self.udp_reply_ports = frozenset(udp_reply_ports)
        self.gateway = gateway
        self.counts = dict.fromkeys(COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

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
                source, destination = struct.unpack_from("!HH", l4, 0)
                reply = (source in self.udp_reply_ports and not v6
                         and bytes(frame[ETH_HLEN + 16:ETH_HLEN + 20]) == self.gateway)
                if reply or (source, destination) == (DHCP_CLIENT, DHCP_SERVER):
                    return True, []
            return self._refuse("refused_udp")
        if protocol in (ICMP, ICMPV6) and len(l4) >= 1:
            passed = (l4[0] in ICMPV6_PASSED or l4[0] < 128) if v6 else l4[0] in ICMP_PASSED
            if passed and (protocol == ICMPV6) == v6:
                return True, []
            return self._refuse("refused_icmp")
        return self._refuse("refused_other")


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
