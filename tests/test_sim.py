"""The simulated EEM device, driven by a tiny host loop on eembridge's codec (no bridge).

Checks that the simulation behaves as USB does at packet granularity (short packets,
ZLPs, babble, stalls, busy endpoints, unplug) and that every injected fault is counted.
"""

from __future__ import annotations

import random
import select
import time
from collections.abc import Callable, Iterator

import pytest

from eembridge import Deframer, Framer
from eembridge.core.events import Echo, EchoResponse, Frame, Hint
from eembridge.core.protocol import CMD_ECHO, CMD_RESPONSE_HINT, CMD_TICKLE, command_header
from eembridge.core.transport import Completion, Direction, Status, TransportGone
from eembridge.sim import (
    FAULT_COUNTERS,
    EemFunction,
    Faults,
    QueueNetworkSide,
    SimDevice,
    SimTransport,
)

from eemstreams import data_packet, ethernet_frame

IN, OUT = Direction.IN, Direction.OUT
ERRORS = ("crc_errors", "sentinel_errors", "oversize", "runts", "truncated",
          "reserved_commands", "unconfirmed_commands", "bytes_skipped")


class Host:
    """A minimal host: IN buffers kept in flight, the EEM codec applied directly."""

    def __init__(self, transport: SimTransport, *, crc: bool = True, in_size: int = 16384,
                 in_flight: int = 4) -> None:
        self.transport = transport
        self.framer = Framer(crc=crc, max_packet=transport.info.max_packet)
        self.deframer = Deframer()
        self.in_size = in_size
        self.buffers: dict[int, bytearray | bytes] = {}
        self.events: list = []
        self.done: list[Completion] = []
        self._tag = 0
        for _ in range(in_flight):
            self.submit_in()

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def submit_in(self) -> int:
        tag = self._next_tag()
        buffer = self.buffers[tag] = bytearray(self.in_size)
        self.transport.submit_in(memoryview(buffer), tag)
        return tag

    def submit_out(self, transfer: bytes) -> int:
        tag = self._next_tag()
        self.buffers[tag] = transfer  # kept alive until it completes
        self.transport.submit_out(memoryview(transfer), tag)
        return tag

    def send(self, frames: list[bytes]) -> list[int]:
        return [self.submit_out(t) for t in self.framer.pack(frames)]

    def pump(self, timeout: float = 0.05) -> list[Completion]:
        select.select([self.transport.fileno()], [], [], timeout)
        completions = self.transport.completions()
        for c in completions:
            buffer = self.buffers.pop(c.tag)
            if c.direction is IN:
                self.events += self.deframer.feed(memoryview(buffer)[: c.actual], c.short)
                if c.status in (Status.COMPLETED, Status.TIMED_OUT, Status.OVERFLOW):
                    self.submit_in()
        self.done += completions
        return completions

    def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self.pump()
        return predicate()

    def settle(self, quiet: float = 0.25, limit: float = 5.0) -> None:
        """Pump until nothing completes for `quiet` seconds."""
        deadline = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() - last < quiet and time.monotonic() < deadline:
            if self.pump(0.02):
                last = time.monotonic()

    def frames(self) -> list[bytes]:
        return [bytes(e.data) for e in self.events if isinstance(e, Frame)]

    def of(self, direction: Direction) -> list[Completion]:
        return [c for c in self.done if c.direction is direction]


@pytest.fixture
def make_device() -> Iterator[Callable[..., tuple[SimDevice, QueueNetworkSide]]]:
    devices: list[SimDevice] = []

    def make(**kwargs) -> tuple[SimDevice, QueueNetworkSide]:
        net = QueueNetworkSide()
        devices.append(SimDevice(net, **kwargs))
        return devices[-1], net

    yield make
    for device in devices:
        device.close()


