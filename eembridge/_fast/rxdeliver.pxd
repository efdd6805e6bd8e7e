# RX delivery in C, header-only: one completed IN transfer, deframed in place on the
# mirrored ring, its frames handed to the link (link.pxd). Shared by the datapath's
# RxPath (driven from the bridge thread) and the engine (engine.pxi: its event thread
# drives it straight from the transfer completion, with no Python per transfer).
#
# Header-only: inline functions compiled into each user, no module of its own. RxPath
# (datapath.pxd) owns an rx_state; the engine takes &rxpath.state and keeps the RxPath
# alive, the only one delivering while it does.

from libc.stdint cimport int64_t

from eembridge._fast.eem cimport eem_deframer, eem_deframe
from eembridge._fast.link cimport eng_link, link_flush

cdef struct rx_state:
    eem_deframer* d
    const unsigned char* ring  # both mappings of the mirrored ring: 2 * size bytes
    Py_ssize_t size  # bytes per mapping
    Py_ssize_t slot_size  # one IN transfer's slot; divides size
    eng_link link  # where the frames go (link.pxd); it counts what it wrote
    int64_t deframe_failures  # eem_deframe refused a transfer (no memory): its frames lost


cdef inline Py_ssize_t rx_slot_offset(rx_state* rx, int64_t sequence) noexcept nogil:
    """Where IN transfer number `sequence` lands in the ring."""
    return <Py_ssize_t>((sequence * rx.slot_size) % rx.size)


cdef inline void rx_flush(rx_state* rx) noexcept nogil:
    """What the link holds back to merge goes up (end of a batch)."""
    link_flush(&rx.link)


cdef inline void rx_write_frames(rx_state* rx, const unsigned char* base) noexcept nogil:
    """Hand every frame of the last deframe to the link; base = start - carried."""
    cdef eem_deframer* d = rx.d
    cdef Py_ssize_t i
    for i in range(d.n_frames):
        rx.link.deliver(&rx.link, base + d.frames[i].offset, d.frames[i].length)


cdef inline Py_ssize_t rx_deliver(rx_state* rx, int64_t sequence, Py_ssize_t actual,
                                  bint short) noexcept nogil:
    """Deframe transfer `sequence` (actual bytes) in place and write its frames.

    Returns the number of commands (rx.d.commands[0:n], payloads in rx.d.command_data),
    or a DEFRAME_* error (< 0, counted in deframe_failures; nothing was delivered).
    The deframer's capacity must cover slot_size (Deframer.set_capacity) beforehand.
    """
    cdef Py_ssize_t offset = rx_slot_offset(rx, sequence)
    cdef Py_ssize_t carried = rx.d.carry
    cdef Py_ssize_t result
    if offset < carried:
        offset += rx.size  # the carried tail sits at the end of the first mapping
    result = eem_deframe(rx.d, rx.ring + offset, carried, actual, short)
    if result < 0:
        rx.deframe_failures += 1
        return result
    rx_write_frames(rx, rx.ring + offset - carried)
    return rx.d.n_commands
