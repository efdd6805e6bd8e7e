"""core.egress, the user link's policy without --nat (sans-IO), and the C fast path that
passes a transfer's TCP segments without asking it (eembridge._fast.slirp.established_tcp):
whatever the fast path passes, the policy must pass too."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge._fast.slirp import established_tcp
from eembridge.core.egress import Egress
from eembridge.core.offload import ones_sum

BOARD_MAC, GATEWAY_MAC = bytes.fromhex("020000000001"), bytes.fromhex("52550a000202")
BOARD, GATEWAY, ELSEWHERE = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), bytes([192, 0, 2, 9])


def ipv4(protocol: int, l4: bytes, source: bytes = BOARD, destination: bytes = GATEWAY,
         fragment: int = 0x4000) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, fragment, 64,
                                   protocol, 0, source, destination))
    struct.pack_into("!H", header, 10, ~ones_sum(header) & 0xFFFF)
    return GATEWAY_MAC + BOARD_MAC + b"\x08\x00" + bytes(header) + l4


def tcp(flags: int, source_port: int = 40000, destination_port: int = 22) -> bytes:
    return struct.pack("!HHIIBBHHH", source_port, destination_port, 1000, 0, 5 << 4, flags,
                       65535, 0, 0)


def udp(source_port: int, destination_port: int) -> bytes:
    return struct.pack("!HHHH", source_port, destination_port, 8, 0)


def test_a_syn_is_refused_with_a_reset_that_checks():
    egress = Egress(nat=False)
    passed, replies = egress.check(ipv4(6, tcp(0x02)))
    assert not passed and len(replies) == 1
    reset = replies[0]
    assert reset[:6] == BOARD_MAC and reset[26:30] == GATEWAY and reset[30:34] == BOARD
    assert ones_sum(reset[14:34]) == 0xFFFF  # the IPv4 header's checksum holds
    segment = reset[34:]
    pseudo = GATEWAY + BOARD + struct.pack("!xBH", 6, len(segment))
    assert ones_sum(segment, ones_sum(pseudo)) == 0xFFFF
    assert segment[13] == 0x14 and struct.unpack_from("!I", segment, 8)[0] == 1001  # RST|ACK
    assert egress.counters()["refused_tcp"] == egress.counters()["resets_sent"] == 1


def test_established_tcp_dhcp_and_a_forwards_replies_pass():
    egress = Egress(nat=False, udp_reply_ports=[53], gateway=GATEWAY)
    assert egress.check(ipv4(6, tcp(0x10)))[0]
    assert egress.check(ipv4(17, udp(68, 67), source=bytes(4), destination=b"\xff" * 4))[0]
    assert egress.check(ipv4(17, udp(53, 40000)))[0]
    assert not any(egress.counters().values())


def test_udp_elsewhere_or_from_another_port_is_refused_and_counted():
    egress = Egress(nat=False, udp_reply_ports=[53], gateway=GATEWAY)
    assert not egress.check(ipv4(17, udp(53, 40000), destination=ELSEWHERE))[0]
    assert not egress.check(ipv4(17, udp(5353, 40000)))[0]
    assert egress.counters()["refused_udp"] == 2


def test_with_nat_everything_passes_uncounted():
    egress = Egress(nat=True)
    assert egress.check(ipv4(6, tcp(0x02), destination=ELSEWHERE)) == (True, [])
    assert not any(egress.counters().values())


def test_the_fast_path_passes_a_transfers_segments_and_leaves_the_rest_to_the_policy():
    assert established_tcp(ipv4(6, tcp(0x10)))
    assert established_tcp(ipv4(6, tcp(0x12)))  # SYN|ACK: the board answering a forward
    for frame in (ipv4(6, tcp(0x02)), ipv4(17, udp(68, 67)), ipv4(6, tcp(0x10), fragment=0x2000),
                  b"", b"\x00" * 13):
        assert not established_tcp(frame)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"\x08\x00", b"\x86\xdd"]),
       st.integers(0, 255))
def test_what_the_fast_path_passes_the_policy_passes(tail, ethertype, first):
    frame = GATEWAY_MAC + BOARD_MAC + ethertype + bytes([first]) + tail
    if established_tcp(frame):
        assert Egress(nat=False).check(frame)[0], frame.hex()


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(min_size=0, max_size=40))
def test_the_fast_path_on_well_formed_tcp_agrees_with_the_policy(flags, fragment, options):
    frame = ipv4(6, tcp(flags) + options, fragment=fragment)
    if established_tcp(frame):
        assert Egress(nat=False).check(frame)[0]