def frame_set(rng: random.Random, max_packet: int, count: int) -> list[bytes]:
    """Random sizes plus every size whose EEM packet is an exact multiple of max_packet."""
    exact = [k * max_packet - 6 for k in range(1, 30) if 14 <= k * max_packet - 6 <= 1514]
    sizes = exact + [14, 60, 1514] + [rng.randrange(14, 1515) for _ in range(count)]
    rng.shuffle(sizes)
    return [ethernet_frame(rng, n - 14) for n in sizes]


def is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


@pytest.mark.parametrize("max_packet", (64, 512, 1024))
@pytest.mark.parametrize("batch", (False, True))
@pytest.mark.parametrize("crc", (False, True))
@pytest.mark.parametrize("zlp", ("eem", "usb"))
def test_frames_both_ways_intact(make_device, max_packet, batch, crc, zlp):
    device, net = make_device(max_packet=max_packet, batch=batch, crc=crc, zlp=zlp)
    host = Host(device.connect(), crc=not crc)
    rng = random.Random(max_packet * 4 + batch * 2 + crc)
    down, up = frame_set(rng, max_packet, 40), frame_set(rng, max_packet, 40)
    net.send(*down)
    host.send(up)
    assert host.until(lambda: len(host.frames()) == len(down))
    assert net.received(len(up), timeout=5) == up
    assert host.frames() == down
    assert all(e.crc == crc for e in host.events if isinstance(e, Frame))
    counters = host.deframer.counters()
    assert all(counters[k] == 0 for k in ERRORS), counters
    device_counters = device.counters()
    assert all(device_counters["rx_" + k] == 0 for k in ERRORS), device_counters
    host.until(lambda: len(host.of(OUT)) == host.framer.counters()["transfers"])
    assert all(c.status is Status.COMPLETED and c.actual == c.requested for c in host.of(OUT))
    ins = [c for c in host.of(IN) if c.actual]
    if batch:
        assert len(ins) < len(down)  # packets share transfers and span them
    else:
        assert len(ins) == len(down)  # one EEM packet per transfer, each ending short
        assert all(c.short for c in ins)
    exact = sum((len(f) + 6) % max_packet == 0 for f in down)
    if not batch:
        assert device_counters["tx_zlps" if zlp == "eem" else "tx_usb_zlps"] == exact
    assert device.fault_counters() == dict.fromkeys(FAULT_COUNTERS, 0) | {
        "in_packets": device.fault_counters()["in_packets"],
        "out_packets": device.fault_counters()["out_packets"]}


@pytest.mark.parametrize("batch", (False, True))
def test_echo_both_ways(make_device, batch):
    device, net = make_device(max_packet=64, batch=batch)
    host = Host(device.connect())
    host.submit_out(host.framer.echo(b"ping from host"))
    assert host.until(lambda: EchoResponse(b"ping from host") in host.events)
    device.send_echo(b"ping from device")
    assert host.until(lambda: Echo(b"ping from device") in host.events)
    host.submit_out(host.framer.echo_response(b"ping from device"))
    deadline = time.monotonic() + 5
    answers: list[bytes] = []
    while not answers and time.monotonic() < deadline:
        host.pump(0.01)
        answers = device.echo_responses()
    assert answers == [b"ping from device"]
    assert device.fault_counters()["injected_echo"] == 1


@pytest.mark.parametrize("batch", (False, True))
@pytest.mark.parametrize("zlp, ends_at", (("usb", 128), ("eem", 130)))
def test_in_transfer_at_exact_multiple_ends_by_zlp_rule(make_device, batch, zlp, ends_at):
    device, net = make_device(max_packet=64, batch=batch, zlp=zlp)
    host = Host(device.connect(), in_size=4 * 64, in_flight=1)
    frame = ethernet_frame(random.Random(1), 128 - 6 - 14)  # EEM packet of exactly 128 bytes
    net.send(frame)
    assert host.until(lambda: host.of(IN))
    (c,) = host.of(IN)
    assert (c.status, c.actual, c.requested, c.short) == (Status.COMPLETED, ends_at, 256, True)
    assert host.frames() == [frame]


