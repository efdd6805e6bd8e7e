"""SimDevice: the device side of a simulated USB EEM function, with its network side.

Theory of operation
-------------------
The device has its own EEM codec (eembridge's Framer and Deframer) and two threads:

* IN thread: `TxStream` turns what the device has to send (answers to Echo first,
  then injected commands, then frames from the network side) into USB packets, and
  the thread offers each to the host's head IN transfer (`SimTransport.offer_in`).
  batch=False: one EEM packet per device transfer. batch=True: one continuous stream
  of EEM packets, cut into full packets while data lasts; a device transfer ends with a
  short packet only when the device runs out of data. Either way a transfer that ends
  on a max-packet boundary is terminated by the ZLP rule: `zlp="eem"` a zero-length
  EEM packet (0x0000), `"usb"` a USB ZLP, `"none"` nothing (a buggy device).
* OUT thread: takes the host's OUT packets one at a time, collects them into a device
  request until a short packet or ZLP ends the transfer (or rx_buffer fills), and feeds
  that to the deframer: frames go to the network side, Echo is answered.

The network side is pulled by the IN thread (`next_frames`, never blocking) and woken
through the callback it was given with `attach`; received frames are pushed to it with
`deliver` from the OUT thread. No sleeps: every wait is on the bus Condition.

Unplug bumps `_generation`; each thread notices and forgets its codec state, as a
device that lost power would.

The function itself (codec, faults, TxStream, OUT handling, what it owes the host) is
`EemFunction`, with no bus and no threads: SimDevice drives it on the simulated bus,
tests/interop/ffs_eem_device.py on FunctionFS endpoints of a real USB gadget.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import Deframer, EchoResponse, Frame, Framer
from ..core.events import Echo, Hint
from ..core.protocol import (
    CHECK_SIZE,
    COMMAND_PARAM_MASK,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_TRANSFER,
    HEADER_SIZE,
    MAX_ECHO_DATA,
    MAX_PACKET_SIZES,
    command_header,
)
from ..core.transport import DeviceInfo, Direction, TransportGone
from .faults import FaultCounters, FaultInjector, Faults
from .transport import Bus, SimTransport

ZLP_MODES = ("eem", "usb", "none")
SPEEDS = {64: "full", 512: "high", 1024: "super"}
INJECTED_COUNTER = {"echo": "injected_echo", "echo_response": "injected_echo_response",
                    "hint": "injected_hints", "garbage": "injected_garbage"}


class NetworkSide(ABC):
    """Where the device's frames come from and go to. Methods may be called from any thread."""

    @abstractmethod
    def attach(self, wake: Callable[[], None]) -> None:
        """Called once by the device. Call wake() whenever next_frames may have new frames
        (from any thread, but holding no lock that next_frames takes)."""

    @abstractmethod
    def next_frames(self, max_frames: int) -> list[bytes]:
        """Up to max_frames Ethernet frames for the device to send to the host; never blocks."""

    @abstractmethod
    def deliver(self, frame: bytes) -> None:
        """An Ethernet frame the device received from the host (may block: backpressure)."""


