"""Linux usbmon captures: read their records, and write captures like the kernel's.

Theory of operation
-------------------
`tcpdump -i usbmonN -w f.pcap` stores one record per URB event, each a usbmon
pseudo-header followed by the data usbmon copied (Documentation/usb/usbmon.rst,
struct usbmon_packet; drivers/usb/mon/mon_bin.c). The header is in the capturing
host's byte order, which is the byte order of the file (libpcap swaps it with the
file's records). Offsets:

     0 u64 id          URB address: pairs a submission with its completion
     8 u8  type        'S' submission, 'C' completion, 'E' submission error
     9 u8  xfer_type   0 isochronous, 1 interrupt, 2 control, 3 bulk
    10 u8  epnum       endpoint number, bit 7 set for IN
    11 u8  devnum      device address
    12 u16 busnum
    14 s8  flag_setup  0 when setup[] holds a control request
    15 s8  flag_data   0 when data follows; '<' (IN submission) or '>' (OUT completion)
    16 s64 ts_sec
    24 s32 ts_usec
    28 s32 status      -EINPROGRESS on submissions, the URB's status on completions
    32 u32 length      submission: buffer length; completion: bytes transferred
    36 u32 len_cap     bytes usbmon captured (it clamps large transfers)
    40 u8  setup[8]
    -- link type 220 (LINKTYPE_USB_LINUX_MMAPPED) only; 189 stops at 48 bytes --
    48 s32 interval
    52 s32 start_frame
    56 u32 xfer_flags
    60 u32 ndesc       isochronous descriptors between header and data

So the data of a bulk IN transfer is on its completion and the length the host asked
for is on its submission; an OUT transfer's data is on its submission. Data can be
missing twice over: usbmon captures at most a fifth of its buffer (len_cap < length),
and the pcap snaplen can cut the record (fewer bytes present than len_cap).

The writer produces the same records for a list of bulk transfers, with libpcap's
record lengths: the original length counts the URB length when data was captured.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from ..core.errors import CaptureError
from ..core.protocol import USB_CLASS_CDC, USB_PROTOCOL_EEM, USB_SUBCLASS_EEM
from .pcap import (
    DEFAULT_SNAPLEN,
    LINKTYPE_USB_LINUX,
    LINKTYPE_USB_LINUX_MMAPPED,
    ByteSource,
    CaptureReader,
    Packet,
    PcapngWriter,
    PcapWriter,
    linktype_name,
)

USBMON_LINKTYPES = (LINKTYPE_USB_LINUX_MMAPPED, LINKTYPE_USB_LINUX)
HEADER_SIZES = {LINKTYPE_USB_LINUX: 48, LINKTYPE_USB_LINUX_MMAPPED: 64}
ISO_DESCRIPTOR_SIZE = 16

XFER_ISOCHRONOUS, XFER_INTERRUPT, XFER_CONTROL, XFER_BULK = 0, 1, 2, 3
ENDPOINT_IN = 0x80
EVENTS = (b"S", b"C", b"E")

# Standard requests and descriptor types (USB 2.0, chapter 9).
REQUEST_GET_DESCRIPTOR = 6
DESCRIPTOR_CONFIGURATION = 2
DESCRIPTOR_INTERFACE = 4
DESCRIPTOR_ENDPOINT = 5
ENDPOINT_ATTR_BULK = 2

_BASE = "QBBBBHBBqiiII8s"  # the 48 bytes both link types share
_FIELDS = {
    (lt, order): struct.Struct(order + _BASE + ("iiII" if lt == LINKTYPE_USB_LINUX_MMAPPED else ""))
    for lt in USBMON_LINKTYPES
    for order in "<>"
}


def errno_name(status: int) -> str:
    """'EPROTO' for -71: how usbmon statuses are shown."""
    return errno.errorcode.get(-status, str(status))


class UsbRecord(NamedTuple):
    """One usbmon event."""

    urb_id: int
    event: str  # "S", "C" or "E"
    xfer_type: int
    endpoint: int  # bit 7 set for IN
    device: int
    bus: int
    flag_setup: int
    flag_data: int
    timestamp_ns: int  # the capture record's (usbmon's own ts_sec/ts_usec agree to the µs)
    status: int
    length: int  # submission: buffer length; completion: bytes transferred
    captured: int  # len_cap
    setup: bytes
    data: bytes  # bytes present after the header (ISO descriptors included, as captured)
    interval: int = 0
    start_frame: int = 0
    xfer_flags: int = 0
    ndesc: int = 0

    @property
    def is_in(self) -> bool:
        return bool(self.endpoint & ENDPOINT_IN)

    @property
    def carries_data(self) -> bool:
        """Whether this event is the one that holds the transfer's data."""
        return (self.event == "C") if self.is_in else (self.event == "S")

    @property
    def data_missing(self) -> bool:
        """usbmon or the snaplen kept fewer bytes than the transfer had."""
        return self.carries_data and len(self.data) < self.length


