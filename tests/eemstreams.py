"""Builders of EEM byte streams for tests: frames, packets, commands, garbage."""

from __future__ import annotations

import random
import struct
import zlib

from eembridge.core.protocol import SENTINEL, command_header

HOST_MAC = bytes([0x02, 0, 0, 0, 0, 1])


def ipv4_header(payload_len: int, ident: int = 0) -> bytes:
    """An IPv4 header (checksum right) for a packet of payload_len bytes after it."""
    # Protocol 253 (for experiments): no transport checksum for the deframer to check.
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0, 64,
                                   253, 0, bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(header)


def ethernet_frame(rng: random.Random, payload_len: int) -> bytes:
    """A frame to HOST_MAC. From 20 bytes of payload on it is an IPv4 packet (random
    bytes after a right header), so it is plausible (codec.plausible) when found by
    scanning; shorter ones are bare random bytes and are not."""
    dst = HOST_MAC
    src = bytes([0x02, 0, 0, 0, 0, 2])
    payload = rng.randbytes(payload_len)
    if payload_len >= 20:
        payload = ipv4_header(payload_len - 20, payload[4] << 8 | payload[5]) + payload[20:]
    return dst + src + b"\x08\x00" + payload


def data_packet(frame: bytes, crc: bool) -> bytes:
    check = struct.pack("<I", zlib.crc32(frame)) if crc else SENTINEL
    header = (0x4000 if crc else 0) | (len(frame) + 4)
    return struct.pack("<H", header) + frame + check


def command(command_code: int, param: int, payload: bytes = b"") -> bytes:
    return struct.pack("<H", command_header(command_code, param)) + payload


def feed_all(deframer, transfers, short_last: bool = True):
    """Feed transfers, all full but (optionally) the last, and collect events."""
    events = []
    for i, transfer in enumerate(transfers):
        events += deframer.feed(transfer, short_last and i == len(transfers) - 1)
    return events


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def transport_frame(rng: random.Random, size: int, dst: bytes = HOST_MAC) -> bytes:
    """A UDP/IPv4, TCP/IPv6 or ARP frame with right checksums, as a device sends."""
    kind = rng.randrange(3)
    if kind == 2:
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, bytes(6), bytes(4), bytes(6),
                          bytes(4))
        return b"\xff" * 6 + bytes(6) + b"\x08\x06" + arp + bytes(18)
    data = rng.randbytes(size)
    if kind == 0:
        udp = bytearray(struct.pack("!HHHH", 1, 2, 8 + size, 0) + data)
        pseudo = bytes([10, 0, 0, 2, 10, 0, 0, 1, 0, 17]) + struct.pack("!H", len(udp))
        udp[6:8] = struct.pack("!H", _internet_checksum(pseudo + udp) or 0xFFFF)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                                   bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])))
        ip[10:12] = struct.pack("!H", _internet_checksum(bytes(ip)))
        frame = dst + bytes(6) + b"\x08\x00" + bytes(ip) + bytes(udp)
    else:
        tcp = bytearray(struct.pack("!HHIIHHHH", 1, 2, 3, 4, 0x5010, 100, 0, 0) + data)
        pseudo = bytes(32) + struct.pack("!I3xB", len(tcp), 6)
        tcp[16:18] = struct.pack("!H", _internet_checksum(pseudo + tcp))
        frame = dst + bytes(6) + b"\x86\xdd" + struct.pack("!IHBB16s16s", 0x60000000, len(tcp),
                                                           6, 64, bytes(16), bytes(16)) + bytes(tcp)
    return frame + bytes(max(0, 60 - len(frame)))


def _internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return ~(int.from_bytes(data, "big") % 0xFFFF) & 0xFFFF
