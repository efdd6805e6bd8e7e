# RX delivery in C, header-only: one completed IN transfer, deframed in place on the
# mirrored ring, its frames written to the TAP. Shared by the datapath's RxPath (driven
# from the bridge thread) and the engine (engine.pxi: its event thread drives it
# straight from the transfer completion, with no Python per transfer).
#
# Header-only: inline functions compiled into each user, no module of its own. RxPath
# (datapath.pxd) owns an rx_state; the engine takes &rxpath.state and keeps the RxPath
# alive, the only one delivering while it does.

from libc.errno cimport errno
from libc.stdint cimport int64_t
from libc.string cimport memset
from posix.unistd cimport write
from posix.uio cimport iovec, writev

from eembridge._fast.offload cimport (VNET_HDR_SIZE, vnet_hdr_t, gro_state_t, gro_offer,
                                      gro_finish, GRO_HELD, GRO_PASS, GRO_FLUSH_FIRST)

from eembridge._fast.eem cimport eem_deframer, eem_deframe

cdef enum:
    RX_ERRNO_SLOTS = 256

cdef struct rx_state:
    eem_deframer* d
    const unsigned char* ring  # both mappings of the mirrored ring: 2 * size bytes
    Py_ssize_t size  # bytes per mapping
    Py_ssize_t slot_size  # one IN transfer's slot; divides size
    int tap_fd
    bint vnet  # the TAP wants a virtio_net_hdr in front of each frame (offload on)
    gro_state_t gro  # with vnet: TCP segments held to go up merged (offload.pxd)
    Py_ssize_t gro_bytes  # bytes of the frames held
    int64_t gro_packets  # merged packets written
    int64_t gro_frames  # frames that went up in them
    int64_t frames_written
    int64_t bytes_written
    int64_t write_errors
    int64_t deframe_failures  # eem_deframe refused a transfer (no memory): its frames lost
    int64_t errno_counts[RX_ERRNO_SLOTS]  # refused TAP writes by errno


cdef inline Py_ssize_t rx_slot_offset(rx_state* rx, int64_t sequence) noexcept nogil:
    """Where IN transfer number `sequence` lands in the ring."""
    return <Py_ssize_t>((sequence * rx.slot_size) % rx.size)


cdef inline void _rx_count(rx_state* rx, Py_ssize_t written, Py_ssize_t length,
                           int64_t frames, Py_ssize_t frame_bytes) noexcept nogil:
    cdef int e
    if written == length:
        rx.frames_written += frames
        rx.bytes_written += frame_bytes
    else:
        e = errno
        rx.write_errors += frames
        rx.errno_counts[e if 0 <= e < RX_ERRNO_SLOTS else 0] += frames


cdef inline void _rx_write_one(rx_state* rx, const unsigned char* frame,
                               Py_ssize_t length) noexcept nogil:
    cdef unsigned char plain[VNET_HDR_SIZE]  # all zero: nothing asked of the kernel
    cdef iovec iov[2]
    if not rx.vnet:
        _rx_count(rx, write(rx.tap_fd, frame, length), length, 1, length)
        return
    memset(plain, 0, VNET_HDR_SIZE)
    iov[0].iov_base = plain
    iov[0].iov_len = VNET_HDR_SIZE
    iov[1].iov_base = <void*>frame
    iov[1].iov_len = length
    _rx_count(rx, writev(rx.tap_fd, iov, 2) - VNET_HDR_SIZE, length, 1, length)


cdef inline void rx_flush(rx_state* rx) noexcept nogil:
    """Write the merged packet held, if any (offload on)."""
    cdef vnet_hdr_t h
    cdef iovec iov[2]
    cdef Py_ssize_t length
    cdef int segs = rx.gro.segs
    if not rx.vnet or rx.gro.len == 0:
        return
    length = gro_finish(&rx.gro, &h)
    iov[0].iov_base = &h
    iov[0].iov_len = VNET_HDR_SIZE
    iov[1].iov_base = rx.gro.buf
    iov[1].iov_len = length
    _rx_count(rx, writev(rx.tap_fd, iov, 2) - VNET_HDR_SIZE, length, segs, rx.gro_bytes)
    if segs > 1:
        rx.gro_packets += 1
        rx.gro_frames += segs
    rx.gro.len = 0
    rx.gro_bytes = 0


cdef inline void rx_write_frames(rx_state* rx, const unsigned char* base) noexcept nogil:
    """Write every frame of the last deframe to the TAP; base = start - carried.

    One write(2) per frame: a TAP takes exactly one frame per write. A refused write
    (queue full, link down) is counted under its errno and not retried, as the kernel
    would drop the frame itself on a full queue. With offload, consecutive segments of
    one TCP flow are held and go up as one packet (rx_flush; offload.pxd says when).
    """
    cdef eem_deframer* d = rx.d
    cdef Py_ssize_t i, length
    cdef const unsigned char* frame
    cdef int r
    for i in range(d.n_frames):
        length = d.frames[i].length
        frame = base + d.frames[i].offset
        if not rx.vnet:
            _rx_write_one(rx, frame, length)
            continue
        r = gro_offer(&rx.gro, frame, length)
        if r == GRO_FLUSH_FIRST:
            rx_flush(rx)
            r = gro_offer(&rx.gro, frame, length)
        if r == GRO_HELD:
            rx.gro_bytes += length
        else:
            rx_flush(rx)  # what is held went up before this frame arrived
            _rx_write_one(rx, frame, length)


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
