"""The data path objects on their own, both implementations (pure Python and the C one in
eembridge._fast.datapath): frames arrive intact, refused writes are counted by reason, and
OUT transfers say exactly how many frames they carry.

A SOCK_SEQPACKET socket pair stands in for the TAP: like a TAP, each write(2) is one
frame, each read(2) returns one frame, and a full queue answers EAGAIN.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from eembridge.core import codec
from eembridge.core.events import Frame
from eembridge.datapath import reference as pydatapath

try:
    from eembridge._fast import datapath as _datapath
    from eembridge._fast import eem as _eem
except ImportError as exc:  # the build is part of the suite: say what is missing
    raise ImportError(f"eembridge._fast.datapath / eem are not built ({exc}): run setup.py build_ext") from exc

IMPLEMENTATIONS = {
    "python": (pydatapath.RxPath, pydatapath.TxPath, codec.Deframer, codec.Framer),
    "cython": (_datapath.RxPath, _datapath.TxPath, _eem.Deframer, _eem.Framer),
}
MAX_PACKET = 512


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> tuple[Any, ...]:
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def fake_tap() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the bridge's end, the kernel's end), both non-blocking."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def ethernet_frames(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [60, 64, 500, 504, 506, 1014, 1018, 1514] + [rng.randrange(60, 1515) for _ in range(count)]
    return [rng.randbytes(n) for n in sizes[:count]]


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_tx_reads_frames_and_frames_them_in_transfers(impl: tuple[Any, ...], fake_tap: Any) -> None:
    _rx, tx_cls, _deframer_cls, framer_cls = impl
    bridge_end, kernel_end = fake_tap
    frames = ethernet_frames(60)
    for frame in frames:
        kernel_end.send(frame)
    framer = framer_cls(crc=True, max_transfer=16384, max_packet=MAX_PACKET)
    tx = tx_cls(framer, bridge_end.fileno(), 4 * 16384)
    sent: list[Any] = []
    while len(sent) < 100:
        batch = tx.fill()
        if not batch:
            break
        sent.extend(batch)
        for transfer in batch:  # as the bridge does once each transfer completed
            tx.release(transfer)
    assert tx.bytes_in_flight == 0
    reference = codec.Deframer()
    decoded = []
    for transfer in sent:
        data = bytes(transfer.buffer)
        assert len(data) <= 16384
        assert len(data) % MAX_PACKET, "a transfer on a max-packet boundary needs the ZLP rule"
        events = reference.feed(data, True)
        got = [bytes(e.data) for e in events if isinstance(e, Frame)]
        assert transfer.frames == len(got)
        decoded.extend(got)
    assert decoded == frames
    assert reference.counters()["crc_errors"] == 0
    assert tx.counters()["tap_frames_read"] == len(frames)


def test_tx_counts_runts_and_oversize_and_sends_the_rest(impl: tuple[Any, ...], fake_tap: Any) -> None:
    _rx, tx_cls, _deframer_cls, framer_cls = impl
    bridge_end, kernel_end = fake_tap
    good = ethernet_frames(3)
    for frame in (b"\x01" * 10, good[0], b"\x02" * 1600, good[1], good[2]):
        kernel_end.send(frame)
    tx = tx_cls(framer_cls(crc=False, max_packet=MAX_PACKET), bridge_end.fileno(), 4 * 16384)
    transfers = tx.fill()
    counters = tx.counters()
    assert counters["tx_runts"] == 1 and counters["tx_oversize"] == 1
    assert counters["tap_frames_read"] == 5
    assert sum(t.frames for t in transfers) == 3
    reference = codec.Deframer()
    got = [bytes(e.data) for t in transfers for e in reference.feed(bytes(t.buffer), True)
           if isinstance(e, Frame)]
    assert got == good


def test_tx_backpressure_holds_memory_until_released(impl: tuple[Any, ...], fake_tap: Any) -> None:
    _rx, tx_cls, _deframer_cls, framer_cls = impl
    bridge_end, kernel_end = fake_tap
    tx = tx_cls(framer_cls(max_packet=MAX_PACKET), bridge_end.fileno(), 2 * 16384)
    frames = [os.urandom(1514) for _ in range(40)]
    for frame in frames:
        kernel_end.send(frame)
    held = tx.fill()
    assert not tx.has_room and held
    assert tx.fill() == [] or not tx.has_room
    assert sum(t.frames for t in held) < len(frames)  # the rest waits in the kernel
    while held:
        tx.release(held.pop(0))
    assert tx.has_room


def test_rx_writes_every_frame_intact(impl: tuple[Any, ...], fake_tap: Any) -> None:
    rx_cls, _tx, deframer_cls, _framer_cls = impl
    bridge_end, kernel_end = fake_tap
    frames = ethernet_frames(80, seed=2)
    transfers = codec.Framer(crc=True, max_packet=MAX_PACKET).pack(frames)
    rx = rx_cls(deframer_cls(), bridge_end.fileno(), 9, 16384)
    got: list[bytes] = []
    for sequence, transfer in enumerate(transfers):
        rx.slot_buffer(sequence)[: len(transfer)] = transfer
        assert rx.complete(sequence, len(transfer), True) == []
        got.extend(drain(kernel_end))
    assert got == frames
    counters = rx.counters()
    assert counters["tap_frames_written"] == len(frames)
    assert counters["tap_bytes_written"] == sum(map(len, frames))
    assert counters["tap_write_errors"] == 0


def test_rx_counts_refused_writes_by_reason(impl: tuple[Any, ...], fake_tap: Any) -> None:
    rx_cls, _tx, deframer_cls, _framer_cls = impl
    bridge_end, kernel_end = fake_tap
    frames = [os.urandom(1514) for _ in range(400)]  # far more than the socket queues
    transfers = codec.Framer(crc=False, max_packet=MAX_PACKET).pack(frames)
    rx = rx_cls(deframer_cls(), bridge_end.fileno(), 9, 16384)
    for sequence, transfer in enumerate(transfers):
        rx.slot_buffer(sequence)[: len(transfer)] = transfer
        rx.complete(sequence, len(transfer), True)
    arrived = drain(kernel_end)
    counters = rx.counters()
    assert counters["tap_write_errors"] > 0
    assert counters["tap_frames_written"] == len(arrived)
    assert counters["tap_frames_written"] + counters["tap_write_errors"] == len(frames)
    assert rx.write_errors == {"EAGAIN": counters["tap_write_errors"]}
    assert arrived == frames[: len(arrived)]  # what was written is intact and in order