def test_in_without_zlp_rule_runs_into_the_next_packet(make_device):
    device, net = make_device(max_packet=64, zlp="none")
    host = Host(device.connect(), in_size=8 * 64, in_flight=1)
    rng = random.Random(2)
    first, second = ethernet_frame(rng, 128 - 6 - 14), ethernet_frame(rng, 46)
    net.send(first)
    host.settle(quiet=0.15)
    assert host.of(IN) == []  # the buggy device never ended the transfer
    net.send(second)
    assert host.until(lambda: host.of(IN))
    assert host.of(IN)[0].actual == 128 + len(second) + 6
    assert host.frames() == [first, second]


def test_out_transfer_at_exact_multiple_needs_an_end(make_device):
    device, net = make_device(max_packet=64)
    host = Host(device.connect(), in_flight=0)
    rng = random.Random(3)
    frame = ethernet_frame(rng, 128 - 6 - 14)
    raw = data_packet(frame, crc=True)
    assert len(raw) == 128
    host.submit_out(raw)  # no ZLP rule: the device cannot see this transfer end
    assert host.until(lambda: host.of(OUT))
    assert host.of(OUT)[0].status is Status.COMPLETED  # the device accepted the packets
    assert net.received(1, timeout=0.2) == []
    host.submit_out(b"")  # a USB ZLP ends it
    assert net.received(1, timeout=2) == [frame]
    # The framer's zero-length EEM packet does the same within the transfer.
    (transfer,) = host.framer.pack([frame])
    assert len(transfer) == 130 and host.framer.counters()["zlps"] == 1
    host.submit_out(transfer)
    assert net.received(1, timeout=2) == [frame]


def test_in_babble_is_overflow(make_device):
    device, net = make_device(max_packet=64)
    host = Host(device.connect(), in_size=100, in_flight=1)  # not a multiple of max packet
    net.send(ethernet_frame(random.Random(4), 1000))
    assert host.until(lambda: host.of(IN))
    assert (host.of(IN)[0].status, host.of(IN)[0].actual) == (Status.OVERFLOW, 100)


@pytest.mark.parametrize("batch", (False, True))
def test_packet_loss_is_survived_and_counted(make_device, batch):
    device, net = make_device(max_packet=512, batch=batch, crc=True, faults=Faults(loss=0.03, seed=7))
    host = Host(device.connect())
    rng = random.Random(5)
    down, up = frame_set(rng, 512, 300), frame_set(rng, 512, 300)
    net.send(*down)
    host.send(up)
    host.settle()
    got_down, got_up = host.frames(), net.received()
    faults, counters, device_counters = device.fault_counters(), host.deframer.counters(), device.counters()
    assert faults["in_packets_lost"] > 0 and faults["out_packets_lost"] > 0
    assert is_subsequence(got_down, down) and is_subsequence(got_up, up)
    assert 0 < len(got_down) < len(down) and 0 < len(got_up) < len(up)
    assert counters["bytes_skipped"] > 0 and counters["resyncs"] > 0
    assert device_counters["rx_bytes_skipped"] > 0


def test_bit_flips_are_counted_per_packet(make_device):
    device, net = make_device(max_packet=64, crc=True, faults=Faults(in_flip=1.0, seed=1))
    host = Host(device.connect())
    frames = [ethernet_frame(random.Random(i), 86) for i in range(10)]  # 106 bytes: 2 packets
    net.send(*frames)
    host.settle()
    faults = device.fault_counters()
    assert faults["in_packets"] == faults["in_bits_flipped"] == 20
    assert faults["out_bits_flipped"] == 0
    assert host.frames() == []
    counters = host.deframer.counters()
    assert counters["bytes_skipped"] > 0 and counters["frames"] == 0


