# The C-level API of the Cython EEM codec (eembridge._fast.eem), for Cython code that
# drives it without per-frame Python objects and with the GIL released (the bridge).
#
# Use (as `from eembridge._fast.eem cimport ...`):
#
#     cdef eem_deframer* d = &deframer.d                # deframer: a Deframer (cimported)
#     deframer.set_capacity(slot_size)                  # once, with the GIL
#     with nogil:
#         count = eem_deframe(d, start, d.carry, n, short)   # start: the transfer in memory
#     # count < 0: DEFRAME_* below, nothing was done (NO_MEMORY: commands were lost).
#     # Frame i is (start - carried_before)[d.frames[i].offset : + d.frames[i].length].
#     # Command j (rare) goes before frame d.commands[j].before_frame; its payload is
#     #   d.command_data[d.commands[j].data_offset : + d.commands[j].param] (Echo/Response).
#     # Afterwards the last d.carry bytes of [start - carried_before, start + n) must lie
#     # immediately before the next transfer's bytes (a mirrored ring keeps them there).
#
#     cdef eem_framer* f = &framer.f                    # framer: a Framer (cimported)
#     size = eem_frame_in_place(f, slot, frame_len)     # frame already at slot + 2; 0: refused
#     if length and not eem_fits(f, length + size): close the batch first (always without batching)
#     length = eem_close_transfer(f, transfer, length)  # appends 0x0000 on a max-packet boundary
#
# The pointers are valid while the caller holds the Python object. Use one object from
# one thread at a time; feed()/feed_buffer()/deframe_into() and eem_deframe() share the
# same state (feed() keeps its own carry, so a stream uses feed() or in-place, not both).
#
# The cdef classes are declared here, and the extension is built as
# eembridge._fast.eem, the module this file's place names, so a cimporting module gets
# the real type (checked by Cython, no capsule). The rules are implemented once, in
# eem.pyx; the structs carry pointers to those functions, so a cimporting module
# neither compiles a second copy of them nor links zlib.

from libc.stdint cimport int32_t, int64_t
from libc.string cimport memmove, memset

cdef enum:
    DEFRAME_BAD_CARRY = -1  # carried differs from the deframer's d.carry
    DEFRAME_OVER_CAPACITY = -2  # carried + n beyond what set_capacity() sized the records for
    DEFRAME_NO_MEMORY = -3  # growing the command output failed: commands lost, reset()
    DEFRAME_WRONG_MODE = -4  # this stream is fed through feed(); reset() first
    EEM_MODE_NONE = 0  # how the current stream is fed
    EEM_MODE_FEED = 1
    EEM_MODE_IN_PLACE = 2
    EEM_WAIT_LIMIT = 16  # protocol.MAX_PENDING_COMMANDS (checked at import)
    EEM_WAIT_BYTES_LIMIT = 8196  # protocol.MAX_PENDING_COMMAND_BYTES (checked at import)

ctypedef struct eem_frame_record:
    Py_ssize_t offset  # first Ethernet byte, counted from start - carried
    int32_t length  # Ethernet bytes, check stripped
    int32_t crc  # 1: arrived with bmCRC=1, 0: with the sentinel

ctypedef struct eem_command_record:
    int32_t command  # bmEEMCmd (protocol.CMD_*)
    int32_t param  # bmEEMCmdParam; for Echo and Echo Response the payload length
    Py_ssize_t data_offset  # payload position in command_data
    Py_ssize_t before_frame  # goes just before frames[before_frame] (== count: after all)

ctypedef struct eem_waiting:  # a command parsed in sync, awaiting confirmation
    int32_t command
    int32_t param
    Py_ssize_t data_offset  # payload position in wait_data
    Py_ssize_t size  # header + payload

