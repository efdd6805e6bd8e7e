"""Pure-Python EEM codec: the readable specification and the fallback.

Sans-IO: bytes in, events out, bytes out. No I/O, no threads, no clocks. The Cython
codec (eembridge/_fast/eem.pyx) must agree with this module on every input, event and counter.

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

Trust after garbage (false frames)
----------------------------------
A frame is *trusted* when its header sits where a packet must begin: at the start of a
transfer that follows a short one (or the first after reset), right after a packet that
verified, a ZLP or a command. A frame found by scanning is not: the scan tries every
byte offset, and in sentinel mode every later packet ends in the same four bytes, so a
random header inside a payload whose length happens to reach a real packet's
DE AD BE EF "verifies" (bench/falseframes.py: about one false frame in 1,000 at 2%
USB packet loss before this rule).
So a sentinel packet found by scanning is delivered only if its frame is *plausible*
(plausible() below); otherwise it is counted in `implausible` and the scan goes on.
The rule, on the frame without its check (n bytes):

* destination: the configured MAC (Deframer(mac=...), the TAP's), or a group address
  (I/G bit set: broadcast, multicast). Without a MAC any destination passes.
* EtherType (after at most one 802.1Q tag, 4 bytes) is IPv4, IPv6 or ARP, and:
  - IPv4: version 4, IHL >= 5, the header inside the frame, its checksum right, and
    the frame ends where Total Length says;
  - IPv6: version 6, the frame ends where Payload Length says (40 + payload);
  - ARP: Ethernet/IPv4 (htype 1, ptype 0x0800, hlen 6, plen 4), opcode 1 or 2;
  where "ends" allows Ethernet padding in a frame of at most 64 bytes (60 + a tag).
A random candidate passes with odds below 1e-9 (group bit 1/2, EtherType 3/65536,
checksum 1/65536, length ~1/1500). A real frame of another kind (LLDP, another unicast
MAC behind a bridge) that is the first one found after garbage is lost, counted.

Loss also splices packets in sync: a packet B whose header is right loses a USB packet
from its middle, and its length then reaches past the gap to the sentinel of a later
packet P (P ends exactly one USB packet after B's real end; or, with one packet per
transfer, B's last short USB packet is lost and the transfer runs on into P's). Its
header, and so its plausibility, is B's own. What gives it away is P, whole, inside
it: so a sentinel packet (in sync or found by scanning) is refused, counted in
`spliced`, when a sentinel data header at an offset inside it claims exactly the rest
of it and the frame that header claims is plausible. Its bytes are then scanned as
garbage, which finds P. A real frame refused this way would have to carry a plausible
EEM packet ending at its own end, a chance below 1e-9 for a random one (2^-15 per
offset for the header, then the rule above). A splice that lost P's header as well
is not caught by that, nor a splice of two packets of the same size (loss of the
end of one and the start of the next). Those keep a whole IP header and change the
payload, so a sentinel packet is also refused (counted in `spliced`) when its
EtherType says IPv4 or IPv6 and the header there is broken (version, IPv4 header
checksum, a length past the frame), or when it carries TCP, UDP or ICMP over IPv4 (not
a fragment), or TCP, UDP or ICMPv6 right after an IPv6 header, whose checksum is wrong
(l4_intact() below; a UDP checksum of zero means none and passes; a frame too short
for the IP header it names is not judged). The host's stack would drop such a frame
anyway; a real device computes these checksums (EEM carries no offload).

CRC packets found by scanning need no such rule: a CRC-32 match by chance is 2^-32 per
candidate (bench/falseframes.py: none in 10 million frames at 2% loss, nor in 1
million at 1 and 5%).

A device that ends every transfer short (Linux f_eem) is scanned like any other. A
rule that skipped a damaged packet's transfer unscanned there was measured and removed:
when loss takes the short packet that ends a transfer, the host's transfer runs on into
the device's next one, and only a scan finds that frame (bench/RESULTS.md: 0.8 points
more loss at 2%, no false frame prevented). The CRC budget already bounds what garbage
costs.

Cost of garbage
---------------
Sentinel checks cost a compare and the plausibility rule a few dozen bytes, so a
scan is linear. CRC checks are not: a scan tries every offset, and a candidate
claiming max_length makes zlib run over max_length bytes, at every other offset for
a repeated `F2 45`. So the CRC work *that fails* is paid from a budget. A check
costs its bmLength plus CRC_CHECK_OVERHEAD (zlib's per-call cost). Every byte the
deframer moves past (skipped, or consumed in a packet, ZLP or command) earns
CRC_BUDGET_PER_BYTE, up to a cap of two checks of max_length. A CRC check is made only
if the budget holds its cost (in sync, and for a scanned candidate whose frame is
plausible), or its cost plus a reserve of one max_length check (a scanned candidate
whose frame is not plausible: the reserve keeps room for the real, plausible packet
that ends the garbage). A check refused is counted in `unchecked`: in sync the packet
is garbage, in a scan the candidate is passed over. A failed check takes its cost from
the budget; one that succeeds costs nothing, being paid by the frame it delivers. So
the CRC work on any input is at most the bytes delivered plus the cap plus
CRC_BUDGET_PER_BYTE per byte fed, while on a real link (everything verifies, or
garbage followed by a plausible frame) the budget is never short. The price: after
garbage, a CRC packet whose frame is not plausible (another EtherType, another unicast
MAC) is checked only while the budget stands above the reserve, which random garbage
keeps it below; such packets are passed over until a plausible one, or the end of a
short transfer, ends the scan.

Invariants
* Output does not depend on how a stream is split into transfers, as long as every
  transfer but the last is marked not short.
* Work is linear: see "Cost of garbage".
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
    CRC_BUDGET_PER_BYTE,
    CRC_CHECK_OVERHEAD,
    DATA_CRC,
    DATA_LENGTH_MASK,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_TRANSFER,
    DEFRAMER_COUNTERS,
    ETH_HEADER,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ETHERTYPE_VLAN,
    FRAMER_COUNTERS,
    HEADER_SIZE,
    MAX_ECHO_DATA,
    MAX_PENDING_COMMAND_BYTES,
    MAX_PENDING_COMMANDS,
    MIN_DATA_LENGTH,
    PADDED_FRAME_MAX,
    SENTINEL,
    TYPE_COMMAND,
    command_header,
    data_header,
)

__all__ = [
    "Deframer", "Framer", "check_ok", "l4_intact", "plausible", "validate_framer_options", "validate_mac",
    "validate_max_length",
]


def check_ok(packet: bytes | memoryview, crc: bool) -> bool:
    """Whether a data packet body (frame + 4-byte check) carries a valid check."""
    body, check = packet[:-CHECK_SIZE], packet[-CHECK_SIZE:]
    if crc:
        return zlib.crc32(body) == int.from_bytes(check, "little")
    return bytes(check) == SENTINEL


def _ends_right(n: int, end: int) -> bool:
    """A frame of n bytes holding a packet that ends at byte `end`: exactly, or followed
    by Ethernet padding in a short frame."""
    return end == n or end < n <= PADDED_FRAME_MAX


def plausible(frame: bytes | memoryview, mac: bytes | None) -> bool:
    """Whether a frame found by scanning may be delivered (module docstring: "Trust")."""
    n = len(frame)
    if n < ETH_HEADER:
        return False
    if mac is not None and not frame[0] & 1 and bytes(frame[0:6]) != mac:
        return False
    off = ETH_HEADER
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == ETHERTYPE_VLAN:
        if n < off + 4:
            return False
        ethertype = frame[16] << 8 | frame[17]
        off += 4
    if ethertype == ETHERTYPE_IPV4:
        if n < off + 20 or frame[off] >> 4 != 4:
            return False
        ihl = (frame[off] & 0x0F) * 4
        if ihl < 20 or off + ihl > n:
            return False
        total = sum(frame[i] << 8 | frame[i + 1] for i in range(off, off + ihl, 2))
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        length = frame[off + 2] << 8 | frame[off + 3]
        return total == 0xFFFF and length >= ihl and _ends_right(n, off + length)
    if ethertype == ETHERTYPE_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6:
            return False
        return _ends_right(n, off + 40 + (frame[off + 4] << 8 | frame[off + 5]))
    if ethertype == ETHERTYPE_ARP:
        return (
            n >= off + 28
            and bytes(frame[off : off + 6]) == b"\x00\x01\x08\x00\x06\x04"
            and frame[off + 6] == 0
            and frame[off + 7] in (1, 2)
            and _ends_right(n, off + 28)
        )
    return False


def _ones_sum_is_zero(data: bytes) -> bool:
    """Whether the one's complement sum of data's 16-bit words verifies (RFC 1071: that
    sum is the number they make modulo 0xFFFF, and 0 and 0xFFFF are both zero)."""
    if len(data) % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF == 0


def l4_intact(frame: bytes | memoryview) -> bool:
    """False if the frame's EtherType says IPv4 or IPv6 and what follows is long enough
    for that header but is no such packet (version, IPv4 header checksum, a length past
    the frame), or if it carries a TCP, UDP or ICMP(v6) packet whose checksum is wrong
    (module docstring: "Trust"); anything it cannot judge passes."""
    frame = bytes(frame)
    n = len(frame)
    off = ETH_HEADER
    if n < off:
        return True
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == ETHERTYPE_VLAN and n >= off + 4:
        ethertype = frame[16] << 8 | frame[17]
        off += 4
    if ethertype == ETHERTYPE_IPV4 and n >= off + 20:
        if frame[off] >> 4 != 4:
            return False
        ihl = (frame[off] & 0x0F) * 4
        total = frame[off + 2] << 8 | frame[off + 3]
        proto = frame[off + 9]
        fragment = (frame[off + 6] << 8 | frame[off + 7]) & 0x3FFF
        if ihl < 20 or off + ihl > n or not _ones_sum_is_zero(frame[off : off + ihl]):
            return False  # a broken IPv4 header: no stack sends one
        if total < ihl or off + total > n:
            return False  # an IPv4 packet longer than its frame
        if fragment:
            return True
        segment = frame[off + ihl : off + total]
        addresses = frame[off + 12 : off + 20]
        icmp = 1
    elif ethertype == ETHERTYPE_IPV6 and n >= off + 40:
        length = frame[off + 4] << 8 | frame[off + 5]
        proto = frame[off + 6]
        if frame[off] >> 4 != 6 or off + 40 + length > n:
            return False
        segment = frame[off + 40 : off + 40 + length]
        addresses = frame[off + 8 : off + 40]
        icmp = 58  # ICMPv6, whose checksum covers the pseudo-header as TCP's does
    else:
        return True
    pseudo = addresses + bytes([0, proto]) + len(segment).to_bytes(2, "big")
    if proto == 6 and len(segment) >= 20:
        return _ones_sum_is_zero(pseudo + segment)
    if proto == 17 and len(segment) >= 8:
        return segment[6:8] == b"\0\0" or _ones_sum_is_zero(pseudo + segment)
    if proto == icmp and len(segment) >= 4:
        return _ones_sum_is_zero((pseudo if icmp == 58 else b"") + segment)
    return True


def validate_mac(mac: bytes | bytearray | None) -> bytes | None:
    if mac is None:
        return None
    if not isinstance(mac, (bytes, bytearray)) or len(mac) != 6:
        raise ValueError(f"mac must be 6 bytes or None, not {mac!r}")
    return bytes(mac)


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

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, mac: bytes | None = None) -> None:
        validate_max_length(max_length)
        self.max_length = max_length
        self._mac = validate_mac(mac)
        self._counters = dict.fromkeys(DEFRAMER_COUNTERS, 0)
        self.reset()

    @property
    def mac(self) -> bytes | None:
        """The host's (TAP's) MAC the plausibility rule expects; None: any."""
        return self._mac

    @mac.setter
    def mac(self, value: bytes | None) -> None:
        self._mac = validate_mac(value)

    def reset(self) -> None:
        """Forget the stream (device reconnected); counters are kept."""
        self._carry = b""
        self._scanning = False
        self._waiting: list[tuple[Event, int]] = []  # commands awaiting confirmation
        self._waiting_bytes = 0
        self._budget = self._cap()  # failed CRC work allowed ("Cost of garbage")
        self._paid = 0  # _scan: offset up to which skipped bytes have earned budget

    @property
    def budget(self) -> int:
        return self._budget

    def _cap(self) -> int:
        return 2 * (self.max_length + CRC_CHECK_OVERHEAD)

    def _earn(self, nbytes: int) -> None:
        self._budget = min(self._cap(), self._budget + CRC_BUDGET_PER_BYTE * nbytes)

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
                pos = self._scan(data, pos, short, events)
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
                self._earn(HEADER_SIZE)
                pos += HEADER_SIZE
            elif header & TYPE_COMMAND:
                size = self._command(data, pos, header, short)
                if size is None:  # carried or cut off
                    break
                if size == 0:  # garbage
                    pos = self._start_scan(pos)
                else:
                    self._earn(size)
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
        if crc and self._budget < length + CRC_CHECK_OVERHEAD:
            c["unchecked"] += 1
            return 0
        packet = data[pos + HEADER_SIZE : pos + size]
        if not check_ok(packet, crc):
            c["crc_errors" if crc else "sentinel_errors"] += 1
            if crc:
                self._budget -= length + CRC_CHECK_OVERHEAD
            return 0
        if not crc and self._spliced(data, pos, pos + size):
            return 0
        self._deliver(packet, crc, events)
        return size

    def _spliced(self, data: bytes, pos: int, stop: int) -> bool:
        """Whether the sentinel packet data[pos:stop] looks spliced by loss: its TCP, UDP
        or ICMP checksum is wrong, or it holds a whole plausible sentinel packet ending at
        stop (module docstring: "Trust"); counted."""
        if not l4_intact(data[pos + HEADER_SIZE : stop - CHECK_SIZE]):
            self._counters["spliced"] += 1
            return True
        # The header a packet at q ending at stop needs is stop - q - 2: find where its
        # high byte appears (the same over runs of 256 offsets), then compare the low.
        last = stop - HEADER_SIZE - MIN_DATA_LENGTH
        q = pos + HEADER_SIZE
        while q <= last:
            high = (stop - q - HEADER_SIZE) >> 8
            block_end = min(last, stop - HEADER_SIZE - (high << 8))
            hit = data.find(high.to_bytes(1, "little"), q + 1, block_end + 2)
            if hit < 0:
                q = block_end + 1
                continue
            q = hit - 1
            if data[q] == (stop - q - HEADER_SIZE) & 0xFF and plausible(
                data[q + HEADER_SIZE : stop - CHECK_SIZE], self._mac
            ):
                self._counters["spliced"] += 1
                return True
            q += 1
        return False

    def _deliver(self, packet: bytes, crc: bool, events: list[Event]) -> None:
        c = self._counters
        self._confirm(events)
        events.append(Frame(packet[:-CHECK_SIZE], crc))
        c["frames"] += 1
        c["bytes"] += len(packet) - CHECK_SIZE
        c["crc_frames"] += crc
        self._earn(HEADER_SIZE + len(packet))

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
        self._earn(1)
        return pos + 1

    def _scan(self, data: bytes, pos: int, short: bool, events: list[Event]) -> int:
        """Find the first offset >= pos holding a data packet that verifies (and is
        plausible, or passes a CRC check the budget allows), and deliver it.

        Returns the offset after it (scanning ends), or, when the bytes run out first,
        the end (scanning goes on; the rest from the offset to resume at is carried or,
        at the end of a short transfer, skipped).
        """
        c = self._counters
        end = len(data)
        start = pos
        self._paid = pos  # bytes before this offset have earned their budget
        while pos + HEADER_SIZE <= end:
            header = data[pos] | (data[pos + 1] << 8)
            length = header & DATA_LENGTH_MASK
            if not header & TYPE_COMMAND and MIN_DATA_LENGTH <= length <= self.max_length:
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    if not short:
                        break  # this candidate decides; wait for the rest of it
                elif self._candidate(data, pos, stop, bool(header & DATA_CRC)):
                    c["bytes_skipped"] += pos - start
                    c["resyncs"] += 1
                    self._scanning = False
                    self._earn(pos - self._paid)
                    self._deliver(data[pos + HEADER_SIZE : stop], bool(header & DATA_CRC), events)
                    return stop
            pos += 1
        if short:
            pos = end
        c["bytes_skipped"] += pos - start
        self._earn(pos - self._paid)
        self._carry = data[pos:]
        return end

    def _candidate(self, data: bytes, pos: int, stop: int, crc: bool) -> bool:
        """Whether the packet at data[pos:stop], found by scanning, is taken."""
        packet = data[pos + HEADER_SIZE : stop]
        if not crc:
            if packet[-CHECK_SIZE:] != SENTINEL:
                return False
            if not plausible(packet[:-CHECK_SIZE], self._mac):
                self._counters["implausible"] += 1
                return False
            return not self._spliced(data, pos, stop)
        self._earn(pos - self._paid)  # what the scan passed pays before this check
        self._paid = pos
        cost = stop - pos - HEADER_SIZE + CRC_CHECK_OVERHEAD
        reserve = self.max_length + CRC_CHECK_OVERHEAD  # the most one check can cost
        if self._budget < cost or (
            self._budget < cost + reserve and not plausible(packet[:-CHECK_SIZE], self._mac)
        ):
            self._counters["unchecked"] += 1
            return False
        if check_ok(packet, True):
            return True
        self._budget -= cost
        return False


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
