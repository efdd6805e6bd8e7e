"""Pure-Python EEM codec: the readable specification and the fallback.

Sans-IO: bytes in, events out, bytes out. No I/O, no threads, no clocks. The Cython
codec (_fast/eem.pyx) must agree with this module on every input, event and counter.

Theory of operation (deframer)
------------------------------
The input is a sequence of bulk IN transfers, each marked *short* if it ended with a
short USB packet or a ZLP (fewer bytes than requested). EEM packets may be
concatenated in one transfer and may continue into the next one only when a transfer
filled its buffer; a short transfer ends whatever packet is in progress.

The deframer is in one of two states:

* in sync: the position is believed to be a packet boundary. Headers are parsed.
  Data packets verify themselves (CRC-32 or the DE AD BE EF sentinel).
* scanning: garbage was seen (bmLength out of range, failed check, reserved command,
  a packet cut off). Nothing is believed until either a data packet whose check
  passes is found at some later byte offset, or a short transfer ends, after which
  the next transfer starts in sync.

Commands carry no check of their own. A garbage header after a lost USB packet can
read as an Echo, and answering it sends the device an Echo Response it never asked
for. So a command is only emitted once it is *confirmed*: it was parsed in sync and
what follows it is a trusted boundary, namely a data packet that verifies or the exact
end of a short transfer. Commands wait (bounded in count and bytes) until then; if
garbage comes first they are dropped and counted as unconfirmed.

Invariants
* Output does not depend on how a stream is split into transfers, as long as every
  transfer but the last is marked not short.
* Memory is bounded: the carried tail is shorter than one packet
  (max(max_length, MAX_ECHO_DATA) + 2 bytes) and waiting commands are bounded.
  Nothing is ever allocated from a length field.
* Every byte fed is accounted for: delivered in a packet, counted in bytes_skipped,
  carried, or waiting in an unconfirmed command.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from .events import Echo, EchoResponse, Event, Frame, Hint
from .protocol import (
    CHECK_SIZE,
    CMD_ECHO,
    CMD_ECHO_RESPONSE,
    CMD_TICKLE,
    COMMAND_MASK,
    COMMAND_NAMES,
    COMMAND_PARAM_MASK,
    COMMAND_SHIFT,
    DATA_CRC,
    DATA_LENGTH_MASK,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_TRANSFER,
    DEFRAMER_COUNTERS,
    ETH_HEADER,
    FRAMER_COUNTERS,
    HEADER_SIZE,
    MAX_ECHO_DATA,
    MAX_PENDING_COMMAND_BYTES,
    MAX_PENDING_COMMANDS,
    MIN_DATA_LENGTH,
    SENTINEL,
    TYPE_COMMAND,
    command_header,
    data_header,
)

__all__ = ["Deframer", "Framer", "check_ok", "validate_framer_options", "validate_max_length"]


def check_ok(packet: bytes | memoryview, crc: bool) -> bool:
    """Whether a data packet body (frame + 4-byte check) carries a valid check."""
    body, check = packet[:-CHECK_SIZE], packet[-CHECK_SIZE:]
    if crc:
        return zlib.crc32(body) == int.from_bytes(check, "little")
    return bytes(check) == SENTINEL


def validate_max_length(max_length: int) -> None:
    if not MIN_DATA_LENGTH <= max_length <= DATA_LENGTH_MASK:
        raise ValueError(
            f"max_length {max_length} out of range: bmLength must be {MIN_DATA_LENGTH}..{DATA_LENGTH_MASK}"
        )


def validate_framer_options(max_transfer: int, max_packet: int, max_length: int,
                            out_chunk: int = 0) -> None:
    validate_max_length(max_length)
    if max_packet < 8 or max_packet > 1024 or max_packet & (max_packet - 1):
        raise ValueError(f"max_packet {max_packet} is not a USB bulk packet size (8..1024, power of two)")
    if max_transfer < max_length + 2 * HEADER_SIZE:
        raise ValueError(
            f"max_transfer {max_transfer} cannot hold one full packet and a ZLP header "
            f"(needs at least {max_length + 2 * HEADER_SIZE})"
        )
    if out_chunk and (out_chunk % max_packet or out_chunk < max_length + HEADER_SIZE + 1):
        raise ValueError(
            f"out_chunk {out_chunk} must be a multiple of the max packet size {max_packet} "
            f"holding the longest packet ({max_length + HEADER_SIZE + 1} bytes)"
        )


class Deframer:
    """EEM bulk IN stream to events. See the module docstring for the rules."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        validate_max_length(max_length)
        self.max_length = max_length
        self._counters = dict.fromkeys(DEFRAMER_COUNTERS, 0)
        self.reset()

    def reset(self) -> None:
        """Forget the stream (device reconnected); counters are kept."""
        self._carry = b""
        self._scanning = False
        self._waiting: list[tuple[Event, int]] = []  # commands awaiting confirmation
        self._waiting_bytes = 0

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    @property
    def carried(self) -> int:
        """Bytes held over to the next transfer (always less than one packet)."""
        return len(self._carry)

    @property
    def waiting_commands(self) -> int:
        return len(self._waiting)

    def feed(self, transfer: bytes | bytearray | memoryview, short: bool) -> list[Event]:
        c = self._counters
        c["transfers"] += 1
        c["short_transfers"] += bool(short)
        # Bytes, whatever the buffer's format (a cast memoryview's len() counts items).
        transfer = memoryview(transfer).tobytes()
        c["bytes_in"] += len(transfer)
        data = self._carry + transfer
        self._carry = b""
        end = len(data)
        events: list[Event] = []
        pos = 0
        while True:
            if self._scanning:
                pos = self._scan(data, pos, short)
                if self._scanning:  # ran out of bytes while still looking
                    break
            if pos == end:
                break
            if end - pos < HEADER_SIZE:
                if short:
                    self._cut_off(end - pos)
                else:
                    self._carry = data[pos:]
                break
            header = int.from_bytes(data[pos : pos + HEADER_SIZE], "little")
            if header == 0:
                c["zlps"] += 1
                pos += HEADER_SIZE
            elif header & TYPE_COMMAND:
                size = self._command(data, pos, header, short)
                if size is None:  # carried or cut off
                    break
                if size == 0:  # garbage
                    pos = self._start_scan(pos)
                else:
                    pos += size
            else:
                size = self._data(data, pos, header, short, events)
                if size is None:
                    break
                if size == 0:
                    pos = self._start_scan(pos)
                else:
                    pos += size
        if short:
            if not self._carry and not self._scanning:
                self._confirm(events)  # the transfer ended exactly after them
            elif self._scanning:
                self._counters["resyncs"] += 1
            self._drop_waiting()
            self._scanning = False
            self._carry = b""
        return events

    # -- in sync ---------------------------------------------------------------

    def _data(self, data: bytes, pos: int, header: int, short: bool, events: list[Event]) -> int | None:
        """Parse a data packet at pos: its size, 0 for garbage, None if carried/cut off."""
        c = self._counters
        length = header & DATA_LENGTH_MASK
        if length > self.max_length:
            c["oversize"] += 1
            return 0
        if length < MIN_DATA_LENGTH:
            c["runts"] += 1
            return 0
        size = HEADER_SIZE + length
        if pos + size > len(data):
            self._incomplete(data, pos, short)
            return None
        crc = bool(header & DATA_CRC)
        packet = data[pos + HEADER_SIZE : pos + size]
        if not check_ok(packet, crc):
            c["crc_errors" if crc else "sentinel_errors"] += 1
            return 0
        self._confirm(events)
        events.append(Frame(packet[:-CHECK_SIZE], crc))
        c["frames"] += 1
        c["bytes"] += length - CHECK_SIZE
        c["crc_frames"] += crc
        return size

    def _command(self, data: bytes, pos: int, header: int, short: bool) -> int | None:
        """Parse a command at pos and queue it for confirmation (same returns as _data)."""
        c = self._counters
        command = (header >> COMMAND_SHIFT) & COMMAND_MASK
        param = header & COMMAND_PARAM_MASK
        if command > CMD_TICKLE or header & DATA_CRC:
            c["reserved_commands"] += 1
            return 0
        size = HEADER_SIZE
        event: Event
        if command in (CMD_ECHO, CMD_ECHO_RESPONSE):
            size += param
            if pos + size > len(data):
                self._incomplete(data, pos, short)
                return None
            payload = data[pos + HEADER_SIZE : pos + size]
            event = Echo(payload) if command == CMD_ECHO else EchoResponse(payload)
        else:
            event = Hint(command, param)
        if (
            len(self._waiting) >= MAX_PENDING_COMMANDS
            or self._waiting_bytes + size > MAX_PENDING_COMMAND_BYTES
        ):
            c["unconfirmed_commands"] += 1  # this one; the waiting ones are dropped next
            return 0
        self._waiting.append((event, size))
        self._waiting_bytes += size
        return size

    def _incomplete(self, data: bytes, pos: int, short: bool) -> None:
        if short:
            self._counters["truncated"] += 1
            self._cut_off(len(data) - pos)
        else:
            self._carry = data[pos:]

    def _cut_off(self, nbytes: int) -> None:
        """The short transfer ended inside a packet: drop its bytes and what waited."""
        self._counters["bytes_skipped"] += nbytes
        self._drop_waiting()

    def _confirm(self, events: list[Event]) -> None:
        c = self._counters
        for event, _size in self._waiting:
            if isinstance(event, Echo):
                c["echo"] += 1
            elif isinstance(event, EchoResponse):
                c["echo_response"] += 1
            else:
                c["hints"] += 1
            events.append(event)
        self._waiting.clear()
        self._waiting_bytes = 0

    def _drop_waiting(self) -> None:
        if self._waiting:
            self._counters["unconfirmed_commands"] += len(self._waiting)
            self._counters["bytes_skipped"] += self._waiting_bytes
            self._waiting.clear()
            self._waiting_bytes = 0

    # -- scanning --------------------------------------------------------------

    def _start_scan(self, pos: int) -> int:
        """Garbage at pos: drop what waited, skip one byte, and look for a packet."""
        self._drop_waiting()
        self._scanning = True
        self._counters["bytes_skipped"] += 1
        return pos + 1

    def _scan(self, data: bytes, pos: int, short: bool) -> int:
        """Find the first offset >= pos holding a data packet that verifies.

        Returns that offset (scanning ends), or, when the bytes run out first, the
        offset to resume from (scanning goes on; the rest is carried or, at the end of a
        short transfer, skipped).
        """
        end = len(data)
        start = pos
        while pos + HEADER_SIZE <= end:
            header = data[pos] | (data[pos + 1] << 8)
            length = header & DATA_LENGTH_MASK
            if not header & TYPE_COMMAND and MIN_DATA_LENGTH <= length <= self.max_length:
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    if not short:
                        break  # this candidate decides; wait for the rest of it
                elif check_ok(data[pos + HEADER_SIZE : stop], bool(header & DATA_CRC)):
                    self._counters["bytes_skipped"] += pos - start
                    self._counters["resyncs"] += 1
                    self._scanning = False
                    return pos
            pos += 1
        if short:
            pos = end
        self._counters["bytes_skipped"] += pos - start
        self._carry = data[pos:]
        return end


