"""SimTransport: the host controller's side of the simulated device.

Theory of operation
-------------------
USB at packet granularity, as a host controller sees it. Pending transfers wait in one
queue per direction; only the head of a queue moves data, so completions come in
submission order per direction. All state here is guarded by the device's bus lock
(`SimDevice._bus`, a Condition); the device's IN and OUT threads call the `offer_in`,
`take_out` and `out_accepted` methods with that lock held.

* IN: each packet the device sends (at most max_packet bytes) is written straight into
  the caller's memoryview (the one copy a real controller makes by DMA). The transfer
  completes when its buffer is full or a short packet / ZLP arrives. A packet longer
  than the room left is babble: OVERFLOW.
* OUT: the head transfer is cut into max_packet packets; each is handed to the device
  and the transfer completes once the device accepted its last packet. No ZLP is added:
  a transfer of a multiple of max_packet leaves the device waiting for the next one
  (which is why the EEM framer appends a zero-length EEM packet).
* Fast path: when no per-packet fault (loss, bit flips, timeouts) is configured for a
  direction, the device moves runs of full packets (IN) or the rest of a transfer (OUT)
  in one call. What reaches the other side, the packet counts and every per-transfer
  decision (stalls) are the same as packet by packet; only the Python work per packet
  (and the bus lock and GIL hand-offs that came with it) is gone.
* A halted endpoint answers every transfer with STALL until clear_halt. Unplug
  completes everything with NO_DEVICE and makes the transport gone for good; close
  cancels everything. Once the bus lock is released after either, no device thread
  touches the caller's buffers again.

`fileno()` is an eventfd, non-zero exactly while completions are waiting.

The bridge drives it through the compiled engine when it can (`engine()`,
eembridge._fast.simlink): then the engine's thread submits and reaps the data transfers.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Protocol

from ..core.transport import (
    BUSY_POLLS,
    Completion,
    DeviceInfo,
    Direction,
    Status,
    Transport,
    TransportGone,
)

if TYPE_CHECKING:
    from .faults import FaultInjector

IN, OUT = Direction.IN, Direction.OUT


class Bus(threading.Condition):
    """The bus lock, with one wait queue per device thread: a host submitting an IN
    transfer wakes the IN thread only, an OUT transfer the OUT thread only (`notify`),
    while state changes everyone must see (plug, stall, close) wake both (notify_all).
    One queue for both woke a thread for nothing at every transfer: a lock and GIL
    hand-off per transfer that the bridge's process paid for."""

    def __init__(self) -> None:
        lock = threading.Lock()
        super().__init__(lock)
        self.queues = {Direction.IN: threading.Condition(lock), Direction.OUT: threading.Condition(lock)}

    def notify_all(self) -> None:
        super().notify_all()
        for queue in self.queues.values():
            queue.notify_all()

    def notify_direction(self, direction: Direction) -> None:
        self.queues[direction].notify_all()


class Device(Protocol):
    """What the host controller needs of the device it serves (sim.device.SimDevice):
    the device calls the host controller's public methods (offer_in, take_out, ...)
    with the bus lock held; the host controller calls only these."""

    def detach(self, transport: SimTransport) -> None: ...
    def count_fault(self, name: str) -> None: ...
    def fault_counters(self) -> dict[str, int]: ...


class _Transfer:
    __slots__ = ("direction", "tag", "buffer", "length", "offset", "packets", "armed", "timeout_after")

    def __init__(self, direction: Direction, tag: int, buffer: memoryview) -> None:
        self.direction = direction
        self.tag = tag
        self.buffer: memoryview | None = buffer
        self.length = len(buffer)
        self.offset = 0  # bytes moved
        self.packets = 0  # packets moved
        self.armed = False  # per-transfer fault decisions made (when it reaches the head)
        self.timeout_after: int | None = None


