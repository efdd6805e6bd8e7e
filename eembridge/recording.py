"""`--usb-pcap FILE`: the bulk transfers as eembridge saw them, as a usbmon capture.

A Transport wrapper around whatever the connector returns. It writes one usbmon
record per submission and one per completion (never per frame): OUT data at
submission, IN data at completion, read from the caller's own buffer, which the
bridge does not reuse before it has processed that completion. The file is what
`tcpdump -i usbmonN` would have written for the same device, so `eembridge decode`,
`eembridge replay` and Wireshark read it. A configuration descriptor naming the EEM
interface is written on every connect, so the readers find the endpoints by themselves.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from .errors import UserError
from .transport import Completion, Direction, Status, Transport
from .usbmon import ENDPOINT_IN, XFER_BULK, UsbmonWriter

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


class UsbRecorder:
    """The capture file, shared by every connection of one bridge run."""

    def __init__(self, path: str) -> None:
        try:
            self._file: BinaryIO = open(path, "wb", buffering=1 << 16)
        except OSError as exc:
            raise UserError(f"--usb-pcap {path}: {exc.strerror or exc}") from None
        self.path = path
        self.writer = UsbmonWriter(self._file, start_ns=time.time_ns())
        self.lock = threading.Lock()
        self.transfers = 0

    def wrap(self, connect: Callable[[], Transport]) -> Callable[[], Transport]:
        def connect_recorded() -> Transport:
            transport = connect()
            with self.lock:
                self.writer.write_configuration(max_packet=transport.info.max_packet)
            return RecordingTransport(transport, self)

        return connect_recorded

    def counters(self) -> dict[str, int]:
        return {"records": self.writer.records, "transfers": self.transfers}

    def flush(self) -> None:
        with self.lock:
            self._file.flush()

    def close(self) -> None:
        with self.lock:
            self._file.close()


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
