# cython: language_level=3
"""The bridge's data path in C: eembridge._fast.datapath, the fast twin of eembridge.datapath.reference.

Same objects, same API, same counters as the pure-Python RxPath/TxPath; the bridge does
not know which one it drives (eembridge.datapath chooses).

RX (RxPath): IN transfers land in slots of a mirrored ring (eembridge._fast.ring). For each
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

cimport cython
from libc.string cimport memcpy, memset
from libc.stdint cimport int64_t

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer

from eembridge._fast.eem cimport Deframer, Framer
from eembridge._fast.link cimport frame_link_init, LINK_ERRNO_SLOTS
from eembridge._fast.rxdeliver cimport rx_state, rx_write_frames, rx_flush, rx_slot_offset
from eembridge._fast.taplink cimport tap_link_init
from eembridge._fast.txfill cimport (tx_state, tx_has_room, tx_fill_one, tx_release_oldest,
                                     tx_reset, TX_HEADER, TX_CHECK)
from eembridge._fast.offload cimport (vnet_hdr_t, gso_state_t, gso_begin, gso_next,
                                      off_complete_checksum, VNET_HDR_SIZE, VNET_F_NEEDS_CSUM,
                                      VNET_GSO_NONE, GRO_BUF_SIZE)

import errno as _errno

from eembridge._fast.ring import Ring
from eembridge.core.offload import OffloadError
from eembridge.core.protocol import CHECK_SIZE, HEADER_SIZE
from eembridge.datapath.reference import RX_COUNTERS, TX_COUNTERS, OutTransfer

assert TX_HEADER == HEADER_SIZE and TX_CHECK == CHECK_SIZE


cdef dict _errno_names(int64_t* counts):
    cdef int i
    out = {}
    for i in range(LINK_ERRNO_SLOTS):
        if counts[i]:
            out[_errno.errorcode.get(i, str(i))] = counts[i]
    return out


# no_gc_clear, and buffers taken from objects the collector does not clear (the ring, a
# bytearray, never a memoryview): a bridge that stopped on an error stays in a cycle
# (its error's traceback) until the collection at exit, and there tp_clear dropped the
# Py_buffers' owners first. The interpreter then freed a bytearray still exported
# ("SystemError: deallocated bytearray object has exported buffers") or crashed.
@cython.no_gc_clear
cdef class RxPath:
    """RX in place on a mirrored ring; frames go to the TAP from one C loop per transfer.

    The ring holds one slot per transfer in flight plus one: the tail an unfinished
    packet leaves in slot k is still needed while slot k+1 is deframed, and the mirror
    mapping keeps it contiguous with slot k+1 even across the end of the ring.
    """

    def __init__(self, Deframer deframer not None, int tap_fd, Py_ssize_t slots, Py_ssize_t slot_size,
                 bint vnet=False):
        self.deframer = deframer
        self.tap_fd = tap_fd
        self.slot_size = slot_size
        self.ring = Ring(slots * slot_size)
        if self.ring.size % slot_size:
            raise ValueError(f"slot size {slot_size} must divide the ring ({self.ring.size})")
        self._whole = memoryview(self.ring)  # both copies: 2 * size bytes
        # From the ring itself, not from _whole: see no_gc_clear above.
        PyObject_GetBuffer(self.ring, &self._view, PyBUF_SIMPLE)
        self._have_view = True
        memset(&self.state, 0, sizeof(self.state))
        self.state.d = &deframer.d
        self.state.ring = <const unsigned char*>self._view.buf
        self.state.size = self.ring.size
        self.state.slot_size = slot_size
        memset(&self.tap, 0, sizeof(self.tap))
        if vnet:
            self._gro_buf = bytearray(GRO_BUF_SIZE)
            PyObject_GetBuffer(self._gro_buf, &self._gro_view, PyBUF_SIMPLE | PyBUF_WRITABLE)
            self._have_gro_view = True
            self.tap.gro.buf = <unsigned char*>self._gro_view.buf
            tap_link_init(&self.state.link, &self.tap, tap_fd)
        else:
            frame_link_init(&self.state.link, tap_fd)
        # A whole slot deframes in place without growing (the transport's event thread
        # cannot grow it).
        deframer.set_capacity(slot_size)


    def __dealloc__(self):
        if self._have_view:
            PyBuffer_Release(&self._view)
        if self._have_gro_view:
            PyBuffer_Release(&self._gro_view)

    def counters(self) -> dict:
        link = &self.state.link
        return dict(zip(RX_COUNTERS, (link.frames_written, link.bytes_written,
                                      link.write_errors, self.tap.gro_packets,
                                      self.tap.gro_frames)))

    @property
    def write_errors(self) -> dict:
        """Refused TAP writes by errno name (EAGAIN/ENOBUFS: queue full; EIO: link down)."""
        return _errno_names(self.state.link.write_errno)

    def slot_buffer(self, Py_ssize_t sequence):
        """Where IN transfer number `sequence` lands."""
        cdef Py_ssize_t start = rx_slot_offset(&self.state, sequence)
        return self._whole[start : start + self.slot_size]

    def complete(self, Py_ssize_t sequence, Py_ssize_t actual, is_short) -> list:
        """Deframe one completed transfer in place, write its frames; return its commands."""
        cdef Py_ssize_t size = self.ring.size
        cdef Py_ssize_t offset = (sequence * self.slot_size) % size
        cdef Py_ssize_t carried = self.deframer.carried
        if offset < carried:
            offset += size  # the carried tail sits at the end of the first copy
        commands = self.deframer.deframe_into(self._whole, offset, actual, is_short)
        cdef const unsigned char* base = self.state.ring + offset - carried
        if self.state.d.n_frames:
            with nogil:
                rx_write_frames(&self.state, base)
                rx_flush(&self.state)  # this path merges within one transfer only
        return commands

    def flush(self) -> None:
        """Write what offload holds back to merge (the native path calls rx_flush itself)."""
        with nogil:
            rx_flush(&self.state)

    def reset(self) -> None:
        self.flush()  # what was held is whole and in order: it still goes up
        self.deframer.reset()


@cython.no_gc_clear  # see RxPath
cdef class TxPath:
    """TAP reads framed in place in TX memory, batched into OUT transfers."""

    def __init__(self, Framer framer not None, int tap_fd, Py_ssize_t max_bytes_in_flight, bint vnet=False):
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
        PyObject_GetBuffer(self._memory, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._have_view = True
        memset(&self.state, 0, sizeof(self.state))
        self.state.f = &framer.f
        self.state.base = <unsigned char*>self._view.buf
        self.state.size = self.size
        self.state.slot_size = self.slot_size
        self.state.read_size = self.read_size
        self.state.max_bytes_in_flight = max_bytes_in_flight
        memset(&self.tap, 0, sizeof(self.tap))
        if vnet:
            # A GSO packet: up to 64 KB of IP behind an Ethernet header and a VLAN tag.
            self._scratch = bytearray(self.read_size + 65536 + 64)
            PyObject_GetBuffer(self._scratch, &self._scratch_view, PyBUF_SIMPLE | PyBUF_WRITABLE)
            self._have_scratch_view = True
            self.tap.scratch = <unsigned char*>self._scratch_view.buf
            self.tap.scratch_size = len(self._scratch)
            tap_link_init(&self.state.link, &self.tap, tap_fd)
        else:
            frame_link_init(&self.state.link, tap_fd)

    @property
    def vnet(self) -> bool:
        """Whether the TAP reads start with a virtio_net_hdr (offload on)."""
        return self.state.link.ctx == &self.tap


    def __dealloc__(self):
        if self._have_view:
            PyBuffer_Release(&self._view)
        if self._have_scratch_view:
            PyBuffer_Release(&self._scratch_view)

    def counters(self) -> dict:
        s, t = &self.state, &self.tap
        return dict(zip(TX_COUNTERS, (s.frames_read, s.link.read_errors,
                                      s.oversize + t.oversize, s.runts, t.gso_packets,
                                      t.gso_frames, t.checksums, t.offload_errors)))

    @property
    def read_errors(self) -> dict:
        return _errno_names(self.state.link.read_errno)

    @property
    def bytes_in_flight(self) -> int:
        return self.state.in_flight

    @bytes_in_flight.setter
    def bytes_in_flight(self, value) -> None:
        # The bridge zeroes it when the device went: all memory is free again.
        if value != 0:
            raise ValueError("bytes_in_flight can only be reset to 0")
        tx_reset(&self.state)

    @property
    def has_room(self) -> bool:
        """Whether another full batch fits: when not, the TAP is not read (backpressure)."""
        return tx_has_room(&self.state)

    def fill(self) -> list:
        """Read what the TAP has, framed in place, into transfers of up to max_transfer."""
        cdef Py_ssize_t start, length
        cdef int frames
        cdef bint drained = False
        transfers = []
        while not drained and tx_has_room(&self.state):
            with nogil:
                length = tx_fill_one(&self.state, &start, &frames, &drained)
            if length < 0:
                raise AssertionError("TX memory has no room although has_room said so")
            if length:
                transfers.append(OutTransfer(self._whole[start : start + length], frames))
        return transfers

    def release(self, transfer) -> None:
        """The oldest transfer completed (sent or dropped): its memory may be reused."""
        tx_release_oldest(&self.state)


def segment(bytes header, bytes packet) -> list:
    """The frames one TAP read stands for, cut by the C offload the data path uses:
    eembridge.core.offload.segment's twin (tests hold them to the same bytes)."""
    cdef vnet_hdr_t h
    cdef gso_state_t st
    cdef Py_ssize_t n
    if len(header) < VNET_HDR_SIZE:
        raise ValueError("a virtio_net_hdr is 10 bytes")
    memcpy(&h, <const char*>header, VNET_HDR_SIZE)
    frame = bytearray(packet)
    cdef unsigned char* p = frame
    if h.gso_type == VNET_GSO_NONE:
        if h.flags & VNET_F_NEEDS_CSUM and not off_complete_checksum(
                p, len(frame), h.csum_start, h.csum_offset):
            raise OffloadError("checksum outside the frame")
        return [bytes(frame)]
    if not gso_begin(&st, &h, p, len(frame)):
        raise OffloadError("not a GSO packet the offload can cut")
    out = bytearray(len(frame) + 64)
    cdef unsigned char* o = out
    frames = []
    while True:
        n = gso_next(&st, o)
        if n == 0:
            return frames
        frames.append(bytes(out[:n]))