def parse_record(packet: Packet, name: str, index: int) -> UsbRecord:
    """The usbmon record in one captured packet of link type 189 or 220."""
    size = HEADER_SIZES[packet.linktype]
    if len(packet.data) < size:
        raise CaptureError(
            f"{name}: record {index} holds {len(packet.data)} bytes, less than the "
            f"{size}-byte usbmon header of link type {packet.linktype} (snaplen too small?)"
        )
    fields = _FIELDS[packet.linktype, packet.byteorder].unpack_from(packet.data)
    event = fields[1]
    if event not in (0x53, 0x43, 0x45):
        raise CaptureError(
            f"{name}: record {index} has event type 0x{event:02x}, not S, C or E: not a usbmon record"
        )
    urb_id, _e, xfer_type, epnum, devnum, busnum, flag_setup, flag_data = fields[:8]
    _sec, _usec, status, length, len_cap, setup = fields[8:14]
    extra = fields[14:] if len(fields) > 14 else (0, 0, 0, 0)
    return UsbRecord(
        urb_id, chr(event), xfer_type, epnum, devnum, busnum, flag_setup, flag_data,
        packet.timestamp_ns, status, length, len_cap, setup,
        packet.data[size : size + len_cap], *extra,
    )


class UsbmonReader:
    """Iterate the usbmon records of a pcap or pcapng stream, one at a time.

    Packets of other link types (a pcapng file may also hold, say, an Ethernet
    interface) are skipped and counted; a capture holding none of ours is an error.
    """

    def __init__(self, stream: ByteSource, name: str) -> None:
        self.capture = CaptureReader(stream, name)
        self.name = name
        self.records = 0
        self.skipped = 0  # packets of other link types
        if self.capture.format == "pcap" and self.capture.linktype not in USBMON_LINKTYPES:
            raise self._wrong_linktype([self.capture.linktype])

    @property
    def format(self) -> str:
        return self.capture.format

    def __iter__(self) -> Iterator[UsbRecord]:
        name = self.name
        for packet in self.capture:
            if packet.linktype not in USBMON_LINKTYPES:
                self.skipped += 1
                continue
            self.records += 1
            yield parse_record(packet, name, self.capture.packets)
        if not self.records and any(lt not in USBMON_LINKTYPES for lt in self.capture.linktypes):
            raise self._wrong_linktype(self.capture.linktypes)

    def _wrong_linktype(self, linktypes: list[int]) -> CaptureError:
        shown = ", ".join(f"{lt} ({linktype_name(lt)})" for lt in dict.fromkeys(linktypes))
        return CaptureError(
            f"{self.name}: link type {shown} is not a usbmon capture "
            f"(need {LINKTYPE_USB_LINUX_MMAPPED} USB_LINUX_MMAPPED or {LINKTYPE_USB_LINUX} USB_LINUX)"
        )


# -- USB descriptors ----------------------------------------------------------------


