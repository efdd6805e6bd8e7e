"""The boundary between the bridge and "a USB device with a bulk IN and a bulk OUT endpoint".

Both the libusb transport (eembridge.usb.device) and the simulated device (eembridge.sim)
implement `Transport`. The bridge owns all transfer memory (ring buffers) and lends it
to the transport as writable/readonly memoryviews: the transport reads or writes that
memory in place and never copies it into memory of its own on the host side.

Completions are delivered in submission order per direction (as USB bulk endpoints
do). `fileno()` is readable while completions are waiting, so the bridge can poll it
together with the TAP file descriptor in one loop.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol


class Direction(enum.Enum):
    IN = "in"
    OUT = "out"


class Status(enum.Enum):
    """Outcome of a transfer, mirroring libusb_transfer_status."""

    COMPLETED = "completed"
    ERROR = "error"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    STALL = "stall"
    NO_DEVICE = "no_device"
    OVERFLOW = "overflow"  # babble: the device sent more than was asked for


@dataclass(frozen=True, slots=True)
class Completion:
    direction: Direction
    tag: int  # the caller's cookie from submit_*
    requested: int
    actual: int  # bytes really moved; for OUT, less than requested means not all was sent
    status: Status

    @property
    def short(self) -> bool:
        """An IN transfer that ended before filling its buffer (short packet or ZLP).

        Any IN transfer that did not complete normally also ends the EEM stream there,
        so it counts as short: nothing may continue across it.
        """
        return self.status is not Status.COMPLETED or self.actual < self.requested


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the bridge and `eembridge list` know of the device behind a transport."""

    max_packet: int
    speed: str  # "full", "high", "super", ...
    description: str  # e.g. "1d6b:0104 bus 1 addr 3 serial X" or "simulated"
    serial: str | None = None
    # Known to take several EEM packets in one OUT transfer (Linux f_eem, the simulated
    # device). Otherwise the bridge sends one frame per transfer, as Linux's cdc_eem does:
    # the only host some firmware was ever tested against.
    takes_batches: bool = False


class TransportGone(Exception):
    """The device is not there (unplugged or not yet replugged)."""


class Transport(ABC):
    """A claimed EEM interface: submit bulk transfers into caller memory, reap completions."""

    info: DeviceInfo

    @abstractmethod
    def fileno(self) -> int:
        """A file descriptor readable while completions() has something to return."""

    @abstractmethod
    def submit_in(self, buffer: memoryview, tag: int) -> None:
        """Queue a bulk IN transfer of len(buffer) bytes landing in `buffer`."""

    @abstractmethod
    def submit_out(self, buffer: memoryview, tag: int) -> None:
        """Queue a bulk OUT transfer of the bytes in `buffer` (kept alive until completed)."""

    @abstractmethod
    def completions(self) -> list[Completion]:
        """Completed transfers, oldest first; never blocks."""

    @abstractmethod
    def clear_halt(self, direction: Direction) -> None:
        """Clear a stall on one endpoint."""

    @abstractmethod
    def close(self) -> None:
        """Cancel everything in flight, wait until it completed, release the device."""

    def engine(self) -> Transport | None:
        """This transport driven by the C engine: a Transport that is also a
        NativeDataPath, to use instead of this one (the simulated device's); None: the
        transport runs the data path itself (libusb) or only offers submit/completions.
        A wrapper (the --usb-pcap recorder) inherits None, so it keeps every transfer."""
        return None


# Empty polls the native data path's thread makes after work before it sleeps. Its next
# work (a completion, the next TCP segment or ACK) tends to come within microseconds,
# and being woken for it costs more than looking again. In one guest boot (TCG, high
# speed) 100 took host→peer from 0.69-0.77x cdc_eem to 1.11-1.15x and idle ping from
# 3.3-4.8x to 2.0-2.4x; 20 was no better than none. Other boots gained less, and one
# was mixed (bench/RESULTS.md, session 7).
BUSY_POLLS = 100
MAX_BUSY_POLLS = 100000


class NativeDataPath(Protocol):
    """What a transport offers when it can run the data path itself, in C, with no
    Python per transfer or frame: its own thread also reads the TAP once start_tx runs
    (eembridge._fast.usb.UsbTransport, through usb.ClaimedDevice; the simulated device
    through Transport.engine(), eembridge._fast.simlink.SimEngine: both are the engine of
    eembridge/_fast/engine.pxi).

    The bridge hands it its RxPath / TxPath (the C ones, eembridge._fast.datapath) and
    from then on only acts on what the poll methods report; counters come from the
    stats methods. A transport without these methods (the --usb-pcap recorder, any
    transport with the pure-Python codec) gets every transfer through
    submit_*/completions instead.
    """

    def start_rx(self, rxpath: Any, in_flight: int) -> None: ...
    def rx_poll(self) -> tuple[list[Any], int, bool, int]: ...
    def rx_resume(self) -> None: ...
    def rx_stats(self) -> dict[str, Any]: ...
    def start_tx(self, txpath: Any) -> None: ...
    @property
    def busy_polls(self) -> int: ...
    def tx_poll(self) -> tuple[int, bool]: ...
    def tx_resume(self) -> None: ...
    def tx_stats(self) -> dict[str, Any]: ...
    def loop_stats(self) -> dict[str, int]: ...
