"""Builders of EEM byte streams for tests: frames, packets, commands, garbage."""

from __future__ import annotations

import random
import struct
import zlib

from eembridge.protocol import SENTINEL, command_header


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
