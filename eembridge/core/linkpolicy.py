"""The link policy: what the bridge does about everything that is not a frame.

Answering the device's Echo, our own Echo and the keepalive, what a stalled, timed-out
or short transfer leads to, and when to try claiming the device again. Frames are the
data path's business (eembridge.datapath and its C twin); this module decides the rest,
once, for every transport.

Theory of operation
-------------------
Sans-IO, as h11 is: `LinkPolicy` does no I/O, starts no thread and reads no clock. The
thread that owns the device tells it what happened, by calling the method named for it
with the time it happened (`connected(now)`, `command_received(now, Echo(...))`,
`out_failed(Status.STALL, frames)`, `tick(now)`, ...), and carries out the actions each
call returns, in order: small frozen dataclasses (`SendEchoResponse`, `ClearHalt`,
`Connect`, `EchoAnswered`, ...). `next_deadline()` says when `tick` has something to do.
The policy owns the counters of what it decides (`counters`, `drop_reasons`,
`in_errors`); the bridge adds them to its own in `Bridge.stats()`.

States::

    DISCONNECTED --tick, reconnect due--> CONNECTING (Connect returned)
    CONNECTING --connected--> CONNECTED
    CONNECTING --connect_failed--> DISCONNECTED (next attempt reconnect_interval later)
    CONNECTED --disconnected--> DISCONNECTED (next attempt at once)

Invariants
* Facts about the link (connected, connect_failed, disconnected) are taken in any state:
  the thread that claims the device knows best whether it has one. Reports that only a
  claimed device produces (commands, failed transfers, halts, the device going) are
  ignored in any other state: the disconnect already counted what they concern.
* Actions that touch the device (SendEcho, SendEchoResponse, ClearHalt, Resume,
  Disconnect) are returned only in CONNECTED; Connect only in DISCONNECTED, when due.
  If carrying out one action loses the device, the thread skips the device actions
  left in the list.
* An Echo from the device is answered with the same data, ahead of TAP data not yet
  submitted. An Echo Response is matched to the oldest of our Echo requests with the
  same data; one nobody asked for is counted and reported, never acted on.
* Every echo request the caller makes is settled exactly once: EchoAnswered,
  EchoTimedOut or EchoRefused. Keepalives are ours and report KeepaliveLost once
  `keepalive_misses` in a row went unanswered, KeepaliveBack at the next answer.
* The OUT-failure policy, the same on every transport: a transfer that stalled, timed
  out or was taken only in part is dropped, its frames counted by reason, and a stall's
  halt is cleared before the direction resumes. It is never resent: with several
  transfers in flight its rest would reach the device after those queued behind it, in
  the middle of other packets, and after a stall the device's state is unknown, so a
  resend could duplicate what it took. Linux usbnet and FreeBSD's if_cdceem drop too;
  TCP resends what mattered. A device that only NAKs (busy) is not a failure: its
  transfers wait without a timeout, and that backpressure is the data path's.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar, Literal

from .events import Echo, EchoResponse, Event
from .protocol import MAX_ECHO_DATA
from .transport import Direction, Status

POLICY_COUNTERS = (
    "connects",  # device claimed (first time and after every replug)
    "connect_failures",  # attempts that found no device (retried every reconnect_interval)
    "unplugs",  # device lost (NO_DEVICE)
    "in_errors",  # IN transfers that ended in an error status
    "in_stalls",  # IN endpoint stalls cleared
    "out_stalls",  # OUT endpoint stalls cleared
    "out_errors",  # OUT transfers that failed for good
    "tx_dropped",  # frames not sent, all reasons (see drop_reasons)
    "echo_answered",  # Echo Responses sent for the device's Echo
    "echo_sent",  # our own Echo requests (the keepalive's too)
    "echo_matched",  # Echo Responses that answered one of ours
    "unsolicited_echo_responses",  # Echo Responses nobody asked for: a symptom
    "echo_timeouts",  # our Echo requests that got no answer in time
    "keepalives_lost",  # times the device stopped answering the keepalive
)

# A keepalive Echo is given this long at least, whatever the interval: a busy device
# late by a few hundred milliseconds is not lost.
KEEPALIVE_MIN_TIMEOUT = 1.0


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


# -- actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendEcho:
    """Send an Echo command carrying `data`."""

    data: bytes
    ahead_of_data: ClassVar[bool] = True  # before TAP data not yet submitted


@dataclass(frozen=True, slots=True)
class SendEchoResponse:
    """Answer the device's Echo with the same data."""

    data: bytes
    ahead_of_data: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class ClearHalt:
    direction: Direction


