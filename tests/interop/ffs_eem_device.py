"""A fault-injecting CDC-EEM device on real USB: the simulated device's model driving
FunctionFS endpoints of a configfs gadget. Runs INSIDE the real-peer guest.

eembridge.sim's EemFunction (its codec, its fault model, what it owes the host) is the
device; this program only moves its USB packets through FunctionFS instead of the
simulated bus, so the bridge's production C data path (libusb's event thread, usbfs,
dummy_hcd) meets the faults the simulator knows:

* bulk IN: TxStream gives the device's USB packets one by one (answers to Echo first,
  then its own Echoes and injected garbage, then frames from the TAP), the Echoes and
  garbage by probability (the sim's Faults) or every N frames; the fault
  injector loses whole max-packet-sized packets (and flips bits if asked); what is
  left of each device transfer goes out in one write() to the IN endpoint file. A lost
  short packet does not end the host's transfer, as on the wire.
* bulk OUT: one read() per device request (rx_buffer bytes); a read that returns fewer
  bytes ended the host's transfer. Every `--out-stall-every` reads the device halts
  its OUT endpoint (I/O in the wrong direction on the file: f_fs sets the halt, the
  host sees STALL until it clears it), and every `--out-busy-every` reads it stops
  reading for `--out-busy-seconds` (the host's transfers stay pending: NAK).
* network side: a TAP (eembridge.sim.polled.PolledNetworkSide on a bare tun fd, no
  pyroute2: Python start-up under TCG is slow enough) that the caller moves into the
  peer's network namespace and addresses; the TCP peer runs there.

The gadget is the caller's (tests/interop/lossy.sh): a configfs gadget with
function `ffs.NAME`, FunctionFS mounted at --ffs. This program writes the descriptors
(full, high and SuperSpeed: one interface 02/0c/07, bulk IN, bulk OUT) and strings to
ep0 and creates the TAP --tap, then says so by creating --ready; the caller moves the
TAP into its namespace and binds the UDC.

What happened is written as JSON to --state on SIGUSR1 and at exit (SIGTERM): the sim's
fault counters, the device codec's counters, which of its Echoes went out whole and
which came back (payloads compared), Echo Responses nobody asked for, frames sent
whole, what the bit flips did to each frame (which the host's framing must refuse,
with --crc: all of them), the digests of every frame and TCP segment sent and of every
frame as a flip left it (to compare with a capture of what the host delivered), and
what each thread is doing right now (for a run that hangs).

    ffs_eem_device.py --ffs /dev/ffs-eem --speed full --tap ffstap \
        --ready R --state S --crc --in-loss 0.02 --in-flip 0.005 --garbage-every 200 --echo-every 100 \
        --out-stall-every 150 --out-busy-every 400 --out-busy-seconds 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from eembridge.core.codec import l4_intact
from eembridge.core.protocol import (
    CHECK_SIZE,
    CMD_ECHO_RESPONSE,
    HEADER_SIZE,
    MAX_ECHO_DATA,
    command_header,
)
from eembridge.sim.device import EemFunction
from eembridge.sim.faults import Faults
from eembridge.sim.polled import PolledNetworkSide

SPEED_MAX_PACKET = {"full": 64, "high": 512, "super": 1024}
# "reads as an Echo Response of 2047 bytes": what a lost packet can leave in front of
# the next one, and the longest command the host's deframer has to hold.
ECHO_RESPONSE_2047 = command_header(CMD_ECHO_RESPONSE, MAX_ECHO_DATA).to_bytes(HEADER_SIZE, "little")

# include/uapi/linux/usb/functionfs.h
DESCRIPTORS_MAGIC_V2 = 3
STRINGS_MAGIC = 2
HAS_FS_DESC, HAS_HS_DESC, HAS_SS_DESC = 1, 2, 4
# OUT reads within which the answer to an Echo is read (OUT transfers the bridge may have
# queued ahead of it, plus slack): a halt in that window may have dropped the answer.
ECHO_ANSWER_READS = 48
EVENT_SIZE = 12  # struct usb_functionfs_event: usb_ctrlrequest (8), type, 3 pad
EVENT_NAMES = ("bind", "unbind", "enable", "disable", "setup", "suspend", "resume")
UNBIND, ENABLE, DISABLE, SETUP = 1, 2, 3, 4


def descriptors() -> bytes:
    """FunctionFS v2 descriptors: one EEM interface (02/0c/07), bulk IN then bulk OUT
    (ep1 and ep2 in FunctionFS's numbering), at full, high and SuperSpeed."""
    interface = struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 2, 0x02, 0x0C, 0x07, 1)

    def endpoints(max_packet: int, companion: bool) -> bytes:
        out = b""
        for address in (0x81, 0x02):
            out += struct.pack("<BBBBHB", 7, 5, address, 2, max_packet, 0)
            if companion:  # SuperSpeed endpoint companion: no bursts, no streams
                out += struct.pack("<BBBBH", 6, 0x30, 0, 0, 0)
        return out

    body = (struct.pack("<III", 3, 3, 5) + interface + endpoints(64, False)
            + interface + endpoints(512, False) + interface + endpoints(1024, True))
    flags = HAS_FS_DESC | HAS_HS_DESC | HAS_SS_DESC
    return struct.pack("<III", DESCRIPTORS_MAGIC_V2, 12 + len(body), flags) + body


