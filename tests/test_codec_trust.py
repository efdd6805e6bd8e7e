"""False frames and the cost of garbage (codec.py: "Trust after garbage", "Cost of
garbage"), over both implementations: the plausibility rule, the device that ends every
transfer short, the CRC budget and their counters."""

from __future__ import annotations

import random
import struct

import pytest

from eembridge.core import codec as reference
from eembridge.core.events import Frame
from eembridge.core.protocol import CRC_BUDGET_PER_BYTE, CRC_CHECK_OVERHEAD

from conftest import load_codec
from eemstreams import HOST_MAC, data_packet, ethernet_frame, ipv4_header, transport_frame

OTHER_MAC = bytes.fromhex("020000000009")
SRC = bytes.fromhex("020000000002")


def eth(dst: bytes, ethertype: int, payload: bytes, pad: bool = True) -> bytes:
    frame = dst + SRC + struct.pack("!H", ethertype) + payload
    return frame + bytes(max(0, 60 - len(frame))) if pad else frame


def ipv4(payload_len: int) -> bytes:
    return ipv4_header(payload_len, 7) + bytes(range(payload_len % 256)) + bytes(
        max(0, payload_len - payload_len % 256))


def ipv6(payload_len: int, claimed: int | None = None) -> bytes:
    claimed = payload_len if claimed is None else claimed
    return struct.pack("!IHBB16s16s", 0x60000000, claimed, 17, 64, bytes(16), bytes(16)) + bytes(
        payload_len)


def arp(opcode: int = 1, hlen: int = 6) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, hlen, 4, opcode, SRC, bytes(4), bytes(6),
                       bytes(4))


def bad_checksum(header: bytes) -> bytes:
    return header[:10] + bytes([header[10] ^ 1]) + header[11:]


V4 = ipv4(100)
CASES = [
    # (name, frame, mac given to the deframer, plausible)
    ("IPv4 to us", eth(HOST_MAC, 0x0800, V4), HOST_MAC, True),
    ("IPv4, no MAC configured: any destination", eth(OTHER_MAC, 0x0800, V4), None, True),
    ("IPv4 to another unicast MAC", eth(OTHER_MAC, 0x0800, V4), HOST_MAC, False),
    ("IPv4 broadcast", eth(b"\xff" * 6, 0x0800, V4), HOST_MAC, True),
    ("IPv4 multicast", eth(bytes.fromhex("01005e000001"), 0x0800, V4), HOST_MAC, True),
    ("IPv4 padded to 60", eth(HOST_MAC, 0x0800, ipv4(8)), HOST_MAC, True),
    ("IPv4 padded, frame over 64", eth(HOST_MAC, 0x0800, ipv4(8) + bytes(40)), HOST_MAC, False),
    ("IPv4 bad header checksum", eth(HOST_MAC, 0x0800, bad_checksum(V4[:20]) + V4[20:]),
     HOST_MAC, False),
    ("IPv4 total length longer than the frame", eth(HOST_MAC, 0x0800, V4[:-1]), HOST_MAC, False),
    ("IPv4 IHL 4", eth(HOST_MAC, 0x0800, b"\x44" + V4[1:]), HOST_MAC, False),
    ("IPv4 version 5", eth(HOST_MAC, 0x0800, b"\x55" + V4[1:]), HOST_MAC, False),
    ("IPv4 header cut", eth(HOST_MAC, 0x0800, V4[:19], pad=False), HOST_MAC, False),
    ("802.1Q IPv4", eth(HOST_MAC, 0x8100, b"\x00\x05\x08\x00" + V4), HOST_MAC, True),
    ("802.1Q, tag cut", eth(HOST_MAC, 0x8100, b"\x00", pad=False), HOST_MAC, False),
    ("IPv6", eth(HOST_MAC, 0x86DD, ipv6(200)), HOST_MAC, True),
    ("IPv6 to multicast 33:33", eth(bytes.fromhex("333300000001"), 0x86DD, ipv6(8)), HOST_MAC, True),
    ("IPv6 payload length wrong", eth(HOST_MAC, 0x86DD, ipv6(200, 199)), HOST_MAC, False),
    ("IPv6 version 4", eth(HOST_MAC, 0x86DD, b"\x40" + ipv6(20)[1:]), HOST_MAC, False),
    ("ARP request", eth(b"\xff" * 6, 0x0806, arp(1)), HOST_MAC, True),
    ("ARP reply", eth(HOST_MAC, 0x0806, arp(2)), HOST_MAC, True),
    ("ARP unpadded (42 bytes)", eth(HOST_MAC, 0x0806, arp(2), pad=False), HOST_MAC, True),
    ("ARP opcode 3", eth(HOST_MAC, 0x0806, arp(3)), HOST_MAC, False),
    ("ARP hlen 8", eth(HOST_MAC, 0x0806, arp(1, 8)), HOST_MAC, False),
    ("ARP in a long frame", eth(HOST_MAC, 0x0806, arp(1) + bytes(100)), HOST_MAC, False),
    ("EtherType 0x89a9 (seen on f_eem at 5% loss)", eth(HOST_MAC, 0x89A9, bytes(30)), HOST_MAC,
     False),
    ("LLDP", eth(bytes.fromhex("0180c200000e"), 0x88CC, bytes(40)), HOST_MAC, False),
    ("too short for Ethernet", HOST_MAC + SRC, HOST_MAC, False),
]


