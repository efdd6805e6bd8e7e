"""The mirrored ring buffer (eembridge._fast.ring): Python API and C-level API.

The C-level API (ring.pxd) is exercised by a small Cython module compiled here from
RING_USER_PYX, which cimports ring.pxd the way any other eembridge/_fast/*.pyx does. Its
functions release the GIL, so two Python threads running them are a real
producer/consumer pair on two cores.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import textwrap
import threading
import time
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import cython_user

try:
    from eembridge._fast.ring import Ring
except ImportError as exc:  # a missing facility is a failure, not a skip
    pytest.fail(
        f"eembridge._fast.ring is not built ({exc}); run setup.py build_ext --inplace", pytrace=False
    )

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- a Cython user of the C-level API ---------------------------------------------

RING_USER_PYX = textwrap.dedent(
    """
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from eembridge._fast.ring cimport (ring_t, ring_of, ring_reserve, ring_commit, ring_peek,
                       ring_consume, ring_at, ring_used, ring_free, ring_head, ring_tail)

    cdef extern from "<sched.h>" nogil:
        int sched_yield()

    cdef inline uint64_t mix(uint64_t x) noexcept nogil:
        # splitmix64 finaliser: byte p of the stream is <unsigned char>mix(p).
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL
        return x ^ (x >> 31)

    def base_address(ring):
        return <size_t>ring_of(ring).base

    def at_address(ring, uint64_t position):
        return <size_t>ring_at(ring_of(ring), position)

    def counts(ring):
        cdef ring_t* r = ring_of(ring)
        return ring_used(r), ring_free(r), ring_head(r), ring_tail(r)

    def reserve_commit(ring, size_t n):
        # Returns False when fewer than n bytes are free (reserve gave NULL).
        cdef ring_t* r = ring_of(ring)
        cdef unsigned char* p = ring_reserve(r, n)
        if p == NULL:
            return False
        ring_commit(r, n)
        return True

    def produce(ring, uint64_t total, size_t max_chunk, uint64_t seed):
        # Writes pattern bytes 0..total in chunks of pseudo-random size 1..max_chunk
        # with the GIL released; returns (FNV-1a of the stream, times the ring was full).
        cdef ring_t* r = ring_of(ring)
        cdef uint64_t position = 0, fnv = 0xcbf29ce484222325ULL, full = 0, state = seed
        cdef size_t n, i
        cdef unsigned char* p
        cdef unsigned char byte
        with nogil:
            while position < total:
                state = mix(state)
                n = 1 + state % max_chunk
                if n > total - position:
                    n = total - position
                p = ring_reserve(r, n)
                if p == NULL:
                    full += 1
                    sched_yield()
                    continue
                for i in range(n):
                    byte = <unsigned char>mix(position + i)
                    p[i] = byte
                    fnv = (fnv ^ byte) * 0x100000001b3ULL
                ring_commit(r, n)
                position += n
        return fnv, full

    def consume(ring, uint64_t total, uint64_t seed):
        # Reads total bytes, consuming pseudo-random pieces of what is readable, with
        # the GIL released. Returns (FNV-1a, bytes not matching the pattern,
        # first bad position or -1, most bytes seen readable at once, times empty).
        cdef ring_t* r = ring_of(ring)
        cdef uint64_t position = 0, fnv = 0xcbf29ce484222325ULL, bad = 0, empty = 0
        cdef uint64_t state = seed
        cdef long long first_bad = -1
        cdef size_t n, i, most = 0
        cdef unsigned char* p
        with nogil:
            while position < total:
                p = ring_peek(r, &n)
                if n == 0:
                    empty += 1
                    sched_yield()
                    continue
                if n > most:
                    most = n
                state = mix(state)
                n = 1 + state % n
                for i in range(n):
                    if p[i] != <unsigned char>mix(position + i):
                        bad += 1
                        if first_bad < 0:
                            first_bad = position + i
                    fnv = (fnv ^ p[i]) * 0x100000001b3ULL
                ring_consume(r, n)
                position += n
        return fnv, bad, first_bad, most, empty
    """
)


@pytest.fixture(scope="module")
def ring_user() -> ModuleType:
    return cython_user.build("ring_user", RING_USER_PYX)


# --- construction and sizes ----------------------------------------------------------


@pytest.mark.parametrize(
    "requested, expected",
    [(1, PAGE), (PAGE - 1, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE), (5 * PAGE + 17, 6 * PAGE)],
)
def test_size_rounds_up_to_the_page_size(requested: int, expected: int) -> None:
    ring = Ring(requested)
    assert ring.size == expected
    assert (ring.used, ring.free, ring.head, ring.tail) == (0, expected, 0, 0)
    assert os.fstat(ring.fd).st_size == expected
    assert len(memoryview(ring)) == 2 * expected  # the buffer protocol exports both copies
    # the whole size is usable in one contiguous reservation
    view = ring.reserve(expected)
    assert view is not None and len(view) == expected


def test_construction_errors() -> None:
    for size in (0, -1, -PAGE):
        with pytest.raises(ValueError, match="positive"):
            Ring(size)
    with pytest.raises(ValueError, match="too large"):
        Ring(2**62)
    fds_before = _fd_count()
    with pytest.raises(OSError) as raised:
        Ring(2**60)  # 2**61 bytes of address space: more than x86-64 user space holds
    assert raised.value.errno == errno.ENOMEM
    assert "mmap" in str(raised.value)
    assert _fd_count() == fds_before  # the half-built ring closed its memfd


# --- the mirror property ---------------------------------------------------------------


def test_a_region_across_the_end_is_contiguous() -> None:
    ring = Ring(PAGE)
    start = PAGE - 96  # 96 bytes before the end of the first copy
    assert ring.reserve(start) is not None
    ring.commit(start)
    ring.consume(start)

    payload = bytes(random.Random(1).randbytes(200))
    view = ring.reserve(200)
    assert view is not None and not view.readonly and len(view) == 200
    view[:] = payload
    ring.commit(200)

    assert bytes(ring.peek()) == payload
    assert bytes(ring.view(start, 200)) == payload
    array = ring.numpy(start, 200)
    assert array.dtype == np.uint8 and array.shape == (200,)
    assert array.tobytes() == payload
    # the 104 bytes past the end landed at the start of the memfd: the mirror
    assert bytes(ring.view(0, 104)) == payload[96:]
    assert bytes(ring.view(PAGE, 104)) == payload[96:]  # same stream position, next lap
    both = memoryview(ring)
    assert bytes(both[:PAGE]) == bytes(both[PAGE:])


def test_numpy_and_views_share_memory_with_the_ring() -> None:
    ring = Ring(PAGE)
    array = ring.numpy(PAGE - 8, 16)  # straddles the end of the first copy
    array[:] = np.arange(16, dtype=np.uint8)
    assert bytes(ring.view(PAGE - 8, 16)) == bytes(range(16))
    assert bytes(ring.view(0, 8)) == bytes(range(8, 16))
    ring.view(3 * PAGE + 2, 1)[0] = 0xAA  # an absolute position three laps on
    assert array[10] == 0xAA
    assert np.shares_memory(array, np.frombuffer(memoryview(ring), dtype=np.uint8))


def test_views_keep_the_ring_alive() -> None:
    gc.collect()  # rings earlier tests left in cycles go now, and none while counting
    gc.disable()
    try:
        mappings = _ring_mappings()
        view = Ring(PAGE).view(10, 20)  # the Ring has no other reference
        array = Ring(PAGE).numpy(5, 5)
        assert _ring_mappings() == mappings + 4
        view[:] = b"x" * 20
        array[:] = 7
        assert bytes(view) == b"x" * 20 and array.tolist() == [7] * 5
        del view, array
        assert _ring_mappings() == mappings
    finally:
        gc.enable()


# --- a model of the stream ---------------------------------------------------------------


class RingAgainstModel(RuleBasedStateMachine):
    """Random reserve/commit/consume sequences against a bytearray of the readable bytes."""

    size = PAGE

    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring(self.size)
        self.readable = bytearray()
        self.pending = b""  # written into the reservation, not yet committed
        self.head = 0

    @rule(n=st.integers(0, PAGE), data=st.data())
    def reserve(self, n: int, data: st.DataObject) -> None:
        view = self.ring.reserve(n)
        if n > self.size - len(self.readable):
            assert view is None
            return
        assert view is not None and len(view) == n
        self.pending = data.draw(st.binary(min_size=n, max_size=n))
        view[:] = self.pending

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.pending)))
        self.ring.commit(n)
        self.readable += self.pending[:n]
        self.pending = self.pending[n:]
        self.head += n

    @rule(extra=st.integers(1, PAGE))
    def commit_more_than_reserved(self, extra: int) -> None:
        with pytest.raises(ValueError, match="reserved"):
            self.ring.commit(len(self.pending) + extra)

    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.readable)))
        self.ring.consume(n)
        del self.readable[:n]

    @rule(extra=st.integers(1, PAGE))
    def consume_more_than_used(self, extra: int) -> None:
        with pytest.raises(ValueError, match="used"):
            self.ring.consume(len(self.readable) + extra)

    @invariant()
    def counters_and_contents_match(self) -> None:
        ring = self.ring
        used = len(self.readable)
        tail = self.head - used
        assert (ring.head, ring.tail, ring.used, ring.free) == (
            self.head,
            tail,
            used,
            self.size - used,
        )
        peeked = ring.peek()
        assert peeked.readonly and bytes(peeked) == self.readable
        assert bytes(ring.view(tail, used)) == self.readable
        assert ring.numpy(tail, used).tobytes() == self.readable


TestRingAgainstModel = RingAgainstModel.TestCase
TestRingAgainstModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# --- misuse from Python -------------------------------------------------------------------


def test_bounds_errors() -> None:
    ring = Ring(PAGE)
    with pytest.raises(ValueError, match="exceeds the ring size"):
        ring.reserve(PAGE + 1)
    with pytest.raises(ValueError, match="negative"):
        ring.reserve(-1)
    with pytest.raises(ValueError, match="exceeds the 0 bytes reserved"):
        ring.commit(1)
    with pytest.raises(ValueError, match="reserved"):
        ring.commit(-1)
    with pytest.raises(ValueError, match="exceeds the 0 bytes used"):
        ring.consume(1)
    with pytest.raises(ValueError, match="used"):
        ring.consume(-1)
    with pytest.raises(ValueError, match="exceeds the ring size"):
        ring.view(0, PAGE + 1)
    with pytest.raises(ValueError, match="exceeds the ring size"):
        ring.numpy(0, PAGE + 1)
    with pytest.raises(ValueError, match="position"):
        ring.view(-1, 1)
    with pytest.raises(ValueError, match="position"):
        ring.view(2**64, 1)

    assert ring.reserve(100) is not None
    ring.commit(60)
    with pytest.raises(ValueError, match="exceeds the 40 bytes reserved"):
        ring.commit(41)
    ring.commit(40)
    with pytest.raises(ValueError, match="exceeds the 100 bytes used"):
        ring.consume(101)
    assert ring.reserve(PAGE - 99) is None  # one byte more than is free
    assert (ring.used, ring.free, ring.head, ring.tail) == (100, PAGE - 100, 100, 0)


# --- resources ---------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> list[str]:
    with open("/proc/self/maps") as maps:
        return maps.read().splitlines()


def _ring_mappings(low: int = 0, high: int = 1 << 64) -> int:
    """memfd ring mappings in [low, high): by address, so that a ring some other test
    left to the garbage collector (or to a thread) going meanwhile does not count."""
    count = 0
    for line in _maps():
        if "memfd:eembridge-ring" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            count += low <= start and end <= high
    return count


def _mapped_ranges() -> list[tuple[int, int]]:
    ranges = []
    for line in _maps():
        start, end = line.split()[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_many_rings_leak_no_fds_and_no_mappings() -> None:
    rng = random.Random(7)
    gc.collect()  # rings earlier tests left in cycles go now, not during the loop
    fds = _fd_count()
    spans = []
    for _ in range(300):
        ring = Ring(rng.randrange(1, 64 * PAGE))
        low, high = ring.address, ring.address + 2 * ring.size
        spans.append((low, high))
        assert _ring_mappings(low, high) == 2  # exactly the two copies
        view = ring.reserve(ring.size // 2)
        assert view is not None
        view[:4] = b"ring"
        del view, ring  # no cycles: freed right here, without the garbage collector
        assert _ring_mappings(low, high) == 0
        assert _fd_count() == fds
    # and the PROT_NONE reservation went too: nothing is mapped where the rings were
    mapped = _mapped_ranges()
    for low, high in spans[-20:]:  # earlier addresses may have been reused since
        assert not any(start < high and low < end for start, end in mapped), hex(low)


# --- the C-level API ----------------------------------------------------------------------


def test_c_level_api_sees_the_same_ring(ring_user: ModuleType) -> None:
    ring = Ring(2 * PAGE)
    assert ring_user.base_address(ring) == ring.address
    assert ring_user.at_address(ring, 3) == ring.address + 3
    assert ring_user.at_address(ring, 2 * PAGE + 3) == ring.address + 3  # next lap
    assert ring_user.reserve_commit(ring, 100)
    ring.consume(40)
    assert ring_user.counts(ring) == (60, 2 * PAGE - 60, 100, 40)
    assert not ring_user.reserve_commit(ring, 2 * PAGE - 59)  # one byte too many
    with pytest.raises(TypeError):
        ring_user.counts(object())  # a Ring is a type Cython checks
    with pytest.raises(TypeError):
        ring_user.counts(None)


def test_two_threads_without_the_gil_move_200_mb(ring_user: ModuleType) -> None:
    total = 200 * 1024 * 1024
    ring = Ring(64 * 1024)  # small, so the stream wraps about 3200 times
    produced: list[tuple[int, int]] = []
    producer = threading.Thread(
        target=lambda: produced.append(ring_user.produce(ring, total, 16 * 1024, 1))
    )
    # Proof that both loops let go of the GIL: a Python thread keeps running beside them
    # (a timing bound would say the same and fail on a loaded machine).
    ticks = [0]
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks[0] += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    producer.start()
    ticks_before = ticks[0]
    fnv, bad, first_bad, most, _empty = ring_user.consume(ring, total, 2)
    ticks_during = ticks[0] - ticks_before
    producer.join()
    done.set()
    ticker.join()

    assert (bad, first_bad) == (0, -1)
    assert produced and produced[0][0] == fnv  # same checksum on both sides
    assert most <= ring.size
    assert (ring.head, ring.tail, ring.used) == (total, total, 0)
    assert ticks_during > 0, "no Python thread ran while the two C loops moved 200 MB"


def test_two_python_threads_keep_the_stream_intact() -> None:
    total = 64 * 1024 * 1024
    ring = Ring(64 * 1024)
    stream = random.Random(3).randbytes(1 << 16)  # repeated; chunking is random
    sent = bytearray()

    def producer() -> None:
        rng, position = random.Random(4), 0
        while position < total:
            n = min(rng.randrange(1, 16 * 1024), total - position)
            view = ring.reserve(n)
            if view is None:
                time.sleep(0)
                continue
            offset = position % len(stream)
            chunk = (stream[offset:] + stream)[:n]
            view[:] = chunk
            sent.extend(chunk)
            ring.commit(n)
            position += n

    thread = threading.Thread(target=producer)
    thread.start()
    crc, received, rng = 0, 0, random.Random(5)
    while received < total:
        readable = ring.peek()
        if not readable:
            time.sleep(0)
            continue
        n = rng.randrange(1, len(readable) + 1)
        crc = zlib.crc32(readable[:n], crc)
        ring.consume(n)
        received += n
    thread.join()
    assert crc == zlib.crc32(sent)
    assert ring.used == 0 and ring.head == total
