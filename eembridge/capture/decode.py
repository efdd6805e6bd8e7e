"""`eembridge decode`: a usbmon capture of an EEM device, decoded into an Ethernet pcap.

Theory of operation
-------------------
Two streaming passes over the capture, so memory never grows with its size:

1. Survey: which devices carry bulk traffic, on which endpoints, what length the host
   asks for on each IN endpoint, and whether a GET_DESCRIPTOR(CONFIGURATION) answer
   names an EEM interface (class 02/0C/07) and its endpoints. That picks the device
   and endpoints (or fails, naming the candidates, so the user can pass --device).
2. Decode: submissions and completions are paired by URB id. A bulk IN transfer's data
   is on its completion and ended short when it holds fewer bytes than its submission
   asked for; a bulk OUT transfer's data is on its submission and is complete by itself.
   Each direction is an EEM stream of its own, fed to its own Deframer (the codec
   selected by eembridge, never a parser of ours), and every Frame goes to the output
   pcap at the timestamp of the record that carried it, in capture order.

The capture is opened once (CaptureInput). A regular file is read twice; anything else
(a pipe: /dev/stdin, <(...); a device) can be read only once, so the first pass copies
what it reads into an unnamed temporary file and the second pass reads that copy.

The output is created exclusively when it does not exist, so that a run that fails
(ENOSPC, EIO, a capture damaged past what pass 1 read, Ctrl-C) removes the file it
created and nothing else; a file that existed is the user's: truncated as -o asked, and
on failure kept and reported incomplete. Devices and pipes are written as they are.

Data usbmon or the snaplen did not keep is counted (capture_truncated) and what is
left of that transfer is fed as short: the deframer drops the cut packet and
resynchronises at the next transfer, so a truncated capture loses frames but never
invents one. A completion whose submission is not in the capture (it was submitted
before the capture started) is counted as unpaired and judged against the length the
host asks for elsewhere on that endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from .. import Deframer
from ..core.errors import CaptureError, UserError
from ..core.events import Event, Frame
from ..core.protocol import DATA_LENGTH_MASK, DEFAULT_MAX_LENGTH, DEFRAMER_COUNTERS, MIN_DATA_LENGTH
from .pcap import LINKTYPE_ETHERNET, ByteSource, PcapWriter, linktype_name
from .usbmon import (
    ENDPOINT_IN,
    XFER_BULK,
    XFER_CONTROL,
    EemInterface,
    UsbmonReader,
    UsbRecord,
    eem_interfaces,
    errno_name,
    is_get_configuration,
)

# URBs awaiting their completion; beyond this the oldest is given up (a capture that
# lost completions must not grow memory). Hosts keep a few hundred in flight at most.
MAX_PENDING_URBS = 4096
DIRECTIONS = ("in", "out")

DeviceKey = tuple[int, int]  # (bus, address)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", help="usbmon capture (pcap or pcapng, link type 220 or 189), "
                        "e.g. from tcpdump -i usbmon0 -w capture.pcap; a pipe such as /dev/stdin "
                        "is copied to a temporary file in TMPDIR for the second pass")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.pcap",
                        help="Ethernet pcap to write the decoded frames to")
    parser.add_argument("--device", type=parse_device, metavar="BUS:ADDR",
                        help="the EEM device, as lsusb shows it (needed when several devices carry bulk traffic)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--max-length", type=max_length_arg, default=DEFAULT_MAX_LENGTH, metavar="N",
                        help=f"longest EEM bmLength to accept (default {DEFAULT_MAX_LENGTH})")


def parse_device(text: str) -> DeviceKey:
    bus, sep, address = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(bus, 10), int(address, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BUS:ADDR (e.g. 1:5, as lsusb shows)") from None


def max_length_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_DATA_LENGTH <= value <= DATA_LENGTH_MASK:
        raise argparse.ArgumentTypeError(f"must be {MIN_DATA_LENGTH}..{DATA_LENGTH_MASK}")
    return value


def device_name(key: DeviceKey) -> str:
    return f"{key[0]}:{key[1]}"


def open_capture(path: str) -> BinaryIO:
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise CaptureError(f"{path}: {exc.strerror or exc}") from None


class _CopyingReader:
    """Reads the capture and appends what it read to the spool (pass 1 of a pipe)."""

    def __init__(self, stream: BinaryIO, spool: BinaryIO, name: str) -> None:
        self._stream, self._spool, self._name = stream, spool, name

    def read(self, n: int, /) -> bytes:
        data = self._stream.read(n)  # its OSError is the capture's: CaptureReader names it
        try:
            self._spool.write(data)
        except OSError as exc:
            raise _spool_error(self._name, exc) from None
        return data


def _spool_error(name: str, exc: OSError) -> CaptureError:
    try:
        where = tempfile.gettempdir()
    except OSError:  # no usable directory at all: the error below says so
        where = "TMPDIR"
    return CaptureError(
        f"{name}: cannot keep a copy of the piped capture in {where} "
        f"(set TMPDIR elsewhere?): {exc.strerror or exc}"
    )


class CaptureInput:
    """The capture, opened once and read twice (the survey, then the decode).

    Only a regular file can be read again. Anything else is copied as pass 1 reads it
    into an unnamed temporary file (TMPDIR), which pass 2 reads: memory stays bounded,
    the copy takes as much disk as the capture and is gone when the command ends.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream = open_capture(path)
        self._spool: BinaryIO | None = None
        self.rereadable = stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode)

    def first_pass(self) -> ByteSource:
        if self.rereadable:
            return self._stream
        try:
            self._spool = tempfile.TemporaryFile(prefix="eembridge-capture-")
        except OSError as exc:
            raise _spool_error(self.path, exc) from None
        return _CopyingReader(self._stream, self._spool, self.path)

    def second_pass(self) -> ByteSource:
        stream = self._stream if self._spool is None else self._spool
        try:
            stream.seek(0)
        except OSError as exc:
            if self._spool is not None:
                raise _spool_error(self.path, exc) from None
            raise CaptureError(f"{self.path}: {exc.strerror or exc} rewinding for the second pass") from None
        return stream

    def close(self) -> None:
        self._stream.close()
        if self._spool is not None:
            try:
                self._spool.close()
            except OSError:  # its flush, on the full disk already reported: the copy is thrown away
                pass

    def __enter__(self) -> CaptureInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_output(path: str) -> tuple[BinaryIO, os.stat_result | None, bool]:
    """The output, open for writing; its identity if this run created it; whether it is
    a regular file (the only kind that can be left incomplete)."""
    created = True
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            created = False
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        identity = os.fstat(fd)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from None
    return os.fdopen(fd, "wb", buffering=1 << 20), identity if created else None, stat.S_ISREG(identity.st_mode)