class QueueNetworkSide(NetworkSide):
    """In-memory network side for tests: `send()` frames to the host, `received()` from it."""

    def __init__(self) -> None:
        self._to_host: deque[bytes] = deque()
        self._from_host: deque[bytes] = deque()
        self._arrived = threading.Condition()
        self._wake: Callable[[], None] = lambda: None

    def attach(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def send(self, *frames: bytes) -> None:
        self._to_host.extend(frames)
        self._wake()

    def next_frames(self, max_frames: int) -> list[bytes]:
        frames: list[bytes] = []
        while len(frames) < max_frames and self._to_host:
            frames.append(self._to_host.popleft())
        return frames

    def deliver(self, frame: bytes) -> None:
        with self._arrived:
            self._from_host.append(frame)
            self._arrived.notify_all()

    def received(self, count: int = 0, timeout: float = 0.0) -> list[bytes]:
        """Frames from the host so far, after waiting up to timeout for `count` of them."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self._from_host) >= count, timeout)
            frames = list(self._from_host)
            self._from_host.clear()
        return frames

    @property
    def unsent(self) -> int:
        return len(self._to_host)


class EemFunction:
    """The device's EEM function without a bus: its codec, its faults and what it owes
    the host. Whatever moves USB packets drives it: SimDevice's threads on the simulated
    bus, or a FunctionFS gadget on real USB (tests/interop/ffs_eem_device.py).

    The driver takes USB packets for bulk IN from `tx` (`next_packet`/`next_burst`) and
    hands bulk OUT data to `_receive_packet`/`_receive_transfer`/`_receive_request`; it
    must call `_flush_rx` when the OUT endpoint halts or the host goes. `_wake` is
    called (from any thread) whenever `tx` may have something new to send.
    """

    def __init__(
        self,
        network: NetworkSide | None = None,
        *,
        max_packet: int = 512,
        batch: bool = False,
        crc: bool = False,  # TX check: CRC-32, or the sentinel (as Linux f_eem sends)
        zlp: str = "eem",
        faults: Faults | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        rx_buffer: int = 16384,  # device OUT request size; a multiple of max_packet
        # Each OUT request unpacked on its own, as Linux f_eem does: a packet that runs
        # past the end of a request fails the request and every frame in it.
        whole_requests: bool = False,
        # Firmware written against Linux's cdc_eem, which never sends two frames in one
        # transfer: only the first data packet of each OUT transfer is taken, the rest
        # lost (counted). Such a device is not known to take batches (DeviceInfo).
        one_frame_per_transfer: bool = False,
        batch_bytes: int = 16384,  # batch=True: how far ahead the device fills its stream
        serial: str = "SIM0001",
    ) -> None:
        if max_packet not in SPEEDS:
            raise ValueError(f"max_packet {max_packet} is not one of {MAX_PACKET_SIZES}")
        if zlp not in ZLP_MODES:
            raise ValueError(f"zlp {zlp!r} is not one of {ZLP_MODES}")
        if rx_buffer <= 0 or rx_buffer % max_packet:
            raise ValueError(f"rx_buffer {rx_buffer} is not a multiple of max_packet {max_packet}")
        self.network = network if network is not None else QueueNetworkSide()
        self.max_packet, self.batch, self.crc, self.zlp = max_packet, batch, crc, zlp
        self.faults = faults if faults is not None else Faults()
        self.info = DeviceInfo(
            max_packet=max_packet,
            speed=SPEEDS[max_packet],
            description=(f"simulated EEM device ({'batch' if batch else 'one packet per transfer'}, "
                         f"{'crc' if crc else 'sentinel'}, max packet {max_packet}, zlp {zlp})"),
            serial=serial,
            takes_batches=not one_frame_per_transfer,
        )
        self._fault_counters = FaultCounters()
        self._in_faults = FaultInjector(self.faults, Direction.IN, self._fault_counters)
        self._out_faults = FaultInjector(self.faults, Direction.OUT, self._fault_counters)
        self._answers: deque[tuple[str, Any]] = deque()  # Echo Responses owed to the host
        self._injected: deque[tuple[str, Any]] = deque()
        self._echo_responses: deque[bytes] = deque()
        self._hints: deque[tuple[int, int]] = deque()
        self._framer = Framer(crc=crc, max_transfer=max(DEFAULT_MAX_TRANSFER, max_length + 2 * HEADER_SIZE),
                              max_packet=max_packet, max_length=max_length)
        self._deframer = Deframer(max_length)
        self._rx_buffer = rx_buffer
        self._whole_requests = whole_requests
        self.failed_requests = 0  # whole_requests: requests f_eem would have failed
        self.failed_request_frames = 0  # ... and the good frames lost with them
        self._one_frame_per_transfer = one_frame_per_transfer
        self.lost_batched_frames = 0  # one_frame_per_transfer: frames after the first
        self._rx = bytearray()
        self.tx = TxStream(self, batch_bytes)

    def _wake(self) -> None:
        """`tx` may have something new to send; the driver says how it is told."""
        raise NotImplementedError

    # -- what the device sends of its own ----------------------------------------------

    def send_echo(self, data: bytes = b"") -> None:
        """The device's own Echo (the host must answer; see echo_responses())."""
        self._inject("echo", bytes(self._checked_echo(data)))

    def inject_echo_response(self, data: bytes = b"") -> None:
        """An Echo Response the host never asked for."""
        self._inject("echo_response", bytes(self._checked_echo(data)))

    def inject_hint(self, command: int, param: int = 0) -> None:
        """A hint command (2..5; 6 and 7 give reserved commands) with an 11-bit param."""
        if not 2 <= command <= 7 or not 0 <= param <= COMMAND_PARAM_MASK:
            raise ValueError(f"hint command {command} param {param} out of range")
        self._inject("hint", (command, param))

    def inject_garbage(self, data: bytes = b"\xff\xff") -> None:
        """Raw bytes put in front of the next EEM packet, inside the same device transfer."""
        self._inject("garbage", bytes(data))

    def _inject(self, kind: str, arg: Any) -> None:
        self._injected.append((kind, arg))
        self._fault_counters.add(INJECTED_COUNTER[kind])
        self._wake()

    @staticmethod
    def _checked_echo(data: bytes) -> bytes:
        if len(data) > MAX_ECHO_DATA:
            raise ValueError(f"echo data of {len(data)} bytes exceeds {MAX_ECHO_DATA}")
        return data

    # -- observation -------------------------------------------------------------------

    def echo_responses(self) -> list[bytes]:
        """Echo Responses the device received from the host, oldest first (and forgets them)."""
        out = []
        while self._echo_responses:
            out.append(self._echo_responses.popleft())
        return out

    def hints(self) -> list[tuple[int, int]]:
        """Hint commands the device received from the host, (command, param)."""
        out = []
        while self._hints:
            out.append(self._hints.popleft())
        return out

    def fault_counters(self) -> dict[str, int]:
        return self._fault_counters.snapshot()

    def quiet(self, direction: Direction) -> None:
        """No more faults in `direction` from now on, nor garbage or hints: what is sent
        next arrives (a test's run then has a definite end). The device threads read
        the odds per packet and per transfer, so this takes effect at the next one."""
        injector = self._in_faults if direction is Direction.IN else self._out_faults
        injector.loss = injector.flip_p = injector.stall_p = injector.timeout_p = 0.0
        self.faults.garbage = self.faults.hint = 0.0

    def count_fault(self, name: str) -> None:
        """A fault the host controller injected (a stall, a timeout), counted with ours."""
        self._fault_counters.add(name)

    def counters(self) -> dict[str, int]:
        """The device codec's counters: rx_* from its deframer, tx_* from its framer."""
        out = {f"rx_{k}": v for k, v in self._deframer.counters().items()}
        out.update({f"tx_{k}": v for k, v in self._framer.counters().items()})
        # The framer closes every packet as if it were a transfer; what really ended the
        # device's transfers on a max-packet boundary is counted by the TX stream.
        out["tx_zlps"], out["tx_usb_zlps"] = self.tx.eem_zlps, self.tx.usb_zlps
        out["rx_failed_requests"] = self.failed_requests
        out["rx_failed_request_frames"] = self.failed_request_frames
        out["rx_lost_batched_frames"] = self.lost_batched_frames
        return out

    # -- bulk OUT ------------------------------------------------------------------------

    def _flush_rx(self) -> None:
        self._rx = bytearray()
        self._deframer.reset()

    def _receive_packet(self, data: bytearray) -> None:
        """One OUT packet: a short one (or ZLP) ends the transfer, and only then is it parsed."""
        self._rx += data
        if len(data) < self.max_packet:
            self._deframe(short=True)
        elif len(self._rx) >= self._rx_buffer:
            self._deframe(short=False)

    def _receive_transfer(self, data: bytearray) -> int:
        """The rest of an OUT transfer at once (fast path): the same as its packets one
        by one through _receive_packet. Returns how many packets that was."""
        mp, n = self.max_packet, len(data)
        if n == 0:
            self._receive_packet(data)  # a USB ZLP
            return 1
        view, pos = memoryview(data), 0
        full = n - n % mp
        while pos < full:
            take = min(full - pos, self._rx_buffer - len(self._rx))
            self._rx += view[pos : pos + take]
            pos += take
            if len(self._rx) >= self._rx_buffer:
                self._deframe(short=False)
        if pos < n:
            self._receive_packet(bytearray(view[pos:]))  # the short packet ends it
        return -(-n // mp)

    def _receive_request(self, data: bytes | bytearray, short: bool) -> None:
        """One completed device OUT request (a FunctionFS read): `short` if it ended the
        host's transfer (fewer bytes than asked for), else the transfer goes on."""
        self._fault_counters.add("out_packets", max(1, -(-len(data) // self.max_packet)))
        self._rx += data
        self._deframe(short)

    def _deframe(self, short: bool) -> None:
        request, self._rx = self._rx, bytearray()
        if self._whole_requests:
            truncated = self._deframer.counters()["truncated"]
            events = self._deframer.feed(request, True)  # nothing carries over
            if self._deframer.counters()["truncated"] != truncated:
                self.failed_requests += 1
                self.failed_request_frames += sum(isinstance(e, Frame) for e in events)
                return
        else:
            events = self._deframer.feed(request, short)
        if self._one_frame_per_transfer:
            frames = [e for e in events if isinstance(e, Frame)]
            self.lost_batched_frames += max(0, len(frames) - 1)
            events = [e for e in events if not isinstance(e, Frame)] + frames[:1]
        for event in events:
            if isinstance(event, Frame):
                self.network.deliver(bytes(event.data))
            elif isinstance(event, Echo):
                self._answers.append(("echo_response", bytes(event.data)))
                self._wake()
            elif isinstance(event, EchoResponse):
                self._echo_responses.append(bytes(event.data))
            elif isinstance(event, Hint):
                self._hints.append((event.command, event.param))


class SimDevice(EemFunction):
    """A simulated EEM device; `connect()` gives the host a SimTransport to it.

    Takes EemFunction's options; its two threads move the function's packets over the
    simulated bus (SimTransport)."""

    def __init__(self, network: NetworkSide | None = None, **options: Any) -> None:
        super().__init__(network, **options)
        self._bus = Bus()
        self._host: SimTransport | None = None
        self._plugged = True
        self._generation = 0
        self._stopping = False
        self._tx_signal = False
        self._in_holding = False  # the IN thread holds packets not yet offered (in_idle)
        self._busy_until = 0.0
        self.network.attach(self._wake)
        self._threads = [threading.Thread(target=self._in_loop, name="sim-in", daemon=True),
                         threading.Thread(target=self._out_loop, name="sim-out", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- host side -----------------------------------------------------------------

    def connect(self) -> SimTransport:
        """Enumerate and claim: a new SimTransport, or TransportGone while unplugged."""
        with self._bus:
            if self._stopping:
                raise TransportGone("simulated device closed")
            if not self._plugged:
                raise TransportGone(f"{self.info.description}: unplugged")
            if self._host is not None:
                raise RuntimeError("the simulated device is already claimed by an open SimTransport")
            self._host = SimTransport(self, self._bus, self.info)
            self._bus.notify_all()
            return self._host

    def detach(self, transport: SimTransport) -> None:
        """The host controller let go of the device (its transport closed)."""
        if self._host is transport:
            self._host = None

    # -- faults at runtime -----------------------------------------------------------

    def unplug(self) -> None:
        """Pending transfers complete NO_DEVICE; the transport is gone; connect() fails."""
        with self._bus:
            if not self._plugged:
                return
            self._plugged = False
            self._generation += 1
            if self._host is not None:
                self._host.unplugged()
                self._host = None
            self._answers.clear()
            self._injected.clear()
            self._busy_until = 0.0
            self._fault_counters.add("unplugs")
            self._bus.notify_all()

    def replug(self) -> None:
        with self._bus:
            if self._plugged:
                return
            self._plugged = True
            self._fault_counters.add("replugs")
            self._bus.notify_all()

    @property
    def plugged(self) -> bool:
        return self._plugged

    @property
    def in_idle(self) -> bool:
        """Bulk IN has offered every packet of every frame it took from the network side,
        so the faults of all of them are decided: once the network side has nothing
        unsent either, quiet() cannot race the last ones."""
        return not self._in_holding

    def stall(self, direction: Direction) -> bool:
        """Halt an endpoint of the connected transport; False if none is connected."""
        with self._bus:
            if self._host is None:
                return False
            self._host.halt(direction)
            self._bus.notify_all()
            return True

    def busy_out_for(self, seconds: float) -> None:
        """Bulk OUT accepts nothing (NAKs) from now for this long: OUT transfers stay
        pending. Replaces any busy period in progress; 0 ends it."""
        with self._bus:
            self._busy_until = time.monotonic() + seconds
            if seconds > 0:
                self._fault_counters.add("out_busy_periods")
            self._bus.notify_all()

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        with self._bus:
            self._stopping = True
            host = self._host
            self._bus.notify_all()
        if host is not None:
            host.close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> SimDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the threads ---------------------------------------------------------------

    def _wake(self) -> None:
        with self._bus:
            self._tx_signal = True
            self._bus.notify_direction(Direction.IN)

    def _in_loop(self) -> None:
        generation = -1
        packet: bytes | None = None  # one USB packet, or (burst) a run of full packets
        burst = False
        fast = not self._in_faults.per_packet
        bus = self._bus
        wait = bus.queues[Direction.IN].wait
        while True:
            with bus:
                while True:
                    if self._stopping:
                        return
                    if generation != self._generation:
                        generation, packet = self._generation, None
                        self.tx.reset()
                    host = self._host
                    if not self._plugged:
                        wait()
                    elif packet is None:
                        break
                    elif host is not None and burst:
                        sent = host.offer_in_burst(memoryview(packet), self._in_faults)
                        if sent == len(packet):
                            packet = None
                            break
                        if sent:
                            packet = packet[sent:]  # the rest goes in the next IN transfer
                        elif not host.has_pending(Direction.IN):
                            wait()
                    elif host is not None and host.offer_in(packet, self._in_faults):
                        packet = None
                        break
                    elif host is None or not host.has_pending(Direction.IN):
                        wait()  # NAK until the host asks again
                self._tx_signal = False
            # Without the lock: it pulls from the network side.
            self._in_holding = True  # before the pull: in_idle never sees a frame in between
            if fast:
                packet, burst = self.tx.next_burst()
            else:
                packet, burst = self.tx.next_packet(), False
            self._in_holding = packet is not None
            if packet is None:
                with bus:
                    while not (self._tx_signal or self._stopping or self._generation != generation):
                        wait()

    def _out_loop(self) -> None:
        generation = -1
        flushed: tuple[SimTransport | None, int] = (None, 0)
        fast = not self._out_faults.per_packet
        bus = self._bus
        wait = bus.queues[Direction.OUT].wait
        while True:
            with bus:
                while True:
                    if self._stopping:
                        return
                    if generation != self._generation:
                        generation = self._generation
                        self._flush_rx()
                    host = self._host
                    if not self._plugged or host is None or not host.has_pending(Direction.OUT):
                        wait()
                        continue
                    busy = self._busy_until - time.monotonic()
                    if busy > 0:
                        wait(busy)
                        continue
                    if flushed != (host, host.out_halts):  # new transport, or a halt
                        flushed = (host, host.out_halts)
                        self._flush_rx()
                    if fast:
                        whole = host.take_out_transfer(self._out_faults)
                        if whole is not None:
                            break
                    else:
                        taken = host.take_out(self._out_faults)
                        if taken is not None:
                            break
            if fast:
                assert whole is not None
                transfer, whole_data = whole
                packets = self._receive_transfer(whole_data)
                with bus:
                    host.out_accepted(transfer, len(whole_data), packets)
                continue
            assert taken is not None
            transfer, data, size = taken
            if data is not None:
                self._receive_packet(data)
            with bus:
                host.out_accepted(transfer, size)

class TxStream:
    """Device TX: EEM packets to USB packets on bulk IN. Only the IN thread uses it."""

    def __init__(self, device: EemFunction, batch_bytes: int) -> None:
        self.device = device
        self.max_packet = device.max_packet
        self.batch_bytes = batch_bytes
        self.pull = 32 if device.batch else 1
        self._pending: deque[tuple[str, Any]] = deque()  # pulled from the network side
        self.eem_zlps = self.usb_zlps = 0
        # None, or a list that every item taken to send is appended to, (kind, argument):
        # a driver that must know what each device transfer held (which Echo went out
        # whole) clears it per transfer.
        self.record: list[tuple[str, Any]] | None = None
        self.reset()

    def reset(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._mid = False  # the last packet was full: the device transfer goes on
        self._pending.clear()

    def next_packet(self) -> bytes | None:
        """The next USB packet (b"" is a ZLP), or None when there is nothing to send."""
        mp = self.max_packet
        avail = len(self._buf) - self._pos
        if avail < mp and self.device.batch or avail == 0 and not self._mid:
            self._refill()
            avail = len(self._buf) - self._pos
        if avail == 0:
            if not self._mid:
                return None
            self._mid = False  # out of data right after a full packet: the ZLP rule
            zlp = self.device.zlp
            if zlp == "usb":
                self.usb_zlps += 1
                return b""
            if zlp == "eem":
                self.eem_zlps += 1
                return b"\x00\x00"
            return None
        n = min(avail, mp)
        packet = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._mid = n == mp
        if self._pos == len(self._buf):
            self._buf, self._pos = bytearray(), 0
        return packet

    def next_burst(self) -> tuple[bytes | None, bool]:
        """Fast path of next_packet: (a run of full packets, True), or (what next_packet
        gives, False) when the next packet is short, a ZLP or nothing. The packets are
        the very ones next_packet would give one by one: it refills only when less than
        a packet is left (batch) or nothing (one EEM packet per transfer)."""
        mp = self.max_packet
        avail = len(self._buf) - self._pos
        if avail < mp and self.device.batch or avail == 0 and not self._mid:
            self._refill()
            avail = len(self._buf) - self._pos
        n = avail - avail % mp
        if n <= mp:
            return self.next_packet(), False
        packets = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._mid = True
        if self._pos == len(self._buf):
            self._buf, self._pos = bytearray(), 0
        return packets, True

    def _refill(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        while True:
            packet = self._take()
            if packet is None:
                return
            self._buf += packet
            if not self.device.batch or len(self._buf) >= self.batch_bytes:
                return

    def _take(self) -> bytes | None:
        """The next EEM packet, with any injected garbage glued in front of it."""
        garbage = b""
        while True:
            item = self._pop()
            if item is None:
                return garbage or None
            kind, arg = item
            if self.record is not None:
                self.record.append(item)
            if kind == "garbage":
                garbage += arg
                continue
            packet = self._build(kind, arg)
            if packet:
                return garbage + packet

    def _pop(self) -> tuple[str, Any] | None:
        device = self.device
        for queue in (device._answers, device._injected, self._pending):
            if queue:
                return queue.popleft()
        faults, counters = device._in_faults, device._fault_counters
        for frame in device.network.next_frames(self.pull):
            for kind, arg in faults.unsolicited():
                counters.add(INJECTED_COUNTER[kind])
                self._pending.append((kind, arg))
            self._pending.append(("frame", frame))
        return self._pending.popleft() if self._pending else None

    def _build(self, kind: str, arg: Any) -> bytes:
        framer = self.device._framer
        if kind == "hint":
            return command_header(*arg).to_bytes(HEADER_SIZE, "little")
        if kind == "frame":
            transfers = framer.pack([arg])
            if not transfers:
                return b""  # runt or oversize: the framer counted it
            out = transfers[0]
            size = len(arg) + HEADER_SIZE + CHECK_SIZE
        else:
            out = framer.echo(arg) if kind == "echo" else framer.echo_response(arg)
            size = len(arg) + HEADER_SIZE
        # The framer closes each packet as a transfer of its own, appending a zero-length
        # EEM packet when it ends on a max-packet boundary; the ZLP rule is applied per
        # device transfer in next_packet instead, so take that one off.
        if size % self.max_packet == 0:
            out = out[:size]
        return bytes(out)
