"""The frames-only link (`BridgeOptions(link="frames")`): the board's Ethernet frames end
in the embedding program, not in an interface. For tools that speak raw Ethernet (scapy,
a test harness); no root, no TAP, no kernel network stack on the host's side.

    with Bridge(sim.connect, BridgeOptions(link="frames")) as bridge:
        bridge.connected.wait(10)
        bridge.send_frame(arp_request)
        reply = bridge.recv_frame(timeout=2)   # bytes, or None when nothing came

The bridge reads and writes whole frames on one descriptor, as on a TAP; here it is one
end of a socketpair(AF_UNIX, SOCK_SEQPACKET), one frame per datagram (the TUN link's
arrangement, link/tun.py, without its translation), and the program holds the other end.
No thread of ours sits in between: `send_frame` and `recv_frame` run in the caller's
thread and touch only the program's end.

Bounded both ways by the socket's buffer (`queue_bytes` per direction):
- Towards the program: the bridge's writes are non-blocking. A program that reads too
  slowly makes them fail EAGAIN: the frame is dropped and counted by the bridge where a
  full TAP queue is (`rx_path.tap_write_errors`); the bridge never waits for the reader.
- Towards the board: the bridge reads the socket only while it has room for OUT
  transfers, so when the board is slower than the program the socket fills and
  `send_frame` waits for room up to its timeout, then refuses the frame (returns
  False, counted `send_refused`).

Counters (`stats()["frames"]`): what the program sent and received, and what was refused.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Iterator

from ..core.l3 import stable_mac
from .pump import frame_socketpair

ETH_HLEN = 14
VLAN_HLEN = 4
RECV_BUFFER = 65536  # more than any frame the bridge delivers: none comes cut
QUEUE_BYTES = 256 * 1024  # per direction: some 100 full frames (each datagram costs ~2.3 KB)

FRAMES_COUNTERS = (
    "sent_frames",  # handed to the bridge by send_frame
    "sent_bytes",
    "send_refused",  # send_frame found no room within its timeout
    "received_frames",  # returned by recv_frame
    "received_bytes",
)


class FramesLink:
    """What the bridge takes for its TAP when link="frames": a frame descriptor (fileno)
    and a MAC; the program's end through send_frame / recv_frame / frames."""

    offload = False  # plain Ethernet frames both ways

    def __init__(self, name: str, *, mtu: int = 1500, mac: str | None = None,
                 queue_bytes: int = QUEUE_BYTES) -> None:
        self.name = name
        self.mtu = mtu
        self._mac = (bytes.fromhex(mac.replace(":", "")) if mac
                     else stable_mac(f"frames:{name}"))
        self._bridge_end, self._program_end = frame_socketpair()
        for end in (self._bridge_end, self._program_end):
            # An AF_UNIX datagram is charged to its sender until it is read: the sender's
            # buffer is what bounds each direction.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, queue_bytes)
        self._counters = dict.fromkeys(FRAMES_COUNTERS, 0)
        self._lock = threading.Lock()  # counters, when several program threads send
        self._largest = mtu + ETH_HLEN + VLAN_HLEN

    # --- what the bridge uses ---------------------------------------------------------

    def fileno(self) -> int:
        return self._bridge_end.fileno()

    @property
    def mac(self) -> str:
        """A MAC the program may send from: the bridge's deframer trusts frames addressed
        to it (or to a group) when it resynchronises after garbage."""
        return self._mac.hex(":")

    def frames_stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def close(self) -> None:
        self._bridge_end.close()
        self._program_end.close()

    def __repr__(self) -> str:
        return f"<FramesLink {self.name} mac={self.mac}>"

    # --- what the program uses --------------------------------------------------------

    def send_frame(self, frame: bytes | bytearray | memoryview, timeout: float | None = 1.0) -> bool:
        """Queue one Ethernet frame (header included, no FCS) for the board. Waits up to
        `timeout` seconds (None: for ever) for room; False if there was none."""
        size = len(frame)
        if not ETH_HLEN <= size <= self._largest:
            raise ValueError(f"frame of {size} bytes: an Ethernet frame here is "
                            f"{ETH_HLEN}-{self._largest} bytes (MTU {self.mtu}, no FCS)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._program_end.send(frame)
                break
            except BlockingIOError:
                if not self._wait(select.POLLOUT, deadline):
                    self._count(send_refused=1)
                    return False
        self._count(sent_frames=1, sent_bytes=size)
        return True

    def recv_frame(self, timeout: float | None = None) -> bytes | None:
        """The next frame from the board, or None if none came within `timeout` seconds
        (None: wait for ever; 0: only what is already there)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frame = self._program_end.recv(RECV_BUFFER)
            except BlockingIOError:
                if not self._wait(select.POLLIN, deadline):
                    return None
                continue
            self._count(received_frames=1, received_bytes=len(frame))
            return frame

    def frames(self, timeout: float | None = None) -> Iterator[bytes]:
        """Frames from the board as they come; ends after `timeout` seconds without one."""
        while (frame := self.recv_frame(timeout)) is not None:
            yield frame

    def _wait(self, event: int, deadline: float | None) -> bool:
        poller = select.poll()
        poller.register(self._program_end, event)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = poller.poll(None if left is None else int(left * 1000) + 1)
            for _fd, mask in ready:
                if mask & event:
                    return True
                if mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    raise OSError(errno.EPIPE, "the bridge's end of the frames link is closed")
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, n in amounts.items():
                self._counters[name] += n