def discard_output(path: str, created: os.stat_result | None, regular: bool) -> str:
    """After a failure: remove the output if this run created it (and it is still that
    file); say what became of it, as the end of the error line."""
    if created is not None:
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                os.unlink(path)
                return "; removed the incomplete output"
        except OSError:
            pass
        return "; the incomplete output could not be removed"
    return "; the output is incomplete" if regular else ""


def write_stdout(lines: Iterable[str]) -> int:
    """Write the report to standard output; returns the exit status.

    A reader that went away (EPIPE, as in `| head`) ends the command quietly with the
    status a SIGPIPE death would have (141), as other filters do; any other failure
    (ENOSPC, EIO) is one line. Either way stdout then points at /dev/null, or Python's
    own flush at exit would fail again and print more.
    """
    out = sys.stdout
    try:
        for line in lines:
            out.write(line)
        out.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        _stdout_to_devnull()
        raise UserError(f"standard output: {exc.strerror or exc}") from None
    return 0


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by a test's capture: nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


# -- pass 1: survey -------------------------------------------------------------------


@dataclass
class DeviceTraffic:
    bulk: Counter[int] = field(default_factory=Counter)  # endpoint -> records
    in_requested: dict[int, int] = field(default_factory=dict)  # IN endpoint -> first length asked
    eem: list[EemInterface] = field(default_factory=list)


@dataclass
class Survey:
    name: str
    format: str = ""
    linktypes: list[int] = field(default_factory=list)
    records: int = 0
    devices: dict[DeviceKey, DeviceTraffic] = field(default_factory=dict)


