# cython: language_level=3
"""The bridge's data path in C: eembridge._datapath, the fast twin of eembridge.datapath.

Same objects, same API, same counters as the pure-Python RxPath/TxPath; the bridge does
not know which one it drives (eembridge.datapath_impl chooses).

RX (RxPath): IN transfers land in slots of a mirrored ring (eembridge._ring). For each
completion the codec deframes in place (Deframer.deframe_into, one C call), then one C
loop with the GIL released writes every frame of the transfer to the TAP straight from
ring memory, one write(2) per frame: a TAP takes exactly one frame per write and has
no batched write (writev would glue frames together; sendmmsg needs a socket). A
refused write is counted under its errno name; nothing is retried, as the kernel
would drop the frame itself on a full queue.

TX (TxPath): OUT transfers are built one after the other in TX memory that wraps like
a ring, as many as fit max_bytes_in_flight (as in the Python TxPath: a lone TCP ACK
makes a transfer of 70 bytes, not a 16 KB slot). With the GIL released, the TAP is
read(2) straight into the transfer at `pos + 2` (room for the EEM header),
eem_frame_in_place writes the header in front and the CRC/sentinel behind, and the
next frame is read right after it. A frame is read only if the longest frame the TAP
may give would still fit the transfer once framed and closed (eem_fits), so framing
never writes beyond the transfer's place and never over a transfer in flight; the
closing 0x0000 of the ZLP rule is appended by eem_close_transfer when a transfer ends
on a max-packet boundary (the one ZLP mechanism, the framer's, as in Framer.pack).
Memory is released strictly in order (the bridge releases OUT transfers first in,
first out).

Commands never pass through here: the bridge submits Echo / Echo Response transfers
of its own, ahead of TAP data not yet submitted.
"""

from libc.errno cimport EAGAIN, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from libc.stdint cimport int64_t
from posix.unistd cimport read, write
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer

from eem cimport (eem_deframer, eem_framer, deframer_of, framer_of, eem_frame_in_place,
                  eem_fits, eem_close_transfer)

import errno as _errno
from collections import deque

from .datapath import RX_COUNTERS, TX_COUNTERS, OutTransfer
from .protocol import CHECK_SIZE, HEADER_SIZE

DEF ERRNO_SLOTS = 256

cdef enum:
    HEADER = 2  # protocol.HEADER_SIZE (checked at import)

assert HEADER == HEADER_SIZE


cdef dict _errno_names(int64_t* counts):
    cdef int i
    out = {}
    for i in range(ERRNO_SLOTS):
        if counts[i]:
            out[_errno.errorcode.get(i, str(i))] = counts[i]
    return out


cdef inline void _count_errno(int64_t* counts, int e) noexcept nogil:
    counts[e if 0 <= e < ERRNO_SLOTS else 0] += 1