class EemInterface(NamedTuple):
    """An EEM interface found in a configuration descriptor."""

    number: int
    endpoint_in: int | None
    endpoint_out: int | None
    max_packet: int


def is_get_configuration(setup: bytes) -> bool:
    """Whether a control setup packet is GET_DESCRIPTOR(CONFIGURATION) to the device."""
    return len(setup) == 8 and setup[0] == 0x80 and setup[1] == REQUEST_GET_DESCRIPTOR and setup[3] == DESCRIPTOR_CONFIGURATION


def eem_interfaces(config: bytes) -> list[EemInterface]:
    """The EEM interfaces (class 02/0C/07) of a configuration descriptor and their bulk endpoints.

    A truncated descriptor (the 9-byte first read of enumeration) yields what it holds.
    """
    found: list[EemInterface] = []
    current: list | None = None  # [number, in, out, max_packet] of the EEM interface being read
    pos = 0
    while pos + 2 <= len(config):
        size, kind = config[pos], config[pos + 1]
        if size < 2 or pos + size > len(config):
            break
        body = config[pos : pos + size]
        if kind == DESCRIPTOR_INTERFACE and size >= 9:
            if current is not None:
                found.append(EemInterface(*current))
            triple = (body[5], body[6], body[7])
            current = [body[2], None, None, 0] if triple == (USB_CLASS_CDC, USB_SUBCLASS_EEM, USB_PROTOCOL_EEM) else None
        elif kind == DESCRIPTOR_ENDPOINT and size >= 7 and current is not None:
            address, attributes = body[2], body[3]
            if attributes & 0x3 == ENDPOINT_ATTR_BULK:
                current[1 if address & ENDPOINT_IN else 2] = address
                current[3] = int.from_bytes(body[4:6], "little") & 0x7FF
        pos += size
    if current is not None:
        found.append(EemInterface(*current))
    return found


def eem_configuration_descriptor(endpoint_in: int, endpoint_out: int, max_packet: int = 512, interface: int = 0) -> bytes:
    """A one-interface configuration descriptor for an EEM function, as f_eem offers."""
    iface = bytes([9, DESCRIPTOR_INTERFACE, interface, 0, 2, USB_CLASS_CDC, USB_SUBCLASS_EEM, USB_PROTOCOL_EEM, 0])
    mps = max_packet.to_bytes(2, "little")
    ep_in = bytes([7, DESCRIPTOR_ENDPOINT, endpoint_in | ENDPOINT_IN, ENDPOINT_ATTR_BULK]) + mps + b"\x00"
    ep_out = bytes([7, DESCRIPTOR_ENDPOINT, endpoint_out & 0x7F, ENDPOINT_ATTR_BULK]) + mps + b"\x00"
    body = iface + ep_in + ep_out
    total = 9 + len(body)
    # bNumInterfaces 1, bConfigurationValue 1, iConfiguration 0, bus powered, 100 mA.
    header = bytes([9, DESCRIPTOR_CONFIGURATION]) + total.to_bytes(2, "little") + bytes([1, 1, 0, 0x80, 50])
    return header + body


# -- writing ------------------------------------------------------------------------


class Transfer(NamedTuple):
    """One bulk transfer for UsbmonWriter, in the order it happened."""

    direction: str  # "in" (device to host) or "out"
    data: bytes
    requested: int | None = None  # IN: buffer length submitted (default: the writer's in_length)
    timestamp_ns: int | None = None  # completion time (IN) or submission time (OUT); None: 1 µs on
    status: int = 0  # completion status: 0 or a negative errno such as -71 (EPROTO)


