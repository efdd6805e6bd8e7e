"""The TAP offload: TCP segmentation and checksum completion (eembridge/core/offload.py is the
specification; the C twin in eembridge/_fast/offload.pxd must give the same bytes on every input).

The frames are checked on their own terms too: every IP and TCP checksum verifies, the
payloads put back together are the original, sequence numbers and flags are what the
kernel's own segmentation would give.
"""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge._fast.datapath import segment as c_segment
from eembridge.core import offload
from eembridge.core.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    OffloadError,
    ones_sum,
    segment,
    vnet_header,
)

MAC = bytes.fromhex("02eeb0000001" "02eeb0000002")


def tcp_packet(payload: bytes, v6: bool = False, flags: int = 0x18, seq: int = 1000,
               ip_id: int = 7, options: bytes = b"", vlan: bool = False) -> bytes:
    """An Ethernet/IP/TCP packet as the kernel hands a TSO device: checksum field holding
    the pseudo-header sum (CHECKSUM_PARTIAL), IP lengths of the whole packet."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 55, (5 + len(options) // 4) << 4, flags,
                      502, 0, 0) + options
    tcp_length = len(tcp) + len(payload)
    if v6:
        src, dst = bytes.fromhex("fe80" + "00" * 13 + "01"), bytes.fromhex("fe80" + "00" * 13 + "02")
        ip = struct.pack("!IHBB", 0x60000000, tcp_length, 6, 64) + src + dst
        pseudo = ones_sum(src + dst + struct.pack("!IxxxB", tcp_length, 6))
        ethertype = 0x86DD
    else:
        src, dst = bytes([169, 254, 7, 1]), bytes([169, 254, 7, 2])
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + tcp_length, ip_id, 0x4000, 64, 6, 0) + src + dst
        ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
        pseudo = ones_sum(src + dst + struct.pack("!xBH", 6, tcp_length))
        ethertype = 0x0800
    tcp = tcp[:16] + struct.pack("!H", pseudo) + tcp[18:]
    eth = MAC + (struct.pack("!HH", 0x8100, 5) if vlan else b"") + struct.pack("!H", ethertype)
    return eth + ip + tcp + payload


def check_frames(frames, packet, mss, v6, vlan=False):
    l3 = 18 if vlan else 14
    l4 = l3 + (40 if v6 else 20)
    end = l4 + (packet[l4 + 12] >> 4) * 4
    seq0 = struct.unpack_from("!I", packet, l4 + 4)[0]
    payload = b""
    for i, frame in enumerate(frames):
        assert len(frame) <= end + mss
        if v6:
            assert struct.unpack_from("!H", frame, l3 + 4)[0] == len(frame) - l4
            pseudo = ones_sum(frame[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", len(frame) - l4, 6))
        else:
            assert struct.unpack_from("!H", frame, l3 + 2)[0] == len(frame) - l3
            assert ones_sum(frame[l3:l4]) == 0xFFFF  # the IP header checksum verifies
            assert struct.unpack_from("!H", frame, l3 + 4)[0] == (7 + i) & 0xFFFF
            pseudo = ones_sum(frame[l3 + 12 : l3 + 20] + struct.pack("!xBH", 6, len(frame) - l4))
        assert ones_sum(frame[l4:], pseudo) == 0xFFFF  # the TCP checksum verifies
        assert struct.unpack_from("!I", frame, l4 + 4)[0] == (seq0 + len(payload)) & 0xFFFFFFFF
        flags = frame[l4 + 13]
        if i != len(frames) - 1:
            assert not flags & 0x09  # FIN and PSH only on the last
        if i:
            assert not flags & 0x80  # CWR only on the first
        payload += frame[end:]
    assert payload == packet[end:]


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=9000), mss=st.integers(1, 1460), v6=st.booleans(),
       flags=st.sampled_from([0x10, 0x18, 0x19, 0x98]), seq=st.integers(0, 2**32 - 1),
       options=st.sampled_from([b"", bytes.fromhex("0101080a0000000100000002")]),
       vlan=st.booleans())
def test_segments_are_valid_tcp_and_the_c_twin_agrees(payload, mss, v6, flags, seq, options, vlan):
    packet = tcp_packet(payload, v6=v6, flags=flags, seq=seq, options=options, vlan=vlan)
    header = vnet_header(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, 0, mss)
    frames = segment(header, packet)
    assert c_segment(header, packet) == frames
    check_frames(frames, packet, mss, v6, vlan)
    assert len(frames) == max(1, -(-len(payload) // mss))


@settings(max_examples=200, deadline=None)
@given(header=st.binary(min_size=10, max_size=10), packet=st.binary(max_size=300))
def test_any_header_on_any_bytes_gives_the_same_answer_or_the_same_refusal(header, packet):
    """Garbage in: both refuse it, or both give the same frames; neither crashes."""
    try:
        expected = segment(header, packet)
    except OffloadError:
        with pytest.raises(OffloadError):
            c_segment(header, packet)
        return
    assert c_segment(header, packet) == expected


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), start=st.integers(0, 3100),
       offset=st.integers(0, 20).map(lambda half: 2 * half))  # TCP: 16, UDP: 6
def test_partial_checksums_are_completed_alike(data, start, offset):
    header = vnet_header(F_NEEDS_CSUM, 0, 0, 0, start, offset)
    if start >= len(data) or start + offset + 2 > len(data):
        with pytest.raises(OffloadError):
            segment(header, data)
        with pytest.raises(OffloadError):
            c_segment(header, data)
        return
    (frame,) = segment(header, data)
    assert c_segment(header, data) == [frame]
    # What the field held (the pseudo-header sum, for TCP and UDP) is what a receiver adds
    # back; with it, the sum over the covered bytes verifies.
    held = struct.unpack_from("!H", data, start + offset)[0]
    assert ones_sum(frame[start:], held) == 0xFFFF


def test_a_udp_checksum_left_partial_is_completed():
    payload = b"hello"
    src, dst = bytes([169, 254, 7, 1]), bytes([169, 254, 7, 2])
    udp_length = 8 + len(payload)
    pseudo = ones_sum(src + dst + struct.pack("!xBH", 17, udp_length))
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + udp_length, 1, 0, 64, 17, 0) + src + dst
    packet = MAC + b"\x08\x00" + ip + struct.pack("!HHHH", 1, 2, udp_length, pseudo) + payload
    (frame,) = c_segment(vnet_header(F_NEEDS_CSUM, 0, 0, 0, 34, 6), packet)
    assert ones_sum(frame[34:], ones_sum(src + dst + struct.pack("!xBH", 17, udp_length))) == 0xFFFF
    assert frame[:34] == packet[:34] and frame[42:] == payload


def test_what_was_not_offered_is_refused():
    packet = tcp_packet(b"x" * 3000)
    with pytest.raises(OffloadError):  # UDP fragmentation offload
        c_segment(vnet_header(0, 3, 0, 1000), packet)
    with pytest.raises(OffloadError):  # TCPv6 type on an IPv4 packet
        c_segment(vnet_header(0, GSO_TCPV6, 0, 1000), packet)
    with pytest.raises(OffloadError):
        c_segment(vnet_header(0, GSO_TCPV4, 0, 0), packet)
    assert offload.TUN_OFFLOADS == 0x07


# --- the data path with offload, on a socket pair standing in for the TAP -------------
# A SOCK_SEQPACKET pair keeps message boundaries as a TAP does: one message per frame
# (or per merged packet), each led by its virtio_net_hdr.

from eembridge._fast.datapath import RxPath, TxPath  # noqa: E402
from eembridge._fast.eem import Deframer, Framer  # noqa: E402
from eembridge.core import codec  # noqa: E402


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
    return a, b


def _drain(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


def _deliver(frames, max_packet=512):
    """frames -> EEM transfers -> RxPath(vnet) -> what the kernel would read."""
    bridge_end, kernel_end = _pair()
    try:
        rx = RxPath(Deframer(), bridge_end.fileno(), 3, 65536, vnet=True)
        transfers = codec.Framer(crc=True, max_packet=max_packet, max_transfer=65536).pack(frames)
        for sequence, transfer in enumerate(transfers):
            rx.slot_buffer(sequence)[: len(transfer)] = transfer
            rx.complete(sequence, len(transfer), True)
        return [(m[:10], m[10:]) for m in _drain(kernel_end)], rx.counters()
    finally:
        bridge_end.close()
        kernel_end.close()


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=1, max_size=20000), mss=st.integers(200, 1460),
       v6=st.booleans(), last_flags=st.sampled_from([0x10, 0x18]),
       options=st.sampled_from([b"", bytes.fromhex("0101080a0000000100000002")]))
def test_merged_segments_cut_again_give_the_same_frames(payload, mss, v6, last_flags, options):
    """GRO then GSO is the identity: what the bridge merges on the way up, the kernel
    could cut back into exactly the frames the device sent."""
    packet = tcp_packet(payload, v6=v6, flags=last_flags, options=options)
    frames = segment(vnet_header(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, 0, mss), packet)
    written, counters = _deliver(frames)
    again = []
    for header, merged in written:
        if header[1]:  # a GSO packet: its checksum is left partial, as the header says
            assert header[0] == F_NEEDS_CSUM
            again.extend(segment(header, merged))
        else:
            assert header == bytes(10)
            again.append(merged)
    assert again == frames
    assert counters["tap_frames_written"] == len(frames)
    assert counters["tap_bytes_written"] == sum(map(len, frames))
    if len(frames) > 1:
        assert counters["tap_gro_packets"] >= 1 and len(written) < len(frames)


def test_what_cannot_merge_goes_up_as_it_came_and_in_order():
    packet = tcp_packet(bytes(range(256)) * 40, flags=0x10)
    frames = segment(vnet_header(F_NEEDS_CSUM, GSO_TCPV4, 0, 1000), packet)  # 11 segments
    bad = bytearray(frames[4])
    bad[-1] ^= 0xFF  # a payload byte flipped: its checksum fails
    syn = tcp_packet(b"", flags=0x02)
    udp = MAC + b"\x08\x00" + bytes(60)
    sent = frames[:4] + [bytes(bad)] + frames[5:8] + [syn, udp] + frames[8:]
    written, counters = _deliver(sent)
    plain = [packet for header, packet in written if header == bytes(10)]
    assert bytes(bad) in plain and syn in plain and udp in plain
    again = []
    for header, merged in written:
        again.extend(segment(header, merged) if header[1] else [merged])
    assert again == sent  # nothing lost, nothing reordered, the bad one untouched
    assert counters["tap_frames_written"] == len(sent)


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=70000), mss=st.integers(500, 1460), v6=st.booleans())
def test_tx_path_reads_a_gso_packet_and_sends_its_frames(payload, mss, v6):
    """A TAP read of up to 64 KB, spilling past the transfer into scratch, comes out as
    the reference's frames, framed in OUT transfers."""
    payload = payload[: 65000]
    packet = tcp_packet(payload, v6=v6)
    header = vnet_header(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, 0, mss)
    bridge_end, kernel_end = _pair()
    try:
        framer = Framer(crc=True, max_packet=512, max_transfer=16384)
        tx = TxPath(framer, bridge_end.fileno(), 1 << 20, vnet=True)
        small = tcp_packet(b"ack", flags=0x10)  # a plain frame after it, checksum partial
        kernel_end.send(header + packet)
        kernel_end.send(vnet_header(F_NEEDS_CSUM, 0, 0, 0, 34, 16) + small)
        transfers = tx.fill()
        deframer = codec.Deframer()
        got = []
        for transfer in transfers:
            got.extend(e.data for e in deframer.feed(bytes(transfer.buffer), True))
        assert got == segment(header, packet) + segment(vnet_header(F_NEEDS_CSUM, 0, 0, 0, 34, 16), small)
        counters = tx.counters()
        assert counters["tap_gso_packets"] == 1 and counters["tap_gso_frames"] == len(got) - 1
        assert counters["tap_offload_errors"] == 0 and counters["tap_checksums"] == 1
    finally:
        bridge_end.close()
        kernel_end.close()
