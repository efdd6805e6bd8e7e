"""What the links that are not a TAP share: the bridge's frame descriptor and a pump thread.

The bridge and both data paths (Python and C) read and write whole Ethernet frames on
one descriptor, the TAP's. A `FramePump` hands them one end of a
socketpair(AF_UNIX, SOCK_SEQPACKET) instead: one frame per datagram, read(2) and write(2)
as on a TAP, EAGAIN when empty or full. A thread (the subclass's `_pump`) moves frames
between the other end and whatever the link ends in (a TUN, a user-mode network stack).

Frames towards the bridge go through `_send`: what finds the socket full waits in a
backlog, oldest first, bounded (MAX_BACKLOG, the excess counted as backlog_dropped); a
pump stops reading its other side while the backlog is not empty, so backpressure
carries through. A pump that fails hangs its end up: the bridge sees the hang-up on its
descriptor and stops with one line, as for a deleted TAP.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

BURST = 64  # datagrams or packets moved per side before looking at the other
MAX_BACKLOG = 256  # frames kept for the bridge while its socket is full


class FramePump:
    """The bridge's end of a SEQPACKET socketpair (`fileno`), and the thread that pumps
    the other end. Subclasses implement `_pump` and call `start()` when ready."""

    KIND = "link"
    FATAL: tuple[type[BaseException], ...] = ()  # failures logged in one line, no traceback

    def __init__(self, name: str) -> None:
        self.name = name
        self._bridge_end, self._pump_end = socket.socketpair(socket.AF_UNIX,
                                                             socket.SOCK_SEQPACKET)
        for end in (self._bridge_end, self._pump_end):
            end.setblocking(False)
        self.pump_counters = {"backlog_dropped": 0, "pump_wakeups": 0}
        self._backlog: deque[bytes] = deque()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._pump_guarded,
                                        name=f"eembridge-{self.KIND.lower()}-{name}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def fileno(self) -> int:
        return self._bridge_end.fileno()

    def stop_pump(self) -> None:
        """Stop the thread and close both ends (the subclass closes what it pumps to)."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._bridge_end.close()
        self._pump_end.close()

    def _pump(self) -> None:
        raise NotImplementedError

    def _poll(self, poller: select.poll, timeout: int | None = None) -> list[tuple[int, int]] | None:
        """The events of one wakeup (the stop pipe registered by the caller); None when
        asked to stop."""
        events = poller.poll(timeout)
        self.pump_counters["pump_wakeups"] += 1
        if any(fd == self._stop_r for fd, _ in events):
            return None
        return events

    def _bridge_side(self, mask: int, receive: Callable[[], None]) -> bool:
        """The bridge's end is ready: room for the backlog, frames to receive. False once
        the bridge has closed it."""
        if mask & select.POLLOUT:
            self._send(())
        if mask & select.POLLIN:
            receive()
        return not mask & (select.POLLHUP | select.POLLERR)

    def _pump_guarded(self) -> None:
        try:
            self._pump()
        except BaseException as exc:
            self.error = exc
            log.error("%s pump for %s stopped: %s", self.KIND, self.name, exc,
                      exc_info=not isinstance(exc, self.FATAL))
            try:
                self._pump_end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send(self, frames: Any) -> None:
        """Frames to the bridge, oldest first; what finds the socket full waits."""
        backlog = self._backlog
        backlog.extend(frames)
        while backlog:
            try:
                self._pump_end.send(backlog[0])
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. EMSGSIZE: the bridge could not take it either
                if exc.errno == errno.EBADF:
                    raise
                self.pump_counters["backlog_dropped"] += 1
            backlog.popleft()
        while len(backlog) > MAX_BACKLOG:
            backlog.pop()
            self.pump_counters["backlog_dropped"] += 1
