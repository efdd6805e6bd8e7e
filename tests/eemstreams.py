"""Builders of EEM byte streams for tests: frames, packets, commands, garbage."""

from __future__ import annotations

import random
import struct
import zlib

from eembridge.protocol import SENTINEL, command_header


def ethernet_frame(rng: random.Random, payload_len: int) -> bytes:
    dst = bytes([0x02, 0, 0, 0, 0, 1])
    src = bytes([0x02, 0, 0, 0, 0, 2])
    return dst + src + b"\x08\x00" + rng.randbytes(payload_len)


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