def survey_capture(path: str, stream: ByteSource | None = None) -> Survey:
    """Pass 1: devices, bulk endpoints and EEM interfaces in the capture (read from
    `stream` when given, else from path)."""
    if stream is None:
        with CaptureInput(path) as source:
            return survey_capture(path, source.first_pass())
    survey = Survey(path)
    config_requests: OrderedDict[tuple[int, int], None] = OrderedDict()
    reader = UsbmonReader(stream, path)
    survey.format = reader.format
    for r in reader:
        if r.xfer_type == XFER_BULK:
            traffic = survey.devices.setdefault((r.bus, r.device), DeviceTraffic())
            traffic.bulk[r.endpoint] += 1
            if r.event == "S" and r.is_in:
                traffic.in_requested.setdefault(r.endpoint, r.length)
        elif r.xfer_type == XFER_CONTROL:
            key = (r.bus, r.urb_id)
            if r.event == "S" and r.flag_setup == 0 and is_get_configuration(r.setup):
                config_requests[key] = None
                if len(config_requests) > MAX_PENDING_URBS:
                    config_requests.popitem(last=False)
            elif r.event in "CE" and key in config_requests:
                del config_requests[key]
                if r.event == "C" and r.status == 0:
                    traffic = survey.devices.setdefault((r.bus, r.device), DeviceTraffic())
                    for iface in eem_interfaces(r.data):
                        if iface not in traffic.eem:
                            traffic.eem.append(iface)
    survey.records = reader.records
    survey.linktypes = list(dict.fromkeys(reader.capture.linktypes))
    return survey


class Selection(NamedTuple):
    bus: int
    device: int
    endpoint_in: int | None
    endpoint_out: int | None
    source: str  # "descriptor" or "traffic": how the endpoints were found


def choose_device(survey: Survey, wanted: DeviceKey | None) -> Selection:
    """The EEM device and endpoints: by --device, by descriptor, or the only bulk device."""
    name = survey.name
    bulk_devices = [k for k, t in survey.devices.items() if t.bulk]
    listed = ", ".join(map(device_name, bulk_devices)) or "none"
    if wanted is not None:
        traffic = survey.devices.get(wanted)
        if traffic is None or not traffic.bulk:
            raise CaptureError(
                f"{name}: device {device_name(wanted)} has no bulk traffic in the capture "
                f"(devices with bulk traffic: {listed})"
            )
        return _endpoints(name, wanted, traffic)
    if not bulk_devices:
        raise CaptureError(f"{name}: no bulk transfers in {survey.records} usbmon records: nothing to decode")
    eem_devices = [k for k in bulk_devices if survey.devices[k].eem]
    if len(eem_devices) == 1:
        return _endpoints(name, eem_devices[0], survey.devices[eem_devices[0]])
    if len(eem_devices) > 1:
        raise CaptureError(
            f"{name}: several EEM devices carry bulk traffic ({', '.join(map(device_name, eem_devices))}); "
            "choose one with --device BUS:ADDR"
        )
    if len(bulk_devices) > 1:
        raise CaptureError(
            f"{name}: several devices carry bulk traffic ({listed}) and no configuration descriptor "
            "in the capture says which is EEM; choose one with --device BUS:ADDR"
        )
    return _endpoints(name, bulk_devices[0], survey.devices[bulk_devices[0]])


def _endpoints(name: str, key: DeviceKey, traffic: DeviceTraffic) -> Selection:
    for iface in traffic.eem:
        if iface.endpoint_in is not None or iface.endpoint_out is not None:
            return Selection(*key, iface.endpoint_in, iface.endpoint_out, "descriptor")
    ins = sorted(ep for ep in traffic.bulk if ep & ENDPOINT_IN)
    outs = sorted(ep for ep in traffic.bulk if not ep & ENDPOINT_IN)
    if len(ins) > 1 or len(outs) > 1:
        shown = " ".join(f"0x{ep:02x}" for ep in ins + outs)
        raise CaptureError(
            f"{name}: device {device_name(key)} uses several bulk endpoints ({shown}) and no "
            "configuration descriptor in the capture says which belong to EEM"
        )
    return Selection(*key, ins[0] if ins else None, outs[0] if outs else None, "traffic")


# -- pass 2: decode -------------------------------------------------------------------


