"""The TUN link's C fast path (eembridge._fast.tunlink) against the Translator alone.

The Translator (eembridge.core.l3) is the specification. Random sequences of device
frames, host packets, clock steps and torn snapshot reads go (a) through a Translator
alone and (b) through the C fast path with a Translator as its slow path, driven
synchronously as the TUN link's pump drives it (link/tun.py: handed_over, publish after
every change); the packets to the TUN, the frames to the device and the counters must be
the same after every step,
and so must the Translators' state. The TUN is a SEQPACKET socketpair here (one packet per
datagram, as a TUN's reads and writes).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eembridge.core import dhcp as dhcp_module
from eembridge.core import l3
from eembridge.core.l3 import Translator
from eembridge.link.pump import frame_socketpair
from eembridge.link.tun import handed_over, merged_counters

try:
    from eembridge._fast.tunlink import TunFast
except ImportError as exc:  # a missing facility is a failure, not a skip
    pytest.fail(f"eembridge._fast.tunlink is not built ({exc}): python3 setup.py build_ext "
                "--inplace", allow_module_level=True)

HOST_MAC = bytes.fromhex("02aabbccddee")
BOARD_MAC = bytes.fromhex("525400123456")
OTHER_MAC = bytes.fromhex("525400abcdef")
# Weighted towards what makes state: the board's frames to the host, its addresses.
MACS = [HOST_MAC, HOST_MAC, HOST_MAC, BOARD_MAC, OTHER_MAC, l3.BROADCAST, bytes.fromhex("333300000001"),
        bytes.fromhex("01005e0000fb"), bytes.fromhex("02aabbccddef")]
SOURCE_MACS = [BOARD_MAC, BOARD_MAC, BOARD_MAC, OTHER_MAC, bytes.fromhex("333300000001"), HOST_MAC]
HOST_LL = str(l3.link_local(HOST_MAC))
ADDRESSES = ["10.0.0.1/24", "2001:db8::1/64"]
IPS4 = ["10.0.0.2", "10.0.0.2", "8.8.8.8", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.255", "10.0.0.0",
        "8.8.8.8", "169.254.1.1", "224.0.0.251", "239.1.2.3", "255.255.255.255", "0.0.0.0"]
IPS6 = ["2001:db8::2", "2001:db8::2", "2001:db8::1", "2001:db8::3", "fe80::1", "fe80::2", HOST_LL,
        "2001:db9::5", "ff02::1", "ff02::1:ff00:2", "::"]


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ipv4(source: str, destination: str, payload: bytes, proto: int = 17,
         fragment: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, fragment, 64, proto, 0) + \
        packed(source) + packed(destination) + payload


def ipv6(source: str, destination: str, payload: bytes, next_header: int = 17) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + packed(source) + \
        packed(destination) + payload


# --- what the device sends ---------------------------------------------------------------

payloads = st.binary(max_size=24)
udp68 = st.builds(lambda sport: struct.pack("!HHHH", sport, 68, 8, 0) + bytes(8),
                  st.sampled_from([67, 1234]))

ip4_packets = st.one_of(
    st.builds(ipv4, st.sampled_from(IPS4), st.sampled_from(IPS4), payloads,
              st.sampled_from([17, 6, 1])),
    st.builds(lambda s, d, p, frag: ipv4(s, d, p, 17, frag), st.sampled_from(IPS4),
              st.sampled_from(IPS4), udp68, st.sampled_from([0, 0x2000, 0x4000])),
)
ip6_packets = st.builds(ipv6, st.sampled_from(IPS6), st.sampled_from(IPS6), payloads,
                        st.sampled_from([17, 6, 58]))


def _ndp(kind: int, source: str, destination: str, target: str, option_mac: bytes,
         hop_limit: int) -> bytes:
    flags = 0x60 if kind == l3.NDP_NA else 0
    option = l3.OPT_TLLA if kind == l3.NDP_NA else l3.OPT_SLLA
    packet = bytearray(l3.ndp_packet(packed(source), packed(destination), kind, flags,
                                     packed(target), option, option_mac))
    packet[7] = hop_limit
    return bytes(packet)


ndp_packets = st.builds(_ndp, st.sampled_from([l3.NDP_NS, l3.NDP_NA]), st.sampled_from(IPS6),
                        st.sampled_from(["ff02::1:ff00:2", HOST_LL, "ff02::1"]),
                        st.sampled_from(IPS6), st.sampled_from(SOURCE_MACS),
                        st.sampled_from([255, 255, 64]))


def _arp(op: int, sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    return l3.arp_packet(op, sender_mac, packed(sender_ip), bytes(6), packed(target_ip))


arp_packets = st.builds(_arp, st.sampled_from([1, 2, 3]), st.sampled_from(SOURCE_MACS),
                        st.sampled_from(IPS4), st.sampled_from(IPS4))


def _frame(destination: bytes, source: bytes, ethertype: int, payload: bytes, pad: int,
           cut: int | None) -> bytes:
    frame = destination + source + struct.pack("!H", ethertype) + payload + bytes(pad)
    return frame if cut is None else frame[:cut]


uncut = st.none() | st.none() | st.none()  # most frames whole
frames = st.one_of(
    st.builds(_frame, st.sampled_from(MACS), st.sampled_from(SOURCE_MACS), st.just(0x0800),
              ip4_packets, st.sampled_from([0, 0, 6]), uncut | st.integers(0, 40)),
    st.builds(_frame, st.sampled_from(MACS), st.sampled_from(SOURCE_MACS), st.just(0x86DD),
              ip6_packets | ndp_packets, st.sampled_from([0, 0, 3]),
              uncut | st.integers(0, 60)),
    st.builds(_frame, st.sampled_from(MACS), st.sampled_from(SOURCE_MACS), st.just(0x0806),
              arp_packets, st.just(18), uncut | st.integers(10, 45)),
    st.builds(_frame, st.sampled_from(MACS), st.sampled_from(SOURCE_MACS),
              st.sampled_from([0x8100, 0x88B5, 0x0800, 0x86DD, 0x0042]), payloads,
              st.just(0), st.none()),
    st.binary(max_size=20),
)

# --- what the host sends -----------------------------------------------------------------

host_packets = st.one_of(
    st.builds(ipv4, st.sampled_from(["10.0.0.1", "169.254.9.9"]), st.sampled_from(IPS4),
              payloads),
    st.builds(ipv4, st.just("10.0.0.1"), st.sampled_from(["10.0.0.2", "10.0.0.3"]), payloads),
    st.builds(ipv6, st.sampled_from(["2001:db8::1", HOST_LL]), st.sampled_from(IPS6), payloads),
    st.binary(max_size=45),
)

# The board (or another) announcing itself: a neighbour learned for sure.
announcements = st.builds(lambda mac, sender: _frame(l3.BROADCAST, mac, 0x0806,
                                                     _arp(1, mac, sender, "10.0.0.1"), 18, None),
                          st.sampled_from([BOARD_MAC, OTHER_MAC]),
                          st.sampled_from(["10.0.0.2", "10.0.0.3"]))

steps = st.lists(st.one_of(
    st.tuples(st.just("device"), frames),
    st.tuples(st.just("device"), announcements),
    st.tuples(st.just("host"), host_packets),
    st.tuples(st.just("host"), st.builds(ipv4, st.just("10.0.0.1"), st.just("10.0.0.2"), payloads)),
    st.tuples(st.just("time"), st.sampled_from([0.0005, 0.3, 1.0, 1.5, 4.0, 30.0])),
    # Time passing with no tick: the pump's tick and C's reads are not in step.
    st.tuples(st.just("wait"), st.sampled_from([1.0, 6.0])),
    st.tuples(st.just("tear"), st.none()),
), min_size=5, max_size=60)


def make_translator(fixed_peer: bool, static: bool, small: bool) -> Translator:
    options = dict(table_size=2, hold=2, max_pending=2) if small else {}
    # Neighbours age within a few steps of time.
    t = Translator(HOST_MAC, peer_mac=BOARD_MAC if fixed_peer else None, max_age=5.0, **options)
    t.set_host_addresses(ADDRESSES)
    if static:
        t.add_static("10.0.0.4", OTHER_MAC)
    return t


class Reference:
    """The specification: the Translator alone, as the pump ran it before."""

    def __init__(self, translator: Translator, dhcp: bool) -> None:
        self.t = translator
        self.dhcp = dhcp

    def device(self, frame: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        packet, replies = self.t.from_device(frame, now)
        return _to_tun(packet, self.dhcp), list(replies)

    def host(self, packet: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        return [], self.t.from_host(packet, now)

    def time(self, now: float) -> tuple[list[bytes], list[bytes]]:
        return [], self.t.tick(now)

    def counters(self) -> dict[str, int]:
        return self.t.counters()


def _to_tun(packet, dhcp: bool) -> list[bytes]:
    """A packet for the TUN, unless the DHCP client takes it (as the pump's _carry)."""
    if packet is None or dhcp and dhcp_module.is_dhcp_reply(packet):
        return []
    return [bytes(packet)]


class Fast:
    """The C fast path with a Translator behind it, driven as the pump drives it."""

    def __init__(self, translator: Translator, dhcp: bool) -> None:
        self.t = translator
        self.dhcp = dhcp
        self.tun_c, self.tun_kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.tun_c, self.tun_kernel):
            end.setblocking(False)
        self.bridge_end, self.pump_end = frame_socketpair()
        self.chan_c, self.chan_py = frame_socketpair()
        self.epoll = select.epoll()
        self.epoll.register(self.bridge_end.fileno(), select.EPOLLIN)
        self.fast = TunFast(self.tun_c.fileno(), self.bridge_end.fileno(), self.chan_c.fileno(),
                            self.epoll.fileno())
        self.publish()

    def close(self) -> None:
        for end in (self.tun_c, self.tun_kernel, self.bridge_end, self.pump_end, self.chan_c,
                    self.chan_py, self.epoll):
            end.close()

    def publish(self) -> None:
        self.fast.publish(**self.t.decisive_state(), dhcp=self.dhcp, tun_open=True)

    def pump(self) -> list[bytes]:
        """What the pump does with the channel; the packets it writes to the TUN."""
        written = []
        while True:
            try:
                message = self.chan_py.recv(4096)
            except BlockingIOError:
                break
            packet, replies = handed_over(self.t, memoryview(message))
            written += _to_tun(packet, self.dhcp)
            for frame in replies:
                self.pump_end.send(frame)
        self.publish()
        return written

    def fill(self, now: float) -> list[bytes]:
        out = []
        while True:
            frame, refused = self.fast.fill(now)
            if refused:
                self.pump()
            elif frame is None:
                return out
            else:
                out.append(frame)

    def tun_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun_kernel.recv(4096))
            except BlockingIOError:
                return out

    def device(self, frame: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        self.fast.deliver(frame, now)
        written = self.tun_packets() + self.pump()
        return written, self.fill(now)

    def host(self, packet: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        self.tun_kernel.send(packet)
        return [], self.fill(now)

    def time(self, now: float) -> tuple[list[bytes], list[bytes]]:
        for frame in self.t.tick(now):
            self.pump_end.send(frame)
        self.publish()
        return [], self.fill(now)

    def counters(self) -> dict[str, int]:
        merged = merged_counters(self.t.counters(), self.fast.counters())
        return {k: v for k, v in merged.items() if not k.startswith("fast_")}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, fixed_peer=st.booleans(), static=st.booleans(), small=st.booleans(),
       dhcp=st.booleans())
def test_the_fast_path_does_what_the_translator_does(steps, fixed_peer, static, small, dhcp):
    reference = Reference(make_translator(fixed_peer, static, small), dhcp)
    fast = Fast(make_translator(fixed_peer, static, small), dhcp)
    try:
        now = 1000.0
        for kind, value in steps:
            if kind == "time":
                now += value
                assert fast.time(now) == reference.time(now)
            elif kind == "wait":
                now += value
            elif kind == "tear":
                fast.fast.tear()  # published again by the pump's next turn
            else:
                now += 0.0001
                assert getattr(fast, kind)(value, now) == getattr(reference, kind)(value, now), \
                    (kind, value.hex())
            assert fast.counters() == reference.counters()
            # The same state too (neighbours and when they were confirmed, pending).
            assert fast.t.decisive_state() == reference.t.decisive_state()
        counters = fast.fast.counters()
        for name in ("notes", "slow_frames", "to_host_packets", "to_device_frames", "handoffs",
                     "torn"):
            event(f"{name} > 0: {counters[name] > 0}")
    finally:
        fast.close()


def _session(fast: Fast, now: float) -> None:
    """The board learned (ARP), then a TCP-like stream both ways."""
    fast.device(_frame(l3.BROADCAST, BOARD_MAC, 0x0806,
                       _arp(1, BOARD_MAC, "10.0.0.2", "10.0.0.1"), 18, None), now)
    for i in range(10):
        fast.device(_frame(HOST_MAC, BOARD_MAC, 0x0800, ipv4("10.0.0.2", "10.0.0.1", b"d" * 40,
                                                             6), 0, None), now + i * 0.25)
        fast.host(ipv4("10.0.0.1", "10.0.0.2", b"h" * 40, 6), now + i * 0.25)


def test_the_common_frames_take_the_fast_path():
    """Once the board is known, its packets both ways never reach the Translator."""
    fast = Fast(make_translator(False, False, False), dhcp=False)
    try:
        _session(fast, 1000.0)
        counters = fast.fast.counters()
        # The ARP request took the pump; the frames at 1.0 s and 2.0 s went to the TUN
        # from C and to the pump too, which confirmed the board's entry (CONFIRM_EVERY).
        assert counters["slow_frames"] == 1 and counters["notes"] == 2, counters
        assert counters["to_host_packets"] == 8 and counters["to_device_frames"] == 10, counters
        assert counters["handoffs"] == 0, counters
    finally:
        fast.close()


def test_a_torn_snapshot_sends_everything_to_the_translator():
    fast = Fast(make_translator(True, False, False), dhcp=False)
    try:
        fast.fast.tear()
        before = fast.fast.counters()
        frame = _frame(HOST_MAC, BOARD_MAC, 0x0800, ipv4("8.8.8.8", "10.0.0.1", b"x"), 0, None)
        fast.fast.deliver(frame, 1000.0)
        assert fast.fast.counters()["slow_frames"] == before["slow_frames"] + 1
        assert fast.pump() == [frame[14:]]  # the pump wrote it, and published anew
        fast.fast.deliver(frame, 1000.0)
        assert fast.tun_packets() == [frame[14:]]
    finally:
        fast.close()


def test_a_pump_that_hung_up_leaves_the_readiness_set():
    """EOF on the bridge's end (the pump died) takes it out of the epoll set, or the
    engine would find it readable forever and spin."""
    fast = Fast(make_translator(True, False, False), dhcp=False)
    try:
        fast.pump_end.shutdown(socket.SHUT_RDWR)
        assert fast.epoll.poll(0)
        assert fast.fast.fill(1000.0) == (None, False)
        assert fast.epoll.poll(0) == []
    finally:
        fast.close()


def test_a_neighbour_that_aged_is_not_used_before_the_pump_ticks():
    """The pump's tick forgets an aged entry; C, meanwhile, sees it aged by itself."""
    fast = Fast(make_translator(False, False, False), dhcp=False)
    reference = Reference(make_translator(False, False, False), dhcp=False)
    try:
        announcement = _frame(l3.BROADCAST, BOARD_MAC, 0x0806,
                              _arp(1, BOARD_MAC, "10.0.0.2", "10.0.0.1"), 18, None)
        for side in (fast, reference):
            side.device(announcement, 1000.0)
        packet = ipv4("10.0.0.1", "10.0.0.2", b"late")
        sent = fast.host(packet, 1006.0)
        assert sent == reference.host(packet, 1006.0)
        assert len(sent[1]) == 1 and sent[1][0][12:14] == b"\x08\x06"  # asked again (ARP)
        assert fast.fast.counters()["handoffs"] == 1
    finally:
        fast.close()


def test_a_tun_not_given_to_c_is_not_read():
    """Until the pump opens it (installed, no backlog), the TUN is the pump's alone."""
    fast = Fast(make_translator(True, False, False), dhcp=False)
    try:
        fast.fast.publish(**fast.t.decisive_state(), dhcp=False, tun_open=False)
        fast.tun_kernel.send(ipv4("10.0.0.1", "8.8.8.8", b"wait"))
        assert fast.fast.fill(1000.0) == (None, False)
        fast.publish()  # given to C
        frame, handed_off = fast.fast.fill(1000.0)
        assert frame is not None and frame[:6] == BOARD_MAC and not handed_off
    finally:
        fast.close()
