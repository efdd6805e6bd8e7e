"""What the deframer emits. Both codec implementations build these same classes."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import COMMAND_NAMES


@dataclass(frozen=True, slots=True)
class Frame:
    """An Ethernet frame, its CRC or sentinel already checked and stripped."""

    data: bytes
    crc: bool  # True if it arrived with bmCRC=1 (a real CRC-32), False for the sentinel


@dataclass(frozen=True, slots=True)
class Echo:
    """The device asks for an Echo Response carrying the same data."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EchoResponse:
    """The device answers an Echo (ours, if we sent one with this data)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Hint:
    """Suspend Hint, Response Hint, Response Complete Hint or Tickle: advisory only."""

    command: int
    param: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES[self.command]


Event = Frame | Echo | EchoResponse | Hint
