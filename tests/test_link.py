"""The engine's link table (eembridge/_fast/link.pxd) as a link of another kind meets it.

A small Cython module compiled here implements a link in memory (no descriptor: what an
in-process stack would do) and installs it in an RxPath and a TxPath through their
cimported cdef classes, as link.pxd says to. Frames must go through it whole and in
order both ways, and the data path must count what the link reports.
"""

from __future__ import annotations

import random
import textwrap
from types import ModuleType

import pytest

from eembridge.core import codec
from eembridge.datapath import COMPILED, RxPath, TxPath

import cython_user

MEMORY_LINK_PYX = textwrap.dedent(
    """
    # cython: language_level=3
    from libc.errno cimport EIO
    from libc.string cimport memcpy
    from eembridge._fast.datapath cimport RxPath, TxPath
    from eembridge._fast.link cimport (eng_link, link_count_refused, link_count_write,
                                       LINK_DRAINED, LINK_REFUSED)

    cdef struct memory_link:
        unsigned char out[1 << 20]  # delivered frames, each behind its 2-byte length
        Py_ssize_t out_len
        int refuse_every  # deliver: every Nth frame is refused (EIO); 0: none
        int delivered
        unsigned char inp[1 << 20]  # frames to fill, the same encoding
        Py_ssize_t in_len
        Py_ssize_t in_pos
        int flushes

    cdef memory_link the_link

    cdef void _deliver(eng_link* link, const unsigned char* frame,
                       Py_ssize_t length) noexcept nogil:
        cdef memory_link* m = <memory_link*>link.ctx
        m.delivered += 1
        if m.refuse_every and m.delivered % m.refuse_every == 0:
            link_count_refused(link, EIO, 1)
            return
        m.out[m.out_len] = length & 0xff
        m.out[m.out_len + 1] = length >> 8
        memcpy(m.out + m.out_len + 2, frame, length)
        m.out_len += 2 + length
        link_count_write(link, length, length, 1, length)

    cdef void _flush(eng_link* link) noexcept nogil:
        (<memory_link*>link.ctx).flushes += 1

    cdef Py_ssize_t _fill(eng_link* link, unsigned char* dst,
                          Py_ssize_t room) noexcept nogil:
        cdef memory_link* m = <memory_link*>link.ctx
        cdef Py_ssize_t length, start
        if m.in_pos >= m.in_len:
            return LINK_DRAINED
        length = m.inp[m.in_pos] | (m.inp[m.in_pos + 1] << 8)
        start = m.in_pos + 2
        m.in_pos = start + length
        if length == 0:
            return LINK_REFUSED  # the link's own drop: the data path reads on
        if length > room:
            length = room  # longer than any frame: the framer refuses it as oversize
        memcpy(dst, m.inp + start, length)
        return length

    cdef void _install(eng_link* link) noexcept:
        link.deliver = _deliver
        link.flush = _flush
        link.fill = _fill
        link.ctx = &the_link

    def install(RxPath rx not None, TxPath tx not None, int refuse_every=0):
        the_link.out_len = the_link.in_len = the_link.in_pos = 0
        the_link.delivered = the_link.flushes = 0
        the_link.refuse_every = refuse_every
        _install(&rx.state.link)
        _install(&tx.state.link)

    def delivered():
        cdef Py_ssize_t pos = 0, length
        frames = []
        while pos < the_link.out_len:
            length = the_link.out[pos] | (the_link.out[pos + 1] << 8)
            frames.append(the_link.out[pos + 2:pos + 2 + length])
            pos += 2 + length
        return frames, the_link.flushes

    def offer(frames):
        for frame in frames:
            the_link.inp[the_link.in_len] = len(frame) & 0xff
            the_link.inp[the_link.in_len + 1] = len(frame) >> 8
            memcpy(the_link.inp + the_link.in_len + 2, <const unsigned char*>frame, len(frame))
            the_link.in_len += 2 + len(frame)
    """
)


@pytest.fixture(scope="module")
def memory_link() -> ModuleType:
    assert COMPILED, "the compiled data path is not built (setup.py build_ext --inplace)"
    return cython_user.build("memory_link", MEMORY_LINK_PYX)


def _frames(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(14, 1515)) for _ in range(count)]


def test_a_link_in_memory_carries_frames_both_ways(memory_link):
    from eembridge import Deframer, Framer

    framer = Framer(crc=True, max_transfer=16384, max_packet=512)
    rx = RxPath(Deframer(), -1, 5, 16384)
    tx = TxPath(framer, -1, 4 * 16384)
    memory_link.install(rx, tx, refuse_every=7)

    # RX: IN transfers deframed, every frame to deliver(), flush() after each batch.
    down = _frames(1, 60)
    transfers = codec.Framer(crc=True, max_transfer=16384, max_packet=512).pack(down)
    for sequence, transfer in enumerate(transfers):
        rx.slot_buffer(sequence)[: len(transfer)] = transfer
        rx.complete(sequence, len(transfer), True)
    delivered, flushes = memory_link.delivered()
    kept = [f for i, f in enumerate(down, 1) if i % 7]  # every 7th refused by the link
    assert delivered == kept
    assert flushes == len(transfers)
    counters = rx.counters()
    assert counters["tap_frames_written"] == len(kept)
    assert counters["tap_bytes_written"] == sum(map(len, kept))
    assert counters["tap_write_errors"] == len(down) - len(kept)
    assert rx.write_errors == {"EIO": len(down) - len(kept)}

    # TX: fill() until drained; a 0-length entry is the link's own drop, one longer than
    # any frame is refused by the framer (oversize), the rest go out whole, in order.
    up = _frames(2, 40)
    memory_link.offer(up[:10] + [b""] + up[10:20] + [bytes(3000)] + up[20:])
    sent = []
    deframer = codec.Deframer()
    for transfer in tx.fill():
        sent += [bytes(e.data) for e in deframer.feed(bytes(transfer.buffer), True)]
        tx.release(transfer)
    assert sent == up
    counters = tx.counters()
    assert counters["tap_frames_read"] == len(up) + 1  # the oversize one was read too
    assert counters["tx_oversize"] == 1 and counters["tap_read_errors"] == 0