def strings() -> bytes:
    body = struct.pack("<H", 0x0409) + b"CDC EEM (FunctionFS, faults)\0"
    return struct.pack("<IIII", STRINGS_MAGIC, 16 + len(body), 1, 1) + body


class TunFile:
    """The TAP-like file PolledNetworkSide needs, on a tun fd of our own (IFF_NO_PI:
    one read or write is one Ethernet frame)."""

    def __init__(self, name: str) -> None:
        import pytun  # a C extension: cheap, unlike pyroute2

        self.device = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI)
        os.set_blocking(self.device.fileno(), False)
        self.write_errors: collections.Counter[str] = collections.Counter()

    def fileno(self) -> int:
        return int(self.device.fileno())

    def read_into(self, buffer: bytearray) -> int:
        try:
            return os.readv(self.fileno(), (buffer,))
        except BlockingIOError:
            return 0

    def write(self, frame: bytes) -> int:
        try:
            return os.write(self.fileno(), frame)
        except OSError as exc:  # e.g. EIO before the caller brought the TAP up: a drop
            self.write_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            return 0

    def close(self) -> None:
        self.device.close()


class FfsEemDevice(EemFunction):
    """EemFunction on FunctionFS endpoints; three threads (ep0 events, IN, OUT)."""

    def __init__(self, ffs: Path, network: PolledNetworkSide, *, out_stall_every: int,
                 out_busy_every: int, out_busy_seconds: float, echo_every: int = 0,
                 garbage_every: int = 0, **options: Any) -> None:
        super().__init__(network, **options)
        self.echo_every, self.garbage_every = echo_every, garbage_every
        self.ffs = ffs
        self.tap = network
        self.out_stall_every, self.out_busy_every = out_stall_every, out_busy_every
        self.out_busy_seconds = out_busy_seconds
        self.tx.record = []  # what each device transfer held: which Echo went out whole
        self._last_scheduled = 0
        self._signal = threading.Condition()
        self._woken = False
        self._enabled = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()  # the accounting below, read by state()
        self.events: collections.Counter[str] = collections.Counter()
        self.echo_sent: collections.Counter[bytes] = collections.Counter()
        self.echo_whole: collections.Counter[bytes] = collections.Counter()
        self.echo_answers: collections.Counter[bytes] = collections.Counter()
        # payload -> OUT reads done when it went out whole; the OUT reads at which the
        # device halted OUT. The bridge drops an OUT transfer that stalls (never resends),
        # an Echo Response in it included: an Echo whose answer was due when the device
        # halted is excused, no other.
        self.echo_whole_at: dict[bytes, int] = {}
        self.halts_at: list[int] = []
        self.gone_at: list[int] = []  # OUT reads done at each DISABLE or UNBIND (unplug, reset)
        # sha256 prefixes (_digest) of every frame sent, and of every frame as a flip left
        # it (-> whether its framing must refuse it): what a capture on the host's TAP may
        # hold, and what it must not.
        self.frames_sent: set[str] = set()
        self.frames_flipped: dict[str, bool] = {}
        # The bridge merges consecutive TCP segments on their way to its TAP (--offload):
        # what each segment carried, by flow and sequence number, "LENGTH DIGEST".
        self.tcp_sent: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self.echo_sent_corrupted: collections.Counter[bytes] = collections.Counter()
        self.n: collections.Counter[str] = collections.Counter()  # frames/transfers sent, whole, reads, stalls, ...
        # The last IN transfers: when, what, how many packets lost (for a run that hangs:
        # which TCP segments went out, and whether whole).
        self.last_in: collections.deque[dict[str, Any]] = collections.deque(maxlen=48)
        self.doing = {"ep0": "starting", "in": "starting", "out": "starting"}
        self.since = dict.fromkeys(self.doing, time.monotonic())
        self.ep0 = os.open(ffs / "ep0", os.O_RDWR)
        os.write(self.ep0, descriptors())
        os.write(self.ep0, strings())
        network.attach(self._wake)
        self._threads = [threading.Thread(target=self._guard, args=(f,), name=n, daemon=True)
                         for n, f in (("ffs-ep0", self._ep0_loop), ("ffs-in", self._in_loop),
                                      ("ffs-out", self._out_loop))]
        for thread in self._threads:
            thread.start()

    # -- what each thread is doing (for a run that hangs) ---------------------------

    def _doing(self, who: str, what: str) -> None:
        self.doing[who], self.since[who] = what, time.monotonic()

    def _guard(self, loop: Any) -> None:
        try:
            loop()
        except Exception as exc:  # a dead device thread must show, not hang the run
            self.n["thread_failures"] += 1
            self._doing(threading.current_thread().name.removeprefix("ffs-"), f"died: {exc!r}")
            print(f"ffs_eem_device: {threading.current_thread().name} died: {exc!r}",
                  file=sys.stderr, flush=True)

    def _wake(self) -> None:
        with self._signal:
            self._woken = True
            self._signal.notify_all()

    # -- ep0: the gadget's life (bind, enable, disable, setup requests) -------------

    def _ep0_loop(self) -> None:
        while not self._stopping:
            self._doing("ep0", "reading events")
            data = os.read(self.ep0, EVENT_SIZE * 4)
            for pos in range(0, len(data) - EVENT_SIZE + 1, EVENT_SIZE):
                kind = data[pos + 8]
                self.events[EVENT_NAMES[kind] if kind < len(EVENT_NAMES) else str(kind)] += 1
                if kind == ENABLE:
                    self._enabled.set()
                elif kind in (DISABLE, UNBIND):  # an unbind from the UDC may come without DISABLE
                    self._enabled.clear()
                    with self._lock:
                        self.gone_at.append(self.n["out_reads"])
                elif kind == SETUP:  # EEM has no class requests: stall them all
                    request_type = data[pos]
                    with contextlib.suppress(OSError):  # f_fs halts ep0: EL2HLT
                        if request_type & 0x80:
                            os.read(self.ep0, 0)
                        else:
                            os.write(self.ep0, b"")

    def _wait_enabled(self, who: str) -> None:
        self._doing(who, "waiting for ENABLE")
        while not self._stopping and not self._enabled.wait(0.5):
            pass

    # -- bulk IN ----------------------------------------------------------------------

    def _in_loop(self) -> None:
        self._wait_enabled("in")
        fd = os.open(self.ffs / "ep1", os.O_RDWR)
        mp = self.max_packet
        faults = self._in_faults
        record = self.tx.record
        assert record is not None
        boundary = True  # the last packet that reached the host ended its transfer
        while not self._stopping:
            packets: list[bytes] = []
            while True:
                with self._signal:
                    self._woken = False
                packet = self.tx.next_packet()
                if packet is None:
                    if packets:
                        break  # (batch=True only: the stream ran dry after a full packet)
                    self._doing("in", "waiting for frames")
                    with self._signal:
                        while not self._woken and not self._stopping:
                            self._signal.wait(0.5)
                    continue
                packets.append(packet)
                if len(packet) < mp:
                    break
            kept, sent, lost_at, flipped_at = [], [], [], []
            offset = 0
            for packet in packets:
                if faults.packet():
                    lost_at.append((offset, offset + len(packet)))
                else:
                    if faults.flip_p:
                        flipped = bytearray(packet)
                        faults.flip(flipped)
                        if flipped != packet:
                            self.n["in_packets_flipped"] += 1
                            flipped_at += [offset + i for i, (a, b) in enumerate(zip(packet, flipped, strict=True)) if a != b]
                            packet = bytes(flipped)
                    kept.append(packet)
                sent.append(packet)
                offset += len(packet)
            whole = (boundary and not lost_at and not flipped_at
                     and not any(kind == "garbage" for kind, _arg in record))
            if flipped_at:
                self._account_flips(record, b"".join(sent), lost_at, flipped_at,
                                    in_sync=boundary and not lost_at
                                    and not any(kind == "garbage" for kind, _arg in record))
            data = b"".join(kept)
            if kept:
                boundary = len(kept[-1]) < mp
            with self._lock:
                self.n["in_transfers"] += 1
                self.n["in_transfers_whole"] += whole
                for kind, arg in record:
                    self.n[f"sent_{kind}"] += 1
                    if kind == "frame":
                        self.n["frames_whole"] += whole
                        self.frames_sent.add(digest(arg))
                        segment = tcp_segment(arg)
                        if segment:
                            flow, seq, payload = segment
                            self.tcp_sent[f"{flow}@{seq}"].add(f"{len(payload)} {digest(payload)}")
                    elif kind == "echo":
                        self.echo_sent[arg] += 1
                        self.echo_whole[arg] += whole
                        if whole:
                            self.echo_whole_at[arg] = self.n["out_reads"]
            self.last_in.append({"t": round(time.monotonic(), 3), "bytes": len(data),
                                 "packets": len(packets), "lost": len(packets) - len(kept),
                                 "whole": whole, "held": [_describe(kind, arg) for kind, arg in record]})
            record.clear()
            self._scheduled(n_frames=self.n["sent_frame"])
            while data and not self._stopping:
                self._doing("in", f"writing {len(data)} bytes")
                try:
                    os.write(fd, data)  # f_fs: one request, complete when the host took it
                    self.n["in_writes"] += 1
                    break
                except OSError as exc:
                    if exc.errno != errno.ESHUTDOWN:
                        raise
                    self.n["in_shutdown"] += 1  # the host reset or unbound: lost
                    boundary = True  # the host's next transfer starts afresh
                    self._wait_enabled("in")
                    break

    def _account_flips(self, record: list[tuple[str, Any]], sent: bytes, lost_at: list[tuple[int, int]],
                       flipped_at: list[int], in_sync: bool) -> None:
        """What the flipped bits of one device transfer (`sent`: its bytes as the host
        would see them were no packet lost) did to each item in it. A frame is
        *detectable* when its framing must refuse it: any flip in CRC mode, in sentinel
        mode a flip in the sentinel or one that breaks its IP header or TCP/UDP/ICMP
        checksum (codec.l4_intact); a frame flipped otherwise may be delivered as it is.
        A flipped Echo is still an Echo (commands carry no check): its answer is one the
        device asked for."""
        offset = 0
        with self._lock:
            for kind, arg in record:
                size = _item_size(kind, arg)
                start, end = offset, offset + size
                offset = end
                flips = [at - start for at in flipped_at if start <= at < end]
                if not flips or any(a < end and start < b for a, b in lost_at):
                    continue  # unflipped, or lost anyway
                header = any(at < HEADER_SIZE for at in flips)
                if kind == "frame":
                    corrupted = sent[start + HEADER_SIZE:end - CHECK_SIZE]
                    detectable = (self.crc or any(at >= size - CHECK_SIZE for at in flips)
                                  or not l4_intact(corrupted))
                    self.n["frames_flipped"] += 1
                    self.n["frames_flipped_in_header"] += header
                    if corrupted != bytes(arg):
                        self.frames_flipped[digest(corrupted)] = detectable
                    # in sync, the header whole: the check must fail right there
                    self.n["frames_flipped_whole_detectable"] += in_sync and not header and detectable
                elif kind == "echo":
                    if header:
                        self.n["echo_flipped_header"] += 1
                    else:
                        self.echo_sent_corrupted[sent[start + HEADER_SIZE:end]] += 1

    def _scheduled(self, n_frames: int) -> None:
        """Every echo_every frames an Echo of the device's own (payload: its number, then
        0 to 60 bytes more), every garbage_every frames the garbage, through the same
        calls as SimDevice's (send_echo, inject_garbage): they go out next."""
        if n_frames == self._last_scheduled:
            return
        self._last_scheduled = n_frames
        # The first a quarter of the way in, so that a short run has one of each.
        if self.echo_every and n_frames % self.echo_every == self.echo_every // 4:
            number = n_frames // self.echo_every
            self.send_echo((number.to_bytes(4, "big") * 16)[: 4 + number % 61])
        if self.garbage_every and n_frames % self.garbage_every == self.garbage_every // 4:
            self.inject_garbage(ECHO_RESPONSE_2047)

    # -- bulk OUT -----------------------------------------------------------------------

    def _out_loop(self) -> None:
        self._wait_enabled("out")
        fd = os.open(self.ffs / "ep2", os.O_RDWR)
        reads = 0
        while not self._stopping:
            if reads and self.out_stall_every and reads % self.out_stall_every == 0:
                self._doing("out", "halting")
                try:
                    os.write(fd, b"\0")  # the wrong direction: f_fs halts the endpoint
                except OSError as exc:
                    if exc.errno != errno.EBADMSG:
                        raise
                    self._fault_counters.add("out_stalls")
                    with self._lock:
                        self.halts_at.append(reads)
                    self._flush_rx()  # a halted request's data is gone, as SimDevice's
            if reads and self.out_busy_every and reads % self.out_busy_every == 0:
                self._doing("out", f"busy for {self.out_busy_seconds} s")
                self._fault_counters.add("out_busy_periods")
                # The fault itself is a stretch of time: the host's transfers wait (NAK).
                time.sleep(self.out_busy_seconds)
            self._doing("out", "reading")
            try:
                data = os.read(fd, self._rx_buffer)
            except OSError as exc:
                if exc.errno != errno.ESHUTDOWN:
                    raise
                self.n["out_shutdown"] += 1
                self._flush_rx()
                self._wait_enabled("out")
                continue
            reads += 1
            self.n["out_reads"] += 1
            self._doing("out", "deframing")
            self._receive_request(data, short=len(data) < self._rx_buffer)
            answers = self.echo_responses()
            if answers:
                with self._lock:
                    self.echo_answers.update(answers)

    # -- the report ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            sent, whole, answers = +self.echo_sent, +self.echo_whole, +self.echo_answers
            corrupted = +self.echo_sent_corrupted
            n = dict(self.n)
            halts, gone, whole_at = list(self.halts_at), list(self.gone_at), dict(self.echo_whole_at)
            frames = {"sent": sorted(self.frames_sent), "flipped": dict(self.frames_flipped),
                      "tcp": {k: sorted(v) for k, v in self.tcp_sent.items()}}
        unasked = answers - sent - corrupted  # payloads answered more often than they were sent
        unanswered = whole - answers

        # Due when the device halted or went (unplug): a halt within the OUT reads that
        # can be queued ahead of the answer (the bridge's OUT transfers in flight, 32 at
        # most) after it went.
        def due_at(events: list[int]) -> int:
            return sum(count for payload, count in unanswered.items()
                       if any(0 <= e - whole_at.get(payload, -10**9) <= ECHO_ANSWER_READS for e in events))
        excused = due_at(halts)
        excused_gone = due_at(gone)
        return {
            "max_packet": self.max_packet,
            "faults": self.fault_counters(),
            "codec": self.counters(),
            "device": n,
            "echo": {
                "sent": sum(sent.values()),
                "whole": sum(whole.values()),
                "responses": sum(answers.values()),
                "whole_answered": sum((whole & answers).values()),
                "whole_unanswered": max(0, sum(unanswered.values()) - excused - excused_gone),
                "whole_unanswered_at_a_halt": excused,
                "whole_unanswered_at_an_unplug": excused_gone,
                "sent_corrupted": sum(corrupted.values()),
                "unasked": sum(unasked.values()),
                "unasked_payloads": [p.hex() for p in list(unasked)[:10]],
            },
            "frames": frames,
            "ep0_events": dict(self.events),
            "enabled": self._enabled.is_set(),
            "now": round(now, 3),
            "last_in": list(self.last_in),
            "doing": {who: f"{what} for {now - self.since[who]:.1f} s" for who, what in self.doing.items()},
            "owed": {"answers": len(self._answers), "injected": len(self._injected)},
            "tap": {"name": self.tap.name, "write_drops": self.tap.write_drops,
                    "write_errors": dict(self.tap.tap.write_errors)},
        }

    def stop(self) -> None:
        self._stopping = True
        self._wake()


