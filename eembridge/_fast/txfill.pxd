# TX batching in C, header-only: TAP reads framed in place into OUT transfers laid out
# one after the other in TX memory that wraps like a ring. Shared by the datapath's
# TxPath (driven from the bridge thread) and the engine (engine.pxi: its event thread
# refills from the OUT completion, with no Python per transfer).
#
# Header-only: see rxdeliver.pxd. TxPath (datapath.pxd) owns a tx_state; the engine
# takes &txpath.state, keeps the TxPath alive and is the only one filling and releasing
# while it does. Theory of the layout: top of datapath.pyx.

from libc.errno cimport errno, EAGAIN
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from posix.unistd cimport read
from posix.uio cimport iovec, readv

from eembridge._fast.eem cimport (eem_framer, eem_frame_placed, eem_place, eem_fits,
                                  eem_close_transfer)
from eembridge._fast.offload cimport (vnet_hdr_t, gso_state_t, gso_begin, gso_next,
                                      gso_longest, off_complete_checksum, VNET_HDR_SIZE,
                                      VNET_F_NEEDS_CSUM, VNET_GSO_NONE)

cdef enum:
    TX_ERRNO_SLOTS = 256
    TX_HELD_MAX = 1024  # transfers held at once (a lone TCP ACK makes a 70-byte one)
    TX_HEADER = 2  # protocol.HEADER_SIZE
    TX_CHECK = 4  # protocol.CHECK_SIZE

cdef struct tx_state:
    eem_framer* f
    unsigned char* base
    Py_ssize_t size  # bytes of TX memory
    Py_ssize_t slot_size  # room one transfer may take while being built
    Py_ssize_t read_size  # one byte more than the longest frame we may send
    Py_ssize_t max_bytes_in_flight
    int tap_fd
    Py_ssize_t head  # where the next transfer may start
    Py_ssize_t held_start[TX_HELD_MAX]  # transfers not released yet, oldest first (a FIFO)
    Py_ssize_t held_length[TX_HELD_MAX]
    int held_first
    int n_held
    Py_ssize_t in_flight  # bytes held
    int64_t frames_read
    int64_t read_errors
    int64_t oversize
    int64_t runts
    int64_t errno_counts[TX_ERRNO_SLOTS]  # failed TAP reads by errno
    # Offload (IFF_VNET_HDR, offload.pxd): each read starts with a virtio_net_hdr and may
    # be one TCP packet of up to 64 KB, cut into frames here.
    bint vnet
    unsigned char* scratch  # scratch_size bytes: a whole GSO packet, contiguous
    Py_ssize_t scratch_size
    vnet_hdr_t hdr
    gso_state_t gso
    int64_t gso_packets  # GSO packets read
    int64_t gso_frames  # frames cut from them
    int64_t checksums  # partial checksums completed (NEEDS_CSUM)
    int64_t offload_errors  # packets refused by the offload: dropped


cdef inline bint tx_has_room(tx_state* tx) noexcept nogil:
    """Whether another full transfer fits: when not, the TAP is not read (backpressure)."""
    return (tx.in_flight + tx.f.max_transfer <= tx.max_bytes_in_flight
            and tx.n_held < TX_HELD_MAX)


cdef inline Py_ssize_t tx_place(tx_state* tx) noexcept nogil:
    """Where a transfer of up to slot_size bytes can be built now; -1: nowhere.

    With two slots to spare in TX memory, a place always exists while tx_has_room.
    """
    cdef Py_ssize_t tail, p = tx.head
    if tx.n_held == 0:
        tx.head = 0
        return 0
    tail = tx.held_start[tx.held_first]
    if p >= tail:  # free: [p, size) and [0, tail)
        if p + tx.slot_size <= tx.size:
            return p
        if tx.slot_size <= tail:
            return 0  # wrap; [p, size) stays unused this round
    elif p + tx.slot_size <= tail:  # free: [p, tail)
        return p
    return -1


cdef enum:
    TX_READ_DRAINED = 0
    TX_READ_ERROR = -1  # counted; the TAP is not read again this round
    TX_READ_REFUSED = -2  # a packet consumed and dropped (counted); read on


