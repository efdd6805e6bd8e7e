# TX batching in C, header-only: TAP reads framed in place into OUT transfers laid out
# one after the other in TX memory that wraps like a ring. Shared by eembridge._datapath
# (TxPath, driven from the bridge thread) and eembridge._usb (the libusb event thread
# refills from the OUT completion callback, with no Python per transfer).
#
# Why header-only: see ring.pxd. TxPath owns a tx_state and hands its address out as a
# PyCapsule (TX_STATE_CAPSULE); whoever holds it keeps the TxPath alive and is the only
# one filling and releasing while it does. Theory of the layout: top of datapath.pyx.

from libc.errno cimport errno, EAGAIN
from libc.stdint cimport int64_t
from posix.unistd cimport read

from eem cimport eem_framer, eem_frame_in_place, eem_fits, eem_close_transfer

cdef extern from *:
    """
    #define TX_STATE_CAPSULE "eembridge._datapath.tx_state"
    """
    const char* TX_STATE_CAPSULE

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
    cdef Py_ssize_t longest = tx.read_size - 1 + TX_HEADER + TX_CHECK
    cdef Py_ssize_t pos = 0, n, size, length
    cdef int64_t oversize0 = f.c.oversize, runts0 = f.c.runts
    cdef unsigned char* slot
    cdef int k
    frames[0] = 0
    drained[0] = False
    start[0] = tx_place(tx)
    if start[0] < 0:
        return -1  # cannot happen while tx_has_room (see tx_place)
    slot = tx.base + start[0]
    while pos == 0 or eem_fits(f, pos + longest):
        n = read(tx.tap_fd, slot + pos + TX_HEADER, tx.read_size)
        if n < 0:
            if errno != EAGAIN:  # EAGAIN: drained (== EWOULDBLOCK on Linux)
                tx.read_errors += 1
                tx.errno_counts[errno if 0 <= errno < TX_ERRNO_SLOTS else 0] += 1
            drained[0] = True
            break
        if n == 0:
            drained[0] = True
            break
        tx.frames_read += 1
        size = eem_frame_in_place(f, slot + pos, n)
        if size:
            pos += size
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
