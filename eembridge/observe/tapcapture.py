"""`--pcap FILE`: a live capture of the Ethernet frames crossing the TAP, both ways.

It costs the data path nothing: the kernel hands a copy of every frame on the TAP to
an AF_PACKET socket (ETH_P_ALL, bound to the TAP) that a capture thread of its own
reads, as tcpdump would. PACKET_OUTGOING marks frames the host sent (to the device);
the rest are frames the bridge wrote (from the device). Timestamps are the kernel's
(SO_TIMESTAMPNS). Frames the socket could not keep up with are counted by the kernel
(PACKET_STATISTICS tp_drops) and shown in `eembridge stats` as capture drops.

`--pcap-rotate SIZE_MB[:COUNT]` starts a new file when the current one passes SIZE_MB:
FILE is always the newest, FILE.1 the one before, ... up to COUNT files in all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from typing import BinaryIO, cast

from ..capture.pcap import LINKTYPE_ETHERNET, PcapWriter
from ..core.errors import UserError
from .recording import RecordFile

log = logging.getLogger("eembridge.observe.tapcapture")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SNAPLEN = 65535
_TIMESPEC = struct.Struct("@ll")


def parse_rotate(text: str) -> tuple[int, int]:
    """SIZE_MB[:COUNT] -> (bytes, files); UserError naming what is wrong."""
    size_text, _sep, count_text = text.partition(":")
    try:
        size_mb = float(size_text)
        count = int(count_text) if count_text else 5
    except ValueError:
        raise UserError(f"--pcap-rotate {text!r}: expected SIZE_MB[:COUNT], e.g. 100:5") from None
    if size_mb <= 0 or count < 1:
        raise UserError(f"--pcap-rotate {text!r}: size must be positive and count at least 1")
    return int(size_mb * 1_000_000), count


class RotatingPcap:
    """An Ethernet pcap file that starts again, under the same name, past a size.

    Written through recording.RecordFile, as `--usb-pcap` is: a capture is a side show,
    so when its disk fills (or any write fails) the bridge goes on, the file is cut back
    to its last whole record so it stays readable, one warning says so, and the frames
    not kept are counted (stats: capture.pcap.records_lost). It does not resume, not
    even by rotating: a set of files with a gap would pass for a complete one.
    """

    def __init__(self, path: str, max_bytes: int | None = None, files: int = 1) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self.rotations = 0
        self.records = 0  # frames handed to the capture
        self.records_lost = 0  # of those, not in any file (a write failed)
        self._warned = False
        self._open()

    def _open(self) -> None:
        try:
            self._file = RecordFile(self.path)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            raise UserError(f"--pcap {self.path!r}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        self._writer = PcapWriter(cast(BinaryIO, self._file), LINKTYPE_ETHERNET, SNAPLEN,
                                  nanosecond=True)
        self._file.end_records(0)  # the file header

    @property
    def error(self) -> OSError | None:
        return self._file.error

    def write(self, frame: bytes, timestamp_ns: int) -> None:
        self.records += 1
        if self._file.error is not None:
            self.records_lost += 1
            return
        self._writer.write(frame, timestamp_ns)
        self._file.end_records(1)
        self._check()
        if (self.max_bytes is not None and self._file.error is None
                and self._file.size() >= self.max_bytes):
            self._rotate()

    def _check(self) -> None:
        """Count what a failed write lost and warn once."""
        if self._file.error is None or self._warned:
            return
        self._warned = True
        # Every record of this file not kept is lost; earlier files were complete.
        self.records_lost += self._writer.packets - self._file.records_kept
        log.warning("--pcap %s: %s: capture stopped, the bridge goes on; the file keeps its "
                    "first %d frames (stats: capture.pcap.records_lost)", self.path,
                    self._file.error.strerror or self._file.error, self._file.records_kept)

    def _rotate(self) -> None:
        self._file.close()
        self._check()
        if self._file.error is not None:
            return  # the last file was cut short: keep it, and stop
        if self.files <= 1:
            os.unlink(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.{self.files - 1}")
            for i in range(self.files - 2, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.rename(self.path, f"{self.path}.1")
        self.rotations += 1
        try:
            self._open()
        except UserError as exc:  # e.g. the directory went: stop capturing, go on
            log.warning("%s: capture stopped, the bridge goes on", exc)
            self._file.error = OSError(str(exc))  # the closed file stands for the capture
            self._warned = True

    def flush(self) -> None:
        self._file.flush()
        self._check()

    def close(self) -> None:
        self._file.close()
        self._check()


class TapCapture:
    """Capture thread on one interface; counters() for the stats snapshot."""

    def __init__(self, output: RotatingPcap) -> None:
        self.output = output
        self.frames_in = 0  # written to the TAP by the bridge: from the device
        self.frames_out = 0  # sent by the host into the TAP: to the device
        self.bytes_in = 0
        self.bytes_out = 0
        self.kernel_drops = 0  # tp_drops: frames the socket's queue had no room for
        self.errors = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self, interface: str) -> None:
        """Open the socket on `interface` (it must exist) and start the capture thread."""
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((interface, ETH_P_ALL))
        except OSError as exc:
            raise UserError(f"--pcap: cannot capture on {interface}: {exc.strerror or exc}") from None
        sock.settimeout(0.2)  # so stop() is seen promptly
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name=f"eembridge-pcap-{interface}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        ancillary = socket.CMSG_SPACE(_TIMESPEC.size)
        while not self._stop.is_set():
            try:
                frame, ancdata, _flags, address = sock.recvmsg(SNAPLEN, ancillary)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                self.errors += 1
                time.sleep(0.05)
                continue
            timestamp = time.time_ns()
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack(data[: _TIMESPEC.size])
                    timestamp = sec * 1_000_000_000 + nsec
            with self._lock:
                if address[2] == PACKET_OUTGOING:
                    self.frames_out += 1
                    self.bytes_out += len(frame)
                else:
                    self.frames_in += 1
                    self.bytes_in += len(frame)
                self.output.write(frame, timestamp)

    def counters(self) -> dict[str, int]:
        if self._sock is not None:
            try:
                # tpacket_stats {tp_packets, tp_drops}; reading resets it, so accumulate.
                raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
                self.kernel_drops += struct.unpack("II", raw)[1]
            except OSError:
                pass
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "drops": self.kernel_drops,
            "errors": self.errors,
            "rotations": self.output.rotations,
            "write_errors": int(self.output.error is not None),
            "records_lost": self.output.records_lost,
        }

    def flush(self) -> None:
        with self._lock:
            self.output.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self.counters()  # the last drops
            self._sock.close()
        with self._lock:
            self.output.close()
