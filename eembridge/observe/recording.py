"""`--usb-pcap FILE`: the bulk transfers as eembridge saw them, as a usbmon capture.

A Transport wrapper around whatever the connector returns. It writes one usbmon
record per submission and one per completion (never per frame): OUT data at
submission, IN data at completion, read from the caller's own buffer, which the
bridge does not reuse before it has processed that completion. The file is what
`tcpdump -i usbmonN` would have written for the same device, so `eembridge decode`,
`eembridge replay` and Wireshark read it. A configuration descriptor naming the EEM
interface is written on every connect, so the readers find the endpoints by themselves.

A recording is a side show: when its disk is full (or any write fails) the bridge goes
on, the file is cut back to its last whole record so it stays readable, one warning
says so, and stats count the records lost (capture.usb_pcap). It does not resume: a
file with a gap in the middle would pass for a complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO, cast

from ..capture.usbmon import ENDPOINT_IN, XFER_BULK, UsbmonWriter
from ..core.errors import UserError
from ..core.transport import Completion, Direction, Status, Transport

log = logging.getLogger("eembridge.observe.recording")

# libusb transfer status -> the URB status usbmon would show (negative errno).
USBMON_STATUS = {
    Status.COMPLETED: 0,
    Status.ERROR: -errno.EPROTO,
    Status.TIMED_OUT: -errno.ETIMEDOUT,
    Status.CANCELLED: -errno.ENOENT,
    Status.STALL: -errno.EPIPE,
    Status.NO_DEVICE: -errno.ESHUTDOWN,
    Status.OVERFLOW: -errno.EOVERFLOW,
}


class RecordFile:
    """The capture file, written in batches of whole records (see the module comment).

    write() collects bytes; end_records(n) says that n whole records end here. A batch
    goes to the file once it reaches FLUSH_AT, and is only ever cut between records."""

    FLUSH_AT = 1 << 16

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._pending = bytearray()
        self._ends: list[tuple[int, int]] = []  # (offset in _pending, records up to there)
        self._size = 0  # bytes of whole records in the file
        self.records_kept = 0
        self.error: OSError | None = None  # the write that stopped the recording

    def size(self) -> int:
        """Bytes written so far: in the file, and waiting to go there."""
        return self._size + len(self._pending)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is None:
            self._pending += data
        return len(data)

    def end_records(self, count: int) -> None:
        if self.error is not None:
            return
        before = self._ends[-1][1] if self._ends else 0
        self._ends.append((len(self._pending), before + count))
        if len(self._pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self.error is not None or not self._ends:
            return
        view = memoryview(self._pending)[: self._ends[-1][0]]
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            view.release()
            self._stop(exc, written)
            return
        view.release()
        self._size += written
        self.records_kept += self._ends[-1][1]
        del self._pending[:written]
        self._ends.clear()

    def _stop(self, exc: OSError, written: int) -> None:
        whole, records = 0, 0
        for offset, count in self._ends:
            if offset <= written:
                whole, records = offset, count
        if whole < written:  # a record cut in two: the file ends at the last whole one
            try:
                os.ftruncate(self._fd, self._size + whole)
            except OSError:
                pass  # /dev/full and pipes cannot be cut; nothing more to save there
        self._size += whole
        self.records_kept += records
        self.error = exc
        self._pending = bytearray()
        self._ends.clear()

    def close(self) -> None:
        if self._fd < 0:
            return  # closed already: the number may belong to another file by now
        self.flush()
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:  # NFS reports a failed write-back at close
            if self.error is None:
                self.error = exc


class UsbRecorder:
    """The capture file, shared by every connection of one bridge run."""

    def __init__(self, path: str) -> None:
        try:
            self._file = RecordFile(path)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            raise UserError(f"--usb-pcap {path!r}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        self.path = path
        self.writer = UsbmonWriter(cast(BinaryIO, self._file), start_ns=time.time_ns())
        self._file.end_records(0)  # the file header
        self.lock = threading.Lock()
        self.transfers = 0
        self._warned = False

    def wrap(self, connect: Callable[[], Transport]) -> Callable[[], Transport]:
        def connect_recorded() -> Transport:
            transport = connect()
            with self.lock:
                before = self.writer.records
                self.writer.write_configuration(max_packet=transport.info.max_packet)
                self.recorded(self.writer.records - before)
            return RecordingTransport(transport, self)

        return connect_recorded

    def recorded(self, count: int = 1) -> None:
        """`count` records were written whole (called under the lock)."""
        self._file.end_records(count)
        self._warn_once()

    def _warn_once(self) -> None:
        error = self._file.error
        if error is not None and not self._warned:
            self._warned = True
            log.warning("--usb-pcap %s: %s: recording stopped, the bridge goes on; the file "
                        "keeps the first %d records (stats: capture.usb_pcap.records_lost)",
                        self.path, error.strerror or error, self._file.records_kept)

    def counters(self) -> dict[str, int]:
        lost = self.writer.records - self._file.records_kept if self._file.error else 0
        return {"records": self.writer.records, "transfers": self.transfers,
                "write_errors": int(self._file.error is not None), "records_lost": lost}

    def flush(self) -> None:
        with self.lock:
            self._file.flush()
            self._warn_once()

    def close(self) -> None:
        with self.lock:
            self._file.close()
            self._warn_once()


class RecordingTransport(Transport):
    # Recording needs every IN transfer to pass through submit_in/completions, so the
    # libusb transport's native IN path (delivered in C, never seen here) is not offered.
    start_rx = None

    def __init__(self, inner: Transport, recorder: UsbRecorder) -> None:
        self.inner = inner
        self.info = inner.info
        self._recorder = recorder
        self._writer = recorder.writer
        # Per direction, in submission order (completions come in that order too):
        # (tag, URB id, requested length, the caller's buffer).
        self._pending: dict[Direction, deque[tuple[int, int, int, memoryview]]] = {
            Direction.IN: deque(), Direction.OUT: deque(),
        }
        self._next_id = 0xFFFF_8880_2000_0000

    def fileno(self) -> int:
        return self.inner.fileno()

    def _submitted(self, direction: Direction, buffer: memoryview, tag: int) -> None:
        self._next_id += 0x100
        urb_id = self._next_id
        w = self._writer
        with self._recorder.lock:
            if direction is Direction.IN:
                w.record("S", XFER_BULK, w.endpoint_in | ENDPOINT_IN, urb_id, len(buffer), b"",
                         time.time_ns())
            else:
                w.record("S", XFER_BULK, w.endpoint_out, urb_id, len(buffer), bytes(buffer),
                         time.time_ns())
            self._recorder.recorded()
        self._pending[direction].append((tag, urb_id, len(buffer), buffer))

    def submit_in(self, buffer: memoryview, tag: int) -> None:
        self.inner.submit_in(buffer, tag)
        self._submitted(Direction.IN, buffer, tag)

    def submit_out(self, buffer: memoryview, tag: int) -> None:
        self.inner.submit_out(buffer, tag)
        self._submitted(Direction.OUT, buffer, tag)

    def completions(self) -> list[Completion]:
        done = self.inner.completions()
        if done:
            now = time.time_ns()
            with self._recorder.lock:
                for completion in done:
                    self._completed(completion, now)
        return done

    def _completed(self, c: Completion, now: int) -> None:
        pending = self._pending[c.direction]
        entry = next((e for e in pending if e[0] == c.tag), None)
        if entry is None:
            return  # submitted before the wrapper existed: nothing to pair with
        pending.remove(entry)
        _tag, urb_id, _requested, buffer = entry
        w = self._writer
        status = USBMON_STATUS.get(c.status, -errno.EPROTO)
        if c.direction is Direction.IN:
            w.record("C", XFER_BULK, w.endpoint_in | ENDPOINT_IN, urb_id, c.actual,
                     bytes(buffer[: c.actual]), now, status=status)
        else:
            w.record("C", XFER_BULK, w.endpoint_out, urb_id, c.actual, b"", now, status=status)
        self._recorder.recorded()
        self._recorder.transfers += 1

    def clear_halt(self, direction: Direction) -> None:
        self.inner.clear_halt(direction)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._recorder.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # anything else a transport offers