def tcp_segment(frame: Any) -> tuple[str, int, bytes] | None:
    """(flow "SRC:SPORT>DST:DPORT", sequence number, payload) of an IPv4 TCP frame,
    merged or not; None for anything else."""
    frame = bytes(frame)
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 15) * 4
    total = int.from_bytes(frame[16:18], "big")
    tcp = 14 + ihl
    if len(frame) < tcp + 20:
        return None
    sport, dport, seq = struct.unpack_from(">HHI", frame, tcp)
    src, dst = (".".join(map(str, frame[a:a + 4])) for a in (26, 30))
    return f"{src}:{sport}>{dst}:{dport}", seq, frame[tcp + (frame[tcp + 12] >> 4) * 4:14 + total]


def digest(frame: Any) -> str:
    return hashlib.sha256(bytes(frame)).hexdigest()[:16]


def _item_size(kind: str, arg: Any) -> int:
    """Bytes an item TxStream took (its record) fills in a device transfer (a frame from
    the TAP, at its MTU of 1500, is never one the framer refuses)."""
    if kind == "garbage":
        return len(arg)
    if kind == "hint":
        return HEADER_SIZE
    if kind == "frame":
        return HEADER_SIZE + len(arg) + CHECK_SIZE
    return HEADER_SIZE + len(arg)  # echo, echo_response


