# TX batching in C, header-only: the link's frames (link.pxd) framed in place into OUT
# transfers laid out one after the other in TX memory that wraps like a ring. Shared by
# the datapath's TxPath (driven from the bridge thread) and the engine (engine.pxi: its event thread
# refills from the OUT completion, with no Python per transfer).
#
# Header-only: see rxdeliver.pxd. TxPath (datapath.pxd) owns a tx_state; the engine
# takes &txpath.state, keeps the TxPath alive and is the only one filling and releasing
# while it does. Theory of the layout: top of datapath.pyx.

from libc.stdint cimport int64_t

from eembridge._fast.eem cimport (eem_framer, eem_frame_placed, eem_place, eem_fits,
                                  eem_close_transfer)
from eembridge._fast.link cimport eng_link, LINK_REFUSED

cdef enum:
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
    eng_link link  # where the frames come from (link.pxd); it counts its read errors
    Py_ssize_t head  # where the next transfer may start
    Py_ssize_t held_start[TX_HELD_MAX]  # transfers not released yet, oldest first (a FIFO)
    Py_ssize_t held_length[TX_HELD_MAX]
    int held_first
    int n_held
    Py_ssize_t in_flight  # bytes held
    int64_t frames_read
    int64_t oversize
    int64_t runts


cdef inline bint tx_has_room(tx_state* tx) noexcept nogil:
    """Whether another full transfer fits: when not, the link is not read (backpressure)."""
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
    """Read what the link has into one transfer, framed in place, and hold it.

    Returns its length (0: nothing read, or only refused frames; -1: no place, which
    tx_has_room rules out); *start is where it
    lies in TX memory, *frames how many frames it carries, *drained whether the link
    had no more. A frame is read only if the longest frame the link may give would
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
        n = tx.link.fill(&tx.link, slot + pos + TX_HEADER, tx.read_size)
        if n == LINK_REFUSED:
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