cdef inline Py_ssize_t tx_read_frame(tx_state* tx, unsigned char* dst) noexcept nogil:
    """The TAP's next frame into dst (room: read_size bytes): its length, or TX_READ_*.

    A length of read_size means an oversize frame (the framer refuses and counts it).
    With offload, a GSO packet's frames come one per call until it is used up.
    """
    cdef Py_ssize_t n
    cdef iovec iov[3]
    if tx.vnet and tx.gso.pending:
        n = gso_next(&tx.gso, dst)
        if n:
            tx.gso_frames += 1
            return n
    if tx.vnet:
        # Header, then the frame straight into the transfer; only a packet longer than
        # a frame spills over into scratch, behind room for the part that did not.
        iov[0].iov_base = &tx.hdr
        iov[0].iov_len = VNET_HDR_SIZE
        iov[1].iov_base = dst
        iov[1].iov_len = tx.read_size
        iov[2].iov_base = tx.scratch + tx.read_size
        iov[2].iov_len = tx.scratch_size - tx.read_size
        n = readv(tx.tap_fd, iov, 3)
        if n >= VNET_HDR_SIZE:
            n -= VNET_HDR_SIZE
        elif n >= 0:
            tx.offload_errors += 1  # a header cut short: the kernel never does that
            return TX_READ_REFUSED
    else:
        n = read(tx.tap_fd, dst, tx.read_size)
    if n < 0:
        if errno != EAGAIN:  # EAGAIN: drained (== EWOULDBLOCK on Linux)
            tx.read_errors += 1
            tx.errno_counts[errno if 0 <= errno < TX_ERRNO_SLOTS else 0] += 1
            return TX_READ_ERROR
        return TX_READ_DRAINED
    if not tx.vnet:
        return n
    if tx.hdr.gso_type == VNET_GSO_NONE:
        if n > tx.read_size:
            return tx.read_size  # oversize; the framer counts it
        if tx.hdr.flags & VNET_F_NEEDS_CSUM:
            if not off_complete_checksum(dst, n, tx.hdr.csum_start, tx.hdr.csum_offset):
                tx.offload_errors += 1
                return TX_READ_REFUSED
            tx.checksums += 1
        return n
    if n >= tx.scratch_size:
        tx.oversize += 1  # filled every byte offered: maybe cut short (BIG TCP?), refused
        return TX_READ_REFUSED
    memcpy(tx.scratch, dst, n if n < tx.read_size else tx.read_size)
    if not gso_begin(&tx.gso, &tx.hdr, tx.scratch, n):
        tx.offload_errors += 1
        return TX_READ_REFUSED
    if gso_longest(&tx.gso) >= tx.read_size:
        tx.gso.pending = 0
        tx.oversize += 1
        return TX_READ_REFUSED
    tx.gso_packets += 1
    tx.gso_frames += 1
    return gso_next(&tx.gso, dst)


cdef inline Py_ssize_t tx_fill_one(tx_state* tx, Py_ssize_t* start, int* frames,
                                   bint* drained) noexcept nogil:
    """Read what the TAP has into one transfer, framed in place, and hold it.

    Returns its length (0: nothing read, or only refused frames; -1: no place, which
    tx_has_room rules out); *start is where it
    lies in TX memory, *frames how many frames it carries, *drained whether the TAP
    had no more. A frame is read only if the longest frame the TAP may give would
    still fit the transfer once framed and closed (eem_fits), so framing never writes
    beyond the transfer's place and never over a transfer in flight.
    """
    cdef eem_framer* f = tx.f
    # (+1: with out_chunk, an odd frame is padded by a byte)
    cdef Py_ssize_t longest = tx.read_size - 1 + TX_HEADER + TX_CHECK + (f.out_chunk != 0)
    cdef Py_ssize_t pos = 0, n, size, length, at
    cdef int64_t oversize0 = f.c.oversize, runts0 = f.c.runts
    cdef unsigned char* slot
    cdef int k
    frames[0] = 0
    drained[0] = False
    start[0] = tx_place(tx)
    if start[0] < 0:
        return -1  # cannot happen while tx_has_room (see tx_place)
    slot = tx.base + start[0]
    # (with out_chunk the longest frame may have to start at the next chunk: eem_place)
    while pos == 0 or eem_fits(f, eem_place(f, pos, longest) + longest):
        n = tx_read_frame(tx, slot + pos + TX_HEADER)
        if n == TX_READ_REFUSED:
            continue
        if n <= 0:
            drained[0] = True
            break
        tx.frames_read += 1
        size = eem_frame_placed(f, slot, pos, n, &at)
        if size:
            pos = at + size
            frames[0] += 1
    tx.oversize += f.c.oversize - oversize0
    tx.runts += f.c.runts - runts0
    if frames[0] == 0:
        return 0  # the memory stays free
    length = eem_close_transfer(f, slot, pos)
    k = (tx.held_first + tx.n_held) % TX_HELD_MAX
    tx.held_start[k] = start[0]
    tx.held_length[k] = length
    tx.n_held += 1
    tx.head = start[0] + length
    tx.in_flight += length
    return length


cdef inline void tx_release_oldest(tx_state* tx) noexcept nogil:
    """The oldest transfer completed (sent or dropped): its memory may be reused."""
    if tx.n_held:
        tx.in_flight -= tx.held_length[tx.held_first]
        tx.held_first = (tx.held_first + 1) % TX_HELD_MAX
        tx.n_held -= 1


cdef inline void tx_unhold_newest(tx_state* tx) noexcept nogil:
    """The newest transfer was never submitted: give its memory back."""
    cdef int k
    if tx.n_held:
        k = (tx.held_first + tx.n_held - 1) % TX_HELD_MAX
        tx.in_flight -= tx.held_length[k]
        tx.head = tx.held_start[k]
        tx.n_held -= 1


cdef inline void tx_reset(tx_state* tx) noexcept nogil:
    """The device went: all memory is free again."""
    tx.in_flight = 0
    tx.head = 0
    tx.n_held = 0
    tx.held_first = 0
