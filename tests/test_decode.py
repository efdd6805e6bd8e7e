"""`eembridge decode` on usbmon captures written by eembridge.capture.usbmon.

Frames are framed (Framer.pack), captured as the kernel would show them (UsbmonWriter:
both link types, pcap and pcapng, both byte orders), decoded through the CLI, and read
back from the Ethernet pcap with a parser of the test's own. tcpdump checks both kinds
of file independently: it must read our usbmon captures and our Ethernet output.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge import Framer
from eembridge.capture.decode import decode_capture
from eembridge.capture.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_USB_LINUX,
    LINKTYPE_USB_LINUX_MMAPPED,
    CaptureReader,
    PcapngWriter,
    PcapWriter,
)
from eembridge.capture.usbmon import (
    XFER_BULK,
    Transfer,
    UsbmonReader,
    UsbmonWriter,
    eem_configuration_descriptor,
    eem_interfaces,
)
from eembridge.cli.main import main
from eembridge.core.errors import CaptureError

from eemstreams import ipv4_header

ROOT = Path(__file__).resolve().parent.parent
IN_SOURCE = bytes.fromhex("02000000000a")  # device -> host frames
OUT_SOURCE = bytes.fromhex("02000000000b")  # host -> device frames
DESTINATION = bytes.fromhex("020000000001")
T0 = 1_700_000_000_000_000_000
IN_BUFFER = 16384  # what the simulated host submits on bulk IN


def make_frames(rng: random.Random, source: bytes, count: int, largest: int = 1500) -> list[bytes]:
    """IPv4 frames (a right header from 20 bytes of payload on: the deframer refuses a
    sentinel frame whose IPv4 header is broken, codec.py "Trust"), random payloads."""
    frames = []
    for _ in range(count):
        payload = rng.randbytes(rng.randint(0, largest))
        if len(payload) >= 20:
            payload = ipv4_header(len(payload) - 20) + payload[20:]
        frames.append(DESTINATION + source + b"\x08\x00" + payload)
    return frames


def read_ethernet_pcap(path: Path) -> list[tuple[int, bytes]]:
    """A tiny independent parser: (timestamp in µs, frame) of a little-endian µs pcap."""
    raw = path.read_bytes()
    magic, _major, _minor, _zone, _sigfigs, _snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, linktype) == (0xA1B2C3D4, LINKTYPE_ETHERNET)
    out, pos = [], 24
    while pos < len(raw):
        sec, usec, caplen, length = struct.unpack_from("<IIII", raw, pos)
        assert caplen == length
        out.append((sec * 1_000_000 + usec, raw[pos + 16 : pos + 16 + caplen]))
        pos += 16 + caplen
    assert pos == len(raw)
    return out


def by_direction(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    return [f for f in frames if f[6:12] == IN_SOURCE], [f for f in frames if f[6:12] == OUT_SOURCE]


def decode_json(capture: Path, output: Path, capsys, *extra: str) -> dict:
    assert main(["decode", str(capture), "-o", str(output), "--json", *extra]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return json.loads(captured.out)


def tcpdump_lines(path: Path) -> list[str]:
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed (apt-get install tcpdump)"
    result = subprocess.run([tcpdump, "-r", str(path), "-nn"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def interleave(rng: random.Random, first: list, second: list) -> list:
    """Merge two lists at random, keeping each one's order."""
    merged, i, j = [], 0, 0
    while i < len(first) or j < len(second):
        if j == len(second) or (i < len(first) and rng.random() < 0.5):
            merged.append(first[i])
            i += 1
        else:
            merged.append(second[j])
            j += 1
    return merged


def in_transfers(frames: list[bytes], max_transfer: int = 4096) -> list[Transfer]:
    """A device sending batches, each transfer short (shorter than the host's buffer)."""
    return [Transfer("in", t) for t in Framer(crc=True, max_transfer=max_transfer).pack(frames)]


def out_transfers(frames: list[bytes]) -> list[Transfer]:
    return [Transfer("out", t) for t in Framer(crc=True, max_transfer=1536).pack(frames)]


def one_per_transfer(direction: str, frames: list[bytes]) -> list[Transfer]:
    framer = Framer(crc=True)
    return [Transfer(direction, framer.pack([f])[0]) for f in frames]


