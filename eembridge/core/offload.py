"""TCP segmentation and checksum offload for the TAP: the reference (the specification
of eembridge/_fast/offload.pxd, which must give the same bytes for every input).

Why: a TAP opened with IFF_VNET_HDR and told TUNSETOFFLOAD(CSUM | TSO4 | TSO6) lets the
kernel's TCP hand the bridge one packet of up to 64 KB instead of forty-odd frames: one
read(2), one trip through the qdisc and the TAP instead of one per frame, and no
software segmentation in the kernel (usbnet, and so cdc_eem, gets software GSO). The
price is ours to pay: each read starts with a 10-byte virtio_net_hdr (legacy layout,
native byte order: little endian on every host we build for) and we cut the packet into
MSS-sized frames and fill in the checksums the kernel left to "hardware".

What the header may say, and what we do:
- gso_type NONE, no NEEDS_CSUM: the frame is complete; sent as it is.
- gso_type NONE, NEEDS_CSUM: finish the checksum the kernel started (the field at
  csum_start + csum_offset holds the pseudo-header sum): sum from csum_start to the
  end, store its complement (0 becomes 0xFFFF, as the kernel's skb_checksum_help does).
- gso_type TCPV4 / TCPV6: segments of gso_size payload bytes, each with its own IP
  length (and IPv4 id + i and header checksum), sequence number, flags (FIN and PSH
  only on the last, CWR only on the first) and TCP checksum, as the kernel's
  tcp_gso_segment would make them.
Anything else (UDP fragmentation offload, IPv6 extension headers, ECN without CWR
semantics we could vouch for) was not offered by TUNSETOFFLOAD and is refused:
OffloadError, counted by the caller, the packet dropped.
"""

from __future__ import annotations

import struct

VNET_HDR_SIZE = 10  # struct virtio_net_hdr; TUNSETVNETHDRSZ's default
F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

# TUNSETOFFLOAD bits (include/uapi/linux/if_tun.h): what the kernel may hand us.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_ETH_VLAN = 0x8100
_TCP = 6
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80


class OffloadError(ValueError):
    """A packet the offload cannot turn into frames (malformed or not offered)."""


def vnet_header(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
                csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of big-endian words (RFC 1071), folded."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _store(packet: bytearray, at: int, value: int) -> None:
    packet[at : at + 2] = struct.pack("!H", value)


def complete_checksum(packet: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum in place (NEEDS_CSUM)."""
    if start + offset + 2 > len(packet) or start >= len(packet):
        raise OffloadError(f"checksum at {start}+{offset} lies outside a {len(packet)}-byte frame")
    value = ~ones_sum(packet[start:]) & 0xFFFF
    _store(packet, start + offset, value or 0xFFFF)


def _layers(packet: bytes, v6: bool) -> tuple[int, int, int]:
    """(l3, l4, end of the TCP header) of an Ethernet/IP/TCP packet, or OffloadError."""
    if len(packet) < 14:
        raise OffloadError("GSO packet shorter than an Ethernet header")
    l3, ethertype = 14, struct.unpack_from("!H", packet, 12)[0]
    if ethertype == _ETH_VLAN and len(packet) >= 18:
        l3, ethertype = 18, struct.unpack_from("!H", packet, 16)[0]
    if ethertype != (_ETH_IPV6 if v6 else _ETH_IPV4):
        raise OffloadError(f"GSO packet with EtherType 0x{ethertype:04x}")
    if v6:
        if len(packet) < l3 + 40 or packet[l3 + 6] != _TCP:
            raise OffloadError("TCPv6 GSO packet without a plain TCP next header")
        l4 = l3 + 40
    else:
        if len(packet) < l3 + 20:
            raise OffloadError("TCPv4 GSO packet shorter than its IP header")
        ihl = (packet[l3] & 0x0F) * 4
        if ihl < 20 or packet[l3 + 9] != _TCP:
            raise OffloadError("TCPv4 GSO packet without a TCP header")
        l4 = l3 + ihl
    if len(packet) < l4 + 20:
        raise OffloadError("GSO packet shorter than its TCP header")
    end = l4 + (packet[l4 + 12] >> 4) * 4
    if end < l4 + 20 or end > len(packet):
        raise OffloadError("GSO packet with a bad TCP header length")
    return l3, l4, end


def segment(header: bytes, packet: bytes) -> list[bytes]:
    """The frames one TAP read (virtio_net_hdr + packet) stands for."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = struct.unpack(
        "<BBHHHH", header[:VNET_HDR_SIZE])
    if gso_type == GSO_NONE:
        frame = bytearray(packet)
        if flags & F_NEEDS_CSUM:
            complete_checksum(frame, csum_start, csum_offset)
        return [bytes(frame)]
    if gso_type not in (GSO_TCPV4, GSO_TCPV6):
        raise OffloadError(f"GSO type 0x{gso_type:02x} was not offered")
    if gso_size == 0:
        raise OffloadError("GSO packet with a segment size of 0")
    v6 = gso_type == GSO_TCPV6
    l3, l4, end = _layers(packet, v6)
    payload = packet[end:]
    seq0 = struct.unpack_from("!I", packet, l4 + 4)[0]
    id0 = 0 if v6 else struct.unpack_from("!H", packet, l3 + 4)[0]
    pieces = [payload[at : at + gso_size] for at in range(0, len(payload), gso_size)] or [b""]
    frames = []
    for i, piece in enumerate(pieces):
        h = bytearray(packet[:end])
        tcp_length = end - l4 + len(piece)
        if v6:
            _store(h, l3 + 4, tcp_length)
            pseudo = ones_sum(h[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", tcp_length, _TCP))
        else:
            _store(h, l3 + 2, l4 - l3 + tcp_length)
            _store(h, l3 + 4, (id0 + i) & 0xFFFF)
            _store(h, l3 + 10, 0)
            _store(h, l3 + 10, ~ones_sum(h[l3:l4]) & 0xFFFF)
            pseudo = ones_sum(h[l3 + 12 : l3 + 20] + struct.pack("!xBH", _TCP, tcp_length))
        struct.pack_into("!I", h, l4 + 4, (seq0 + i * gso_size) & 0xFFFFFFFF)
        if i != len(pieces) - 1:
            h[l4 + 13] &= ~(_FIN | _PSH) & 0xFF
        if i != 0:
            h[l4 + 13] &= ~_CWR & 0xFF
        _store(h, l4 + 16, 0)
        _store(h, l4 + 16, ~ones_sum(bytes(h[l4:]) + piece, pseudo) & 0xFFFF)
        frames.append(bytes(h) + piece)
    return frames
