# The TAP link with offload (IFF_VNET_HDR): an implementation of the link table
# (link.pxd). Every read and write carries a virtio_net_hdr; a read may be one TCP
# packet of up to 64 KB with its checksum left to us, cut here into frames (GSO), and
# consecutive TCP segments of one flow delivered are held and go up as one packet (GRO,
# flushed at the end of each batch). offload.pxd says when and how. Header-only.

from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset
from posix.uio cimport iovec, readv, writev

from eembridge._fast.link cimport (eng_link, link_count_write, link_read_failed,
                                   frame_link_init, LINK_REFUSED)
from eembridge._fast.offload cimport (VNET_HDR_SIZE, VNET_F_NEEDS_CSUM, VNET_GSO_NONE,
                                      vnet_hdr_t, gro_state_t, gro_offer, gro_finish,
                                      GRO_HELD, GRO_FLUSH_FIRST, gso_state_t, gso_begin,
                                      gso_next, gso_longest, off_complete_checksum)

cdef struct tap_link:
    # RX (deliver / flush)
    gro_state_t gro  # gro.buf: GRO_BUF_SIZE bytes, the owner's
    Py_ssize_t gro_bytes  # bytes of the frames held
    int64_t gro_packets  # merged packets written
    int64_t gro_frames  # frames that went up in them
    # TX (fill)
    unsigned char* scratch  # scratch_size bytes: a whole GSO packet, contiguous; the owner's
    Py_ssize_t scratch_size
    vnet_hdr_t hdr
    gso_state_t gso
    int64_t gso_packets  # GSO packets read
    int64_t gso_frames  # frames cut from them
    int64_t checksums  # partial checksums completed (NEEDS_CSUM)
    int64_t offload_errors  # packets refused by the offload: dropped
    int64_t oversize  # GSO packets whose segments would be too long: dropped


cdef inline void _tap_write_plain(eng_link* link, const unsigned char* frame,
                                  Py_ssize_t length) noexcept nogil:
    cdef unsigned char plain[VNET_HDR_SIZE]  # all zero: nothing asked of the kernel
    cdef iovec iov[2]
    memset(plain, 0, VNET_HDR_SIZE)
    iov[0].iov_base = plain
    iov[0].iov_len = VNET_HDR_SIZE
    iov[1].iov_base = <void*>frame
    iov[1].iov_len = length
    link_count_write(link, writev(link.fd, iov, 2) - VNET_HDR_SIZE, length, 1, length)


cdef inline void _tap_flush(eng_link* link) noexcept nogil:
    """Write the merged packet held, if any."""
    cdef tap_link* t = <tap_link*>link.ctx
    cdef vnet_hdr_t h
    cdef iovec iov[2]
    cdef Py_ssize_t length
    cdef int segs = t.gro.segs
    if t.gro.len == 0:
        return
    length = gro_finish(&t.gro, &h)
    iov[0].iov_base = &h
    iov[0].iov_len = VNET_HDR_SIZE
    iov[1].iov_base = t.gro.buf
    iov[1].iov_len = length
    link_count_write(link, writev(link.fd, iov, 2) - VNET_HDR_SIZE, length, segs, t.gro_bytes)
    if segs > 1:
        t.gro_packets += 1
        t.gro_frames += segs
    t.gro.len = 0
    t.gro_bytes = 0


cdef inline void _tap_deliver(eng_link* link, const unsigned char* frame,
                              Py_ssize_t length) noexcept nogil:
    cdef tap_link* t = <tap_link*>link.ctx
    cdef int r = gro_offer(&t.gro, frame, length)
    if r == GRO_FLUSH_FIRST:
        _tap_flush(link)
        r = gro_offer(&t.gro, frame, length)
    if r == GRO_HELD:
        t.gro_bytes += length
    else:
        _tap_flush(link)  # what is held went up before this frame arrived
        _tap_write_plain(link, frame, length)


cdef inline Py_ssize_t _tap_fill(eng_link* link, unsigned char* dst,
                                 Py_ssize_t room) noexcept nogil:
    cdef tap_link* t = <tap_link*>link.ctx
    cdef Py_ssize_t n
    cdef iovec iov[3]
    if t.gso.pending:
        n = gso_next(&t.gso, dst)
        if n:
            t.gso_frames += 1
            return n
    # Header, then the frame straight into the transfer; only a packet longer than a
    # frame spills over into scratch, behind room for the part that did not.
    iov[0].iov_base = &t.hdr
    iov[0].iov_len = VNET_HDR_SIZE
    iov[1].iov_base = dst
    iov[1].iov_len = room
    iov[2].iov_base = t.scratch + room
    iov[2].iov_len = t.scratch_size - room
    n = readv(link.fd, iov, 3)
    if n < 0:
        return link_read_failed(link)
    if n < VNET_HDR_SIZE:
        t.offload_errors += 1  # a header cut short: the kernel never does that
        return LINK_REFUSED
    n -= VNET_HDR_SIZE
    if t.hdr.gso_type == VNET_GSO_NONE:
        if n > room:
            return room  # oversize; the framer counts it
        if t.hdr.flags & VNET_F_NEEDS_CSUM:
            if not off_complete_checksum(dst, n, t.hdr.csum_start, t.hdr.csum_offset):
                t.offload_errors += 1
                return LINK_REFUSED
            t.checksums += 1
        return n
    if n >= t.scratch_size:
        t.oversize += 1  # filled every byte offered: maybe cut short (BIG TCP?), refused
        return LINK_REFUSED
    memcpy(t.scratch, dst, n if n < room else room)
    if not gso_begin(&t.gso, &t.hdr, t.scratch, n):
        t.offload_errors += 1
        return LINK_REFUSED
    if gso_longest(&t.gso) >= room:
        t.gso.pending = 0
        t.oversize += 1
        return LINK_REFUSED
    t.gso_packets += 1
    t.gso_frames += 1
    return gso_next(&t.gso, dst)


cdef inline void tap_link_init(eng_link* link, tap_link* t, int fd) noexcept nogil:
    """Make link the offloading TAP link on fd, its state in t (zeroed, with gro.buf
    for RX, scratch / scratch_size for TX set by the owner, who keeps them)."""
    frame_link_init(link, fd)
    link.deliver = _tap_deliver
    link.flush = _tap_flush
    link.fill = _tap_fill
    link.ctx = t