def write(path: Path, transfers: list[Transfer], configuration: bool = True, **options) -> None:
    with open(path, "wb") as stream:
        writer = UsbmonWriter(stream, **options)
        if configuration:
            writer.write_configuration()
        writer.write_all(transfers)
        writer.close()


# -- round trips ----------------------------------------------------------------------

FORMATS = [
    (linktype, container, order)
    for linktype in (LINKTYPE_USB_LINUX_MMAPPED, LINKTYPE_USB_LINUX)
    for container in ("pcap", "pcapng")
    for order in "<>"
]


@pytest.mark.parametrize("linktype,container,order", FORMATS)
def test_round_trip_both_directions(tmp_path, capsys, linktype, container, order):
    rng = random.Random(linktype * 7 + len(container) + ord(order))
    sent_in, sent_out = make_frames(rng, IN_SOURCE, 60), make_frames(rng, OUT_SOURCE, 40)
    capture, output = tmp_path / f"usb.{container}", tmp_path / "eth.pcap"
    transfers = interleave(rng, in_transfers(sent_in), out_transfers(sent_out))
    write(capture, transfers, linktype=linktype, container=container, byteorder=order, in_flight=3)

    summary = decode_json(capture, output, capsys)
    got_in, got_out = by_direction([f for _ts, f in read_ethernet_pcap(output)])
    assert got_in == sent_in and got_out == sent_out
    assert summary["frames_written"] == len(sent_in) + len(sent_out)
    assert summary["in"]["frames"] == len(sent_in) and summary["out"]["frames"] == len(sent_out)
    assert summary["format"] == container and summary["linktypes"] == [linktype]
    assert (summary["device"], summary["endpoint_in"], summary["endpoint_out"]) == ("1:2", 0x81, 0x02)
    assert summary["endpoints_from"] == "descriptor"
    assert summary["records"] == 2 * len(transfers) + 4  # S and C each, plus two control pairs
    assert summary["unpaired"] == summary["unfinished"] == summary["capture_truncated"] == 0
    for direction in ("in", "out"):
        assert summary[direction]["bytes_skipped"] == summary[direction]["resyncs"] == 0
    # An independent reader: libpcap understands our usbmon records in any byte order.
    lines = tcpdump_lines(capture)
    assert len(lines) == summary["records"]
    assert sum("USB BULK SUBMIT to 1:2:1" in line for line in lines) == len(in_transfers(sent_in))
    assert sum("USB BULK COMPLETE from 1:2:2" in line for line in lines) == len(out_transfers(sent_out))
    # libpcap rewrites the capture as little-endian pcap, swapping the usbmon headers
    # itself: the same frames must come out of its file.
    rewritten = tmp_path / "rewritten.pcap"
    result = subprocess.run(["tcpdump", "-r", str(capture), "-w", str(rewritten)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    decode_json(rewritten, output, capsys)
    assert by_direction([f for _ts, f in read_ethernet_pcap(output)]) == (sent_in, sent_out)


def test_capture_order_and_timestamps(tmp_path, capsys):
    rng = random.Random(5)
    sent_in, sent_out = make_frames(rng, IN_SOURCE, 30), make_frames(rng, OUT_SOURCE, 30)
    framer_in, framer_out = Framer(crc=True), Framer(crc=False)  # one direction CRC, one sentinel
    transfers, expected = [], []
    for i, (fin, fout) in enumerate(zip(sent_in, sent_out, strict=True)):
        t = T0 + i * 1_000_000  # one millisecond apart
        transfers.append(Transfer("in", framer_in.pack([fin])[0], timestamp_ns=t))
        transfers.append(Transfer("out", framer_out.pack([fout])[0], timestamp_ns=t + 500_000))
        expected += [(t // 1000, fin), ((t + 500_000) // 1000, fout)]
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    write(capture, transfers, configuration=False, in_flight=1)
    summary = decode_json(capture, output, capsys)
    assert read_ethernet_pcap(output) == expected
    assert summary["endpoints_from"] == "traffic"
    assert summary["in"]["crc_frames"] == 30 and summary["out"]["crc_frames"] == 0


def test_in_transfers_that_fill_the_buffer_continue(tmp_path, capsys):
    """A batching device streams across full transfers; only the last ends short."""
    rng = random.Random(6)
    sent = make_frames(rng, IN_SOURCE, 50)
    stream = b"".join(Framer(crc=True).packet(f) for f in sent)
    size = 512
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    if len(chunks[-1]) == size:
        chunks.append(b"")  # the device ends the stream with a ZLP
    transfers = [Transfer("in", c, requested=size) for c in chunks]
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    write(capture, transfers, in_flight=4)
    summary = decode_json(capture, output, capsys)
    assert [f for _ts, f in read_ethernet_pcap(output)] == sent
    assert summary["in"]["transfers"] == len(chunks)
    assert summary["in"]["short_transfers"] == 1
    assert summary["in"]["truncated"] == summary["in"]["bytes_skipped"] == 0


def test_commands_are_counted_not_written(tmp_path, capsys):
    rng = random.Random(7)
    sent = make_frames(rng, IN_SOURCE, 3)
    framer = Framer(crc=True)
    transfers = [
        *one_per_transfer("in", sent[:1]),
        Transfer("in", framer.echo(b"ping")),
        *one_per_transfer("in", sent[1:]),
        Transfer("out", framer.echo_response(b"ping")),
    ]
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    write(capture, transfers)
    summary = decode_json(capture, output, capsys)
    assert [f for _ts, f in read_ethernet_pcap(output)] == sent
    assert summary["in"]["echo"] == 1 and summary["out"]["echo_response"] == 1


def test_capture_started_with_urbs_in_flight(tmp_path, capsys):
    """Completions whose submissions predate the capture: unpaired, still decoded."""
    rng = random.Random(8)
    sent = make_frames(rng, IN_SOURCE, 12)
    transfers = in_transfers(sent, max_transfer=2048)
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    with open(capture, "wb") as stream:
        writer = UsbmonWriter(stream)
        for n, early in enumerate(transfers[:2]):  # completions only, as if submitted earlier
            writer.record("C", XFER_BULK, 0x81, 0xFFFF_0000_0000_0100 + 0x100 * n, len(early.data), early.data, T0 + n)
        writer.write_all(transfers[2:])
        writer.close()
    summary = decode_json(capture, output, capsys)
    assert [f for _ts, f in read_ethernet_pcap(output)] == sent
    assert summary["unpaired"] == 2
    assert summary["in"]["short_transfers"] == len(transfers)  # judged by the host's usual request


def test_urbs_still_in_flight_at_the_end_are_unfinished(tmp_path, capsys):
    rng = random.Random(9)
    sent = make_frames(rng, IN_SOURCE, 5)
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    with open(capture, "wb") as stream:
        writer = UsbmonWriter(stream)
        writer.write_all(in_transfers(sent))
        writer.close()
        for n in range(3):  # the host keeps URBs queued when the capture stops
            writer.record("S", XFER_BULK, 0x81, 0xFFFF_0000_0000_0100 + 0x100 * n, IN_BUFFER, b"", T0 + 10**9)
    summary = decode_json(capture, output, capsys)
    assert summary["unfinished"] == 3 and summary["frames_written"] == 5


# -- faults ---------------------------------------------------------------------------


def batches(rng: random.Random, frames: list[bytes]) -> list[list[bytes]]:
    out, i = [], 0
    while i < len(frames):
        n = rng.randint(1, 3)
        out.append(frames[i : i + n])
        i += n
    return out


def damage(rng: random.Random, transfer: bytes) -> bytes:
    """Lose 64-byte USB packets and flip bytes, as a bad full-speed link does."""
    data = bytearray(transfer)
    for _ in range(rng.randint(0, 2)):
        packets = max(1, len(data) // 64)
        start = rng.randrange(packets) * 64
        del data[start : start + 64]
    for _ in range(rng.randint(0 if len(data) != len(transfer) else 1, 3)):
        if data:
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), loss=st.floats(0.1, 0.9))
def test_lossy_in_link_invents_nothing_and_keeps_untouched_transfers(tmp_path_factory, seed, loss):
    rng = random.Random(seed)
    sent = make_frames(rng, IN_SOURCE, 40)
    framer = Framer(crc=True, max_transfer=8192)
    transfers, kept = [], []
    for batch in batches(rng, sent):
        (transfer,) = framer.pack(batch)
        if rng.random() < loss:
            transfer = damage(rng, transfer)
        else:
            kept += batch
        transfers.append(Transfer("in", transfer))
    workdir = tmp_path_factory.mktemp("lossy")
    capture, output = workdir / "usb.pcap", workdir / "eth.pcap"
    write(capture, transfers, in_flight=2)
    summary = decode_capture(str(capture), str(output))
    got = [f for _ts, f in read_ethernet_pcap(output)]
    sent_set = set(sent)
    assert all(f in sent_set for f in got), "decode produced a frame that was never sent"
    assert set(kept) <= set(got), "a frame of an untouched transfer was lost"
    positions = [sent.index(f) for f in got]
    assert positions == sorted(positions), "frames out of order"
    assert summary["in"]["frames"] == len(got)


def test_usbmon_clamp_and_snaplen_count_capture_truncated(tmp_path, capsys):
    rng = random.Random(10)
    sent_in, sent_out = make_frames(rng, IN_SOURCE, 40), make_frames(rng, OUT_SOURCE, 40)
    transfers = one_per_transfer("in", sent_in) + one_per_transfer("out", sent_out)
    limit = 1000
    cut = sum(len(t.data) > limit for t in transfers)
    whole = [f for t, f in zip(transfers, sent_in + sent_out, strict=True) if len(t.data) <= limit]
    assert 0 < cut < len(transfers)
    for options in ({"max_capture": limit}, {"snaplen": 64 + limit}):
        capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
        write(capture, transfers, **options)
        summary = decode_json(capture, output, capsys)
        got = [f for _ts, f in read_ethernet_pcap(output)]
        assert got == whole
        assert summary["capture_truncated"] == cut
        assert summary["in"]["crc_errors"] == summary["out"]["crc_errors"] == 0


def test_status_errors_are_counted_by_errno(tmp_path, capsys):
    rng = random.Random(11)
    sent = make_frames(rng, IN_SOURCE, 4)
    good = one_per_transfer("in", sent)
    transfers = [good[0], Transfer("in", b"", status=-71), good[1], Transfer("out", b"\0" * 20, status=-32),
                 good[2], Transfer("in", b"", status=-2), good[3]]
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    with open(capture, "wb") as stream:
        writer = UsbmonWriter(stream)
        writer.write_all(transfers)
        writer.record("E", XFER_BULK, 0x02, 0xFFFF_0000_0000_0100, 0, b"", T0 + 10**9, status=-19)
        writer.close()
    summary = decode_json(capture, output, capsys)
    assert summary["errors"] == {"ENOENT": 1, "EPIPE": 1, "EPROTO": 1}
    assert summary["submit_errors"] == {"ENODEV": 1}
    assert [f for _ts, f in read_ethernet_pcap(output)] == sent


def test_max_length_option_drops_longer_frames(tmp_path, capsys):
    rng = random.Random(12)
    sent = [DESTINATION + IN_SOURCE + b"\x08\x00" + rng.randbytes(n) for n in (10, 1400, 20)]
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    write(capture, [Transfer("in", Framer(crc=True).pack([f])[0]) for f in sent])
    summary = decode_json(capture, output, capsys, "--max-length", "200")
    assert [f for _ts, f in read_ethernet_pcap(output)] == [sent[0], sent[2]]
    assert summary["in"]["oversize"] == 1


# -- which device -------------------------------------------------------------------


def two_device_capture(path: Path, describe_device_2: bool) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(13)
    frames_2, frames_3 = make_frames(rng, IN_SOURCE, 10), make_frames(rng, OUT_SOURCE, 10)
    with open(path, "wb") as stream:
        writer = UsbmonWriter(stream, in_flight=2)
        if describe_device_2:
            writer.write_configuration()
        for a, b in zip(one_per_transfer("in", frames_2), one_per_transfer("in", frames_3), strict=True):
            writer.write(a)
            writer.write(b, device=3)
        writer.close()
    return frames_2, frames_3


def test_several_bulk_devices_need_device_option(tmp_path, capsys):
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    frames_2, frames_3 = two_device_capture(capture, describe_device_2=False)
    assert main(["decode", str(capture), "-o", str(output)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eembridge: error: ")
    assert "1:2, 1:3" in err and "--device BUS:ADDR" in err
    assert not output.exists()
    summary = decode_json(capture, output, capsys, "--device", "1:3")
    assert [f for _ts, f in read_ethernet_pcap(output)] == frames_3
    assert summary["device"] == "1:3" and summary["records_other"] == 2 * len(frames_2)
    assert main(["decode", str(capture), "-o", str(output), "--device", "1:9"]) != 0
    assert "device 1:9 has no bulk traffic" in capsys.readouterr().err


def test_configuration_descriptor_picks_the_eem_device(tmp_path, capsys):
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    frames_2, _ = two_device_capture(capture, describe_device_2=True)
    summary = decode_json(capture, output, capsys)
    assert summary["device"] == "1:2" and summary["endpoints_from"] == "descriptor"
    assert [f for _ts, f in read_ethernet_pcap(output)] == frames_2


def test_device_option_is_checked_by_argparse(tmp_path, capsys):
    assert main(["decode", str(tmp_path / "x"), "-o", str(tmp_path / "y"), "--device", "two"]) == 2
    err = capsys.readouterr().err
    assert "BUS:ADDR" in err and err.count("\n") == 1, err


def test_eem_interfaces_in_a_composite_configuration():
    eem = eem_configuration_descriptor(0x83, 0x04, max_packet=64, interface=2)
    # An ACM-like interface (class 02/02/01) with its own bulk pair, before the EEM one.
    acm = bytes([9, 4, 0, 0, 2, 0x02, 0x02, 0x01, 0]) + bytes([7, 5, 0x81, 2, 0, 2, 0]) + bytes([7, 5, 0x02, 2, 0, 2, 0])
    config = eem[:9] + acm + eem[9:]
    (found,) = eem_interfaces(config)
    assert (found.number, found.endpoint_in, found.endpoint_out, found.max_packet) == (2, 0x83, 0x04, 64)
    assert eem_interfaces(config[:9]) == []  # enumeration's first, 9-byte read
    assert eem_interfaces(config[:20]) == []  # cut inside a descriptor


# -- containers ---------------------------------------------------------------------


def test_pcapng_with_other_interfaces_unknown_blocks_and_sections(tmp_path, capsys):
    """Records re-emitted into pcapng: an Ethernet interface to skip, an unknown block,
    nanosecond timestamps, Simple Packet Blocks, and a second, big-endian section."""
    rng = random.Random(14)
    sent = make_frames(rng, IN_SOURCE, 20)
    plain = io.BytesIO()
    writer = UsbmonWriter(plain, in_flight=2)
    writer.write_configuration()
    writer.write_all(in_transfers(sent, 1600))
    writer.close()
    packets = list(CaptureReader(io.BytesIO(plain.getvalue()), "plain"))
    half = len(packets) // 2

    little = io.BytesIO()
    ng = PcapngWriter(little, "<")
    ng.add_interface(LINKTYPE_USB_LINUX_MMAPPED)  # interface 0: Simple Packet Blocks go here
    ng.add_interface(LINKTYPE_ETHERNET)
    ng.add_interface(LINKTYPE_USB_LINUX_MMAPPED, tsresol=9)
    for n, p in enumerate(packets[:half]):
        if n % 3 == 0:
            ng.write(b"\xff" * 60, p.timestamp_ns, interface=1)
            ng.write_block(0x00000BAD, rng.randbytes(rng.randint(0, 50)))
        if n % 2:
            ng.write_simple(p.data, p.length)
        else:
            ng.write(p.data, p.timestamp_ns, interface=2, length=p.length)
    # A second section, written big-endian: usbmon headers swap with it.
    big = io.BytesIO()
    be = PcapngWriter(big, ">")
    be.add_interface(LINKTYPE_USB_LINUX_MMAPPED)
    swapped = struct.Struct(">QBBBBHBBqiiII8siiII")
    for p in packets[half:]:
        fields = struct.unpack_from("<QBBBBHBBqiiII8siiII", p.data)
        be.write(swapped.pack(*fields) + p.data[64:], p.timestamp_ns, length=p.length)
    capture, output = tmp_path / "usb.pcapng", tmp_path / "eth.pcap"
    capture.write_bytes(little.getvalue() + big.getvalue())

    summary = decode_json(capture, output, capsys)
    assert [f for _ts, f in read_ethernet_pcap(output)] == sent
    assert summary["packets_skipped"] == (half + 2) // 3
    assert summary["endpoints_from"] == "descriptor"
    assert summary["unpaired"] == 0


def test_reader_reports_kernel_fields(tmp_path):
    stream = io.BytesIO()
    writer = UsbmonWriter(stream, byteorder=">", bus=4, device=9)
    writer.write(Transfer("in", b"abc", requested=512, timestamp_ns=T0))
    writer.write(Transfer("out", b"defg", timestamp_ns=T0 + 2000))
    writer.close()
    stream.seek(0)
    s_in, c_in, s_out, c_out = UsbmonReader(stream, "mem")
    assert (s_in.event, s_in.endpoint, s_in.length, s_in.captured, s_in.status, chr(s_in.flag_data)) == (
        "S", 0x81, 512, 0, -115, "<")
    assert (c_in.event, c_in.length, c_in.data, c_in.flag_data, c_in.urb_id) == ("C", 3, b"abc", 0, s_in.urb_id)
    assert (s_out.endpoint, s_out.data, c_out.length, chr(c_out.flag_data)) == (0x02, b"defg", 4, ">")
    assert (c_in.bus, c_in.device, c_in.timestamp_ns, s_out.timestamp_ns) == (4, 9, T0, T0 + 2000)
    assert not any(r.data_missing for r in (s_in, c_in, s_out, c_out))
    with pytest.raises(ValueError, match="exceeds the 2 requested"):
        writer.write(Transfer("in", b"abc", requested=2))


def test_pcap_writer_nanoseconds_and_reader_agree():
    stream = io.BytesIO()
    writer = PcapWriter(stream, LINKTYPE_USB_LINUX, byteorder=">", nanosecond=True)
    writer.write(b"x" * 48, T0 + 123_456_789, length=100)
    stream.seek(0)
    reader = CaptureReader(stream, "mem")
    (packet,) = reader
    assert (reader.format, packet.timestamp_ns, packet.length, packet.byteorder) == ("pcap", T0 + 123_456_789, 100, ">")


# -- bad input ------------------------------------------------------------------------


def small_capture(container: str) -> bytes:
    rng = random.Random(21)
    stream = io.BytesIO()
    writer = UsbmonWriter(stream, container=container, in_flight=2)
    writer.write_configuration()
    writer.write_all(interleave(rng, in_transfers(make_frames(rng, IN_SOURCE, 4, 200)),
                                out_transfers(make_frames(rng, OUT_SOURCE, 4, 200))))
    writer.close()
    return stream.getvalue()


SMALL_CAPTURES = {container: small_capture(container) for container in ("pcap", "pcapng")}


@settings(max_examples=150, deadline=None)
@given(
    container=st.sampled_from(sorted(SMALL_CAPTURES)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    cut=st.integers(0, 10**6),
)
def test_damaged_files_decode_or_raise_capture_error(tmp_path_factory, container, flips, cut):
    """The fuzz invariant: decode, or raise CaptureError, never anything else."""
    data = bytearray(SMALL_CAPTURES[container])
    for where, mask in flips:
        data[where % len(data)] ^= mask
    workdir = tmp_path_factory.mktemp("fuzz")
    capture, output = workdir / "usb.bin", workdir / "eth.pcap"
    capture.write_bytes(bytes(data[: len(data) - cut % 200]))
    try:
        decode_capture(str(capture), str(output))
    except CaptureError:
        pass


def ethernet_pcap() -> bytes:
    stream = io.BytesIO()
    PcapWriter(stream, LINKTYPE_ETHERNET).write(b"\xff" * 60, T0)
    return stream.getvalue()


def ethernet_only_pcapng() -> bytes:
    stream = io.BytesIO()
    ng = PcapngWriter(stream)
    ng.add_interface(LINKTYPE_ETHERNET)
    ng.write(b"\xff" * 60, T0)
    return stream.getvalue()


def cut_capture() -> bytes:
    stream = io.BytesIO()
    write_to = UsbmonWriter(stream)
    write_to.write_all(in_transfers(make_frames(random.Random(15), IN_SOURCE, 5)))
    write_to.close()
    return stream.getvalue()[:-100]


def short_header_capture() -> bytes:
    stream = io.BytesIO()
    UsbmonWriter(stream, snaplen=40).write(Transfer("out", b"x" * 30))
    return stream.getvalue()


BAD_INPUTS = {
    "empty": (b"", "empty file"),
    "random": (bytes(random.Random(16).randbytes(4000)), "not a pcap or pcapng file (magic 0x"),
    "ethernet": (ethernet_pcap(), "link type 1 (ETHERNET) is not a usbmon capture"),
    "ethernet-pcapng": (ethernet_only_pcapng(), "link type 1 (ETHERNET) is not a usbmon capture"),
    "truncated-record": (cut_capture(), "truncated record"),
    "truncated-header": (ethernet_pcap()[:10], "truncated file header"),
    "header-cut-by-snaplen": (short_header_capture(), "less than the 64-byte usbmon header"),
    "garbage-after-magic": (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 220) + b"\xff" * 16,
                            "claims 4294967295 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case):
    content, message = BAD_INPUTS[case]
    capture, output = tmp_path / "capture.bin", tmp_path / "eth.pcap"
    capture.write_bytes(content)
    assert main(["decode", str(capture), "-o", str(output)]) == CaptureError.exit_code != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"eembridge: error: {capture}: ") and message in captured.err
    assert not output.exists()


def test_missing_capture_and_overwriting_it(tmp_path, capsys):
    capture = tmp_path / "usb.pcap"
    assert main(["decode", str(capture), "-o", str(tmp_path / "eth.pcap")]) != 0
    assert "No such file or directory" in capsys.readouterr().err
    write(capture, in_transfers(make_frames(random.Random(17), IN_SOURCE, 2)))
    assert main(["decode", str(capture), "-o", str(capture)]) != 0
    assert "would overwrite the capture" in capsys.readouterr().err
    assert capture.stat().st_size > 24


# -- as a user runs it ----------------------------------------------------------------


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", "decode", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=dict(os.environ))


def test_subprocess_decode_reads_in_tcpdump(tmp_path):
    rng = random.Random(18)
    sent_in, sent_out = make_frames(rng, IN_SOURCE, 25), make_frames(rng, OUT_SOURCE, 25)
    capture, output = tmp_path / "usb.pcap", tmp_path / "eth.pcap"
    write(capture, interleave(rng, in_transfers(sent_in), out_transfers(sent_out)), in_flight=4)
    result = run_module(str(capture), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert f"{output}: 50 frames (IN 25, OUT 25)" in result.stdout
    assert "device    1:2: bulk IN 0x81, bulk OUT 0x02" in result.stdout
    lines = tcpdump_lines(output)
    assert len(lines) == 50
    assert all("02:00:00:00:00:0a > 02:00:00:00:00:01" in line or "02:00:00:00:00:0b > 02:00:00:00:00:01" in line
               for line in tcpdump_lines_with_macs(output))
    bad = tmp_path / "random.bin"
    bad.write_bytes(random.Random(19).randbytes(100))
    result = run_module(str(bad), "-o", str(tmp_path / "x.pcap"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "not a pcap or pcapng file" in result.stderr


def tcpdump_lines_with_macs(path: Path) -> list[str]:
    result = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-e"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# -- memory ---------------------------------------------------------------------------


def big_capture(path: Path, transfers: int) -> None:
    """Many small transfers each way: records, not bytes, are what could pile up."""
    rng = random.Random(20)
    frame_in = make_frames(rng, IN_SOURCE, 1, largest=40)
    frame_out = make_frames(rng, OUT_SOURCE, 1, largest=40)
    t_in, t_out = in_transfers(frame_in)[0], out_transfers(frame_out)[0]
    with open(path, "wb") as stream:
        writer = UsbmonWriter(stream, in_flight=8)
        for _ in range(transfers):
            writer.write(t_in)
            writer.write(t_out)
        writer.close()


def test_memory_does_not_grow_with_the_capture(tmp_path):
    peaks = {}
    for transfers in (600, 2400):
        capture, output = tmp_path / f"usb{transfers}.pcap", tmp_path / f"eth{transfers}.pcap"
        big_capture(capture, transfers)
        tracemalloc.start()
        summary = decode_capture(str(capture), str(output))
        _, peaks[transfers] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert summary["frames_written"] == 2 * transfers
        assert summary["records"] == 4 * transfers
    assert peaks[2400] < 4_000_000, peaks  # the two 1 MiB file buffers and little else
    assert peaks[2400] - peaks[600] < 64_000, peaks  # 7200 more records: under 9 bytes each