class CaptureDecoder:
    """Pairs the selected endpoints' URBs, feeds each direction to its Deframer, and hands
    every Frame with its timestamp to `sink`."""

    def __init__(
        self,
        selection: Selection,
        sink: Callable[[bytes, int], None],
        max_length: int = DEFAULT_MAX_LENGTH,
        in_requested: dict[int, int] | None = None,
        on_transfer: Callable[[str, UsbRecord, bool, list[Event], Any], None] | None = None,
    ) -> None:
        self.selection = selection
        self._sink = sink
        # Sees every transfer with all its events (eembridge replay); frames still go to sink.
        self._on_transfer = on_transfer
        self.deframers = {d: Deframer(max_length) for d in DIRECTIONS}
        self.frames_written = dict.fromkeys(DIRECTIONS, 0)
        self._pending: OrderedDict[int, int] = OrderedDict()  # URB id -> length submitted
        # What the host asks for on each IN endpoint: the yardstick for completions whose
        # submission happened before the capture began.
        self._requested = dict(in_requested or {})
        self.records = 0
        self.records_other = 0  # other devices, endpoints or transfer types
        self.unpaired = 0  # completions whose submission is not in the capture
        self.unfinished = 0  # submissions never completed (still in flight at the end)
        self.capture_truncated = 0
        self.errors: Counter[str] = Counter()  # completion status -> count
        self.submit_errors: Counter[str] = Counter()  # 'E' events
        self._endpoints = {selection.endpoint_in, selection.endpoint_out} - {None}

    def feed(self, r: UsbRecord) -> None:
        self.records += 1
        sel = self.selection
        if (
            r.xfer_type != XFER_BULK
            or r.endpoint not in self._endpoints
            or r.device != sel.device
            or r.bus != sel.bus
        ):
            self.records_other += 1
            return
        if r.event == "S":
            self._pending[r.urb_id] = r.length
            if len(self._pending) > MAX_PENDING_URBS:
                self._pending.popitem(last=False)
                self.unfinished += 1
            if r.is_in:
                self._requested[r.endpoint] = r.length
            else:
                self._transfer("out", r, short=True)
        elif r.event == "E":
            self._pending.pop(r.urb_id, None)
            self.submit_errors[errno_name(r.status)] += 1
        else:
            requested = self._pending.pop(r.urb_id, None)
            if requested is None:
                self.unpaired += 1
            if r.status:
                self.errors[errno_name(r.status)] += 1
            if r.is_in:
                if requested is None:
                    requested = self._requested.get(r.endpoint)
                # Unknown request length: call it short, which can lose a packet that
                # spans transfers but can never join two transfers that should not be.
                short = requested is None or r.length < requested or r.status != 0
                self._transfer("in", r, short)

    def _transfer(self, direction: str, r: UsbRecord, short: bool) -> None:
        if r.data_missing:
            self.capture_truncated += 1
            short = True
        timestamp = r.timestamp_ns
        written = 0
        deframer = self.deframers[direction]
        events = deframer.feed(r.data, short)
        if self._on_transfer is not None:
            events = list(events)
            self._on_transfer(direction, r, short, events, deframer)
        for event in events:
            if isinstance(event, Frame):
                self._sink(event.data, timestamp)
                written += 1
        self.frames_written[direction] += written

    def finish(self) -> None:
        self.unfinished += len(self._pending)
        self._pending.clear()

    def direction_counters(self, direction: str) -> dict[str, int]:
        deframer = self.deframers[direction]
        return {
            "frames_written": self.frames_written[direction],
            "carried": deframer.carried,
            **deframer.counters(),
        }


# -- the command ----------------------------------------------------------------------


def decode_capture(
    path: str, output: str, device: DeviceKey | None = None, max_length: int = DEFAULT_MAX_LENGTH
) -> dict[str, Any]:
    """Decode a capture into an Ethernet pcap; returns the summary `--json` prints."""
    with CaptureInput(path) as source:
        survey = survey_capture(path, source.first_pass())
        selection = choose_device(survey, device)
        if os.path.exists(output) and os.path.samefile(path, output):
            raise UserError(f"{output}: the output would overwrite the capture")
        out, created, regular = open_output(output)
        try:
            with out:
                writer = PcapWriter(out, LINKTYPE_ETHERNET)
                decoder, reader = run_decoder(path, survey, selection, writer.write, max_length,
                                              stream=source.second_pass())
        except BaseException as exc:
            note = discard_output(output, created, regular)
            # Only the output raises OSError here: the reader turns the capture's into CaptureError.
            if isinstance(exc, OSError):
                raise UserError(f"{output}: {exc.strerror or exc}{note}") from None
            if isinstance(exc, UserError):
                raise type(exc)(f"{exc}{note}") from None
            raise
    return {
        **capture_summary(path, survey, selection, decoder, reader),
        "output": output,
        "frames_written": writer.packets,
    }