class UsbmonWriter:
    """Write S/C records for bulk transfers as usbmon and libpcap would.

    container "pcap" or "pcapng"; linktype 220 (64-byte header, tcpdump's) or 189.
    in_flight > 1 keeps that many IN URBs submitted ahead, as a host driver does, so
    submissions and completions interleave and URB ids are reused: an IN transfer's
    completion is written once in_flight - 1 later IN transfers have been submitted (or
    at close()). max_capture imitates usbmon's clamp (len_cap = min(length, max_capture));
    snaplen cuts records as libpcap does. The caller owns the stream; call close() to
    write outstanding completions.
    """

    def __init__(
        self,
        stream: BinaryIO,
        linktype: int = LINKTYPE_USB_LINUX_MMAPPED,
        container: str = "pcap",
        byteorder: str = "<",
        bus: int = 1,
        device: int = 2,
        endpoint_in: int = 0x81,
        endpoint_out: int = 0x02,
        in_length: int = 16384,
        in_flight: int = 1,
        max_capture: int | None = None,
        snaplen: int = DEFAULT_SNAPLEN,
        start_ns: int = 1_700_000_000_000_000_000,
    ) -> None:
        if linktype not in USBMON_LINKTYPES:
            raise ValueError(f"linktype {linktype} is not a usbmon link type")
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self.linktype = linktype
        self.header_size = HEADER_SIZES[linktype]
        self._struct = _FIELDS[linktype, byteorder]
        self.bus, self.device = bus, device
        self.endpoint_in = endpoint_in | ENDPOINT_IN
        self.endpoint_out = endpoint_out & 0x7F
        self.in_length = in_length
        self.in_flight = in_flight
        self.max_capture = max_capture
        self.snaplen = snaplen
        self._clock = start_ns
        self._pending: deque[tuple[int, Transfer, int, int, int]] = deque()  # id, transfer, bus, device, endpoint
        self._free_ids: deque[int] = deque()
        self._next_id = 0xFFFF_8880_1000_0000
        self.records = 0
        self._pcapng: PcapngWriter | None = None
        self._pcap: PcapWriter | None = None
        if container == "pcap":
            self._pcap = PcapWriter(stream, linktype, snaplen, byteorder)
        elif container == "pcapng":
            self._pcapng = PcapngWriter(stream, byteorder)
            self._pcapng.add_interface(linktype, snaplen)
        else:
            raise ValueError(f"container {container!r} is neither 'pcap' nor 'pcapng'")

    # -- high level ------------------------------------------------------------

    def write_configuration(self, max_packet: int = 512, interface: int = 0) -> None:
        """GET_DESCRIPTOR(CONFIGURATION) as enumeration does it: the 9-byte header, then all."""
        config = eem_configuration_descriptor(self.endpoint_in, self.endpoint_out, max_packet, interface)
        for length in (9, len(config)):
            urb_id = self._take_id()
            setup = bytes([0x80, REQUEST_GET_DESCRIPTOR, 0, DESCRIPTOR_CONFIGURATION, 0, 0]) + length.to_bytes(2, "little")
            now = self._tick(None)
            self.record("S", XFER_CONTROL, ENDPOINT_IN, urb_id, length, b"", now, setup=setup, flag_setup=0)
            self.record("C", XFER_CONTROL, ENDPOINT_IN, urb_id, length, config[:length], self._tick(None), status=0)
            self._free_ids.append(urb_id)

    def write(self, transfer: Transfer, bus: int | None = None, device: int | None = None) -> None:
        """One bulk transfer: its submission and (now or later, see in_flight) its completion."""
        bus = self.bus if bus is None else bus
        device = self.device if device is None else device
        now = self._tick(transfer.timestamp_ns)
        if transfer.direction == "out":
            urb_id = self._take_id()
            n = len(transfer.data)
            self.record("S", XFER_BULK, self.endpoint_out, urb_id, n, transfer.data, now, bus=bus, device=device)
            actual = n if transfer.status == 0 else 0
            self.record("C", XFER_BULK, self.endpoint_out, urb_id, actual, b"", self._tick(None),
                        status=transfer.status, bus=bus, device=device)
            self._free_ids.append(urb_id)
        elif transfer.direction == "in":
            urb_id = self._take_id()
            requested = self.in_length if transfer.requested is None else transfer.requested
            if len(transfer.data) > requested:
                raise ValueError(f"IN transfer of {len(transfer.data)} bytes exceeds the {requested} requested")
            self.record("S", XFER_BULK, self.endpoint_in, urb_id, requested, b"", now, bus=bus, device=device)
            self._pending.append((urb_id, transfer, bus, device, self.endpoint_in))
            while len(self._pending) >= self.in_flight:
                self._complete_in()
        else:
            raise ValueError(f"direction {transfer.direction!r} is neither 'in' nor 'out'")

    def write_all(self, transfers: Iterable[Transfer]) -> None:
        for transfer in transfers:
            self.write(transfer)

    def close(self) -> None:
        """Complete the IN transfers still in flight. The stream stays open."""
        while self._pending:
            self._complete_in()

    def _complete_in(self) -> None:
        urb_id, transfer, bus, device, endpoint = self._pending.popleft()
        when = self._tick(transfer.timestamp_ns if not self._pending else None)
        self.record("C", XFER_BULK, endpoint, urb_id, len(transfer.data), transfer.data, when,
                    status=transfer.status, bus=bus, device=device)
        self._free_ids.append(urb_id)

    # -- low level -------------------------------------------------------------

    def record(
        self,
        event: str,
        xfer_type: int,
        endpoint: int,
        urb_id: int,
        length: int,
        data: bytes,
        timestamp_ns: int,
        *,
        status: int | None = None,
        bus: int | None = None,
        device: int | None = None,
        setup: bytes = bytes(8),
        flag_setup: int = ord("-"),
    ) -> None:
        """One usbmon record, any event. `data` is what the transfer had: usbmon's clamp
        (max_capture) and the snaplen are applied here, as they would be in capture."""
        if status is None:
            status = -errno.EINPROGRESS if event == "S" else 0
        is_in = bool(endpoint & ENDPOINT_IN)
        carries = (event == "C") if is_in else (event == "S")
        if event == "E" or not carries:
            data = b""
        elif self.max_capture is not None:
            data = data[: self.max_capture]
        if event == "E":
            flag_data = ord("E")
        elif carries:
            flag_data = 0
        else:
            flag_data = ord("<" if is_in else ">")
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        fields = [
            urb_id, ord(event), xfer_type, endpoint, self.device if device is None else device,
            self.bus if bus is None else bus, flag_setup, flag_data, sec, ns // 1000, status,
            length, len(data), setup,
        ]
        if self.linktype == LINKTYPE_USB_LINUX_MMAPPED:
            fields += [0, 0, 0, 0]
        raw = self._struct.pack(*fields) + data
        # libpcap: with data, the on-the-wire length counts the whole URB length.
        original = self.header_size + (length if data else 0)
        if len(raw) > self.snaplen:
            raw = raw[: self.snaplen]
        if self._pcap is not None:
            self._pcap.write(raw, timestamp_ns, max(original, len(raw)))
        else:
            assert self._pcapng is not None
            self._pcapng.write(raw, timestamp_ns, 0, max(original, len(raw)))
        self.records += 1

    def _take_id(self) -> int:
        """A URB id; freed ones are reused first, as the kernel reuses URB memory."""
        if self._free_ids:
            return self._free_ids.popleft()
        self._next_id += 0x100
        return self._next_id

    def _tick(self, timestamp_ns: int | None) -> int:
        self._clock = self._clock + 1000 if timestamp_ns is None else max(timestamp_ns, self._clock)
        return self._clock


def write_capture(stream: BinaryIO, transfers: Iterable[Transfer], configuration: bool = False, **options) -> UsbmonWriter:
    """Write a whole usbmon capture of bulk transfers (see UsbmonWriter for the options)."""
    writer = UsbmonWriter(stream, **options)
    if configuration:
        writer.write_configuration()
    writer.write_all(transfers)
    writer.close()
    return writer