ctypedef struct eem_deframer_counters:  # protocol.DEFRAMER_COUNTERS, same order
    int64_t transfers
    int64_t short_transfers
    int64_t bytes_in
    int64_t frames
    int64_t bytes
    int64_t crc_frames
    int64_t zlps
    int64_t crc_errors
    int64_t sentinel_errors
    int64_t oversize
    int64_t runts
    int64_t truncated
    int64_t reserved_commands
    int64_t unconfirmed_commands
    int64_t resyncs
    int64_t bytes_skipped
    int64_t echo
    int64_t echo_response
    int64_t hints
    int64_t implausible
    int64_t unchecked
    int64_t spliced

ctypedef struct eem_framer_counters:  # protocol.FRAMER_COUNTERS, same order
    int64_t frames
    int64_t bytes
    int64_t transfers
    int64_t transfer_bytes
    int64_t zlps
    int64_t oversize
    int64_t runts
    int64_t echo
    int64_t echo_response
    int64_t fill
    int64_t padded

cdef struct eem_deframer
cdef struct eem_framer

ctypedef Py_ssize_t (*eem_deframe_fn)(eem_deframer* d, const unsigned char* start,
                                      Py_ssize_t carried, Py_ssize_t n,
                                      bint short) noexcept nogil
ctypedef Py_ssize_t (*eem_frame_fn)(eem_framer* f, unsigned char* slot,
                                    Py_ssize_t frame_len) noexcept nogil
ctypedef bint (*eem_fits_fn)(eem_framer* f, Py_ssize_t length) noexcept nogil
ctypedef Py_ssize_t (*eem_close_fn)(eem_framer* f, unsigned char* transfer,
                                    Py_ssize_t length) noexcept nogil

cdef struct eem_deframer:
    eem_deframe_fn deframe  # the implementation in eem.pyx
    int max_length
    eem_deframer_counters c
    bint scanning
    Py_ssize_t carry  # bytes held over; they sit right before the next transfer
    int mode  # EEM_MODE_*
    bint failed  # the last call could not grow the command output
    int64_t budget  # failed CRC work still allowed (codec.py, "Cost of garbage")
    Py_ssize_t paid  # _scan: offset up to which skipped bytes have earned budget
    bint has_mac  # the plausibility rule checks the destination against mac
    unsigned char mac[6]

    # Output of the last call, valid until the next one.
    eem_frame_record* frames
    Py_ssize_t n_frames
    Py_ssize_t frame_capacity  # records allocated (Deframer.set_capacity)
    eem_command_record* commands
    Py_ssize_t n_commands
    Py_ssize_t command_capacity
    unsigned char* command_data
    Py_ssize_t command_data_len
    Py_ssize_t command_data_capacity

    # Commands awaiting confirmation. Their payloads are copied: they may outlive the
    # memory they came from.
    eem_waiting waiting[EEM_WAIT_LIMIT]
    int n_waiting
    Py_ssize_t waiting_bytes
    unsigned char wait_data[EEM_WAIT_BYTES_LIMIT]
    Py_ssize_t wait_data_len

cdef struct eem_framer:
    eem_frame_fn frame_in_place  # the implementations in eem.pyx
    eem_fits_fn fits
    eem_close_fn close_transfer
    bint crc
    Py_ssize_t max_transfer
    Py_ssize_t max_packet
    Py_ssize_t max_length
    Py_ssize_t out_chunk  # 0: off; else no packet crosses a multiple of it (codec.Framer)
    bint batch  # 0: one data packet per transfer, as Linux's cdc_eem sends (codec.Framer)
    eem_framer_counters c


cdef class Deframer:
    """EEM bulk IN stream to events (eem.pyx); d is its state for eem_deframe()."""
    cdef eem_deframer d
    cdef readonly Py_ssize_t capacity  # transfer size in-place calls are sized for
    cdef unsigned char* carry_mem  # feed(): the carried bytes, then a transfer behind them
    cdef Py_ssize_t carry_mem_size
    cdef int exports  # buffer exports of the frame records alive (block reallocation)
    cdef object records_view  # feed_buffer(): numpy view of all records, sliced per call
    cdef bint busy  # inside the core with the GIL released
    cdef Py_ssize_t last_base  # deframe_into(): buffer offset the last records count from

    cdef int _check_idle(self) except -1
    cdef int _reserve(self, Py_ssize_t total_bytes) except -1
    cdef int _grow_carry_mem(self, Py_ssize_t size) except -1
    cdef object _command_event(self, Py_ssize_t j)
    cdef list _events(self, const unsigned char* base)
    cdef Py_ssize_t _in_place(self, object buffer, Py_ssize_t offset, Py_ssize_t carried,
                              Py_ssize_t n, bint short, bint grow) except? -9