class SimTransport(Transport):
    """Bulk IN/OUT of one simulated device; get one from `SimDevice.connect()`."""

    def __init__(self, device: Device, bus: Bus, info: DeviceInfo) -> None:
        self.info = info
        self.device = device
        self._bus = bus
        self._max_packet = info.max_packet
        self._queues: dict[Direction, deque[_Transfer]] = {IN: deque(), OUT: deque()}
        self._halted = {IN: False, OUT: False}
        self.out_halts = 0  # the device flushes its OUT request when this changes
        self._done: list[Completion] = []
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._gone = False
        self._closed = False

    # -- Transport API ------------------------------------------------------------

    def fileno(self) -> int:
        if self._closed:
            raise ValueError("SimTransport is closed")
        return self._fd

    def submit_in(self, buffer: memoryview, tag: int) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("an IN buffer must be writable")
        if not view:
            raise ValueError("an IN transfer needs room for at least one byte")
        self._submit(_Transfer(IN, tag, view))

    def submit_out(self, buffer: memoryview, tag: int) -> None:
        # An empty OUT transfer is legal: it goes out as one USB ZLP.
        self._submit(_Transfer(OUT, tag, memoryview(buffer).cast("B")))

    def completions(self) -> list[Completion]:
        with self._bus:
            done, self._done = self._done, []
            if done and not self._closed:
                os.eventfd_read(self._fd)
        return done

    def clear_halt(self, direction: Direction) -> None:
        with self._bus:
            self._check_usable()
            self._halted[direction] = False
            self._bus.notify_all()

    def close(self) -> None:
        with self._bus:
            if self._closed:
                return
            self._fail_all(IN, Status.CANCELLED)
            self._fail_all(OUT, Status.CANCELLED)
            self._closed = True
            self.device.detach(self)
            self._bus.notify_all()
        os.close(self._fd)

    def engine(self) -> Transport | None:
        """This transport driven by the compiled engine (eembridge._fast.simlink), the data
        path real USB runs; None without it (a build without the extensions)."""
        try:
            from .._fast.simlink import SimEngine
        except ImportError:
            return None
        return SimEngine(self, BUSY_POLLS)

    # -- extras -------------------------------------------------------------------

    def fault_counters(self) -> dict[str, int]:
        return self.device.fault_counters()

    @property
    def gone(self) -> bool:
        return self._gone

    def __repr__(self) -> str:
        state = "closed" if self._closed else "gone" if self._gone else "open"
        return f"<SimTransport {self.info.description} {state}>"

    # -- the bus (called by the device with the bus lock held) ---------------------

    def _submit(self, transfer: _Transfer) -> None:
        with self._bus:
            self._check_usable()
            if self._halted[transfer.direction]:
                self._complete(transfer, Status.STALL, 0)
            else:
                self._queues[transfer.direction].append(transfer)
                self._bus.notify_direction(transfer.direction)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError("SimTransport is closed")
        if self._gone:
            raise TransportGone(f"{self.info.description}: unplugged")

    def has_pending(self, direction: Direction) -> bool:
        return bool(self._queues[direction])

    def _complete(self, transfer: _Transfer, status: Status, actual: int) -> None:
        transfer.buffer = None  # the caller owns its memory again
        self._done.append(Completion(transfer.direction, transfer.tag, transfer.length, actual, status))
        if len(self._done) == 1:
            os.eventfd_write(self._fd, 1)

    def _fail_all(self, direction: Direction, status: Status) -> None:
        queue = self._queues[direction]
        while queue:
            transfer = queue.popleft()
            self._complete(transfer, status, transfer.offset)

    def halt(self, direction: Direction) -> None:
        """The endpoint halts: everything pending and submitted until clear_halt STALLs."""
        self._halted[direction] = True
        self.out_halts += direction is OUT
        self._fail_all(direction, Status.STALL)
        self.device.count_fault(f"{direction.value}_stalls")

    def unplugged(self) -> None:
        self._fail_all(IN, Status.NO_DEVICE)
        self._fail_all(OUT, Status.NO_DEVICE)
        self._gone = True

    def _head(self, direction: Direction, faults: FaultInjector) -> _Transfer | None:
        """The transfer now on the bus, after its stall/timeout decisions; None if none."""
        queue = self._queues[direction]
        while queue:
            transfer = queue[0]
            if not transfer.armed:
                transfer.armed = True
                if faults.stall():
                    self.halt(direction)
                    return None
                packets = -(-transfer.length // self._max_packet)
                transfer.timeout_after = faults.timeout_after(packets)
            if transfer.timeout_after is not None and transfer.packets >= transfer.timeout_after:
                queue.popleft()
                self._complete(transfer, Status.TIMED_OUT, transfer.offset)
                self.device.count_fault(f"{direction.value}_timeouts")
                continue
            return transfer
        return None

    def offer_in(self, packet: bytes, faults: FaultInjector) -> bool:
        """The device sends one packet on bulk IN: True if it left the device.

        False means no IN transfer was ready to take it (the device was NAKed and keeps
        the packet). A lost packet left the device but lands nowhere, and a lost short
        packet does not end the transfer.
        """
        transfer = self._head(IN, faults)
        if transfer is None:
            return False
        if faults.packet():
            return True
        view = transfer.buffer
        assert view is not None
        start, n = transfer.offset, len(packet)
        room = transfer.length - start
        if n > room:  # babble: the device sent more than the host asked for
            view[start:] = packet[:room]
            self._queues[IN].popleft()
            self._complete(transfer, Status.OVERFLOW, transfer.length)
            return True
        view[start : start + n] = packet
        faults.flip(view[start : start + n])  # corrupt what lands, as the wire would
        transfer.offset += n
        transfer.packets += 1
        if n < self._max_packet or transfer.offset == transfer.length:
            self._queues[IN].popleft()
            self._complete(transfer, Status.COMPLETED, transfer.offset)
        return True

    def offer_in_burst(self, data: memoryview, faults: FaultInjector) -> int:
        """Fast path of `_offer_in` for a run of full packets (no per-packet fault is
        configured): as many as the head IN transfer has room for, in one copy. Returns
        the bytes that left the device (0: no IN transfer ready, the device keeps them)."""
        transfer = self._head(IN, faults)
        if transfer is None:
            return 0
        mp = self._max_packet
        room = transfer.length - transfer.offset
        n = min(len(data), room - room % mp)
        if n == 0:  # less room than one packet: babble, as _offer_in handles it
            return mp if self.offer_in(bytes(data[:mp]), faults) else 0
        view = transfer.buffer
        assert view is not None
        start = transfer.offset
        view[start : start + n] = data[:n]
        faults.counters.add(faults.prefix + "packets", n // mp)
        transfer.offset += n
        transfer.packets += n // mp
        if transfer.offset == transfer.length:
            self._queues[IN].popleft()
            self._complete(transfer, Status.COMPLETED, transfer.offset)
        return n

    def take_out_transfer(self, faults: FaultInjector) -> tuple[_Transfer, bytearray] | None:
        """Fast path of `_take_out` (no per-packet fault configured): the rest of the
        head OUT transfer at once; the caller reports `_out_accepted` with its size."""
        transfer = self._head(OUT, faults)
        if transfer is None:
            return None
        view = transfer.buffer
        assert view is not None
        data = bytearray(view[transfer.offset :])
        faults.counters.add(faults.prefix + "packets", max(1, -(-len(data) // self._max_packet)))
        return transfer, data

    def take_out(self, faults: FaultInjector) -> tuple[_Transfer, bytearray | None, int] | None:
        """The next OUT packet: (transfer, what reaches the device or None if lost, size).

        The caller hands the data to the device without the bus lock and then reports
        `_out_accepted`; the transfer advances only then.
        """
        transfer = self._head(OUT, faults)
        if transfer is None:
            return None
        view = transfer.buffer
        assert view is not None
        data = bytearray(view[transfer.offset : transfer.offset + self._max_packet])
        size = len(data)
        if faults.packet():
            return transfer, None, size
        faults.flip(data)
        return transfer, data, size

    def out_accepted(self, transfer: _Transfer, size: int, packets: int = 1) -> None:
        queue = self._queues[OUT]
        if not queue or queue[0] is not transfer:
            return  # stalled, unplugged or cancelled meanwhile
        transfer.offset += size
        transfer.packets += packets
        if transfer.offset >= transfer.length:
            queue.popleft()
            self._complete(transfer, Status.COMPLETED, transfer.length)
