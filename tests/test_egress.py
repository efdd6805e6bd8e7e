"""core.egress, the user link's policy without --nat (sans-IO), and its C helpers in
eembridge._fast.slirp: established_tcp passes a transfer's TCP segments without asking the
policy (whatever it passes, the policy must pass too), and forwarded_datagram picks the
frames towards the board the policy learns UDP flows from (exactly those the policy
would learn from: a frame it missed would leave a forward's answers refused)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge._fast.slirp import established_tcp, forwarded_datagram
from eembridge.core.egress import UDP_FLOW_TIMEOUT, Egress
from eembridge.core.egress import forwarded_datagram as policy_forwarded_datagram
from eembridge.core.offload import ones_sum

BOARD_MAC, GATEWAY_MAC = bytes.fromhex("020000000001"), bytes.fromhex("52550a000202")
BOARD, GATEWAY, ELSEWHERE = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), bytes([192, 0, 2, 9])
FORWARDED, CLIENT = 53, 40000  # the board's forwarded UDP port, a host client's port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def to_board(client_port: int = CLIENT, board_port: int = FORWARDED,
             client: bytes = GATEWAY) -> bytes:
    """A forwarded client's datagram as slirp sends it to the board (addresses reversed)."""
    frame = ipv4(17, udp(client_port, board_port), source=client, destination=BOARD)
    return BOARD_MAC + GATEWAY_MAC + frame[12:]


def answer(client_port: int = CLIENT, board_port: int = FORWARDED,
           client: bytes = GATEWAY) -> bytes:
    """The board's datagram from board_port to client:client_port."""
    return ipv4(17, udp(board_port, client_port), destination=client)


def forwarding(**options) -> Egress:
    return Egress(nat=False, udp_forwards=[FORWARDED], **options)


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


def test_established_tcp_dhcp_and_the_answers_of_a_forwarded_flow_pass():
    egress = forwarding()
    assert egress.check(ipv4(6, tcp(0x10)))[0]
    assert egress.check(ipv4(17, udp(68, 67), source=bytes(4), destination=b"\xff" * 4))[0]
    egress.learn(to_board())
    egress.learn(to_board(client=bytes([127, 0, 0, 2])))  # slirp leaves 127.0.0.2 as it is
    assert egress.check(answer())[0] and egress.check(answer())[0]
    assert egress.check(answer(client=bytes([127, 0, 0, 2])))[0]
    counts = egress.counters()
    assert counts.pop("udp_flows_learned") == 2 and not any(counts.values()), counts


def test_udp_from_a_forwarded_port_to_no_flow_of_its_own_is_refused_and_counted():
    """What an unrestricted slirp would carry to the host's loopback at the named port."""
    egress = forwarding()
    assert not egress.check(answer())[0]  # before any client
    egress.learn(to_board())
    egress.learn(to_board(client_port=40001, board_port=5353))  # another, unforwarded port
    refused = [answer(client_port=40001), answer(client=ELSEWHERE), answer(board_port=5353),
               answer(client_port=40001, board_port=5353), ipv4(17, udp(5353, CLIENT)),
               ipv4(17, udp(FORWARDED, CLIENT), source=ELSEWHERE),  # not the board's address
               ipv4(17, udp(FORWARDED, CLIENT), fragment=0x2000)]
    for frame in refused:
        assert not egress.check(frame)[0], frame.hex()
    counts = egress.counters()
    # the first one, before any client, and all but the fragment
    assert counts["refused_udp"] == len(refused) and counts["refused_fragments"] == 1
    assert counts["udp_flows_learned"] == 1