@pytest.mark.parametrize("name,frame,mac,expected", CASES, ids=[c[0] for c in CASES])
def test_plausibility_rule(name, frame, mac, expected):
    assert reference.plausible(frame, mac) is expected
    assert load_codec("cython")._plausible_frame(frame, mac) is expected


SCANNABLE = [c for c in CASES if len(c[1]) >= 14]  # shorter ones are runts, never candidates


@pytest.mark.parametrize("name,frame,mac,expected", SCANNABLE, ids=[c[0] for c in SCANNABLE])
def test_the_rule_decides_scanned_sentinel_frames_only(codec, name, frame, mac, expected):
    """Found by scanning (after garbage), the frame goes up only if plausible; at a
    trusted boundary (the transfer start) it always does."""
    packet = data_packet(frame, False)
    deframer = codec.Deframer(mac=mac)
    events = deframer.feed(b"\xff\xff" + packet, True)  # a reserved command, then the packet
    assert events == ([Frame(frame, False)] if expected else [])
    assert deframer.counters()["implausible"] == (0 if expected else 1)
    trusted = codec.Deframer(mac=mac)
    if name in BROKEN_IP:  # no stack sends these: refused even at a trusted boundary
        assert trusted.feed(packet, True) == [] and trusted.counters()["spliced"] == 1
    else:
        assert trusted.feed(packet, True) == [Frame(frame, False)]


BROKEN_IP = {"IPv4 bad header checksum", "IPv4 total length longer than the frame", "IPv4 IHL 4",
             "IPv4 version 5", "IPv6 version 4"}


def false_frame_stream(seed: int) -> tuple[bytes, bytes]:
    """The tail of a packet whose start was lost, holding a header whose length reaches
    the sentinel of the next, real packet; then that packet. Returns (stream, frame)."""
    rng = random.Random(seed)
    frame = ethernet_frame(rng, 200)
    real = data_packet(frame, False)
    tail = bytearray(rng.randbytes(300))
    for i in range(len(tail) - 1):  # no accidental header in the tail
        if not tail[i + 1] & 0x80:
            tail[i + 1] |= 0x80
    at = 40
    length = len(tail) - at - 2 + len(real)
    tail[at : at + 2] = struct.pack("<H", length)
    return b"\xff\xff" + bytes(tail) + real, frame


def test_sentinel_false_frame_regression(codec):
    """Fails on the old rule: it delivered tail[42:] + the real packet as a frame."""
    stream, frame = false_frame_stream(3)
    deframer = codec.Deframer(mac=HOST_MAC)
    assert deframer.feed(stream, True) == [Frame(frame, False)]
    c = deframer.counters()
    assert c["implausible"] == 1 and c["resyncs"] == 1 and c["frames"] == 1


def lossy_sentinel_transfers(seed: int, frames: int, loss: float) -> tuple[list, set]:
    """Sentinel packets (UDP, TCP, ARP with right checksums) batched into 2 KB device
    transfers, 512-byte USB packets lost."""
    rng = random.Random(seed)
    sent, transfers = set(), []
    framer = reference.Framer(crc=False, max_transfer=2048, max_packet=512)
    pool = [transport_frame(rng, rng.choice([1400, 40, rng.randrange(20, 1441)]))
            for _ in range(frames)]
    sent.update(pool)
    pending = b""
    for transfer in framer.pack(pool):
        kept = b"".join(transfer[i : i + 512] for i in range(0, len(transfer), 512)
                        if rng.random() >= loss)
        pending += kept
        if kept and len(kept) % 512:  # the short packet arrived: the transfer ends
            transfers.append((pending, True))
            pending = b""
    transfers.append((pending, True))
    return transfers, sent


def test_lossy_sentinel_stream_delivers_only_frames_sent(codec):
    """Seeded loss of 512-byte packets (5%): the old rule delivered frames never sent."""
    transfers, sent = lossy_sentinel_transfers(0, 1200, 0.05)
    deframer = codec.Deframer(mac=HOST_MAC)
    delivered = [e.data for t, short in transfers for e in deframer.feed(t, short)
                 if isinstance(e, Frame)]
    assert not [f for f in delivered if f not in sent]
    assert len(delivered) > 900  # and loss costs only the frames it hit, about