def _describe(kind: str, arg: Any) -> str:
    """One item a device transfer held, short: a TCP segment by its ports, sequence
    number and payload length (what the peer's TCP resends), anything else by kind."""
    if kind != "frame":
        return f"{kind} {len(arg)}" if isinstance(arg, bytes) else kind
    frame = bytes(arg)
    if len(frame) >= 54 and frame[12:14] == b"\x08\x00" and frame[23] == 6:
        ihl = (frame[14] & 15) * 4
        total = int.from_bytes(frame[16:18], "big")
        tcp = 14 + ihl
        sport, dport, seq, ack = struct.unpack_from(">HHII", frame, tcp)
        payload = total - ihl - (frame[tcp + 12] >> 4) * 4
        return f"tcp {sport}>{dport} seq {seq} ack {ack} len {payload} ({len(frame)} B)"
    return f"frame {len(frame)} B ethertype {frame[12:14].hex()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ffs", type=Path, required=True, help="where FunctionFS is mounted")
    ap.add_argument("--speed", choices=SPEED_MAX_PACKET, required=True)
    ap.add_argument("--tap", required=True, help="name of the TAP to create (the caller configures it)")
    ap.add_argument("--ready", type=Path, required=True, help="created (TAP name inside) once ep0 is set up")
    ap.add_argument("--state", type=Path, required=True, help="JSON written on SIGUSR1 and at exit")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--in-loss", type=float, default=0.0, help="per IN packet")
    ap.add_argument("--in-flip", type=float, default=0.0, help="per IN packet: one bit flipped")
    ap.add_argument("--crc", action="store_true", help="frames sent with CRC-32 (default: the sentinel, as f_eem)")
    ap.add_argument("--garbage", type=float, default=0.0,
                    help="per EEM packet: an Echo Response header of 2047 bytes glued in front")
    ap.add_argument("--garbage-every", type=int, default=0, help="the same, every N frames")
    ap.add_argument("--echo", type=float, default=0.0, help="per frame: the device's own Echo first")
    ap.add_argument("--echo-every", type=int, default=0, help="an Echo of its own every N frames")
    ap.add_argument("--out-stall-every", type=int, default=0, help="halt OUT every N reads")
    ap.add_argument("--out-busy-every", type=int, default=0, help="stop reading OUT every N reads")
    ap.add_argument("--out-busy-seconds", type=float, default=2.0)
    args = ap.parse_args()

    # Blocked before any thread starts (they inherit the mask): only sigwait below
    # takes these, never a device thread.
    signals = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    faults = Faults(in_loss=args.in_loss, out_loss=0.0, in_flip=args.in_flip, out_flip=0.0,
                    garbage=args.garbage, garbage_bytes=ECHO_RESPONSE_2047, echo=args.echo,
                    seed=args.seed)
    network = PolledNetworkSide(TunFile(args.tap), args.tap)
    device = FfsEemDevice(args.ffs, network, max_packet=SPEED_MAX_PACKET[args.speed], crc=args.crc,
                          faults=faults, out_stall_every=args.out_stall_every,
                          out_busy_every=args.out_busy_every, out_busy_seconds=args.out_busy_seconds,
                          echo_every=args.echo_every, garbage_every=args.garbage_every)

    def dump() -> None:
        tmp = args.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(device.state(), indent=1) + "\n")
        tmp.replace(args.state)  # whole or not at all: the reader may be polling

    args.ready.write_text(network.name + "\n")
    while True:
        received = signal.sigwait(signals)
        dump()
        if received != signal.SIGUSR1:
            break
    device.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