@pytest.mark.parametrize("direction", (IN, OUT))
def test_stall_until_clear_halt(make_device, direction):
    device, net = make_device(max_packet=512)
    transport = device.connect()
    host = Host(transport, in_flight=3)
    frame = ethernet_frame(random.Random(6), 100)
    if direction is OUT:
        device.busy_out_for(5)  # keep one OUT transfer pending to see it stall
        host.send([frame])
    assert device.stall(direction)
    assert host.until(lambda: any(c.status is Status.STALL for c in host.done))
    stalled = [c for c in host.done if c.direction is direction]
    assert stalled and all(c.status is Status.STALL for c in stalled)
    if direction is IN:
        assert [c.tag for c in stalled] == [1, 2, 3]  # submission order
    before = len(host.done)
    tag = host.submit_in() if direction is IN else host.send([frame])[0]
    host.until(lambda: len(host.done) > before)
    assert (host.done[-1].tag, host.done[-1].status) == (tag, Status.STALL)
    transport.clear_halt(direction)
    if direction is IN:
        host.submit_in()
        net.send(frame)
        assert host.until(lambda: host.frames() == [frame])
    else:
        device.busy_out_for(0)
        host.send([frame])
        assert net.received(1, timeout=2) == [frame]
    assert device.fault_counters()[f"{direction.value}_stalls"] == 1


def test_random_stalls_are_counted(make_device):
    device, net = make_device(max_packet=64, faults=Faults(in_stall=1.0, seed=2))
    transport = device.connect()
    host = Host(transport, in_flight=2)
    net.send(ethernet_frame(random.Random(7), 50))
    for _ in range(3):
        assert host.until(lambda: len([c for c in host.done if c.status is Status.STALL]) == 2)
        host.done.clear()
        transport.clear_halt(IN)
        host.submit_in()
        host.submit_in()
    host.until(lambda: len(host.done) == 2)
    assert device.fault_counters()["in_stalls"] == 4


def test_busy_out_holds_completions_then_releases_them(make_device):
    device, net = make_device(max_packet=512)
    host = Host(device.connect())
    rng = random.Random(8)
    up, down = [ethernet_frame(rng, 200) for _ in range(3)], ethernet_frame(rng, 300)
    started = time.monotonic()
    device.busy_out_for(0.5)
    host.send([up[0]])
    host.send(up[1:])
    net.send(down)
    assert host.until(lambda: host.frames() == [down])  # IN is not affected
    host.settle(quiet=0.1, limit=0.15)
    assert host.of(OUT) == [] and net.received() == []
    assert host.until(lambda: len(host.of(OUT)) == 2)
    assert time.monotonic() - started >= 0.5
    assert [c.status for c in host.of(OUT)] == [Status.COMPLETED] * 2
    assert host.of(OUT)[0].tag < host.of(OUT)[1].tag
    assert net.received(3, timeout=2) == up
    assert device.fault_counters()["out_busy_periods"] == 1


def test_unplug_completes_everything_and_replug_works(make_device):
    device, net = make_device(max_packet=512)
    transport = device.connect()
    with pytest.raises(RuntimeError):
        device.connect()  # claimed
    host = Host(transport)
    frame = ethernet_frame(random.Random(9), 400)
    device.busy_out_for(10)
    host.send([frame, frame])
    host.send([frame])
    device.unplug()
    assert host.until(lambda: len(host.done) == 6)
    assert all(c.status is Status.NO_DEVICE for c in host.done)
    assert [c.tag for c in host.of(IN)] == [1, 2, 3, 4]
    assert [c.tag for c in host.of(OUT)] == [5, 6]
    with pytest.raises(TransportGone):
        transport.submit_in(memoryview(bytearray(512)), 99)
    with pytest.raises(TransportGone):
        transport.submit_out(memoryview(b"x"), 99)
    with pytest.raises(TransportGone):
        transport.clear_halt(IN)
    with pytest.raises(TransportGone):
        device.connect()
    transport.close()
    device.replug()
    host = Host(device.connect())
    net.send(frame)
    host.send([frame])  # busy was cleared: the device came back fresh
    assert host.until(lambda: host.frames() == [frame])
    assert net.received(1, timeout=2) == [frame]
    faults = device.fault_counters()
    assert (faults["unplugs"], faults["replugs"]) == (1, 1)


