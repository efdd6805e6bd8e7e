"""The bridge: a claimed EEM device on one side, a TAP interface on the other.

Theory of operation
-------------------
One thread runs one poll loop over three sources: the transport's completion fd, the
TAP fd and a wake-up fd (stop requests, echo requests, stats). Everything that touches
frames happens in the data path objects (eembridge.datapath.reference or its Cython twin); this
module only schedules transfers and decides what to do with their outcome. With the
libusb transport's native data path, that transport's event thread reads the TAP and
moves every frame itself; this loop then sees only commands, faults and timers.

  device --bulk IN--> transport --completion--> RxPath (deframe, write to TAP)
  TAP --readable--> TxPath (read, frame, batch) --OUT transfer--> transport --> device

Invariants
* `in_flight` IN transfers are always queued while the device is connected; each
  completion is processed in submission order and its slot resubmitted.
* The TAP is read only while TxPath has room for another batch. When OUT is slow or
  stalled nothing more is read, the kernel's queue absorbs the burst and TCP slows down:
  that is the backpressure. No frame is counted as sent before its OUT transfer
  completed in full; every frame that is not sent is counted under a reason.
* What is not per frame (commands, our Echo and keepalive, failed transfers, stalls,
  reconnecting) is decided by eembridge.core.linkpolicy, fed from this loop: the loop only
  carries out its actions (`_carry_out`). When one of them finds the device gone, the
  device actions left in that list are skipped (they were for the device that went).
* When the device goes (NO_DEVICE), carrier goes off, the TAP and its addresses stay,
  and `connect()` is retried until the device is back.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from . import CODEC, Deframer, Framer
from .core import environment, linkpolicy
from .core.errors import UserError
from .core.events import Event
from .core.linkpolicy import LinkPolicy
from .core.protocol import DEFAULT_MAX_LENGTH, HEADER_SIZE
from .core.transport import (
    Completion,
    DeviceInfo,
    Direction,
    NativeDataPath,
    Status,
    Transport,
    TransportGone,
)
from .link import privileges
from .observe.logs import GarbageSummary, RepeatSummary, event

log = logging.getLogger("eembridge.bridge")

# In the order `eembridge stats` shows them. The policy's (linkpolicy.POLICY_COUNTERS:
# connects, unplugs, stalls, drops, echoes) are counted by it; those of the native data
# path are added from it, under the same names.
BRIDGE_COUNTERS = (
    "connects",  # device claimed (first time and after every replug)
    "unplugs",  # device lost (NO_DEVICE)
    "tap_lost",  # the TAP's interface was deleted under the bridge (it stops)
    "in_errors",  # IN transfers that ended in an error status
    "in_stalls",  # IN endpoint stalls cleared
    "in_submit_errors",  # IN transfers libusb refused to resubmit (retried)
    "rx_commands_dropped",  # EEM commands the native IN path had no room to hand over
    "rx_deframe_failures",  # IN transfers the native path could not deframe (no memory)
    "out_stalls",  # OUT endpoint stalls cleared
    "out_errors",  # OUT transfers that failed for good
    "tx_transfers",  # OUT transfers completed in full
    "tx_frames",  # frames in those transfers: really sent
    "tx_bytes",  # bytes in those transfers
    "tx_dropped",  # frames not sent, all reasons (see drop_reasons)
    "backpressure",  # times OUT filled up while the TAP had frames (until it drained)
    "echo_answered",  # Echo Responses sent for the device's Echo
    "echo_sent",  # our own Echo requests
    "echo_matched",  # Echo Responses that answered one of ours
    "unsolicited_echo_responses",  # Echo Responses nobody asked for: a symptom
    "echo_timeouts",  # our Echo requests that got no answer in time
    "keepalives_lost",  # times the device stopped answering the keepalive
    "connect_failures",  # attempts to claim the device that found none (retried)
)


# Defaults by bulk packet size: (max_transfer, OUT bytes in flight), from the real-peer
# bench (bench/RESULTS.md, session 6). Every byte queued at the device is delay under
# load, so the budget follows the link's speed. High speed: 12 KB transfers of f_eem
# buffers, loaded ping 6.6 ms (cdc_eem 6.4) with 96 KB in flight, 29 ms with 384 KB.
# Full speed: 12 KB transfers were slower than 1536-byte ones (16.4 vs 21.3 Mbit/s) and
# 12 KB in flight kept loaded ping at 9.3 ms where 96 KB gave 26.7. SuperSpeed: f_eem
# ended multi-buffer transfers short there (its buffers are not whole 1024-byte
# packets), so one buffer per transfer.
OUT_DEFAULTS = {64: (1536, 8 * 1536), 512: (12288, 8 * 12288), 1024: (1536, 32 * 1536)}


@dataclass
class BridgeOptions:
    """Everything a bridge can be told; the CLI and the config file fill this in."""

    tap: str = "usb0"
    # "tun": a layer-3 TUN, Ethernet translated in userspace (link/tun.py); "user": the
    # board's traffic ends in libslirp, reached by forwards (link/user.py); "frames": the
    # frames end in this program, send_frame / recv_frame (link/frames.py)
    link: str = "tap"
    forwards: list[str] = field(default_factory=list)  # --link user: "tcp:8022:22", ...
    nat: bool = False  # --link user: the board's own connections may leave through libslirp
    addresses: list[str] = field(default_factory=list)  # e.g. ["169.254.7.2/24"]
    dhcp: bool = False  # --link tun: take the IPv4 address from the board's DHCP server
    # The DHCP client's clock against the real one; >1 only in tests: dnsmasq's shortest
    # lease is two minutes, and renewal, rebinding and expiry are what they check.
    dhcp_time_scale: float = 1.0
    peer: str | None = None  # peer IP for a static neighbour entry
    peer_mac: str | None = None
    mtu: int = 1500
    mac: str | None = None
    # The TAP's queue, in packets; None: 8 with offload (a packet may then be 64 KB), 64
    # without. tun detaches queued packets from their socket, so TCP's small-queue limit
    # cannot see it: the kernel's 500 held ~120 ms under an upload (bench/RESULTS.md).
    txqueuelen: int | None = None
    tx_crc: bool = True
    # None: out_transfers() decides by the device's packet size.
    max_transfer: int | None = None
    # Several frames per OUT transfer. None: batch where the device is known to take it
    # (DeviceInfo.takes_batches) or max_transfer is given; False: one frame per transfer.
    batch: bool | None = None
    # A multiple of every max packet size. 4096 over 16384: peer→host +20% in two boots
    # against f_eem (one frame per transfer); a longer transfer continues in the next one.
    in_transfer_size: int = 4096
    in_flight: int = 32
    out_in_flight: int | None = None  # None: out_transfers() decides
    # 0: off; N: no EEM packet crosses a multiple of N bytes in an OUT transfer, so a
    # device that receives into N-byte buffers takes many frames per transfer
    # (codec.Framer); "f_eem": Linux f_eem's buffer size for this MTU and packet size.
    # Harmless for a device that takes any transfer: the fill is zero-length EEM packets.
    out_chunk: int | str = "f_eem"
    keepalive: float | None = None  # seconds between our own Echo requests
    persist: bool = False  # keep the TAP when the bridge exits
    # TAP TSO and checksum offload (eembridge/core/offload.py); None: on when the C data path
    # is there (it is the one that can cut and merge TCP segments).
    offload: bool | None = None
    stats_socket: str | None = None  # path of the UNIX stats socket; None: no socket
    reconnect_interval: float = 0.25
    garbage_log_interval: float = 5.0  # at most one "resync: ..." summary line per interval

    def resolved(self) -> BridgeOptions:
        """A copy with every automatic (None) choice made."""
        from . import datapath

        offload = (datapath.OFFLOAD and self.link == "tap") if self.offload is None else self.offload
        txqueuelen = self.txqueuelen
        if txqueuelen is None:
            txqueuelen = 8 if offload else 64
        return replace(self, offload=offload, txqueuelen=txqueuelen)

    def out_transfers(self, max_packet: int, takes_batches: bool) -> tuple[int, int, bool]:
        """(max_transfer, out_in_flight, batch) for a device with this bulk packet size:
        the given values, else OUT_DEFAULTS (in flight: its bytes in transfers, 2..32).
        Without batching a transfer holds one packet of the longest frame and its ZLP
        header."""
        default_transfer, budget = OUT_DEFAULTS[min(OUT_DEFAULTS, key=lambda p: abs(p - max_packet))]
        batch = self.batch
        if batch is None:
            batch = takes_batches or self.max_transfer is not None
        if batch:
            max_transfer = self.max_transfer or default_transfer
        else:
            max_transfer = self.max_length + 2 * HEADER_SIZE
        out_in_flight = self.out_in_flight
        if out_in_flight is None:
            out_in_flight = min(32, max(2, budget // max_transfer))
        return max_transfer, out_in_flight, batch

    @property
    def max_length(self) -> int:
        """Longest bmLength accepted and sent: VLAN-tagged frame of this MTU plus check."""
        return max(DEFAULT_MAX_LENGTH, self.mtu + 14 + 4 + 4)


def out_chunk_size(out_chunk: int | str, mtu: int, max_packet: int) -> int:
    """--out-chunk in bytes. "f_eem": what Linux u_ether allocates per OUT request,
    ETH_HLEN + MTU + RX_EXTRA (20) + the EEM header (2), rounded up to max packet:
    1536 at full and high speed, 2048 at SuperSpeed for MTU 1500."""
    if out_chunk == "f_eem":
        size = 14 + mtu + 20 + 2
        return -(-size // max_packet) * max_packet
    return int(out_chunk)


class Bridge:
    """Bridge one EEM device to one TAP interface. Use as a context manager:

        with Bridge(connect, BridgeOptions(tap="usb0", addresses=["169.254.7.2/24"])) as b:
            ...
            print(b.stats())

    On the user link there is no interface and no privilege to hold: the board's traffic
    ends in libslirp (link/user.py) and its ports are reached on localhost:

        options = BridgeOptions(link="user", forwards=["tcp:8022:22"])  # board 10.0.2.15
        with Bridge(eembridge.board_connector("1d6b:0104"), options) as b:
            b.connected.wait(10)
            port = b.forwarded_ports["tcp:22"]  # 8022: ssh -p 8022 localhost
    """

    def __init__(
        self,
        connect: Callable[[], Transport],
        options: BridgeOptions | None = None,
        tap: Any = None,
        on_link_ready: Callable[[], None] | None = None,
    ) -> None:
        """on_link_ready runs in the caller's thread once the TAP is configured and before
        the bridge starts any thread: the place to drop privileges (eembridge.link.privileges)."""
        self.options = (options or BridgeOptions()).resolved()
        self._on_link_ready = on_link_ready
        self._connect = connect
        self._tap = tap
        self._own_tap = tap is None
        self._thread: threading.Thread | None = None
        self._backlogged = False  # in a backpressure episode (_send_from_tap)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        opts = self.options
        # Decides everything that is not a frame; touched only by the bridge thread (and
        # by the caller once that thread ended).
        self.policy = LinkPolicy(keepalive=opts.keepalive,
                                 reconnect_interval=opts.reconnect_interval)
        # The loop's and the native data path's counters; the policy's are added to them.
        self._counters = dict.fromkeys(BRIDGE_COUNTERS, 0)
        self._loop_totals: dict[str, int] = {}  # event-thread counters of past connections
        self.drop_reasons: dict[str, int] = {}  # of the native data path's past connections
        self.in_errors: dict[str, int] = {}
        self.connected = threading.Event()
        self.error: BaseException | None = None
        # Callers' Echo requests by the policy's token, until it settles them.
        self._echo_futures: dict[int, Future[float]] = {}
        self._echo_tokens = itertools.count()
        self._transport: Transport | None = None
        self._native: NativeDataPath | None = None  # the transport runs the data path (libusb)
        self._in_submitted = self._in_completed = 0
        self._out: deque[Any] = deque()  # OUT transfers in flight, oldest first
        self.deframer = Deframer(max_length=opts.max_length)
        self.framer: Any = None  # made when the device's max packet is known
        self.rx: Any = None
        self.tx: Any = None
        self.device_info: DeviceInfo | None = None
        self._control: Any = None
        # Extra snapshot sections from observers (e.g. the --pcap capture): name -> counters.
        self.observers: dict[str, Callable[[], dict[str, Any]]] = {}
        # Counters of what serves other local processes (control socket, --metrics).
        self.servers: dict[str, Callable[[], dict[str, Any]]] = {}
        self._garbage = GarbageSummary(log, opts.garbage_log_interval)
        self._unsolicited = RepeatSummary(log, "unsolicited_echo_response",
                                          "Echo Responses nobody asked for: device or link fault",
                                          opts.garbage_log_interval)
        self._next_garbage_check = 0.0

    # -- life cycle ----------------------------------------------------------------

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._tap is None:
            from . import datapath
            from .link.tap import Tap

            if self.options.offload and not datapath.OFFLOAD:
                raise UserError("--offload needs the compiled data path (eembridge._fast.datapath); "
                                "this install runs the pure-Python one")
            if self.options.dhcp and self.options.link != "tun":
                raise UserError(f"--dhcp {DHCP_NEEDS_TUN}")
            if self.options.link == "tun":
                self._tap = _open_tun(self.options)
            elif self.options.link == "user":
                self._tap = _open_user(self.options)
            elif self.options.link == "frames":
                self._tap = _open_frames(self.options)
            elif self.options.link != "tap":
                raise UserError(f"link {self.options.link!r}: expected one of tap, tun, user, "
                                "frames")
            else:
                self._tap = Tap(self.options.tap, mtu=self.options.mtu, mac=self.options.mac,
                                txqueuelen=self.options.txqueuelen, persist=self.options.persist,
                                offload=bool(self.options.offload))
        self.deframer.mac = _mac_bytes(getattr(self._tap, "mac", None))
        self._configure_link()
        if self._on_link_ready is not None:
            self._on_link_ready()
        if self.options.stats_socket:
            from .observe.control import ControlServer

            self._control = ControlServer(self.options.stats_socket, self)
        opts = self.options
        # Logged before the thread starts, so "started" always precedes "claimed".
        # The link's own word: a user or frames link has no interface to name.
        where = {"tap": f"TAP {opts.tap}", "tun": f"TUN {opts.tap}"}.get(opts.link,
                                                                          f"{opts.link} link")
        log.info("started: %s (mtu %d, addresses %s, offload %s, queue %d)", where,
                 opts.mtu, ", ".join(opts.addresses) or "none",
                 "on" if opts.offload else "off", opts.txqueuelen,
                 extra=event("started", tap=opts.tap, link=opts.link, mtu=opts.mtu,
                             addresses=opts.addresses, offload=bool(opts.offload),
                             txqueuelen=opts.txqueuelen))
        self._thread = threading.Thread(target=self._run_guarded, name=f"eembridge-{opts.tap}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        started = self._thread is not None
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("bridge thread did not stop within %.0f s", timeout)
            self._thread = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._tap is not None and self._own_tap:
            self._tap.close()
            self._tap = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if started:
            self._garbage.update(time.monotonic(), self.deframer.counters(), final=True)
            self._unsolicited.tick(time.monotonic(), final=True)
            c = self._counters_now()
            log.info("stopped: TAP %s (%d connects, %d unplugs, %d frames sent, %d dropped)",
                     self.options.tap, c["connects"], c["unplugs"], c["tx_frames"], c["tx_dropped"],
                     extra=event("stopped", tap=self.options.tap, **c))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the bridge stopped (or timeout); True if it stopped."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def tap(self) -> Any:
        return self._tap

    def send_frame(self, frame: bytes | bytearray | memoryview, timeout: float | None = 1.0) -> bool:
        """link="frames": one Ethernet frame to the board (link/frames.py). False if the
        link had no room within `timeout` (the board is slower than the program)."""
        return bool(self._frames_link().send_frame(frame, timeout))

    def recv_frame(self, timeout: float | None = None) -> bytes | None:
        """link="frames": the next Ethernet frame from the board, None after `timeout`."""
        frame: bytes | None = self._frames_link().recv_frame(timeout)
        return frame

    def _frames_link(self) -> Any:
        if not hasattr(self._tap, "recv_frame"):
            raise RuntimeError('send_frame and recv_frame need a started bridge with link="frames"')
        return self._tap

    @property
    def forwarded_ports(self) -> dict[str, int]:
        """The user link's forwards: the localhost port reaching each of the board's,
        {"tcp:22": 8022}; empty on the other links and before start."""
        return dict(getattr(self._tap, "forwarded_ports", None) or {})

    @property
    def echo_rtt_last(self) -> float | None:
        """Round-trip time of the last answered Echo (ours or the keepalive's), seconds."""
        return self.policy.echo_rtt_last

    # -- requests from other threads --------------------------------------------

    def echo(self, data: bytes | None = None, timeout: float = 2.0) -> float:
        """Send an EEM Echo to the device and return the round-trip time in seconds.

        Raises TimeoutError if no matching Echo Response came back in time.
        """
        return self.echo_async(data, timeout).result(timeout + 1.0)

    def echo_async(self, data: bytes | None = None, timeout: float = 2.0) -> Future[float]:
        """echo() without waiting: the Future gets the round-trip time, or TimeoutError
        once `timeout` passed (the control socket waits on it without a thread)."""
        future: Future[float] = Future()
        self._requests.put(lambda: self._request_echo(data, future, timeout))
        self._wake()
        return future

    def stats(self) -> dict[str, Any]:
        """A snapshot of every counter, safe to call from any thread."""
        future: Future[dict[str, Any]] = Future()
        if self._thread is None or not self._thread.is_alive():
            return self._snapshot()
        self._requests.put(lambda: future.set_result(self._snapshot()))
        self._wake()
        try:
            return future.result(2.0)
        except TimeoutError:
            return self._snapshot()

    def _counters_now(self) -> dict[str, int]:
        """The loop's counters with the policy's added (not the native path's live ones)."""
        counters = dict(self._counters)
        for name, value in self.policy.counters.items():
            counters[name] += value
        return counters

    def _snapshot(self) -> dict[str, Any]:
        counters = self._counters_now()
        in_errors = _added(self.in_errors, self.policy.in_errors)
        drop_reasons = _added(self.drop_reasons, self.policy.drop_reasons)
        in_flight, out_queued = self._in_submitted - self._in_completed, len(self._out)
        in_buffers = "ring"
        if self._native is not None:  # plus the live counts of the native data path
            rx, tx = _merge_native(self._native, counters, in_errors, drop_reasons)
            in_flight, out_queued = rx["in_flight"], out_queued + tx["in_flight"]
            in_buffers = rx["in_buffers"]
        snapshot: dict[str, Any] = {
            "tap": self.options.tap,
            "codec": CODEC,
            "connected": self._transport is not None,
            "native": self._native is not None,
            # Where IN transfers land: memory mapped from usbfs (then copied into the
            # ring), or the ring itself.
            "in_buffers": in_buffers,
            "device": asdict(self.device_info) if self.device_info else None,
            "bridge": counters,
            "drop_reasons": drop_reasons,
            "in_errors": in_errors,
            "echo_rtt_last": self.echo_rtt_last,
            "rx": self.deframer.counters(),
            "tx": self.framer.counters() if self.framer else {},
            # How OUT transfers are laid out for this device (batch: several frames each).
            "out_layout": ({"batch": self.framer.batch, "max_transfer": self.framer.max_transfer,
                            "chunk": self.framer.out_chunk} if self.framer else None),
            "rx_path": self.rx.counters() if self.rx else {},
            "tx_path": self.tx.counters() if self.tx else {},
            "tx_bytes_in_flight": self.tx.bytes_in_flight if self.tx else 0,
            # Queue depth gauges (eembridge stats --watch, --metrics).
            "in_transfers_in_flight": in_flight if self._transport is not None else 0,
            "out_transfers_queued": out_queued if self._transport is not None else 0,
            # Of the thread answering (the bridge's own once it runs): what it may still do.
            "capabilities": privileges.held(),
        }
        if self._native is not None or self._loop_totals:  # the thread moving the frames
            snapshot["event_loop"] = _added(self._loop_totals,
                                            self._native.loop_stats() if self._native else {})
        if self.observers:
            snapshot["capture"] = {name: get() for name, get in self.observers.items()}
        if self.servers:
            snapshot["servers"] = {name: get() for name, get in self.servers.items()}
        if self._tap is not None and hasattr(self._tap, "l3_stats"):  # --link tun
            snapshot["l3"] = self._tap.l3_stats()
        if self._tap is not None and hasattr(self._tap, "user_stats"):  # --link user
            snapshot["user"] = self._tap.user_stats()
        if getattr(self._tap, "dhcp", None) is not None:  # --link tun --dhcp
            snapshot["dhcp"] = self._tap.dhcp_stats()
        if self._tap is not None and hasattr(self._tap, "frames_stats"):  # link="frames"
            snapshot["frames"] = self._tap.frames_stats()
        if self._tap is not None and hasattr(self._tap, "kernel_stats"):
            try:
                snapshot["link"] = self._tap.kernel_stats().as_dict()
            except OSError as exc:
                snapshot["link"] = {"error": str(exc)}
        return snapshot

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or shutting down

    # -- the loop ----------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except UserError as exc:  # e.g. --wait-timeout expired: the owner prints one line
            self.error = exc
            log.debug("bridge stopped: %s", exc)
        except BaseException as exc:  # the owner sees it through .error and the log
            self.error = exc
            log.exception("bridge stopped by an error: %s", exc)
        finally:
            self._disconnect(reason="stopped", close_quietly=True)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        self._poller = poller
        tap_fd = self._tap.fileno()
        # Always registered: with no events asked for, poll still reports the TAP's
        # errors (tun says POLLERR once its interface is deleted under us).
        poller.register(tap_fd, 0)
        # Where TxPath.fill finds frames, if not there: the TUN link's fast path reads the
        # TUN too (an epoll descriptor, which reports no hang-up of its own).
        ready_fd = getattr(self._tap, "ready_fd", tap_fd)
        if ready_fd != tap_fd:
            poller.register(ready_fd, 0)
        reading_tap = False
        while not self._stop.is_set():
            now = time.monotonic()
            self._carry_out(self.policy.tick(now))  # reconnect, keepalive, echo timeouts
            self._log_summaries(now)
            # Backpressure: poll the TAP only while there is room to send what we read.
            # The native data path reads the TAP in its own thread.
            want_tap = (self._transport is not None and self.tx is not None
                        and self._native is None and self.tx.has_room)
            if want_tap != reading_tap:
                poller.modify(ready_fd, select.POLLIN if want_tap else 0)
                reading_tap = want_tap
            for fd, mask in poller.poll(self._timeout_ms(now)):
                if fd == self._wake_r:
                    self._drain_wake()
                elif fd == tap_fd:
                    if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        self._counters["tap_lost"] += 1
                        raise UserError(f"TAP {self.options.tap} is gone (deleted while the "
                                        "bridge ran?): stopping")
                    self._send_from_tap()
                elif fd == ready_fd:
                    self._send_from_tap()
                elif self._transport is not None and fd == self._transport.fileno():
                    self._reap()

    def _timeout_ms(self, now: float) -> int:
        deadline = self.policy.next_deadline()
        # At least once a second: the log summaries.
        wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
        return int(wait * 1000) + 1

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request()

    def _log_summaries(self, now: float) -> None:
        if now >= self._next_garbage_check:  # not per wake-up: once a second is enough
            self._next_garbage_check = now + 1.0
            self._garbage.update(now, self.deframer.counters())
            self._unsolicited.tick(now)

    # -- the link policy's actions -----------------------------------------------------------

    def _carry_out(self, actions: list[linkpolicy.Action]) -> None:
        """Do what the policy decided, in order."""
        for action in actions:
            if isinstance(action, linkpolicy.DEVICE_ACTIONS) and self._transport is None:
                continue  # the device went while carrying out an earlier one
            try:
                self._carry_out_one(action)
            except TransportGone:
                self._carry_out(self.policy.device_gone())

    def _carry_out_one(self, action: linkpolicy.Action) -> None:
        if isinstance(action, linkpolicy.SendEchoResponse):
            self._submit_out_bytes(self.framer.echo_response(action.data))
        elif isinstance(action, linkpolicy.SendEcho):
            self._submit_out_bytes(self.framer.echo(action.data))
        elif isinstance(action, linkpolicy.ClearHalt):
            self._clear_halt(action.direction)
        elif isinstance(action, linkpolicy.Resume):
            # The Python loop never stops a direction: it resubmits every IN slot as it
            # completes, and reads the TAP again once OUT has room. The native data path
            # stops on a stall until told.
            if self._native is None:
                pass
            elif action.direction is Direction.OUT:
                self._native.tx_resume()
            else:
                try:
                    self._native.rx_resume()
                except TransportGone:
                    raise
                except OSError as exc:  # counted by the transport; the next poll retries
                    log.warning("resubmitting IN transfers failed: %s", exc)
        elif isinstance(action, linkpolicy.Disconnect):
            self._disconnect(reason=action.reason)
        elif isinstance(action, linkpolicy.Connect):
            if not self._try_connect(self._poller):
                self._carry_out(self.policy.connect_failed(time.monotonic()))
        elif isinstance(action, linkpolicy.EchoAnswered):
            future = self._echo_futures.pop(cast(int, action.token))
            if not future.done():
                future.set_result(action.rtt)
        elif isinstance(action, (linkpolicy.EchoTimedOut, linkpolicy.EchoRefused)):
            future = self._echo_futures.pop(cast(int, action.token))
            if future.done():
                pass
            elif isinstance(action, linkpolicy.EchoTimedOut):
                future.set_exception(TimeoutError("no Echo Response from the device"))
            elif action.reason == "not_connected":
                future.set_exception(ConnectionError(action.message))
            else:
                future.set_exception(ValueError(action.message))
        elif isinstance(action, linkpolicy.UnsolicitedEchoResponse):
            self._unsolicited.hit(time.monotonic(), f"{action.length} bytes")
        elif isinstance(action, (linkpolicy.KeepaliveLost, linkpolicy.KeepaliveBack)):
            lost = isinstance(action, linkpolicy.KeepaliveLost)
            name = "keepalive_lost" if lost else "keepalive_back"
            (log.warning if lost else log.info)(
                "%s: the device %s", name,
                "does not answer EEM Echo" if lost else "answers EEM Echo again",
                extra=event(name, tap=self.options.tap))

    def _request_echo(self, data: bytes | None, future: Future[float], timeout: float) -> None:
        token = next(self._echo_tokens)
        self._echo_futures[token] = future
        self._carry_out(self.policy.echo_requested(time.monotonic(), data, timeout, token))

    # -- connection ----------------------------------------------------------------------

    def _try_connect(self, poller: select.poll) -> bool:
        from . import datapath

        try:
            transport = self._connect()
        except TransportGone:
            return False
        opts = self.options
        info = transport.info
        if opts.in_transfer_size % info.max_packet:
            transport.close()
            raise ValueError(
                f"IN transfer size {opts.in_transfer_size} is not a multiple of the "
                f"device's max packet size {info.max_packet}"
            )
        self.device_info = info
        max_transfer, out_in_flight, batch = opts.out_transfers(info.max_packet,
                                                               info.takes_batches)
        if (self.framer is None or self.framer.max_packet != info.max_packet
                or self.framer.batch != batch):
            # One frame per transfer crosses no device buffer: nothing to fill or pad.
            chunk = out_chunk_size(opts.out_chunk, opts.mtu, info.max_packet) if batch else 0
            try:
                self.framer = Framer(crc=opts.tx_crc, max_transfer=max_transfer,
                                     max_packet=info.max_packet, max_length=opts.max_length,
                                     out_chunk=chunk, batch=batch)
            except ValueError as exc:
                transport.close()
                raise UserError(f"--out-chunk {opts.out_chunk}: {exc}") from None
        tap_fd = self._tap.fileno()
        vnet = bool(getattr(self._tap, "offload", False))  # every TAP read/write has a header
        if self.rx is None:
            self.rx = datapath.RxPath(self.deframer, tap_fd, opts.in_flight + 1,
                                           opts.in_transfer_size, vnet=vnet)
        self.rx.reset()
        self.tx = datapath.TxPath(self.framer, tap_fd, out_in_flight * max_transfer,
                                       vnet=vnet)
        install = getattr(self._tap, "install_fast_path", None)
        if datapath.COMPILED and install is not None:  # the TUN link's C translation
            install(self.rx, self.tx)
        self._in_submitted = 0
        self._in_completed = 0
        self._out = deque()
        self._backlogged = False
        # The data path runs in C, in the engine (eembridge/_fast/engine.pxi): the libusb
        # transport's event thread runs it, and the simulated device is driven by it
        # through transport.engine(). It delivers IN transfers and reads the TAP into
        # OUT ones, so no Python runs per transfer or per frame (bench/interop.py).
        # The pure-Python data path, --usb-pcap recording and EEMBRIDGE_NATIVE=0 (to
        # compare: bench/interop.py --variant) take the Python loop.
        native: NativeDataPath | None = None
        if datapath.COMPILED and environment.ENV.native:
            engine = getattr(transport, "engine", None)
            driven = engine() if callable(engine) else None
            if driven is not None:
                transport = driven
            if callable(getattr(transport, "start_rx", None)):
                native = cast(NativeDataPath, transport)
        self._transport = transport
        poller.register(transport.fileno(), select.POLLIN)
        self._poller = poller
        try:
            if native is not None:
                native.start_rx(self.rx, opts.in_flight)
                native.start_tx(self.tx)
                self._native = native
            else:
                for _ in range(opts.in_flight):
                    self._submit_in()
        except TransportGone:
            self._disconnect(reason="gone while starting")
            return False
        self._carry_out(self.policy.connected(time.monotonic()))
        self._set_carrier(True)
        self.connected.set()
        name = "claimed" if self.policy.counters["connects"] == 1 else "reconnected"
        busy_polls = self._native.busy_polls if self._native is not None else None
        path = (f"frames moved in C, busy-poll {busy_polls}" if busy_polls is not None
                else "frames moved by the bridge loop")
        if self._native is not None:
            rx = self._native.rx_stats()
            if rx["in_buffers"] == "usbfs-mapped":
                path += ", IN buffers mapped from usbfs"
            elif rx["usbfs_refused"]:
                log.warning("usbfs refused to map %d bytes for the IN buffers (its limit "
                            "/sys/module/usbcore/parameters/usbfs_memory_mb, shared by every "
                            "program using usbfs, or an old kernel): IN transfers land in the "
                            "ring, at more CPU per frame", rx["usbfs_refused"])
        framer = self.framer
        layout = (f"OUT batches of up to {framer.max_transfer} bytes"
                  + (f" in {framer.out_chunk}-byte chunks" if framer.out_chunk else "")
                  if framer.batch else "OUT one frame per transfer")
        log.info("%s: %s (max packet %d, %s speed; %s; %s)", name, info.description,
                 info.max_packet, info.speed, path, layout,
                 extra=event(name, tap=opts.tap, device=info.description, serial=info.serial,
                             max_packet=info.max_packet, busy_polls=busy_polls,
                             out_batch=framer.batch, max_transfer=framer.max_transfer))
        if not framer.batch and opts.batch is None and self.policy.counters["connects"] == 1:
            log.info("OUT: one frame per transfer, as Linux's cdc_eem sends: this device is "
                     "not known to take several (--max-transfer N batches them)")
        return True

    def _disconnect(self, reason: str, close_quietly: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        self.connected.clear()
        try:
            self._poller.unregister(transport.fileno())
        except (KeyError, ValueError, OSError):
            pass
        self._set_carrier(False)
        try:
            transport.close()
        except Exception as exc:  # closing a vanished device may fail; say so, go on
            log.warning("closing the transport failed: %s", exc)
        dropped = sum(t.frames for t in self._out if not t.done)
        if self._native is not None:  # its counters end with it: keep them in the bridge's
            _rx, tx = _merge_native(self._native, self._counters, self.in_errors,
                                    self.drop_reasons)
            dropped += tx["closing_frames"] + tx["gone_frames"]
            self._loop_totals = _added(self._loop_totals, self._native.loop_stats())
            self._native = None
        self._carry_out(self.policy.disconnected(time.monotonic(), reason, dropped))
        self._out.clear()
        if self.tx is not None:
            self.tx.bytes_in_flight = 0
        if not close_quietly:
            name = "unplugged" if reason == "unplugged" else "disconnected"
            log.warning("%s: device gone (%s), %d frames dropped; waiting for it to return", name,
                        reason, dropped, extra=event(name, tap=self.options.tap, reason=reason,
                                                     dropped=dropped))

    def _set_carrier(self, on: bool) -> None:
        if self._tap is not None and hasattr(self._tap, "set_carrier"):
            try:
                self._tap.set_carrier(on)
            except OSError as exc:
                log.warning("could not set carrier %s: %s", "on" if on else "off", exc)

    def _configure_link(self) -> None:
        tap, opts = self._tap, self.options
        if not hasattr(tap, "add_address"):
            return  # a bare fd-like object handed in by an embedding program
        tap.set_carrier(False)
        for address in opts.addresses:
            tap.add_address(address)
        tap.up()
        if opts.peer and opts.peer_mac:
            tap.add_neighbour(opts.peer, opts.peer_mac)

    # -- transfers -------------------------------------------------------------------------

    def _submit_in(self) -> None:
        assert self._transport is not None
        sequence = self._in_submitted
        self._transport.submit_in(self.rx.slot_buffer(sequence), sequence)
        self._in_submitted += 1

    def _reap(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for completion in transport.completions():
            if self._transport is None:
                return
            if completion.status is Status.NO_DEVICE:
                self._carry_out(self.policy.device_gone())
                return
            if completion.direction is Direction.IN:
                self._in_done(completion)
            else:
                self._out_done(completion)
        if self._native is not None and self._transport is not None:
            self._native_poll(self._native)

    def _native_poll(self, native: NativeDataPath) -> None:
        """What the native data path handed over: commands, stalls, the device going."""
        commands, in_stalls, in_gone, short_of = native.rx_poll()
        out_stalls, out_gone = native.tx_poll()
        self._commands(commands)
        policy = self.policy
        if in_gone or out_gone:
            self._carry_out(policy.device_gone())
            return
        # Counted (and OUT's batch dropped) by the native path already: only clear them.
        actions = policy.halted(Direction.IN) if in_stalls else []
        if short_of and not in_stalls:
            actions += policy.in_submit_refused()
        if out_stalls:
            actions += policy.halted(Direction.OUT)
        self._carry_out(actions)

    def _in_done(self, completion: Completion) -> None:
        status = completion.status
        actual = completion.actual
        if status is not Status.COMPLETED:
            self._carry_out(self.policy.in_failed(status))
            if status is Status.CANCELLED or self._transport is None:
                return
            if status is not Status.TIMED_OUT:
                actual = 0  # an error's data, if any, is not to be trusted
        # Every non-normal end of a transfer also ends the EEM stream (short=True).
        commands = self.rx.complete(completion.tag, actual, completion.short)
        self._in_completed += 1
        self._commands(commands)
        if self._transport is None:
            return  # answering an Echo found the device gone
        try:
            self._submit_in()
        except TransportGone:
            self._carry_out(self.policy.device_gone())

    def _commands(self, commands: list[Event]) -> None:
        now = time.monotonic()
        for command in commands:
            self._carry_out(self.policy.command_received(now, command))

    def _submit_out_bytes(self, transfer: bytes) -> None:
        """A command transfer: sent ahead of TAP data that is not submitted yet."""
        from .datapath.reference import OutTransfer

        self._submit_out(OutTransfer(memoryview(transfer), frames=0, owned=False))

    def _send_from_tap(self) -> None:
        if self._transport is None:
            return
        for transfer in self.tx.fill():
            self._submit_out(transfer)
            if self._transport is None:
                return
        # One backpressure episode: OUT filled up while the TAP still had frames, until
        # a read finds the TAP drained (the engine counts the same way, _tx_pump).
        if not self.tx.has_room:
            if not self._backlogged:
                self._backlogged = True
                self._counters["backpressure"] += 1
        else:
            self._backlogged = False

    def _submit_out(self, transfer: Any) -> None:
        self._out.append(transfer)
        try:
            assert self._transport is not None
            self._transport.submit_out(transfer.buffer, id(transfer))
        except TransportGone:
            self._carry_out(self.policy.device_gone())

    def _out_done(self, completion: Completion) -> None:
        transfer = next((t for t in self._out if id(t) == completion.tag and not t.done), None)
        if transfer is None:
            log.error("OUT completion for an unknown transfer (tag %x)", completion.tag)
            return
        if completion.status is Status.COMPLETED and completion.actual == completion.requested:
            self._counters["tx_transfers"] += 1
            self._counters["tx_frames"] += transfer.frames
            self._counters["tx_bytes"] += completion.actual
            transfer.done = True
        else:
            # Dropped and counted, never resent; a stall's halt cleared (linkpolicy).
            transfer.done = True
            self._carry_out(self.policy.out_failed(completion.status, transfer.frames))
            if self._transport is None:
                return  # the disconnect released every transfer
        # Release in order: the TX ring is reused strictly first in, first out.
        while self._out and self._out[0].done:
            done = self._out.popleft()
            if done.owned:
                self.tx.release(done)

    def _clear_halt(self, direction: Direction) -> None:
        assert self._transport is not None
        try:
            self._transport.clear_halt(direction)
        except TransportGone:
            raise
        except Exception as exc:
            log.warning("clearing the %s stall failed: %s", direction.value, exc)


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def _merge_native(native: NativeDataPath, counters: dict[str, int], in_errors: dict[str, int],
                  drop_reasons: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add the native data path's counters to the bridge's (same names, same meaning);
    returns its (rx_stats, tx_stats) for the gauges."""
    rx, tx = native.rx_stats(), native.tx_stats()
    for key, value in (("in_errors", sum(rx["errors"].values())), ("in_stalls", rx["stalls"]),
                       ("in_submit_errors", rx["submit_errors"]),
                       ("rx_commands_dropped", rx["commands_dropped"]),
                       ("rx_deframe_failures", rx["deframe_failures"]),
                       ("tx_transfers", tx["transfers"]), ("tx_frames", tx["frames"]),
                       ("tx_bytes", tx["bytes"]), ("tx_dropped", sum(tx["dropped"].values())),
                       ("out_stalls", tx["stalls"]), ("backpressure", tx["backpressure"]),
                       ("out_errors", sum(tx["errors"].values()) + tx["short_writes"]
                        + tx["submit_errors"])):
        counters[key] += value
    for errors, more in ((in_errors, rx["errors"]), (drop_reasons, tx["dropped"])):
        for name, count in more.items():
            errors[name] = errors.get(name, 0) + count
    return rx, tx


# Said after "--dhcp" or a config file's "FILE:LINE: [section] dhcp".
DHCP_NEEDS_TUN = ("needs --link tun: a TAP has Ethernet, so the system's DHCP client runs on "
                  "it (dhclient, NetworkManager)")


def _open_tun(options: BridgeOptions) -> Any:
    """--link tun: a TUN and the Ethernet translation in front of it (link/tun.py)."""
    from .link.tun import TunLink

    if options.offload:
        raise UserError("--offload is for the TAP link: the TUN link's frames are made by "
                        "its translation, not the kernel's TCP (drop --offload or --link tun)")
    return TunLink(options.tap, mtu=options.mtu, mac=options.mac,
                   txqueuelen=options.txqueuelen, persist=options.persist,
                   peer_mac=options.peer_mac, dhcp_client=options.dhcp,
                   dhcp_time_scale=options.dhcp_time_scale)


def _open_user(options: BridgeOptions) -> Any:
    """--link user: libslirp behind a pump (link/user.py); no interface, no privilege."""
    from .link.user import open_user_link

    if options.offload:
        raise UserError("--offload is for the TAP link: the user link has no kernel interface "
                        "(drop --offload or --link user)")
    return open_user_link(options.tap, addresses=options.addresses, peer=options.peer,
                          forwards=options.forwards, nat=options.nat, mtu=options.mtu,
                          mac=options.mac)


def _open_frames(options: BridgeOptions) -> Any:
    """link="frames": the frames end in the embedding program (link/frames.py)."""
    from .link.frames import FramesLink

    if options.offload:
        raise UserError('offload is for the TAP link: the frames link carries plain frames')
    return FramesLink(options.tap, mtu=options.mtu, mac=options.mac)


def _mac_bytes(mac: object) -> bytes | None:
    """The TAP's MAC as the deframer's plausibility rule takes it (codec.py, "Trust"):
    frames found by scanning after garbage must be addressed to it or to a group. None
    (any destination) if the TAP does not say."""
    try:
        value = bytes.fromhex(str(mac).replace(":", "")) if isinstance(mac, str) else b""
    except ValueError:
        return None
    return value if len(value) == 6 else None