@dataclass(frozen=True, slots=True)
class Resume:
    """Move transfers in this direction again (after a halt was cleared, or after the
    transport could not resubmit some)."""

    direction: Direction


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The device is gone: release it (then report `disconnected`)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Try to claim the device (then report `connected` or `connect_failed`)."""


@dataclass(frozen=True, slots=True)
class EchoAnswered:
    token: Hashable
    rtt: float  # seconds


@dataclass(frozen=True, slots=True)
class EchoTimedOut:
    token: Hashable


@dataclass(frozen=True, slots=True)
class EchoRefused:
    token: Hashable
    reason: Literal["not_connected", "too_long"]
    message: str


@dataclass(frozen=True, slots=True)
class KeepaliveLost:
    """The device stopped answering the keepalive (log it once)."""


@dataclass(frozen=True, slots=True)
class KeepaliveBack:
    """It answers again."""


@dataclass(frozen=True, slots=True)
class UnsolicitedEchoResponse:
    """An Echo Response nobody asked for: counted; the thread logs it (in summary)."""

    length: int


Action = (SendEcho | SendEchoResponse | ClearHalt | Resume | Disconnect | Connect | EchoAnswered
          | EchoTimedOut | EchoRefused | KeepaliveLost | KeepaliveBack | UnsolicitedEchoResponse)

# The actions that need a claimed device.
DEVICE_ACTIONS = (SendEcho, SendEchoResponse, ClearHalt, Resume, Disconnect)


@dataclass(slots=True)
class _Waiting:
    """One of our Echo requests, not answered yet."""

    data: bytes
    sent: float
    deadline: float
    token: Hashable  # the caller's; None for a keepalive
    keepalive_of: int | None  # the connection (its `connects` number) a keepalive probes


class LinkPolicy:
    """The state machine: see the module's theory of operation."""

    def __init__(self, reconnect_interval: float, keepalive: float | None = None,
                 keepalive_misses: int = 1) -> None:
        """reconnect_interval: seconds between attempts to claim an absent device;
        keepalive: seconds between our own Echo requests (0 or None: none)."""
        # Either would make the thread spin: due again as soon as it was done.
        if reconnect_interval <= 0:
            raise ValueError("reconnect_interval must be positive")
        if keepalive is not None and keepalive < 0:
            raise ValueError("keepalive must be positive (0 or None: off)")
        if keepalive_misses < 1:
            raise ValueError("keepalive_misses must be at least 1")
        self.keepalive = keepalive or None  # 0 and None: off
        self.reconnect_interval = reconnect_interval
        self.keepalive_misses = keepalive_misses
        self.state = LinkState.DISCONNECTED
        self.counters = dict.fromkeys(POLICY_COUNTERS, 0)
        self.drop_reasons: dict[str, int] = {}
        self.in_errors: dict[str, int] = {}
        self.echo_rtt_last: float | None = None
        self._next_connect = float("-inf")  # the first attempt is at once
        self._next_keepalive = float("inf")
        self._waiting: list[_Waiting] = []  # oldest first
        self._echo_seq = 0
        self._missed = 0  # keepalives unanswered in a row
        self.keepalive_lost = False

    # -- facts about the link ----------------------------------------------------------

    def connected(self, now: float) -> list[Action]:
        self.state = LinkState.CONNECTED
        self.counters["connects"] += 1
        self._missed = 0
        if self.keepalive:
            self._next_keepalive = now + self.keepalive
        return []

    def connect_failed(self, now: float) -> list[Action]:
        self.state = LinkState.DISCONNECTED
        self.counters["connect_failures"] += 1
        self._next_connect = now + self.reconnect_interval
        return []

    def disconnected(self, now: float, reason: str, frames_lost: int = 0) -> list[Action]:
        """The device was released; `frames_lost`: frames in OUT transfers it never
        completed. reason "unplugged" counts an unplug; "stopped" is the bridge's own
        stop (its frames are counted as such, not as lost to the device)."""
        self.state = LinkState.DISCONNECTED
        if reason == "unplugged":
            self.counters["unplugs"] += 1
        self._drop("stopped" if reason == "stopped" else "no_device", frames_lost)
        self._next_connect = now  # look for it again at once
        self._next_keepalive = float("inf")
        # Pending echoes stay and time out: a request does not end with the device.
        return []

    # -- reports from a claimed device -------------------------------------------------

    def command_received(self, now: float, command: Event) -> list[Action]:
        if self.state is not LinkState.CONNECTED:
            return []
        if isinstance(command, Echo):
            self.counters["echo_answered"] += 1
            return [SendEchoResponse(bytes(command.data))]
        if isinstance(command, EchoResponse):
            data = bytes(command.data)
            waiting = next((w for w in self._waiting if w.data == data), None)
            if waiting is None:
                self.counters["unsolicited_echo_responses"] += 1
                return [UnsolicitedEchoResponse(len(data))]
            self._waiting.remove(waiting)
            rtt = now - waiting.sent
            self.echo_rtt_last = rtt
            self.counters["echo_matched"] += 1
            if waiting.keepalive_of is None:
                return [EchoAnswered(waiting.token, rtt)]
            if waiting.keepalive_of == self.counters["connects"]:
                self._missed = 0
                if self.keepalive_lost:
                    self.keepalive_lost = False
                    return [KeepaliveBack()]
            return []
        return []  # a Hint is advisory; the deframer counted it

    def out_failed(self, status: Status, frames: int) -> list[Action]:
        """An OUT transfer of `frames` frames that did not complete in full; status
        COMPLETED: the device took only part of it."""
        if self.state is not LinkState.CONNECTED:
            return []
        if status is Status.NO_DEVICE:
            return self.device_gone()
        self.counters["out_errors"] += 1
        self._drop("short_write" if status is Status.COMPLETED else status.value, frames)
        if status is Status.STALL:
            self.counters["out_stalls"] += 1
            return [ClearHalt(Direction.OUT), Resume(Direction.OUT)]
        return []

    def in_failed(self, status: Status) -> list[Action]:
        """An IN transfer that did not complete normally."""
        if self.state is not LinkState.CONNECTED or status is Status.CANCELLED:
            return []  # cancelled: the transfer was ours to end (closing)
        if status is Status.NO_DEVICE:
            return self.device_gone()
        self.counters["in_errors"] += 1
        self.in_errors[status.value] = self.in_errors.get(status.value, 0) + 1
        if status is Status.STALL:
            self.counters["in_stalls"] += 1
            return [ClearHalt(Direction.IN), Resume(Direction.IN)]
        return []

    def halted(self, direction: Direction) -> list[Action]:
        """A transport that runs the data path itself stopped `direction` on a stall it
        already counted (and, for OUT, dropped)."""
        if self.state is not LinkState.CONNECTED:
            return []
        return [ClearHalt(direction), Resume(direction)]

    def in_submit_refused(self) -> list[Action]:
        """Some IN transfers could not be resubmitted (counted by the transport)."""
        if self.state is not LinkState.CONNECTED:
            return []
        return [Resume(Direction.IN)]

    def device_gone(self) -> list[Action]:
        """NO_DEVICE, from a completion or a call."""
        if self.state is not LinkState.CONNECTED:
            return []
        return [Disconnect("unplugged")]

    # -- requests ----------------------------------------------------------------------

    def echo_requested(self, now: float, data: bytes | None, timeout: float,
                       token: Hashable) -> list[Action]:
        """Send our own Echo (data None: a unique one); settled by EchoAnswered,
        EchoTimedOut or EchoRefused with this token."""
        if self.state is not LinkState.CONNECTED:
            return [EchoRefused(token, "not_connected", "no device connected")]
        if data is not None and len(data) > MAX_ECHO_DATA:
            return [EchoRefused(token, "too_long", f"echo data longer than {MAX_ECHO_DATA} bytes")]
        return [self._send_echo(now, data, timeout, token, None)]

    # -- time ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """What is due at `now`: echo timeouts, a reconnect attempt, the keepalive."""
        actions: list[Action] = []
        expired = [w for w in self._waiting if now >= w.deadline]
        for waiting in expired:
            self._waiting.remove(waiting)
            self.counters["echo_timeouts"] += 1
            if waiting.keepalive_of is None:
                actions.append(EchoTimedOut(waiting.token))
            elif (waiting.keepalive_of == self.counters["connects"]
                  and self.state is LinkState.CONNECTED):  # else: the unplug says it all
                self._missed += 1
                if self._missed >= self.keepalive_misses and not self.keepalive_lost:
                    self.keepalive_lost = True
                    self.counters["keepalives_lost"] += 1
                    actions.append(KeepaliveLost())
        if self.state is LinkState.DISCONNECTED and now >= self._next_connect:
            self.state = LinkState.CONNECTING
            actions.append(Connect())
        if self.state is LinkState.CONNECTED and self.keepalive and now >= self._next_keepalive:
            # From now, not from the missed time: a late tick sends one, not a burst.
            self._next_keepalive = now + self.keepalive
            actions.append(self._send_echo(now, None, max(KEEPALIVE_MIN_TIMEOUT, self.keepalive),
                                           None, self.counters["connects"]))
        return actions

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing scheduled)."""
        deadlines = [w.deadline for w in self._waiting]
        if self.state is LinkState.DISCONNECTED:
            deadlines.append(self._next_connect)
        elif self.state is LinkState.CONNECTED and self.keepalive:
            deadlines.append(self._next_keepalive)
        return min(deadlines, default=None)

    @property
    def echoes_waiting(self) -> int:
        return len(self._waiting)

    # -- inside ---------------------------------------------------------------------------

    def _send_echo(self, now: float, data: bytes | None, timeout: float, token: Hashable,
                   keepalive_of: int | None) -> SendEcho:
        if data is None:
            # Unique in this run by the number, and unlike an earlier run's by the time.
            self._echo_seq += 1
            data = b"eembridge" + struct.pack("<Qd", self._echo_seq, now)
        data = bytes(data)
        self._waiting.append(_Waiting(data, now, now + timeout, token, keepalive_of))
        self.counters["echo_sent"] += 1
        return SendEcho(data)

    def _drop(self, reason: str, frames: int) -> None:
        if frames:
            self.counters["tx_dropped"] += frames
            self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + frames