@pytest.mark.parametrize("direction", (IN, OUT))
def test_timeouts_are_counted(make_device, direction):
    key = "in_timeout" if direction is IN else "out_timeout"
    device, net = make_device(max_packet=64, faults=Faults(seed=3, **{key: 1.0}))
    host = Host(device.connect(), in_size=1024)
    frames = [ethernet_frame(random.Random(i), 1000) for i in range(5)]
    if direction is IN:
        net.send(*frames)
    else:
        host.send(frames)
    host.settle(quiet=0.2)
    timed_out = [c for c in host.of(direction) if c.status is Status.TIMED_OUT]
    assert timed_out and all(c.actual < c.requested for c in timed_out)
    assert device.fault_counters()[f"{direction.value}_timeouts"] == len(timed_out)
    if direction is OUT:  # an OUT transfer cannot end early: each one timed out
        assert len(timed_out) == len(host.of(OUT)) == len(frames)
        assert net.received() == []  # no transfer reached its end, so nothing was parsed


def test_injected_commands_reach_the_host(make_device):
    device, net = make_device(max_packet=512, crc=True)
    host = Host(device.connect())
    rng = random.Random(10)
    frame = ethernet_frame(rng, 100)
    device.inject_hint(CMD_RESPONSE_HINT, 5)
    device.inject_echo_response(b"unasked")
    net.send(frame)
    assert host.until(lambda: len(host.events) == 3)
    assert host.events == [Hint(CMD_RESPONSE_HINT, 5), EchoResponse(b"unasked"), Frame(frame, True)]


@pytest.mark.parametrize(
    "garbage, counter",
    ((b"\xff\xff", "reserved_commands"),
     (command_header(CMD_ECHO, 0x7FF).to_bytes(2, "little"), "truncated")),
)
def test_garbage_mid_stream_is_survived(make_device, garbage, counter):
    device, net = make_device(max_packet=512, crc=True)
    host = Host(device.connect())
    rng = random.Random(11)
    frames = [ethernet_frame(rng, 100) for _ in range(3)]
    net.send(frames[0])
    assert host.until(lambda: len(host.frames()) == 1)
    device.inject_garbage(garbage)  # glued in front of the next frame, in its transfer
    net.send(*frames[1:])
    host.settle(quiet=0.15)
    counters = host.deframer.counters()
    assert counters[counter] == 1
    assert not [e for e in host.events if isinstance(e, Echo)]  # never an Echo from garbage
    assert host.frames()[-1] == frames[-1]
    assert device.fault_counters()["injected_garbage"] == 1


def test_random_injections_match_the_counters(make_device):
    faults = Faults(echo=0.2, echo_response=0.2, hint=0.2, garbage=0.1, seed=5)
    device, net = make_device(max_packet=512, crc=True, faults=faults)
    host = Host(device.connect())
    rng = random.Random(12)
    frames = [ethernet_frame(rng, rng.randrange(46, 1500)) for _ in range(100)]
    net.send(*frames)
    host.settle()
    injected, counters = device.fault_counters(), host.deframer.counters()
    assert injected["injected_garbage"] > 0 and injected["injected_echo"] > 0
    assert counters["echo"] == injected["injected_echo"]
    assert counters["echo_response"] == injected["injected_echo_response"]
    assert counters["hints"] == injected["injected_hints"]
    assert counters["reserved_commands"] == injected["injected_garbage"]
    assert host.frames() == frames  # the scan finds each frame behind its garbage
    hints = [e for e in host.events if isinstance(e, Hint)]
    assert all(2 <= h.command <= CMD_TICKLE for h in hints)


def test_fileno_readable_exactly_while_completions_wait(make_device):
    device, net = make_device(max_packet=512)
    transport = device.connect()
    host = Host(transport, in_flight=2)
    fd = transport.fileno()
    assert select.select([fd], [], [], 0.05)[0] == []
    net.send(ethernet_frame(random.Random(13), 60))
    assert select.select([fd], [], [], 2)[0] == [fd]
    assert len(host.pump(0)) == 1
    assert select.select([fd], [], [], 0.05)[0] == []