def test_a_flow_expires_when_its_client_is_silent_whatever_the_board_sends():
    clock = Clock()
    egress = forwarding(clock=clock)
    egress.learn(to_board())
    clock.now += UDP_FLOW_TIMEOUT - 1
    assert egress.check(answer())[0]  # the board's answers do not refresh it
    clock.now += 1
    assert not egress.check(answer())[0]
    egress.learn(to_board())  # the client again: a new flow
    clock.now += UDP_FLOW_TIMEOUT - 1
    egress.learn(to_board())  # and a refresh
    clock.now += UDP_FLOW_TIMEOUT - 1
    assert egress.check(answer())[0]
    counts = egress.counters()
    assert (counts["udp_flows_learned"], counts["udp_flows_expired"], counts["refused_udp"]) \
        == (2, 1, 1)


def test_the_flows_are_bounded_the_least_recently_refreshed_goes():
    egress = forwarding(flow_limit=3)
    for port in (1, 2, 3):
        egress.learn(to_board(client_port=port))
    egress.learn(to_board(client_port=1))  # refreshed: 2 is now the oldest
    egress.learn(to_board(client_port=4))
    assert [egress.check(answer(client_port=port))[0] for port in (1, 2, 3, 4)] == \
        [True, False, True, True]
    counts = egress.counters()
    assert (counts["udp_flows_learned"], counts["udp_flows_evicted"]) == (4, 1)


def test_ipv6_udp_is_refused_forwards_being_ipv4():
    egress = forwarding()
    egress.learn(to_board())
    frame = (GATEWAY_MAC + BOARD_MAC + b"\x86\xdd" + struct.pack("!IHBB", 6 << 28, 8, 17, 64)
             + bytes(15) + b"\x0f" + bytes(15) + b"\x02" + udp(FORWARDED, CLIENT))
    assert not egress.check(frame)[0] and egress.counters()["refused_udp"] == 1
    assert policy_forwarded_datagram(frame, frozenset([CLIENT, FORWARDED])) is None


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


def test_the_frames_learnt_from_are_picked_alike():
    for frame in (to_board(), ipv4(17, udp(CLIENT, FORWARDED), fragment=0x2000 | 0x4000)):
        assert forwarded_datagram(frame, [FORWARDED])  # a first fragment carries the ports
    for frame in (to_board(board_port=5353), ipv4(17, udp(CLIENT, FORWARDED), fragment=1),
                  ipv4(6, tcp(0x10, destination_port=FORWARDED)), b"", b"\x00" * 13):
        assert not forwarded_datagram(frame, [FORWARDED])
        assert policy_forwarded_datagram(frame, frozenset([FORWARDED])) is None


PORTS = st.sampled_from([FORWARDED, 5353, 0, 0xFFFF])


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.just(0x45), st.integers(0x40, 0x4F), st.integers(0, 255)),
       st.one_of(st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x1FFF]), st.integers(0, 0xFFFF)),
       st.sampled_from([17, 17, 6, 0, 255]), PORTS, st.booleans(),
       st.frozensets(PORTS, max_size=3), st.sampled_from([b"\x08\x00", b"\x08\x00",
                                                          b"\x86\xdd", b"\x08\x06"]),
       st.one_of(st.none(), st.integers(0, 100)), st.binary(max_size=60))
def test_the_fast_path_picks_what_the_policy_learns_from(first, fragment, protocol, port,
                                                         forwarded, others, ethertype, cut,
                                                         tail):
    """A datagram's headers, any version, header length, fragment, protocol and port, cut
    anywhere; and any bytes after the first: the same verdict."""
    forwards = others | {port} if forwarded else others
    header = bytes([first, 0, 0, 28, 0, 1]) + struct.pack("!HBBH", fragment, 64, protocol, 0)
    options = bytes(max(0, (first & 0x0F) * 4 - 20))
    shaped = (BOARD_MAC + GATEWAY_MAC + ethertype + header + GATEWAY + BOARD + options
              + struct.pack("!HH", CLIENT, port) + tail)
    for frame in (shaped[:cut], BOARD_MAC + GATEWAY_MAC + ethertype + bytes([first]) + tail):
        assert forwarded_datagram(frame, forwards) == \
            (policy_forwarded_datagram(frame, forwards) is not None), frame.hex()