cdef class RxPath:
    """RX in place on a mirrored ring; frames go to the TAP from one C loop per transfer.

    The ring holds one slot per transfer in flight plus one: the tail an unfinished
    packet leaves in slot k is still needed while slot k+1 is deframed, and the mirror
    mapping keeps it contiguous with slot k+1 even across the end of the ring.
    """

    cdef readonly object deframer
    cdef readonly int tap_fd
    cdef readonly Py_ssize_t slot_size
    cdef readonly object ring
    cdef object _whole
    cdef Py_buffer _view
    cdef bint _have_view
    cdef int64_t frames_written, bytes_written, write_errors_total
    cdef int64_t errno_counts[ERRNO_SLOTS]

    def __init__(self, deframer, int tap_fd, Py_ssize_t slots, Py_ssize_t slot_size):
        from ._ring import Ring

        self.deframer = deframer
        deframer_of(deframer)  # a Cython Deframer, or fail here rather than later
        self.tap_fd = tap_fd
        self.slot_size = slot_size
        self.ring = Ring(slots * slot_size)
        if self.ring.size % slot_size:
            raise ValueError(f"slot size {slot_size} must divide the ring ({self.ring.size})")
        self._whole = memoryview(self.ring)  # both copies: 2 * size bytes
        PyObject_GetBuffer(self._whole, &self._view, PyBUF_SIMPLE)
        self._have_view = True
        memset(self.errno_counts, 0, sizeof(self.errno_counts))

    def __dealloc__(self):
        if self._have_view:
            PyBuffer_Release(&self._view)

    def counters(self) -> dict:
        return dict(zip(RX_COUNTERS, (self.frames_written, self.bytes_written,
                                      self.write_errors_total)))

    @property
    def write_errors(self) -> dict:
        """Refused TAP writes by errno name (EAGAIN/ENOBUFS: queue full; EIO: link down)."""
        return _errno_names(self.errno_counts)

    def slot_buffer(self, Py_ssize_t sequence):
        """Where IN transfer number `sequence` lands."""
        cdef Py_ssize_t start = (sequence * self.slot_size) % self.ring.size
        return self._whole[start : start + self.slot_size]

    def complete(self, Py_ssize_t sequence, Py_ssize_t actual, is_short) -> list:
        """Deframe one completed transfer in place, write its frames; return its commands."""
        cdef Py_ssize_t size = self.ring.size
        cdef Py_ssize_t offset = (sequence * self.slot_size) % size
        cdef Py_ssize_t carried = self.deframer.carried
        if offset < carried:
            offset += size  # the carried tail sits at the end of the first copy
        commands = self.deframer.deframe_into(self._whole, offset, actual, is_short)
        cdef eem_deframer* d = deframer_of(self.deframer)
        cdef const unsigned char* base = <const unsigned char*>self._view.buf + offset - carried
        cdef Py_ssize_t i, length
        cdef Py_ssize_t n = d.n_frames
        cdef int fd = self.tap_fd
        if n:
            with nogil:
                for i in range(n):
                    length = d.frames[i].length
                    if write(fd, base + d.frames[i].offset, length) == length:
                        self.frames_written += 1
                        self.bytes_written += length
                    else:
                        # The kernel refused it (queue full, link down): count, go on.
                        self.write_errors_total += 1
                        _count_errno(self.errno_counts, errno)
        return commands

    def reset(self) -> None:
        self.deframer.reset()


