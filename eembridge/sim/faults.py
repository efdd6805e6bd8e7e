"""USB faults the simulated device injects, and the counters of what it injected.

Loss and bit flips act on USB packets (max-packet-sized pieces of a transfer), which is
where broken hubs, host controllers and firmware lose data; stalls and timeouts act on
transfers. Every fault is off by default and every injected one is counted, so a test
can compare what the bridge reported with what really happened.

Each direction has its own RNG seeded from `seed`: the IN and OUT threads draw
independently, so one direction's sequence of decisions is reproducible on its own.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields

from ..core.transport import Direction

FAULT_COUNTERS = (
    "in_packets",  # USB packets the device sent on bulk IN (the denominator)
    "out_packets",  # USB packets the host sent on bulk OUT
    "in_packets_lost",
    "out_packets_lost",
    "in_bits_flipped",
    "out_bits_flipped",
    "in_stalls",  # times the endpoint was halted (not STALL completions)
    "out_stalls",
    "in_timeouts",  # transfers completed TIMED_OUT
    "out_timeouts",
    "out_busy_periods",
    "unplugs",
    "replugs",
    "injected_echo",  # unsolicited Echo commands put on bulk IN
    "injected_echo_response",
    "injected_hints",
    "injected_garbage",
)


@dataclass
class Faults:
    """Fault parameters; probabilities are in [0, 1], all zero by default."""

    loss: float = 0.0  # a USB packet is lost, both directions
    flip: float = 0.0  # a USB packet gets one bit flipped, both directions
    in_loss: float | None = None  # overrides `loss` on bulk IN
    out_loss: float | None = None
    in_flip: float | None = None  # overrides `flip` on bulk IN
    out_flip: float | None = None
    in_stall: float = 0.0  # per transfer: the endpoint halts (STALL until clear_halt)
    out_stall: float = 0.0
    in_timeout: float = 0.0  # per transfer: it completes TIMED_OUT part way
    out_timeout: float = 0.0
    echo: float = 0.0  # per EEM packet the device sends: an unsolicited Echo before it
    echo_response: float = 0.0  # ... an Echo Response nobody asked for
    hint: float = 0.0  # ... a Suspend/Response/Response Complete Hint or Tickle
    garbage: float = 0.0  # ... `garbage_bytes` glued in front of it (mid-transfer)
    garbage_bytes: bytes = b"\xff\xff"  # reads as reserved command 7; try Echo 0x7FF too
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"fault probability {f.name}={value} must be in [0, 1]")

    def for_direction(self, direction: Direction) -> tuple[float, float, float, float]:
        """(loss, flip, stall, timeout) for one direction, overrides applied."""
        if direction is Direction.IN:
            loss, flip = self.in_loss, self.in_flip
            return (self.loss if loss is None else loss, self.flip if flip is None else flip,
                    self.in_stall, self.in_timeout)
        loss, flip = self.out_loss, self.out_flip
        return (self.loss if loss is None else loss, self.flip if flip is None else flip,
                self.out_stall, self.out_timeout)


class FaultInjector:
    """Draws fault decisions for one direction and counts what it injected."""

    def __init__(self, faults: Faults, direction: Direction, counters: FaultCounters) -> None:
        self.loss, self.flip_p, self.stall_p, self.timeout_p = faults.for_direction(direction)
        self.faults = faults
        self.prefix = direction.value + "_"
        self.counters = counters
        self.rng = random.Random(f"{faults.seed}/{direction.value}")

    @property
    def per_packet(self) -> bool:
        """Whether any fault acts on single packets (then the device moves packet by packet)."""
        return bool(self.loss or self.flip_p or self.timeout_p)

    def packet(self) -> bool:
        """Count one USB packet; True if it is lost."""
        self.counters.add(self.prefix + "packets")
        if self.loss and self.rng.random() < self.loss:
            self.counters.add(self.prefix + "packets_lost")
            return True
        return False

    def flip(self, data: memoryview | bytearray) -> None:
        """Maybe flip one bit of a packet, in place."""
        if self.flip_p and data and self.rng.random() < self.flip_p:
            bit = self.rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            self.counters.add(self.prefix + "bits_flipped")

    def stall(self) -> bool:
        """Per transfer: whether the endpoint halts now (counted by the caller's halt)."""
        return bool(self.stall_p) and self.rng.random() < self.stall_p

    def timeout_after(self, packets: int) -> int | None:
        """Per transfer: after how many packets it times out, or None."""
        if self.timeout_p and self.rng.random() < self.timeout_p:
            return self.rng.randrange(max(packets, 1))
        return None

    def unsolicited(self) -> list[tuple[str, bytes | tuple[int, int]]]:
        """Per EEM packet sent on IN: what to put in front of it (kind, argument)."""
        f, rng = self.faults, self.rng
        out: list[tuple[str, bytes | tuple[int, int]]] = []
        if f.echo and rng.random() < f.echo:
            out.append(("echo", rng.randbytes(rng.randrange(65))))
        if f.echo_response and rng.random() < f.echo_response:
            out.append(("echo_response", rng.randbytes(rng.randrange(65))))
        if f.hint and rng.random() < f.hint:
            out.append(("hint", (rng.randrange(2, 6), rng.randrange(0x800))))
        if f.garbage and rng.random() < f.garbage:
            out.append(("garbage", f.garbage_bytes))
        return out


class FaultCounters:
    """Thread-safe counters (the IN and OUT threads and API callers all count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FAULT_COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