def test_the_fast_path_picks_alike_every_header_shape_cut_anywhere():
    """Exhaustive where the random test is thin: each header length, fragment, protocol
    and port around the verdict, at every length."""
    seen = set()
    for first in (0x45, 0x46, 0x44, 0x4F, 0x55, 0x65):
        for fragment in (0, 0x4000, 0x2000, 0x0001, 0x0100, 0x1FFF, 0x8000):
            for protocol, port in ((17, FORWARDED), (17, 5353), (6, FORWARDED)):
                header = bytes([first, 0, 0, 28, 0, 1]) + struct.pack("!HBBH", fragment, 64,
                                                                      protocol, 0)
                frame = (BOARD_MAC + GATEWAY_MAC + b"\x08\x00" + header + GATEWAY + BOARD
                         + bytes(max(0, (first & 0x0F) * 4 - 20))
                         + struct.pack("!HHHH", CLIENT, port, 8, 0))
                for cut in range(len(frame) + 1):
                    verdict = forwarded_datagram(frame[:cut], [FORWARDED])
                    assert verdict == (policy_forwarded_datagram(
                        frame[:cut], frozenset([FORWARDED])) is not None), frame[:cut].hex()
                    seen.add(verdict)
    assert seen == {True, False}


CLIENTS = st.sampled_from([40000, 40001, 40002])
STEPS = st.one_of(
    st.tuples(st.just("client"), CLIENTS, st.sampled_from([FORWARDED, 5353]),
              st.sampled_from([0, 0x2000, 0x0001])),
    st.tuples(st.just("board"), CLIENTS, st.sampled_from([FORWARDED, 5353]),
              st.sampled_from([GATEWAY, ELSEWHERE])),
    st.tuples(st.just("wait"), st.sampled_from([1.0, UDP_FLOW_TIMEOUT / 2, UDP_FLOW_TIMEOUT])))


@settings(max_examples=500, deadline=None)
@given(st.lists(STEPS, max_size=40))
def test_the_flow_state_through_the_fast_path_is_the_policys(steps):
    """The stack shows the policy only the frames forwarded_datagram picks; a policy shown
    every frame towards the board, and a plain model of the flows (a 4-tuple answered
    until its client has been silent UDP_FLOW_TIMEOUT; at most 2, the least recently
    refreshed going), decide every datagram of the board alike."""
    clock = Clock()
    picked, shown_all = forwarding(clock=clock, flow_limit=2), forwarding(clock=clock, flow_limit=2)
    model: dict[tuple[int, bytes], float] = {}  # (client port, address) -> last refresh
    for step in steps:
        if step[0] == "wait":
            clock.now += step[1]
        elif step[0] == "client":
            _, client_port, board_port, fragment = step
            frame = BOARD_MAC + GATEWAY_MAC + ipv4(17, udp(client_port, board_port),
                                                   source=GATEWAY, destination=BOARD,
                                                   fragment=fragment)[12:]
            if forwarded_datagram(frame, [FORWARDED]):
                picked.learn(frame)
            shown_all.learn(frame)
            if board_port == FORWARDED and not fragment & 0x1FFF:
                model = {flow: seen for flow, seen in model.items()
                         if clock.now - seen < UDP_FLOW_TIMEOUT}
                model.pop((client_port, GATEWAY), None)
                if len(model) == 2:
                    del model[min(model, key=model.__getitem__)]
                model[(client_port, GATEWAY)] = clock.now
        else:
            _, client_port, board_port, address = step
            frame = answer(client_port=client_port, board_port=board_port, client=address)
            seen = model.get((client_port, address))
            expected = (board_port == FORWARDED and seen is not None
                        and clock.now - seen < UDP_FLOW_TIMEOUT)
            assert picked.check(frame)[0] == shown_all.check(frame)[0] == expected, step
    assert picked.counters() == shown_all.counters()