cdef class TxPath:
    """TAP reads framed in place in TX memory, batched into OUT transfers."""

    cdef readonly object framer
    cdef readonly int tap_fd
    cdef readonly Py_ssize_t max_bytes_in_flight
    cdef readonly Py_ssize_t read_size
    cdef readonly Py_ssize_t slot_size
    cdef readonly Py_ssize_t size
    cdef object _memory
    cdef object _whole
    cdef unsigned char* _base
    cdef Py_buffer _view
    cdef bint _have_view
    cdef Py_ssize_t _head  # where the next transfer may start
    cdef object _held  # (start, length) of transfers not released yet, oldest first
    cdef Py_ssize_t _in_flight
    cdef int64_t frames_read, read_errors_total, oversize, runts
    cdef int64_t errno_counts[ERRNO_SLOTS]

    def __init__(self, framer, int tap_fd, Py_ssize_t max_bytes_in_flight):
        framer_of(framer)
        self.framer = framer
        self.tap_fd = tap_fd
        self.max_bytes_in_flight = max_bytes_in_flight
        # One byte more than the longest frame we may send, to see oversize frames.
        self.read_size = framer.max_length - CHECK_SIZE + 1
        # Room a transfer may take while being built: max_transfer, plus what a refused
        # oversize read and the closing 0x0000 may touch beyond it.
        self.slot_size = framer.max_transfer + framer.max_length + 2 * HEADER_SIZE + 8
        # Transfers are laid out one after the other and wrap like a ring. With two
        # slots to spare, a place for the next one always exists while has_room is
        # true: the free bytes (at least 2 slots, or 1 beyond a wrap gap shorter than a
        # slot) cannot all be split into pieces shorter than a slot.
        self.size = max_bytes_in_flight + 2 * self.slot_size
        self._memory = bytearray(self.size)
        self._whole = memoryview(self._memory)
        PyObject_GetBuffer(self._whole, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._have_view = True
        self._base = <unsigned char*>self._view.buf
        self._held = deque()
        memset(self.errno_counts, 0, sizeof(self.errno_counts))

    def __dealloc__(self):
        if self._have_view:
            PyBuffer_Release(&self._view)

    def counters(self) -> dict:
        return dict(zip(TX_COUNTERS, (self.frames_read, self.read_errors_total, self.oversize,
                                      self.runts)))

    @property
    def read_errors(self) -> dict:
        return _errno_names(self.errno_counts)

    @property
    def bytes_in_flight(self) -> int:
        return self._in_flight

    @bytes_in_flight.setter
    def bytes_in_flight(self, value) -> None:
        # The bridge zeroes it when the device went: all memory is free again.
        if value != 0:
            raise ValueError("bytes_in_flight can only be reset to 0")
        self._in_flight = 0
        self._head = 0
        self._held.clear()

    @property
    def has_room(self) -> bool:
        """Whether another full batch fits: when not, the TAP is not read (backpressure)."""
        return self._in_flight + self.framer.max_transfer <= self.max_bytes_in_flight

    cdef Py_ssize_t _place(self) except -1:
        """Where a transfer of up to slot_size bytes can be built now."""
        cdef Py_ssize_t tail, p = self._head
        if not self._held:
            self._head = 0
            return 0
        tail = self._held[0][0]
        if p >= tail:  # free: [p, size) and [0, tail)
            if p + self.slot_size <= self.size:
                return p
            if self.slot_size <= tail:
                return 0  # wrap; [p, size) stays unused this round
        elif p + self.slot_size <= tail:  # free: [p, tail)
            return p
        raise AssertionError("TX memory has no room although has_room said so")

    def fill(self) -> list:
        """Read what the TAP has, framed in place, into transfers of up to max_transfer."""
        cdef eem_framer* f = framer_of(self.framer)
        cdef int fd = self.tap_fd
        cdef Py_ssize_t read_size = self.read_size
        cdef Py_ssize_t longest = read_size - 1 + HEADER_SIZE + CHECK_SIZE
        cdef unsigned char* slot
        cdef Py_ssize_t start, pos, n, size, frames, length
        cdef bint drained = False
        cdef int64_t oversize0, runts0
        transfers = []
        while not drained and self.has_room:
            start = self._place()
            slot = self._base + start
            pos = 0
            frames = 0
            oversize0, runts0 = f.c.oversize, f.c.runts
            with nogil:
                # Read only while the longest possible frame would still fit once framed.
                while pos == 0 or eem_fits(f, pos + longest):
                    n = read(fd, slot + pos + HEADER, read_size)
                    if n < 0:
                        if errno != EAGAIN:  # EAGAIN: drained (== EWOULDBLOCK on Linux)
                            self.read_errors_total += 1
                            _count_errno(self.errno_counts, errno)
                        drained = True
                        break
                    if n == 0:
                        drained = True
                        break
                    self.frames_read += 1
                    size = eem_frame_in_place(f, slot + pos, n)
                    if size:
                        pos += size
                        frames += 1
            self.oversize += f.c.oversize - oversize0
            self.runts += f.c.runts - runts0
            if frames == 0:
                continue  # nothing (or only refused frames) read: the memory stays free
            length = eem_close_transfer(f, slot, pos)
            transfers.append(OutTransfer(self._whole[start : start + length], frames))
            self._held.append((start, length))
            self._head = start + length
            self._in_flight += length
        return transfers

    def release(self, transfer) -> None:
        """The oldest transfer completed (sent or dropped): its memory may be reused."""
        if self._held:
            self._in_flight -= self._held.popleft()[1]
