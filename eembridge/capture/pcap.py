"""pcap and pcapng files: a streaming reader of both, and streaming writers.

Theory of operation
-------------------
Captures can be many gigabytes, so nothing here holds more than one record: the
reader yields one Packet at a time from a buffered stream, and the writers write each
record as it comes. No length field is trusted with memory: a record or block longer
than MAX_RECORD is reported as corruption instead of being allocated.

Byte order is the writer's, per file (pcap: the magic number) or per section
(pcapng: the byte-order magic of each Section Header Block). Pseudo-headers that
carry integers of their own (usbmon's) are in that same order, so every Packet says
which order its file used.

Errors in the input are eembridge.core.errors.CaptureError with a one-line message naming
the file, the problem and where (byte offset, record number); a caller never sees
struct.error, a short read or the OSError of a failing read.

Timestamps: every timestamp the reader yields is in 0 .. 2**32 s (1970..2106), the range
of a pcap record (and of usbmon's), so any of them can be written again. A pcap record's
fraction of a second may be written as a second or more (a µs field of 4294967295): it is
carried into the seconds, which is what the fields say and how libpcap adds them; a sum
past 2106, like a pcapng timestamp outside the range, is corruption, not clamped, because
a record header that garbled is no more to be trusted for its lengths.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple, Protocol

from ..core.errors import CaptureError

LINKTYPE_ETHERNET = 1
LINKTYPE_USB_LINUX = 189  # usbmon, 48-byte header (read(2) interface)
LINKTYPE_USB_LINUX_MMAPPED = 220  # usbmon, 64-byte header (mmap interface; tcpdump's)
LINKTYPE_NAMES = {
    LINKTYPE_ETHERNET: "ETHERNET",
    LINKTYPE_USB_LINUX: "USB_LINUX",
    LINKTYPE_USB_LINUX_MMAPPED: "USB_LINUX_MMAPPED",
}
# The upper bits of a pcap header's link type field carry FCS information.
LINKTYPE_MASK = 0x03FFFFFF

DEFAULT_SNAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN
# Largest record or block we agree to hold in memory; anything longer is corruption.
MAX_RECORD = 64 * 1024 * 1024

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB = 0x00000001
PCAPNG_OBSOLETE_PB = 0x00000002
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
OPT_ENDOFOPT = 0
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14
OPTION_NAMES = {OPT_IF_TSRESOL: "if_tsresol", OPT_IF_TSOFFSET: "if_tsoffset"}
OPTION_SIZES = {OPT_IF_TSRESOL: 1, OPT_IF_TSOFFSET: 8}
# Timestamps run from the epoch to here (exclusive): 32-bit seconds, pcap's and usbmon's.
TIMESTAMP_LIMIT_NS = 2**32 * 1_000_000_000

_SKIP_CHUNK = 1 << 16


def linktype_name(linktype: int) -> str:
    return LINKTYPE_NAMES.get(linktype, "unknown")


class Packet(NamedTuple):
    """One captured packet, as the file holds it."""

    linktype: int
    timestamp_ns: int  # since the epoch
    data: bytes  # the captured bytes (possibly fewer than length: snaplen)
    length: int  # original length, as the capturing program stated it
    byteorder: str  # "<" or ">": the file's (section's) byte order
    interface: int  # pcapng interface index; 0 for pcap


class ByteSource(Protocol):
    """What the reader needs of its stream (a file, or decode's copy-as-you-read pipe)."""

    def read(self, n: int, /) -> bytes: ...


class _Interface(NamedTuple):
    linktype: int
    snaplen: int
    # Timestamp units per second is 10**exp or 2**exp; we keep them as a fraction.
    units_per_second: int
    offset_ns: int


class CaptureReader:
    """Iterate the packets of a pcap or pcapng stream, one record in memory at a time.

    The format is detected from the first bytes when the reader is built, so a file that
    is neither fails at once. `name` only appears in error messages.
    """

    def __init__(self, stream: ByteSource, name: str) -> None:
        self._stream = stream
        self.name = name
        self.offset = 0  # of the next byte to read
        self.packets = 0
        self.linktypes: list[int] = []  # every link type declared so far, in order
        head = self._read_exact(4, "file header", allow_eof=True)
        if not head:
            raise CaptureError(f"{name}: empty file, not a pcap or pcapng capture")
        magic_le = int.from_bytes(head, "little")
        magic_be = int.from_bytes(head, "big")
        if magic_le == PCAPNG_SHB:
            self.format = "pcapng"
            self._first_block_type = head
            self._iter = self._pcapng()
            return
        for order, magic in (("<", magic_le), (">", magic_be)):
            if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
                self.format = "pcap"
                self.byteorder = order
                self.nanosecond = magic == PCAP_MAGIC_NS
                rest = self._read_exact(20, "file header")
                _major, _minor, _zone, _sigfigs, snaplen, network = struct.unpack(order + "HHiIII", rest)
                self.snaplen = snaplen
                self.linktype = network & LINKTYPE_MASK
                self.linktypes.append(self.linktype)
                self._iter = self._pcap()
                return
        raise CaptureError(f"{name}: not a pcap or pcapng file (magic 0x{magic_be:08x})")

    def __iter__(self) -> Iterator[Packet]:
        return self._iter

    # -- reading ---------------------------------------------------------------

    def _read_exact(self, n: int, what: str, allow_eof: bool = False) -> bytes:
        try:
            data = self._stream.read(n)
        except OSError as exc:
            raise CaptureError(
                f"{self.name}: {exc.strerror or exc} reading {what} at offset {self.offset}"
            ) from None
        if len(data) != n and not (allow_eof and not data):
            raise CaptureError(
                f"{self.name}: truncated {what} at offset {self.offset}: "
                f"{n} bytes expected, {len(data)} present"
            )
        self.offset += len(data)
        return data

    def _skip(self, n: int, what: str) -> None:
        """Skip n bytes without holding them (unknown blocks may be large)."""
        while n:
            self._read_exact(min(n, _SKIP_CHUNK), what)
            n -= min(n, _SKIP_CHUNK)

    def _check_size(self, size: int, what: str, start: int) -> None:
        if size > MAX_RECORD:
            raise CaptureError(
                f"{self.name}: {what} at offset {start} claims {size} bytes "
                f"(more than {MAX_RECORD}): the file is corrupt"
            )

    # -- pcap ------------------------------------------------------------------

    def _pcap(self) -> Iterator[Packet]:
        record = struct.Struct(self.byteorder + "IIII")
        frac_ns = 1 if self.nanosecond else 1000
        linktype, order = self.linktype, self.byteorder
        while True:
            start = self.offset
            header = self._read_exact(16, f"record header (record {self.packets + 1})", allow_eof=True)
            if not header:
                return
            sec, frac, caplen, length = record.unpack(header)
            self._check_size(caplen, f"record {self.packets + 1}", start)
            timestamp_ns = sec * 1_000_000_000 + frac * frac_ns
            if timestamp_ns >= TIMESTAMP_LIMIT_NS:
                raise CaptureError(
                    f"{self.name}: record {self.packets + 1} at offset {start} has timestamp "
                    f"{sec}.{frac} ({'ns' if frac_ns == 1 else 'µs'}), after 2106: the file is corrupt"
                )
            data = self._read_exact(caplen, f"record {self.packets + 1} (started at offset {start})")
            self.packets += 1
            yield Packet(linktype, timestamp_ns, data, length, order, 0)

    # -- pcapng ----------------------------------------------------------------

    def _pcapng(self) -> Iterator[Packet]:
        order = "<"
        interfaces: list[_Interface] = []
        first = True
        while True:
            start = self.offset
            if first:
                raw_type, first = self._first_block_type, False
            else:
                raw_type = self._read_exact(4, "block header", allow_eof=True)
                if not raw_type:
                    return
            if int.from_bytes(raw_type, "little") == PCAPNG_SHB:
                # The section's byte order comes from its own magic, after the length.
                head = self._read_exact(8, "section header")
                if int.from_bytes(head[4:], "little") == PCAPNG_BYTE_ORDER_MAGIC:
                    order = "<"
                elif int.from_bytes(head[4:], "big") == PCAPNG_BYTE_ORDER_MAGIC:
                    order = ">"
                else:
                    raise CaptureError(
                        f"{self.name}: section header at offset {start} has no byte-order magic"
                    )
                total = struct.unpack(order + "I", head[:4])[0]
                self._check_block_length(total, 28, start)
                self._skip(total - 12 - 4, "section header")
                self._check_trailer(total, order, start)
                interfaces = []  # a new section declares its interfaces anew
                continue
            block_type = struct.unpack(order + "I", raw_type)[0]
            total = struct.unpack(order + "I", self._read_exact(4, "block header"))[0]
            self._check_block_length(total, 12, start)
            if block_type not in (PCAPNG_IDB, PCAPNG_EPB, PCAPNG_SPB, PCAPNG_OBSOLETE_PB):
                self._skip(total - 12, f"block of type 0x{block_type:08x}")
                self._check_trailer(total, order, start)
                continue
            body = self._read_exact(total - 12, f"block of type {block_type} at offset {start}")
            self._check_trailer(total, order, start)
            if block_type == PCAPNG_IDB:
                interfaces.append(self._interface(body, order, start))
                self.linktypes.append(interfaces[-1].linktype)
                continue
            yield self._block_packet(block_type, body, order, interfaces, start)

    def _check_block_length(self, total: int, minimum: int, start: int) -> None:
        if total % 4 or total < minimum:
            raise CaptureError(f"{self.name}: block at offset {start} has a bad length {total}: the file is corrupt")
        self._check_size(total, "block", start)

    def _check_trailer(self, total: int, order: str, start: int) -> None:
        trailer = struct.unpack(order + "I", self._read_exact(4, "block trailer"))[0]
        if trailer != total:
            raise CaptureError(
                f"{self.name}: block at offset {start} ends with length {trailer}, "
                f"not {total}: the file is corrupt"
            )

    def _interface(self, body: bytes, order: str, start: int) -> _Interface:
        if len(body) < 8:
            raise CaptureError(f"{self.name}: interface block at offset {start} is too short")
        linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
        units, offset_ns = 1_000_000, 0  # default resolution: microseconds
        pos = 8
        # The body is whole words (the block length was checked), so an option header
        # always fits; its value may not.
        while pos + 4 <= len(body):
            code, size = struct.unpack_from(order + "HH", body, pos)
            where = f"{self.name}: interface block at offset {start}: option {code}"
            where += f" ({OPTION_NAMES[code]})" if code in OPTION_NAMES else ""
            where += f" at offset {start + 8 + pos}"
            if pos + 4 + size > len(body):
                raise CaptureError(
                    f"{where} claims {size} bytes, {len(body) - pos - 4} are left in the block: "
                    "the file is corrupt"
                )
            value = body[pos + 4 : pos + 4 + size]
            pos += 4 + (size + 3) // 4 * 4
            if code == OPT_ENDOFOPT:
                break
            if code in OPTION_SIZES and size != OPTION_SIZES[code]:
                raise CaptureError(f"{where} has {size} bytes, not {OPTION_SIZES[code]}: the file is corrupt")
            if code == OPT_IF_TSRESOL:
                exp = value[0] & 0x7F
                units = 2**exp if value[0] & 0x80 else 10**exp
            elif code == OPT_IF_TSOFFSET:
                offset_ns = struct.unpack(order + "q", value)[0] * 1_000_000_000
        return _Interface(linktype, snaplen, units, offset_ns)

    def _block_packet(
        self, block_type: int, body: bytes, order: str, interfaces: list[_Interface], start: int
    ) -> Packet:
        if block_type == PCAPNG_SPB:
            if len(body) < 4:
                raise CaptureError(f"{self.name}: simple packet block at offset {start} is too short")
            iface_id, ts, length = 0, None, struct.unpack_from(order + "I", body)[0]
            caplen, data_at = min(length, len(body) - 4), 4
        elif block_type == PCAPNG_EPB:
            if len(body) < 20:
                raise CaptureError(f"{self.name}: packet block at offset {start} is too short")
            iface_id, high, low, caplen, length = struct.unpack_from(order + "IIIII", body)
            ts, data_at = (high << 32) | low, 20
        else:  # obsolete Packet Block: 16-bit interface id and drops count
            if len(body) < 20:
                raise CaptureError(f"{self.name}: packet block at offset {start} is too short")
            iface_id, _drops, high, low, caplen, length = struct.unpack_from(order + "HHIIII", body)
            ts, data_at = (high << 32) | low, 20
        if iface_id >= len(interfaces):
            raise CaptureError(
                f"{self.name}: packet at offset {start} names interface {iface_id}, "
                f"but only {len(interfaces)} are described before it"
            )
        iface = interfaces[iface_id]
        if block_type == PCAPNG_SPB and iface.snaplen:
            caplen = min(caplen, iface.snaplen)
        if data_at + caplen > len(body):
            raise CaptureError(
                f"{self.name}: packet at offset {start} claims {caplen} captured bytes, "
                f"more than its block holds: the file is corrupt"
            )
        timestamp_ns = 0
        if ts is not None:
            timestamp_ns = ts * 1_000_000_000 // iface.units_per_second + iface.offset_ns
        if not 0 <= timestamp_ns < TIMESTAMP_LIMIT_NS:
            # Outside what any pcap (32-bit seconds) or usbmon record can hold.
            raise CaptureError(
                f"{self.name}: packet at offset {start} has timestamp {timestamp_ns} ns, "
                f"outside 1970..2106: the file is corrupt"
            )
        self.packets += 1
        return Packet(iface.linktype, timestamp_ns, body[data_at : data_at + caplen], length, order, iface_id)


# -- writing ---------------------------------------------------------------------


class PcapWriter:
    """Write a classic pcap file record by record; nothing is held back.

    The caller owns the stream (opens, flushes and closes it). Timestamps are integer
    nanoseconds since the epoch, stored as microseconds unless nanosecond=True.
    """

    def __init__(
        self,
        stream: BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = DEFAULT_SNAPLEN,
        byteorder: str = "<",
        nanosecond: bool = False,
    ) -> None:
        self._stream = stream
        self.linktype = linktype
        self.snaplen = snaplen
        self._nanosecond = nanosecond
        self._record = struct.Struct(byteorder + "IIII")
        magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
        stream.write(struct.pack(byteorder + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        self.packets = 0

    def write(self, data: bytes | bytearray | memoryview, timestamp_ns: int, length: int | None = None) -> None:
        """One record; `length` is the original length when data was cut (default len(data))."""
        if not 0 <= timestamp_ns < TIMESTAMP_LIMIT_NS:
            # CaptureReader never yields one (see the module's notes): a caller's bug.
            raise ValueError(f"timestamp {timestamp_ns} ns is outside 1970..2106, what a pcap record holds")
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        frac = ns if self._nanosecond else ns // 1000
        n = len(data)
        self._stream.write(self._record.pack(sec, frac, n, n if length is None else length))
        self._stream.write(data)
        self.packets += 1


class PcapngWriter:
    """Write a pcapng file: one section, interfaces added on demand, one block per packet.

    Also writes Simple Packet Blocks and arbitrary blocks, so readers can be tested on
    everything a pcapng file may hold.
    """

    def __init__(self, stream: BinaryIO, byteorder: str = "<") -> None:
        self._stream = stream
        self._order = byteorder
        self._snaplens: list[int] = []
        self._units: list[int] = []
        # SHB: byte-order magic, version 1.0, section length unknown (-1).
        self.write_block(PCAPNG_SHB, struct.pack(byteorder + "IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1))
        self.packets = 0

    def add_interface(self, linktype: int, snaplen: int = DEFAULT_SNAPLEN, tsresol: int = 6) -> int:
        """Declare an interface (timestamps in units of 10**-tsresol s); returns its index."""
        options = b""
        if tsresol != 6:
            options += struct.pack(self._order + "HHB3x", OPT_IF_TSRESOL, 1, tsresol)
        if options:
            options += struct.pack(self._order + "HH", OPT_ENDOFOPT, 0)
        self.write_block(PCAPNG_IDB, struct.pack(self._order + "HHI", linktype, 0, snaplen) + options)
        self._snaplens.append(snaplen)
        self._units.append(10**tsresol)
        return len(self._snaplens) - 1

    def write(
        self,
        data: bytes | bytearray | memoryview,
        timestamp_ns: int,
        interface: int = 0,
        length: int | None = None,
    ) -> None:
        """One Enhanced Packet Block."""
        ts = timestamp_ns * self._units[interface] // 1_000_000_000
        n = len(data)
        head = struct.pack(
            self._order + "IIIII", interface, ts >> 32, ts & 0xFFFFFFFF, n, n if length is None else length
        )
        self.write_block(PCAPNG_EPB, head + bytes(data))
        self.packets += 1

    def write_simple(self, data: bytes | bytearray | memoryview, length: int | None = None) -> None:
        """One Simple Packet Block (interface 0, no timestamp)."""
        n = len(data)
        self.write_block(PCAPNG_SPB, struct.pack(self._order + "I", n if length is None else length) + bytes(data))
        self.packets += 1

    def write_block(self, block_type: int, body: bytes) -> None:
        """Any block; the body is padded to 4 bytes."""
        body += bytes(-len(body) % 4)
        total = len(body) + 12
        self._stream.write(struct.pack(self._order + "II", block_type, total) + body)
        self._stream.write(struct.pack(self._order + "I", total))
