"""Pure-Python data path: the readable reference and fallback of eembridge/_fast/datapath.pyx.

The bridge moves bytes through two objects and never touches frames itself:

* RxPath owns the memory bulk IN transfers land in (one slot per transfer in
  flight), deframes each completed transfer and writes its frames to the TAP.
* TxPath reads frames from the TAP, frames and batches them into OUT transfers in
  memory it owns, and releases that memory once the transfer completed.

This version copies (bytearrays, os.read) for clarity; the Cython one works in place
on mirrored ring buffers. Both count the same things under the same names.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..core.events import Event, Frame
from ..core.protocol import CHECK_SIZE, DATA_LENGTH_MASK, HEADER_SIZE, TYPE_COMMAND

RX_COUNTERS = (
    "tap_frames_written",
    "tap_bytes_written",
    "tap_write_errors",
    # Offload (--offload; the C data path only): consecutive TCP segments merged.
    "tap_gro_packets",  # merged packets written to the TAP ...
    "tap_gro_frames",  # ... and the frames that went up in them
)
TX_COUNTERS = (
    "tap_frames_read",
    "tap_read_errors",
    "tx_oversize",  # frames longer than the EEM maximum: dropped
    "tx_runts",  # frames shorter than an Ethernet header: dropped
    # Offload (--offload; the C data path only): see eembridge/core/offload.py.
    "tap_gso_packets",  # TCP packets of up to 64 KB read from the TAP ...
    "tap_gso_frames",  # ... and the frames cut from them
    "tap_checksums",  # partial checksums completed
    "tap_offload_errors",  # packets the offload refused: dropped
)


@dataclass(slots=True)
class OutTransfer:
    """One bulk OUT transfer built from TAP frames, held until it completed."""

    buffer: memoryview
    frames: int
    done: bool = False
    owned: bool = True  # built in TxPath memory (False: a command transfer of the bridge's)


class RxPath:
    def __init__(self, deframer, tap_fd: int, slots: int, slot_size: int,
                 vnet: bool = False) -> None:
        if vnet:
            raise ValueError("TAP offload (a virtio_net_hdr per read) needs eembridge._fast.datapath")
        self.deframer = deframer
        self.tap_fd = tap_fd
        self.slot_size = slot_size
        self._counters = dict.fromkeys(RX_COUNTERS, 0)
        self.write_errors: dict[str, int] = {}
        self._make_slots(slots)

    def _make_slots(self, slots: int) -> None:
        self._slots = [bytearray(self.slot_size) for _ in range(slots)]

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def slot_buffer(self, sequence: int) -> memoryview:
        """Where IN transfer number `sequence` lands."""
        return memoryview(self._slots[sequence % len(self._slots)])

    def complete(self, sequence: int, actual: int, short: bool) -> list[Event]:
        """Deframe one completed transfer, write its frames; return the commands in it."""
        events = self.deframer.feed(self.slot_buffer(sequence)[:actual], short)
        commands: list[Event] = []
        for event in events:
            if isinstance(event, Frame):
                self._write(event.data)
            else:
                commands.append(event)
        return commands

    def _write(self, frame: bytes | memoryview) -> None:
        c = self._counters
        try:
            os.write(self.tap_fd, frame)
        except OSError as exc:
            # The kernel refused it (queue full, interface down): count, go on.
            c["tap_write_errors"] += 1
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.write_errors[name] = self.write_errors.get(name, 0) + 1
        else:
            c["tap_frames_written"] += 1
            c["tap_bytes_written"] += len(frame)

    def reset(self) -> None:
        self.deframer.reset()


def count_packets(transfer: bytes | memoryview) -> int:
    """Data packets in a transfer the framer built (commands and ZLPs are not frames)."""
    pos, frames = 0, 0
    while pos + HEADER_SIZE <= len(transfer):
        header = transfer[pos] | (transfer[pos + 1] << 8)
        if header == 0:
            pos += HEADER_SIZE
        elif header & TYPE_COMMAND:
            break
        else:
            frames += 1
            pos += HEADER_SIZE + (header & DATA_LENGTH_MASK)
    return frames


class TxPath:
    def __init__(self, framer, tap_fd: int, max_bytes_in_flight: int,
                 vnet: bool = False) -> None:
        if vnet:
            raise ValueError("TAP offload (a virtio_net_hdr per read) needs eembridge._fast.datapath")
        self.framer = framer
        self.tap_fd = tap_fd
        self.max_bytes_in_flight = max_bytes_in_flight
        self.bytes_in_flight = 0
        # One byte more than the longest frame we may send, to see oversize frames.
        self.read_size = framer.max_length - CHECK_SIZE + 1
        self._counters = dict.fromkeys(TX_COUNTERS, 0)
        self.read_errors: dict[str, int] = {}

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    @property
    def has_room(self) -> bool:
        """Whether another full batch fits: when not, the TAP is not read (backpressure)."""
        return self.bytes_in_flight + self.framer.max_transfer <= self.max_bytes_in_flight

    def fill(self) -> list[OutTransfer]:
        """Read what the TAP has, up to the room left, and batch it into transfers."""
        c = self._counters
        frames: list[bytes] = []
        room = self.max_bytes_in_flight - self.bytes_in_flight
        pending = 0
        while pending + self.framer.max_length + 2 * HEADER_SIZE <= room:
            try:
                frame = os.read(self.tap_fd, self.read_size)
            except BlockingIOError:
                break
            except OSError as exc:
                c["tap_read_errors"] += 1
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.read_errors[name] = self.read_errors.get(name, 0) + 1
                break
            c["tap_frames_read"] += 1
            frames.append(frame)
            # (out_chunk: a packet may need up to its own size again of fill before it)
            pending += (len(frame) + HEADER_SIZE + CHECK_SIZE) * (2 if self.framer.out_chunk else 1)
        before = self.framer.counters()
        transfers = [
            OutTransfer(memoryview(t), count_packets(t)) for t in self.framer.pack(frames)
        ]
        after = self.framer.counters()
        c["tx_oversize"] += after["oversize"] - before["oversize"]
        c["tx_runts"] += after["runts"] - before["runts"]
        for transfer in transfers:
            self.bytes_in_flight += len(transfer.buffer)
        return transfers

    def release(self, transfer: OutTransfer) -> None:
        """The transfer completed (sent or dropped): its memory may be reused."""
        self.bytes_in_flight -= len(transfer.buffer)


class RingRxPath(RxPath):
    """RX on a mirrored ring: IN transfers land in ring slots, the Cython deframer works
    in place (deframe_into) and each frame goes to the TAP straight from ring memory.

    The ring holds one slot per transfer in flight plus one: the tail an unfinished
    packet leaves in slot k is still needed while slot k+1 is deframed, and the mirror
    mapping keeps that tail contiguous with slot k+1 even across the end of the ring.
    Frame offsets still cross into Python (one os.write per frame), but no frame is
    copied on its way from USB to the kernel.
    """

    def _make_slots(self, slots: int) -> None:
        from .._fast.ring import Ring

        self.ring = Ring(slots * self.slot_size)
        if self.ring.size % self.slot_size:
            raise ValueError(f"slot size {self.slot_size} must divide the ring ({self.ring.size})")
        self._whole = memoryview(self.ring)  # both copies: 2 * size bytes

    def slot_buffer(self, sequence: int) -> memoryview:
        start = (sequence * self.slot_size) % self.ring.size
        return self._whole[start : start + self.slot_size]

    def complete(self, sequence: int, actual: int, short: bool) -> list[Event]:
        offset = (sequence * self.slot_size) % self.ring.size
        if offset < self.deframer.carried:
            offset += self.ring.size  # the carried tail sits at the end of the first copy
        commands = self.deframer.deframe_into(self._whole, offset, actual, short)
        whole = self._whole
        for start, length in self.deframer.frame_records():
            self._write(whole[start : start + length])
        return commands