cdef class Framer:
    """Ethernet frames to bulk OUT transfers (eem.pyx); f is its state for eem_frame_*."""
    cdef eem_framer f
    cdef unsigned char* transfer_mem  # pack(): the transfer being assembled
    cdef Py_ssize_t transfer_size

    cdef int _reserve(self, Py_ssize_t size) except -1
    cdef bytes _close_bytes(self, Py_ssize_t length)
    cdef bytes _command_transfer(self, int command, object data)


cdef inline Py_ssize_t eem_deframe(eem_deframer* d, const unsigned char* start,
                                   Py_ssize_t carried, Py_ssize_t n, bint short) noexcept nogil:
    """Deframe the n bytes at start, the `carried` bytes held over lying just before it.

    Returns the number of frame records (d.frames[0:count]) or a DEFRAME_* error.
    """
    return d.deframe(d, start, carried, n, short)


cdef inline Py_ssize_t eem_frame_in_place(eem_framer* f, unsigned char* slot,
                                          Py_ssize_t frame_len) noexcept nogil:
    """Make the frame at slot + 2 an EEM packet: header at slot[0:2], CRC or sentinel
    after the frame. Returns the packet size (frame_len + 6), or 0 if the frame is
    refused (too long or too short; counted)."""
    return f.frame_in_place(f, slot, frame_len)


cdef inline bint eem_fits(eem_framer* f, Py_ssize_t length) noexcept nogil:
    """Whether a transfer already holding packets may grow to length bytes: never
    without batching, else if it stays within max_transfer once closed."""
    return f.fits(f, length)


cdef inline Py_ssize_t eem_place(eem_framer* f, Py_ssize_t pos, Py_ssize_t size) noexcept nogil:
    """codec.Framer.place: where a packet of size bytes goes in a transfer of pos bytes."""
    cdef Py_ssize_t chunk = f.out_chunk
    if chunk and pos % chunk + size > chunk:
        return pos + chunk - pos % chunk
    return pos


cdef inline Py_ssize_t eem_frame_placed(eem_framer* f, unsigned char* transfer, Py_ssize_t pos,
                                        Py_ssize_t frame_len, Py_ssize_t* start) noexcept nogil:
    """eem_frame_in_place for the frame at transfer + pos + 2, with codec.Framer's
    out_chunk rules: an odd frame padded with a zero byte, the packet moved to the next
    chunk (zero-length packets before it) if it would cross one. Returns the packet size
    (0: refused, counted); *start is where it now begins (pos without out_chunk).
    The caller leaves room: a frame moved ends by the place eem_fits checked."""
    cdef Py_ssize_t size, at
    cdef bint padded = False
    start[0] = pos
    if not f.out_chunk:
        return f.frame_in_place(f, transfer + pos, frame_len)
    if frame_len & 1:
        transfer[pos + 2 + frame_len] = 0
        frame_len += 1
        padded = True
    at = eem_place(f, pos, 2 + frame_len + 4)
    if at != pos:
        memmove(transfer + at + 2, transfer + pos + 2, frame_len)
        memset(transfer + pos, 0, at - pos)
    size = f.frame_in_place(f, transfer + at, frame_len)
    if size:
        f.c.fill += (at - pos) // 2
        f.c.padded += padded
        start[0] = at
    return size


cdef inline Py_ssize_t eem_close_transfer(eem_framer* f, unsigned char* transfer,
                                          Py_ssize_t length) noexcept nogil:
    """Close a batched transfer: append 0x0000 if length is a multiple of max_packet
    (transfer needs 2 bytes of room), count it; returns its final length."""
    return f.close_transfer(f, transfer, length)