def run_decoder(
    path: str,
    survey: Survey,
    selection: Selection,
    sink: Callable[[bytes, int], None],
    max_length: int = DEFAULT_MAX_LENGTH,
    on_transfer: Callable[[str, UsbRecord, bool, list[Event], Any], None] | None = None,
    stream: ByteSource | None = None,
) -> tuple[CaptureDecoder, UsbmonReader]:
    """Pass 2 over the whole capture (shared by decode and replay), from `stream` (the
    CaptureInput's second pass) or else from path."""
    if stream is None:
        with open_capture(path) as opened:
            return run_decoder(path, survey, selection, sink, max_length, on_transfer, opened)
    key = (selection.bus, selection.device)
    decoder = CaptureDecoder(selection, sink, max_length, survey.devices[key].in_requested, on_transfer)
    reader = UsbmonReader(stream, path)
    for record in reader:
        decoder.feed(record)
    decoder.finish()
    return decoder, reader


def capture_summary(
    path: str, survey: Survey, selection: Selection, decoder: CaptureDecoder, reader: UsbmonReader
) -> dict[str, Any]:
    key = (selection.bus, selection.device)
    return {
        "capture": path,
        "format": survey.format,
        "linktypes": survey.linktypes,
        "device": device_name(key),
        "endpoint_in": selection.endpoint_in,
        "endpoint_out": selection.endpoint_out,
        "endpoints_from": selection.source,
        "records": decoder.records,
        "records_other": decoder.records_other,
        "packets_skipped": reader.skipped,
        "unpaired": decoder.unpaired,
        "unfinished": decoder.unfinished,
        "capture_truncated": decoder.capture_truncated,
        "errors": dict(sorted(decoder.errors.items())),
        "submit_errors": dict(sorted(decoder.submit_errors.items())),
        "in": decoder.direction_counters("in"),
        "out": decoder.direction_counters("out"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary: what was read, chosen and written, then the counters."""

    def endpoint(ep: int | None) -> str:
        return "none" if ep is None else f"0x{ep:02x}"

    def tally(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

    source = "configuration descriptor" if summary["endpoints_from"] == "descriptor" else "bulk traffic"
    linktypes = ", ".join(f"{lt} {linktype_name(lt)}" for lt in summary["linktypes"])
    lines = [
        f"capture   {summary['capture']} ({summary['format']}, link type {linktypes}): "
        f"{summary['records']} usbmon records",
        f"device    {summary['device']}: bulk IN {endpoint(summary['endpoint_in'])}, "
        f"bulk OUT {endpoint(summary['endpoint_out'])} (from the {source})",
        f"output    {summary['output']}: {summary['frames_written']} frames "
        f"(IN {summary['in']['frames_written']}, OUT {summary['out']['frames_written']})",
        f"records   other {summary['records_other']}, unpaired {summary['unpaired']}, "
        f"unfinished {summary['unfinished']}, capture_truncated {summary['capture_truncated']}, "
        f"other link types {summary['packets_skipped']}",
        f"errors    completions: {tally(summary['errors'])}; submissions: {tally(summary['submit_errors'])}",
        "",
    ]
    names = ["frames_written", "carried", *DEFRAMER_COUNTERS]
    width = max(map(len, names))
    lines.append(f"{'':<{width}}  {'IN':>12}  {'OUT':>12}")
    for name in names:
        lines.append(f"{name:<{width}}  {summary['in'][name]:>12}  {summary['out'][name]:>12}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = decode_capture(args.capture, args.output, args.device, args.max_length)
    return write_stdout([(json.dumps(summary) if args.json else format_summary(summary)) + "\n"])