def test_close_cancels_pending_and_releases_the_claim(make_device):
    device, net = make_device(max_packet=1024)
    transport = device.connect()
    host = Host(transport, in_flight=3)
    device.busy_out_for(10)
    host.send([ethernet_frame(random.Random(14), 60)])
    transport.close()
    done = transport.completions()
    assert [(c.tag, c.status) for c in done] == [(1, Status.CANCELLED), (2, Status.CANCELLED),
                                                 (3, Status.CANCELLED), (4, Status.CANCELLED)]
    with pytest.raises(ValueError):
        transport.submit_in(memoryview(bytearray(1024)), 5)
    device.connect().close()


@pytest.mark.parametrize("max_packet, speed", ((64, "full"), (512, "high"), (1024, "super")))
def test_info(make_device, max_packet, speed):
    device, _ = make_device(max_packet=max_packet, serial="SIM42")
    info = device.connect().info
    assert (info.max_packet, info.speed, info.serial) == (max_packet, speed, "SIM42")
    assert info.description.startswith("simulated EEM device")


class _Driven(EemFunction):
    """EemFunction driven by the test itself, as a FunctionFS gadget drives it."""

    def __init__(self, network: QueueNetworkSide, **options: object) -> None:
        super().__init__(network, **options)  # type: ignore[arg-type]
        self.wakes = 0
        network.attach(self._wake)

    def _wake(self) -> None:
        self.wakes += 1


def _device_transfers(function: EemFunction) -> list[bytes]:
    """Everything TxStream has to send, cut into device transfers (ended by a short packet)."""
    transfers, current = [], b""
    while (packet := function.tx.next_packet()) is not None:
        current += packet
        if len(packet) < function.max_packet:
            transfers.append(current)
            current = b""
    assert current == b""
    return transfers


def test_an_eem_function_without_a_bus_records_what_each_transfer_held() -> None:
    net = QueueNetworkSide()
    function = _Driven(net, max_packet=64)
    function.tx.record = []
    rng = random.Random(1)
    frames = [ethernet_frame(rng, 46), ethernet_frame(rng, 1500)]
    net.send(*frames)
    function.send_echo(b"ping")
    function.inject_garbage(b"\xff\x8f")
    assert function.wakes >= 2  # the driver is told there is something to send
    transfers = _device_transfers(function)
    # The Echo, then the garbage glued in front of the first frame, then the second frame.
    assert [kind for kind, _arg in function.tx.record] == ["echo", "garbage", "frame", "frame"]
    assert len(transfers) == 3
    assert list(Deframer().feed(transfers[0], True)) == [Echo(b"ping")]
    assert transfers[1][:2] == b"\xff\x8f"
    events = [e for t in (transfers[1][2:], transfers[2]) for e in Deframer().feed(t, True)]
    assert [bytes(e.data) for e in events if isinstance(e, Frame)] == frames
    assert all(isinstance(e, Frame) for e in events)
    assert function.fault_counters()["injected_echo"] == 1
    assert function.fault_counters()["injected_garbage"] == 1


def test_an_eem_function_takes_functionfs_reads_as_requests() -> None:
    """_receive_request: one completed device OUT request; short ends the host's transfer."""
    net = QueueNetworkSide()
    function = _Driven(net, max_packet=512)
    framer = Framer(crc=True, max_packet=512)
    frame = ethernet_frame(random.Random(3), 1500)
    stream = framer.pack([frame])[0] + framer.echo(b"are you there")
    # The host's transfer arrives in two requests: a full one, then the short rest.
    function._receive_request(stream[:512], short=False)
    assert net.received() == []  # nothing until the transfer ends
    function._receive_request(stream[512:], short=True)
    assert net.received(1, timeout=1) == [frame]
    # The Echo is answered: its response is the next thing the device sends.
    (answer,) = _device_transfers(function)
    assert list(Deframer().feed(answer, True)) == [EchoResponse(b"are you there")]
    assert function.counters()["rx_frames"] == 1