class Framer:
    """Ethernet frames to bulk OUT transfers.

    Packets are batched into transfers of at most max_transfer bytes. A transfer that
    would end exactly on a max-packet boundary gets a zero-length EEM packet (0x0000)
    appended so the device sees it end without needing a USB ZLP.

    out_chunk (0: off) is for a device that receives into buffers of that many bytes and
    takes each one on its own (Linux f_eem: 1536, 2048 at SuperSpeed; a USB device
    controller completes a buffer when it is full, and the transfer goes on in the
    next). No packet then crosses a multiple of out_chunk: the rest of a chunk is filled
    with zero-length EEM packets first, and a frame of odd length gets one zero byte more
    (Ethernet padding, inside the CRC) so that every fill is whole 2-byte headers. A
    transfer may then carry many chunks: one USB transfer for many frames.

    batch=False puts every data packet in a transfer of its own, as Linux's cdc_eem
    does. Firmware only ever tested against that driver may take nothing else: Zephyr's
    EEM function reads each transfer into one frame-sized buffer and stops parsing at a
    zero-length packet. The zero-length packet that avoids a USB ZLP still closes it.
    """

    def __init__(
        self,
        crc: bool = True,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        max_packet: int = 512,
        max_length: int = DEFAULT_MAX_LENGTH,
        out_chunk: int = 0,
        batch: bool = True,
    ) -> None:
        validate_framer_options(max_transfer, max_packet, max_length, out_chunk)
        self.crc = crc
        self.batch = batch
        self.max_transfer = max_transfer
        self.max_packet = max_packet
        self.max_length = max_length
        self.out_chunk = out_chunk
        self._counters = dict.fromkeys(FRAMER_COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def packet(self, frame: bytes | bytearray | memoryview) -> bytes:
        """One EEM data packet (header, frame, check).

        Only the header's 14-bit bmLength limits it (ValueError beyond); pack() applies
        the configured maximum and counts what it refuses.
        """
        frame = bytes(frame)
        if len(frame) + CHECK_SIZE > DATA_LENGTH_MASK:
            raise ValueError(f"frame of {len(frame)} bytes does not fit an EEM data header")
        check = zlib.crc32(frame).to_bytes(CHECK_SIZE, "little") if self.crc else SENTINEL
        header = data_header(len(frame) + CHECK_SIZE, self.crc)
        return header.to_bytes(HEADER_SIZE, "little") + frame + check

    def pack(self, frames: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """Frame and batch; frames that cannot be sent are counted and left out."""
        c = self._counters
        transfers: list[bytes] = []
        current = bytearray()
        for frame in frames:
            n = memoryview(frame).nbytes  # bytes, also for a cast memoryview
            padded = bool(self.out_chunk and n % 2)
            if padded:
                frame, n = bytes(frame) + b"\0", n + 1
            if n + CHECK_SIZE > self.max_length:
                c["oversize"] += 1
                continue
            if n < ETH_HEADER:
                c["runts"] += 1
                continue
            size = HEADER_SIZE + n + CHECK_SIZE
            start = self.place(len(current), size)
            if current and not self._fits(start + size):
                transfers.append(self._close(current))
                current = bytearray()
                start = 0
            c["fill"] += (start - len(current)) // HEADER_SIZE
            current += bytes(start - len(current))  # zero-length EEM packets
            current += self.packet(frame)
            c["frames"] += 1
            c["bytes"] += n
            c["padded"] += padded
        if current:
            transfers.append(self._close(current))
        return transfers

    def echo(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._command_transfer(CMD_ECHO, data)

    def echo_response(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._command_transfer(CMD_ECHO_RESPONSE, data)

    def _command_transfer(self, command: int, data: bytes | bytearray | memoryview) -> bytes:
        data = bytes(data)
        if len(data) > MAX_ECHO_DATA:
            raise ValueError(f"echo data of {len(data)} bytes exceeds {MAX_ECHO_DATA}")
        self._counters[COMMAND_NAMES[command]] += 1  # counted only once it is built
        header = command_header(command, len(data)).to_bytes(HEADER_SIZE, "little")
        return self._close(bytearray(header + bytes(data)))

    def place(self, pos: int, size: int) -> int:
        """Where a packet of size bytes goes in a transfer of pos bytes: pos, or with
        out_chunk, the next multiple of it if the packet would cross one."""
        chunk = self.out_chunk
        if chunk and pos % chunk + size > chunk:
            return pos + chunk - pos % chunk
        return pos

    def _fits(self, length: int) -> bool:
        """Whether a transfer already holding packets may grow to this length: never
        without batching, else if it stays within the limit once closed by _close."""
        if not self.batch:
            return False
        if length % self.max_packet == 0:
            length += HEADER_SIZE
        return length <= self.max_transfer

    def _close(self, transfer: bytearray) -> bytes:
        if len(transfer) % self.max_packet == 0:
            transfer += b"\x00\x00"
            self._counters["zlps"] += 1
        self._counters["transfers"] += 1
        self._counters["transfer_bytes"] += len(transfer)
        return bytes(transfer)
