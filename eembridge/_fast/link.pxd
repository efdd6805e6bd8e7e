# The engine's link interface: how the data path hands Ethernet frames to the host side
# and takes them from it, as a table of C functions (eng_link), the counterpart of the
# transport table (eng_ops, engine.pxi). Header-only (see rxdeliver.pxd).
#
# The data path never touches a descriptor itself: RX (rxdeliver.pxd) calls deliver()
# for every frame of an IN transfer and flush() after each batch; TX (txfill.pxd) calls
# fill() until it reports LINK_DRAINED, and the engine's event thread polls `fd` for
# POLLIN to know when to call it again (POLLERR / POLLHUP / POLLNVAL: the link is gone,
# the bridge stops). Every call comes from one thread at a time (the engine's event
# thread, or the bridge thread when the Python loop drives RxPath / TxPath) with the GIL
# released: an implementation must not block and must not take the GIL.
#
# Implementations:
#   frame_link_init (here)   a descriptor that carries one Ethernet frame per read(2)
#                            and write(2), non-blocking: a TAP without IFF_VNET_HDR, one
#                            end of a socketpair(AF_UNIX, SOCK_SEQPACKET) (the TUN link's
#                            pump, a user-mode stack). The one to reuse for a new link
#                            that can hand over frames on a descriptor.
#   tap_link_init (taplink.pxd)  a TAP with IFF_VNET_HDR (offload on): a virtio_net_hdr
#                            per read and write, TCP packets of up to 64 KB cut into
#                            frames (GSO) and consecutive segments merged (GRO).
#   TunFast.install (tunlink.pyx)  the TUN link: IP packets to and from a TUN with the
#                            Ethernet header taken off or put on in C when a snapshot of
#                            eembridge.core.l3's state decides it; the rest handed to the
#                            link's pump thread. Its fd is an epoll descriptor (two sources).
# A link with no descriptor of its own (an in-process stack) sets deliver / fill to its
# functions, ctx to its state, and fd to an eventfd it makes readable when fill() has
# frames; it installs the table in RxPath.state.link / TxPath.state.link (datapath.pxd)
# before the engine starts.

from libc.errno cimport errno, EAGAIN
from libc.stdint cimport int64_t
from posix.unistd cimport read, write

cdef enum:
    # What fill() returns besides a frame's length.
    LINK_DRAINED = 0  # nothing more now: poll fd
    LINK_ERROR = -1  # the read failed (counted in read_errors / read_errno): poll fd again
    LINK_REFUSED = -2  # a packet was taken and dropped (counted by the link): call again
    LINK_ERRNO_SLOTS = 256

cdef struct eng_link

# deliver: one frame (length bytes at frame) to the host. Counts it (link_count_write,
# link_count_refused): frames_written and bytes_written once it went up, or
# write_errors and write_errno[errno] if it was refused (queue full, link down; never
# retried: the kernel drops on a full queue too).
# A link may hold the frame back to merge it (count it when it goes, in flush).
ctypedef void (*link_deliver_fn)(eng_link* link, const unsigned char* frame,
                                 Py_ssize_t length) noexcept nogil
# flush: what deliver held back goes up now (end of a batch). NULL: nothing is held.
ctypedef void (*link_flush_fn)(eng_link* link) noexcept nogil
# fill: the host's next frame into dst, which has room bytes (one more than the longest
# frame the data path may send): its length (room: longer than that, the framer refuses
# it), or a LINK_* code. Counts its own read errors.
ctypedef Py_ssize_t (*link_fill_fn)(eng_link* link, unsigned char* dst,
                                    Py_ssize_t room) noexcept nogil

cdef struct eng_link:
    link_deliver_fn deliver
    link_flush_fn flush
    link_fill_fn fill
    int fd  # POLLIN: fill() has frames; its owner closes it
    void* ctx  # the implementation's state (NULL for the frame link)
    # Counted by every implementation (the data path's tap_* counters).
    int64_t frames_written
    int64_t bytes_written
    int64_t write_errors
    int64_t read_errors
    int64_t write_errno[LINK_ERRNO_SLOTS]  # refused deliveries by errno
    int64_t read_errno[LINK_ERRNO_SLOTS]  # failed reads by errno


cdef inline void link_count_refused(eng_link* link, int error, int64_t frames) noexcept nogil:
    """Count `frames` frames the host side refused, for the reason `error` (an errno)."""
    link.write_errors += frames
    link.write_errno[error if 0 <= error < LINK_ERRNO_SLOTS else 0] += frames


cdef inline void link_count_write(eng_link* link, Py_ssize_t written, Py_ssize_t length,
                                  int64_t frames, Py_ssize_t frame_bytes) noexcept nogil:
    """Count `frames` frames of frame_bytes that went up in one write of length bytes
    (written: what write(2) returned; on a short one, errno says why)."""
    if written == length:
        link.frames_written += frames
        link.bytes_written += frame_bytes
    else:
        link_count_refused(link, errno, frames)


cdef inline Py_ssize_t link_read_failed(eng_link* link) noexcept nogil:
    """A read returned -1: LINK_DRAINED on EAGAIN, else counted and LINK_ERROR."""
    cdef int e = errno
    if e == EAGAIN:  # == EWOULDBLOCK on Linux
        return LINK_DRAINED
    link.read_errors += 1
    link.read_errno[e if 0 <= e < LINK_ERRNO_SLOTS else 0] += 1
    return LINK_ERROR


# --- the frame link: one frame per read(2) / write(2) on a descriptor ----------------

cdef inline void _frame_deliver(eng_link* link, const unsigned char* frame,
                                Py_ssize_t length) noexcept nogil:
    link_count_write(link, write(link.fd, frame, length), length, 1, length)


cdef inline Py_ssize_t _frame_fill(eng_link* link, unsigned char* dst,
                                   Py_ssize_t room) noexcept nogil:
    cdef Py_ssize_t n = read(link.fd, dst, room)
    if n < 0:
        return link_read_failed(link)
    return n  # a SEQPACKET datagram longer than room is cut to room: oversize


cdef inline void frame_link_init(eng_link* link, int fd) noexcept nogil:
    """Make link the frame link on fd (non-blocking; its owner keeps it open). Counters
    are left as they are (zero them first)."""
    link.deliver = _frame_deliver
    link.flush = NULL
    link.fill = _frame_fill
    link.fd = fd
    link.ctx = NULL


cdef inline void link_flush(eng_link* link) noexcept nogil:
    if link.flush != NULL:
        link.flush(link)
