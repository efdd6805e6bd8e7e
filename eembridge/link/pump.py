"""The frame socket a link that is not a TAP gives the bridge, and the thread behind it.

The bridge and both data paths (Python and C) read and write whole Ethernet frames on
one descriptor, the TAP's. A `FramePump` hands them one end of a
socketpair(AF_UNIX, SOCK_SEQPACKET) instead: one frame per datagram, read(2) and write(2)
as on a TAP, EAGAIN when empty or full. A thread (the subclass's `_pump`) moves frames
between the other end and whatever the link ends in: today the user link's libslirp
(link/user.py); the TUN link (link/tun.py) keeps its own copy of this contract, with its
DHCP client's wakeups, and could move onto it.

A pump that fails hangs its end up: the bridge sees the hang-up on its descriptor and
stops with one line, as for a deleted TAP. `stop_pump` makes the stop pipe readable,
which the pump's poll(2) watches, joins the thread and closes both ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


def frame_socketpair() -> tuple[socket.socket, socket.socket]:
    """The frame descriptor of a non-TAP link and its other end: SEQPACKET keeps one frame
    per datagram, and neither end ever blocks the engine's thread."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in ends:
        end.setblocking(False)
    return ends


def close_quietly(*fds: int) -> None:
    """Close descriptors at shutdown, where one already closed is no error."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FramePump:
    """The bridge's end of a SEQPACKET socketpair (`fileno`), and the thread that pumps
    the other end (`_pump_end`) until `_stop_r` is readable. Subclasses implement `_pump`
    and call `start()` when ready."""

    KIND = "link"
    FATAL: tuple[type[BaseException], ...] = ()  # failures logged in one line, no traceback

    def __init__(self, name: str) -> None:
        self.name = name
        self._bridge_end, self._pump_end = frame_socketpair()
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
        close_quietly(self._stop_r, self._stop_w)
        self._bridge_end.close()
        self._pump_end.close()

    def _pump(self) -> None:
        raise NotImplementedError

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