def one_packet_transfers(count: int, crc: bool) -> list[bytes]:
    rng = random.Random(5)
    return [data_packet(ethernet_frame(rng, 100), crc) for _ in range(count)]


@pytest.mark.parametrize("crc", [True, False])
def test_a_device_that_ends_every_transfer_short_is_still_scanned(codec, crc):
    """When loss takes the short packet that ends a device's transfer, the host's
    transfer runs on into the next one: after a long run of short transfers, a damaged
    packet at a transfer start is still scanned past, and the frame behind it found.
    (A rule that skipped such a transfer unscanned lost these frames: removed.)"""
    packets = one_packet_transfers(40, crc)
    broken = bytearray(packets[1])
    broken[-1] ^= 1  # its check fails: a data packet damaged (by loss, say)
    damaged = bytes(broken) + packets[-1]
    deframer = codec.Deframer()
    for packet in packets[:-2]:
        assert deframer.feed(packet, True) == [Frame(packet[2:-4], crc)]
    assert deframer.feed(damaged, True) == [Frame(packets[-1][2:-4], crc)]
    c = deframer.counters()
    assert c["resyncs"] == 1 and c["bytes_skipped"] == len(broken)
    assert deframer.feed(packets[0], True) == [Frame(packets[0][2:-4], crc)]  # in sync


def plausible_crc_packet(length: int) -> bytes:
    frame = eth(bytes.fromhex("01005e000001"), 0x0800, ipv4(length - 4 - 14 - 20), pad=False)
    return data_packet(frame, True)


HOSTILE = {
    "F2 45": b"\xf2\x45" * 20000,
    "12 40": b"\x12\x40" * 20000,
    "plausible, CRC wrong": (plausible_crc_packet(1522)[:-4] + b"\0\0\0\0") * 30,
}


@pytest.mark.parametrize("pattern", HOSTILE, ids=list(HOSTILE))
def test_failed_crc_work_is_bounded(monkeypatch, pattern):
    """The reference's CRC work on hostile garbage is at most the budget's bound (the
    old rule ran 760 bytes of CRC per byte of F2 45); a real packet after the garbage is
    still found."""
    work = [0]
    check_ok = reference.check_ok

    def counting(packet, crc):
        work[0] += len(packet) + CRC_CHECK_OVERHEAD if crc else 0
        return check_ok(packet, crc)

    monkeypatch.setattr(reference, "check_ok", counting)
    real = plausible_crc_packet(600)
    stream = HOSTILE[pattern] + real
    deframer = reference.Deframer()
    events = []
    for i in range(0, len(stream), 4096):
        events += deframer.feed(stream[i : i + 4096], False)
    events += deframer.feed(b"", True)
    cap = 2 * (deframer.max_length + CRC_CHECK_OVERHEAD)
    assert work[0] <= cap + CRC_BUDGET_PER_BYTE * len(stream) + len(real) + CRC_CHECK_OVERHEAD
    assert deframer.counters()["unchecked"] > 0
    if pattern != "plausible, CRC wrong":  # implausible garbage leaves the reserve
        assert events == [Frame(real[2:-4], True)]


def test_real_crc_packets_after_random_garbage_are_found(codec):
    """The budget never refuses a plausible packet after garbage that is not itself
    plausible: random bytes between real packets, each packet found."""
    rng = random.Random(9)
    packets = [plausible_crc_packet(rng.randrange(100, 1522)) for _ in range(30)]
    stream = b"".join(rng.randbytes(rng.randrange(0, 5000)) + p for p in packets)
    deframer = codec.Deframer()
    events = [e for i in range(0, len(stream), 512)
              for e in deframer.feed(stream[i : i + 512], False)]
    events += deframer.feed(b"", True)
    assert [e.data for e in events] == [p[2:-4] for p in packets]
    assert deframer.counters()["unchecked"] > 0


def test_mac_is_validated_alike(codec):
    for bad in (b"12345", "02:00:00:00:00:01", 5):
        with pytest.raises(ValueError, match="mac"):
            codec.Deframer(mac=bad)
    deframer = codec.Deframer()
    assert deframer.mac is None
    deframer.mac = bytearray(HOST_MAC)
    assert deframer.mac == HOST_MAC
    deframer.mac = None
    assert deframer.mac is None


def test_crc_checks_in_sync_take_no_budget_when_they_pass(codec):
    """A clean CRC stream never runs short of budget, whatever the frame sizes."""
    rng = random.Random(4)
    packets = b"".join(data_packet(ethernet_frame(rng, rng.randrange(0, 1501)), True)
                       for _ in range(300))
    deframer = codec.Deframer(max_length=1522)
    events = deframer.feed(packets, True)
    assert len(events) == 300 and deframer.counters()["unchecked"] == 0
    assert deframer.budget == 2 * (1522 + CRC_CHECK_OVERHEAD)
