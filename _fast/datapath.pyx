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

TX (TxPath): OUT transfers are built in fixed slots of TX memory, one slot per
transfer in flight (max_bytes_in_flight // max_transfer of them). With the GIL
released, the TAP is read(2) straight into a slot at `pos + 2` (room for the EEM
header), eem_frame_in_place writes the header in front and the CRC/sentinel behind,
and the next frame is read right after it. A frame is read only if the longest frame
the TAP may give would still fit the transfer once framed and closed (eem_fits), so
framing never writes beyond the slot and never over the next one; the slot has
max_transfer + 8 bytes for the check and the closing 0x0000 of the ZLP rule, which
eem_close_transfer appends when the transfer ends on a max-packet boundary (the one
ZLP mechanism, the framer's, as in Framer.pack). Slots are released strictly in
order (the bridge releases OUT transfers first in, first out).

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
    """TAP reads framed in place in TX slots, batched into OUT transfers."""

    cdef readonly object framer
    cdef readonly int tap_fd
    cdef readonly Py_ssize_t max_bytes_in_flight
    cdef readonly Py_ssize_t read_size
    cdef readonly Py_ssize_t slots
    cdef readonly Py_ssize_t slot_size
    cdef object _memory
    cdef object _whole
    cdef unsigned char* _base
    cdef Py_buffer _view
    cdef bint _have_view
    cdef Py_ssize_t _next  # slot the next transfer is built in
    cdef Py_ssize_t _used  # slots held by transfers not released yet
    cdef object _sizes  # their lengths, oldest first
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
        self.slots = max(1, max_bytes_in_flight // framer.max_transfer)
        # Room beyond max_transfer: a refused oversize read and the closing 0x0000.
        self.slot_size = framer.max_transfer + 2 * HEADER_SIZE + CHECK_SIZE + 8
        self._memory = bytearray(self.slots * self.slot_size)
        self._whole = memoryview(self._memory)
        PyObject_GetBuffer(self._whole, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._have_view = True
        self._base = <unsigned char*>self._view.buf
        self._sizes = deque()
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
        # The bridge zeroes it when the device went: every slot is free again.
        if value != 0:
            raise ValueError("bytes_in_flight can only be reset to 0")
        self._in_flight = 0
        self._used = 0
        self._sizes.clear()

    @property
    def has_room(self) -> bool:
        """Whether another batch fits: when not, the TAP is not read (backpressure)."""
        return self._used < self.slots

    def fill(self) -> list:
        """Read what the TAP has into free slots, framed in place, one transfer per slot."""
        cdef eem_framer* f = framer_of(self.framer)
        cdef int fd = self.tap_fd
        cdef Py_ssize_t read_size = self.read_size
        cdef Py_ssize_t longest = read_size - 1 + HEADER_SIZE + CHECK_SIZE
        cdef unsigned char* slot
        cdef Py_ssize_t pos, n, size, frames, length
        cdef bint drained = False
        cdef int64_t oversize0, runts0
        transfers = []
        while not drained and self._used < self.slots:
            slot = self._base + self._next * self.slot_size
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
                continue  # nothing (or only refused frames) read: the slot stays free
            length = eem_close_transfer(f, slot, pos)
            start = self._next * self.slot_size
            transfers.append(OutTransfer(self._whole[start : start + length], frames))
            self._sizes.append(length)
            self._in_flight += length
            self._used += 1
            self._next = (self._next + 1) % self.slots
        return transfers

    def release(self, transfer) -> None:
        """The oldest transfer completed (sent or dropped): its slot may be reused."""
        if self._used:
            self._in_flight -= self._sizes.popleft()
            self._used -= 1
