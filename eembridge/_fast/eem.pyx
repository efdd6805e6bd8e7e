# cython: language_level=3, auto_pickle=False
"""Cython EEM codec: the rules of the reference eembridge/core/codec.py, in C.

How the C core maps to the reference's theory of operation
-----------------------------------------------------------
* One implementation of the rules, on a C struct (eem_deframer, eem.pxd): ``_run``
  walks ``data[0:end]`` exactly as ``codec.Deframer.feed`` walks ``carry + transfer``;
  ``_data``, ``_command``, ``_incomplete``, ``_cut_off``, ``_confirm``,
  ``_drop_waiting``, ``_start_scan`` and ``_scan`` are the reference methods of the
  same names, line for line, on C integers. In sync / scanning is ``d.scanning``.
* The carry is a count, not bytes: the ``d.carry`` bytes held over always sit right
  before the next transfer. In place (``eem_deframe``, the bridge) the caller's
  mirrored ring keeps them there and nothing is copied; ``feed()`` keeps them in its
  own buffer and copies a transfer behind them only when there is a carry.
* Delivered frames are records (offset, length, crc) into that memory, so no Python
  object is made per frame in place; ``feed()`` turns them into the very
  ``events.Frame`` objects the reference emits.
* Commands awaiting confirmation are copied into a bounded buffer in the struct
  (MAX_PENDING_COMMANDS, MAX_PENDING_COMMAND_BYTES), because they may outlive the
  memory they came from; once confirmed they join the command output, each marked with
  the frame record it precedes, so the order of events is the reference's.
* Memory stays bounded as the reference's: the records are sized from the transfer
  size (a frame takes at least 20 bytes), the carry is shorter than one packet, and
  the command output of one call is bounded by its bytes plus what waited.
* The trust rules (plausibility, splices, the all-short device) and the CRC budget of
  codec.py are ``_plausible``, ``_l4_intact``, ``_spliced``, ``_candidate`` and
  ``_earn``, with the same arithmetic. Two are written for speed, not line for line:
  ``_scan`` decides which kind of candidate an offset is without a branch per kind
  (random bytes make that a coin toss the CPU mispredicts), and ``_spliced`` finds the
  inner header with memchr; both try the same offsets in the same order.
* Counters are C structs in protocol.DEFRAMER_COUNTERS / FRAMER_COUNTERS order.
* The framer's rules (header, CRC or sentinel, refusals, _fits, _close with its ZLP)
  are ``_seal``, ``_frame_in_place``, ``_fits`` and ``_close_transfer`` on an
  eem_framer; ``pack()``, ``packet()`` and ``echo()`` use them.

Constants, events and option validation come from the pure-Python modules, so both
implementations raise the same errors and emit the same objects. The C entry points
are reached from other Cython modules through eem.pxd (why there: see its header).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove, memset

# eem.pxd (this module's own declarations) is in scope without a cimport.

from eembridge.core import protocol as _protocol
from eembridge.core.codec import validate_framer_options, validate_mac, validate_max_length
from eembridge.core.events import Echo, EchoResponse, Frame, Hint

__all__ = ["Deframer", "Framer", "FRAME_RECORD_DTYPE"]

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int length)


# The protocol facts the C core needs as C constants; checked against protocol.py below.
cdef enum:
    HEADER_SIZE = 2
    CHECK_SIZE = 4
    TYPE_COMMAND = 0x8000
    DATA_CRC = 0x4000
    DATA_LENGTH_MASK = 0x3FFF
    COMMAND_SHIFT = 11
    COMMAND_MASK = 0x7
    COMMAND_PARAM_MASK = 0x07FF
    CMD_ECHO = 0
    CMD_ECHO_RESPONSE = 1
    CMD_TICKLE = 5
    ETH_HEADER = 14
    MIN_DATA_LENGTH = 18
    MAX_ECHO_DATA = 0x07FF
    CRC_BUDGET_PER_BYTE = 2
    CRC_CHECK_OVERHEAD = 64
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_ARP = 0x0806
    ETHERTYPE_VLAN = 0x8100
    ETHERTYPE_IPV6 = 0x86DD
    PADDED_FRAME_MAX = 64
    # Every delivered frame occupies at least this many distinct input bytes.
    MIN_PACKET = HEADER_SIZE + MIN_DATA_LENGTH
    # Transfer size deframe() takes before set_capacity() (the bridge's IN buffers).
    DEFAULT_CAPACITY = 16384

cdef const unsigned char* SENTINEL_BYTES = b"\xde\xad\xbe\xef"
cdef uint32_t SENTINEL_LE32 = 0xEFBEADDE  # SENTINEL_BYTES read as a little-endian word

_DEFRAMER_FIELDS = (
    "transfers", "short_transfers", "bytes_in", "frames", "bytes", "crc_frames", "zlps",
    "crc_errors", "sentinel_errors", "oversize", "runts", "truncated", "reserved_commands",
    "unconfirmed_commands", "resyncs", "bytes_skipped", "echo", "echo_response", "hints",
    "implausible", "unchecked", "spliced",
)
_FRAMER_FIELDS = (
    "frames", "bytes", "transfers", "transfer_bytes", "zlps", "oversize", "runts", "echo",
    "echo_response", "fill", "padded",
)


def _check_protocol() -> None:
    """Fail the import, not the data, if protocol.py and these C constants drift apart."""
    p = _protocol
    expected = {
        "HEADER_SIZE": HEADER_SIZE, "CHECK_SIZE": CHECK_SIZE, "TYPE_COMMAND": TYPE_COMMAND,
        "DATA_CRC": DATA_CRC, "DATA_LENGTH_MASK": DATA_LENGTH_MASK,
        "COMMAND_SHIFT": COMMAND_SHIFT, "COMMAND_MASK": COMMAND_MASK,
        "COMMAND_PARAM_MASK": COMMAND_PARAM_MASK, "CMD_ECHO": CMD_ECHO,
        "CMD_ECHO_RESPONSE": CMD_ECHO_RESPONSE, "CMD_TICKLE": CMD_TICKLE,
        "ETH_HEADER": ETH_HEADER, "MIN_DATA_LENGTH": MIN_DATA_LENGTH,
        "MAX_ECHO_DATA": MAX_ECHO_DATA, "MAX_PENDING_COMMANDS": EEM_WAIT_LIMIT,
        "CRC_BUDGET_PER_BYTE": CRC_BUDGET_PER_BYTE,
        "CRC_CHECK_OVERHEAD": CRC_CHECK_OVERHEAD,
        "ETHERTYPE_IPV4": ETHERTYPE_IPV4, "ETHERTYPE_ARP": ETHERTYPE_ARP,
        "ETHERTYPE_VLAN": ETHERTYPE_VLAN, "ETHERTYPE_IPV6": ETHERTYPE_IPV6,
        "PADDED_FRAME_MAX": PADDED_FRAME_MAX,
        "MAX_PENDING_COMMAND_BYTES": EEM_WAIT_BYTES_LIMIT, "SENTINEL": SENTINEL_BYTES[:4],
        "DEFRAMER_COUNTERS": _DEFRAMER_FIELDS, "FRAMER_COUNTERS": _FRAMER_FIELDS,
    }
    for name, value in expected.items():
        if getattr(p, name) != value:
            raise ImportError(f"eembridge._fast.eem is out of date: protocol.{name} changed; rebuild it")
    if sizeof(eem_deframer_counters) != 8 * len(_DEFRAMER_FIELDS) or (
        sizeof(eem_framer_counters) != 8 * len(_FRAMER_FIELDS)
    ):
        raise ImportError("eembridge._fast.eem counter structs do not match protocol.py")


_check_protocol()


# -- building Frame events fast ---------------------------------------------------------
# Frame is a frozen, slotted dataclass. Calling it costs ~0.6 us, which would dominate
# feed() for small frames, so the object is allocated and its two slots are set through
# their member descriptors directly: the same class and field values, without the
# Python-level __init__. Used only if an import-time check shows the result is equal to
# Frame(...) (a __post_init__ or a non-slotted Frame would turn it off).
cdef extern from *:
    """
    static PyObject* eem_new_slotted2(PyObject* type, PyObject* d1, PyObject* v1,
                                      PyObject* d2, PyObject* v2) {
        PyTypeObject* tp = (PyTypeObject*)type;
        PyObject* obj = tp->tp_alloc(tp, 0);
        if (obj == NULL) return NULL;
        if (Py_TYPE(d1)->tp_descr_set(d1, obj, v1) < 0 ||
                Py_TYPE(d2)->tp_descr_set(d2, obj, v2) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
        return obj;
    }
    """
    object eem_new_slotted2(object type, object d1, object v1, object d2, object v2)

cdef object _frame_data_slot = None
cdef object _frame_crc_slot = None
cdef bint _fast_frames = False


cdef inline object _new_frame(const unsigned char* data, Py_ssize_t length, bint crc):
    cdef bytes payload = PyBytes_FromStringAndSize(<const char*>data, length)
    if _fast_frames:
        return eem_new_slotted2(Frame, _frame_data_slot, payload, _frame_crc_slot,
                                True if crc else False)
    return Frame(payload, True if crc else False)


def _enable_fast_frames() -> None:
    global _frame_data_slot, _frame_crc_slot, _fast_frames
    slot_type = type(Echo.__dict__.get("data"))
    data_slot = Frame.__dict__.get("data")
    crc_slot = Frame.__dict__.get("crc")
    if (
        hasattr(Frame, "__post_init__")
        or slot_type.__name__ != "member_descriptor"
        or type(data_slot) is not slot_type
        or type(crc_slot) is not slot_type
    ):
        return
    _frame_data_slot, _frame_crc_slot, _fast_frames = data_slot, crc_slot, True
    probe = _new_frame(b"probe", 5, True)
    if not (type(probe) is Frame and probe == Frame(b"probe", True) and hash(probe) == hash(Frame(b"probe", True))):
        _fast_frames = False


_enable_fast_frames()


# -- little helpers ---------------------------------------------------------------------

cdef inline unsigned int _le16(const unsigned char* p) noexcept nogil:
    return p[0] | (<unsigned int>p[1] << 8)


cdef inline uint32_t _le32(const unsigned char* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline bint _check_ok(const unsigned char* packet, Py_ssize_t length, bint crc) noexcept nogil:
    """codec.check_ok on packet[0:length] (frame + 4-byte check)."""
    cdef Py_ssize_t n = length - CHECK_SIZE
    if crc:
        return crc32(0, packet, <unsigned int>n) == _le32(packet + n)
    return memcmp(packet + n, SENTINEL_BYTES, CHECK_SIZE) == 0


cdef inline bint _ends_right(Py_ssize_t n, Py_ssize_t end) noexcept nogil:
    return end == n or (end < n and n <= PADDED_FRAME_MAX)


cdef bint _plausible(const eem_deframer* d, const unsigned char* f, Py_ssize_t n) noexcept nogil:
    """codec.plausible on the frame f[0:n] (check stripped), with d's MAC."""
    cdef Py_ssize_t off = ETH_HEADER
    cdef Py_ssize_t ihl, i
    cdef unsigned int ethertype
    cdef uint32_t total = 0
    if n < ETH_HEADER:
        return False
    if d.has_mac and not f[0] & 1 and memcmp(f, d.mac, 6) != 0:
        return False
    ethertype = (<unsigned int>f[12] << 8) | f[13]
    if ethertype == ETHERTYPE_VLAN:
        if n < off + 4:
            return False
        ethertype = (<unsigned int>f[16] << 8) | f[17]
        off += 4
    if ethertype == ETHERTYPE_IPV4:
        if n < off + 20 or f[off] >> 4 != 4:
            return False
        ihl = (f[off] & 0x0F) * 4
        if ihl < 20 or off + ihl > n:
            return False
        for i in range(off, off + ihl, 2):
            total += (<uint32_t>f[i] << 8) | f[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        i = (<Py_ssize_t>f[off + 2] << 8) | f[off + 3]
        return total == 0xFFFF and i >= ihl and _ends_right(n, off + i)
    if ethertype == ETHERTYPE_IPV6:
        if n < off + 40 or f[off] >> 4 != 6:
            return False
        return _ends_right(n, off + 40 + ((<Py_ssize_t>f[off + 4] << 8) | f[off + 5]))
    if ethertype == ETHERTYPE_ARP:
        return (n >= off + 28 and f[off] == 0 and f[off + 1] == 1 and f[off + 2] == 8
                and f[off + 3] == 0 and f[off + 4] == 6 and f[off + 5] == 4 and f[off + 6] == 0
                and (f[off + 7] == 1 or f[off + 7] == 2) and _ends_right(n, off + 28))
    return False


cdef inline int64_t _budget_cap(const eem_deframer* d) noexcept nogil:
    return 2 * (<int64_t>d.max_length + CRC_CHECK_OVERHEAD)


cdef inline void _earn(eem_deframer* d, Py_ssize_t nbytes) noexcept nogil:
    cdef int64_t cap = _budget_cap(d)
    d.budget += CRC_BUDGET_PER_BYTE * <int64_t>nbytes
    if d.budget > cap:
        d.budget = cap


cdef inline Py_ssize_t _records_for(Py_ssize_t total_bytes) noexcept nogil:
    """Most frames total_bytes of input can hold (each takes MIN_PACKET bytes or more)."""
    return total_bytes // MIN_PACKET + 1


cdef inline Py_ssize_t _max_carry(int max_length) noexcept nogil:
    """The carry is shorter than one packet: max(max_length, MAX_ECHO_DATA) + 2 bytes."""
    return (max_length if max_length > MAX_ECHO_DATA else MAX_ECHO_DATA) + HEADER_SIZE - 1


cdef object _acquire(object obj, Py_buffer* view, int flags):
    """Get a contiguous buffer of obj's bytes; returns the object that owns it.

    A non-contiguous buffer is copied through memoryview(obj).tobytes(), as the
    reference does; what is not a buffer at all raises TypeError there.
    """
    try:
        PyObject_GetBuffer(obj, view, flags)
        return obj
    except (BufferError, TypeError):
        if flags & PyBUF_WRITABLE:
            raise
    obj = memoryview(obj).tobytes()
    PyObject_GetBuffer(obj, view, flags)
    return obj


FRAME_RECORD_DTYPE = None  # numpy dtype of eem_frame_record, made on first feed_buffer()


def _frame_record_dtype():
    global FRAME_RECORD_DTYPE
    if FRAME_RECORD_DTYPE is None:
        import numpy as np

        dtype = np.dtype([("offset", np.intp), ("length", np.int32), ("crc", np.int32)])
        if dtype.itemsize != sizeof(eem_frame_record):
            raise RuntimeError("eem_frame_record layout does not match FRAME_RECORD_DTYPE")
        FRAME_RECORD_DTYPE = dtype
    return FRAME_RECORD_DTYPE


# -- the deframer core: codec.Deframer's rules on an eem_deframer -----------------------

cdef Py_ssize_t _deframe(eem_deframer* d, const unsigned char* start, Py_ssize_t carried,
                         Py_ssize_t n, bint short) noexcept nogil:
    """eem_deframe(): the n bytes at start, the carried bytes held over just before it.

    Returns the number of frame records (d.frames, offsets counted from start - carried),
    or DEFRAME_WRONG_MODE / DEFRAME_BAD_CARRY / DEFRAME_OVER_CAPACITY (nothing done) /
    DEFRAME_NO_MEMORY (done, but commands lost: reset()).
    """
    if d.mode == EEM_MODE_FEED:
        return DEFRAME_WRONG_MODE
    if carried != d.carry:
        return DEFRAME_BAD_CARRY
    if n < 0 or _records_for(carried + n) > d.frame_capacity:
        return DEFRAME_OVER_CAPACITY
    d.mode = EEM_MODE_IN_PLACE
    d.c.transfers += 1
    d.c.short_transfers += short
    d.c.bytes_in += n
    return _run(d, start - carried, carried + n, short)


cdef Py_ssize_t _run(eem_deframer* d, const unsigned char* data, Py_ssize_t end,
                     bint short) noexcept nogil:
    """codec.Deframer.feed after its transfer counters, on data[0:end] (carry included)."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size
    cdef unsigned int header
    d.n_frames = 0
    d.n_commands = 0
    d.command_data_len = 0
    d.failed = False
    d.carry = 0
    while True:
        if d.scanning:
            pos = _scan(d, data, pos, end, short)
            if d.scanning:  # ran out of bytes while still looking
                break
        if pos == end:
            break
        if end - pos < HEADER_SIZE:
            if short:
                _cut_off(d, end - pos)
            else:
                d.carry = end - pos
            break
        header = _le16(data + pos)
        if header == 0:
            d.c.zlps += 1
            _earn(d, HEADER_SIZE)
            pos += HEADER_SIZE
            continue
        if header & TYPE_COMMAND:
            size = _command(d, data, pos, end, header, short)
            if size > 0:
                _earn(d, size)
        else:
            size = _data(d, data, pos, end, header, short)
        if size < 0:  # carried or cut off
            break
        if size == 0:  # garbage
            pos = _start_scan(d, pos)
        else:
            pos += size
    if short:
        if d.carry == 0 and not d.scanning:
            _confirm(d)  # the transfer ended exactly after them
        elif d.scanning:
            d.c.resyncs += 1
        _drop_waiting(d)
        d.scanning = False
        d.carry = 0
    if d.failed:
        return DEFRAME_NO_MEMORY
    return d.n_frames


# in sync

cdef Py_ssize_t _data(eem_deframer* d, const unsigned char* data, Py_ssize_t pos,
                      Py_ssize_t end, unsigned int header, bint short) noexcept nogil:
    """A data packet at pos: its size, 0 for garbage, -1 if carried or cut off."""
    cdef Py_ssize_t length = header & DATA_LENGTH_MASK
    cdef Py_ssize_t size
    cdef bint crc
    if length > d.max_length:
        d.c.oversize += 1
        return 0
    if length < MIN_DATA_LENGTH:
        d.c.runts += 1
        return 0
    size = HEADER_SIZE + length
    if pos + size > end:
        _incomplete(d, pos, end, short)
        return -1
    crc = (header & DATA_CRC) != 0
    if crc and d.budget < length + CRC_CHECK_OVERHEAD:
        d.c.unchecked += 1
        return 0
    if not _check_ok(data + pos + HEADER_SIZE, length, crc):
        if crc:
            d.c.crc_errors += 1
            d.budget -= length + CRC_CHECK_OVERHEAD
        else:
            d.c.sentinel_errors += 1
        return 0
    if not crc and _spliced(d, data, pos, pos + size):
        return 0
    _deliver(d, pos, length, crc)
    return size


cdef uint64_t _native_sum(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Sum of p's bytes as little-endian 32-bit words (a last 2 or 1 bytes as a shorter
    one): congruent modulo 0xFFFF to the one's complement sum of its 16-bit words, byte
    order aside (RFC 1071), which is all a check against zero needs."""
    cdef uint64_t total = 0
    cdef uint32_t word
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        memcpy(&word, p + i, 4)
        total += word
        i += 4
    if i + 2 <= n:
        total += p[i] | (<uint32_t>p[i + 1] << 8)
        i += 2
    if i < n:
        total += p[i]
    return total


cdef bint _l4_intact(const unsigned char* f, Py_ssize_t n) noexcept nogil:
    """codec.l4_intact on the frame f[0:n]."""
    cdef Py_ssize_t off = ETH_HEADER
    cdef Py_ssize_t ihl, total, seg_off, seg_len
    cdef unsigned int ethertype, proto, icmp
    cdef unsigned char pseudo[36]
    cdef Py_ssize_t addr_len
    cdef uint64_t sum
    if n < off:
        return True
    ethertype = (<unsigned int>f[12] << 8) | f[13]
    if ethertype == ETHERTYPE_VLAN and n >= off + 4:
        ethertype = (<unsigned int>f[16] << 8) | f[17]
        off += 4
    if ethertype == ETHERTYPE_IPV4 and n >= off + 20:
        if f[off] >> 4 != 4:
            return False
        ihl = (f[off] & 0x0F) * 4
        total = (<Py_ssize_t>f[off + 2] << 8) | f[off + 3]
        proto = f[off + 9]
        if ihl < 20 or off + ihl > n or _native_sum(f + off, ihl) % 0xFFFF != 0:
            return False  # a broken IPv4 header: no stack sends one
        if total < ihl or off + total > n:
            return False  # an IPv4 packet longer than its frame
        if ((<unsigned int>f[off + 6] << 8) | f[off + 7]) & 0x3FFF:
            return True
        seg_off = off + ihl
        seg_len = total - ihl
        memcpy(pseudo, f + off + 12, 8)
        addr_len = 8
        icmp = 1
    elif ethertype == ETHERTYPE_IPV6 and n >= off + 40:
        seg_len = (<Py_ssize_t>f[off + 4] << 8) | f[off + 5]
        proto = f[off + 6]
        if f[off] >> 4 != 6 or off + 40 + seg_len > n:
            return False
        seg_off = off + 40
        memcpy(pseudo, f + off + 8, 32)
        addr_len = 32
        icmp = 58
    else:
        return True
    pseudo[addr_len] = 0
    pseudo[addr_len + 1] = <unsigned char>proto
    pseudo[addr_len + 2] = <unsigned char>(seg_len >> 8)
    pseudo[addr_len + 3] = <unsigned char>(seg_len & 0xFF)
    if proto == 6 and seg_len >= 20:
        sum = _native_sum(pseudo, addr_len + 4)
    elif proto == 17 and seg_len >= 8:
        if f[seg_off + 6] == 0 and f[seg_off + 7] == 0:
            return True
        sum = _native_sum(pseudo, addr_len + 4)
    elif proto == icmp and seg_len >= 4:
        sum = _native_sum(pseudo, addr_len + 4) if icmp == 58 else 0
    else:
        return True
    sum += _native_sum(f + seg_off, seg_len)
    return sum % 0xFFFF == 0


cdef bint _spliced(eem_deframer* d, const unsigned char* data, Py_ssize_t pos,
                   Py_ssize_t stop) noexcept nogil:
    """codec.Deframer._spliced: the sentinel packet data[pos:stop] has a wrong TCP, UDP
    or ICMP checksum, or a whole plausible sentinel packet ends inside it at its end;
    counted."""
    cdef Py_ssize_t q, block_end
    cdef Py_ssize_t last = stop - HEADER_SIZE - MIN_DATA_LENGTH
    cdef unsigned int high
    cdef const unsigned char* hit
    if not _l4_intact(data + pos + HEADER_SIZE, stop - pos - HEADER_SIZE - CHECK_SIZE):
        d.c.spliced += 1
        return True
    # The header a packet at q ending at stop needs is stop - q - 2. Its high byte is
    # the same over runs of 256 offsets: memchr finds where it appears (rarely, in a
    # payload), and only there is the low byte compared. The offsets tried are those
    # of codec.Deframer._spliced, in the same order.
    q = pos + HEADER_SIZE
    while q <= last:
        high = <unsigned int>((stop - q - HEADER_SIZE) >> 8)
        block_end = stop - HEADER_SIZE - (<Py_ssize_t>high << 8)  # last q with this high byte
        if block_end > last:
            block_end = last
        hit = <const unsigned char*>memchr(data + q + 1, <int>high, block_end - q + 1)
        if hit == NULL:
            q = block_end + 1
            continue
        q = hit - data - 1
        if data[q] == ((stop - q - HEADER_SIZE) & 0xFF) and _plausible(
                d, data + q + HEADER_SIZE, stop - q - HEADER_SIZE - CHECK_SIZE):
            d.c.spliced += 1
            return True
        q += 1
    return False


cdef void _deliver(eem_deframer* d, Py_ssize_t pos, Py_ssize_t length, bint crc) noexcept nogil:
    """codec.Deframer._deliver: the verified packet at pos (bmLength `length`)."""
    cdef eem_frame_record* record
    if d.n_waiting:
        _confirm(d)
    # Room: frames never outnumber _records_for(end), checked before _run.
    record = &d.frames[d.n_frames]
    record.offset = pos + HEADER_SIZE
    record.length = <int32_t>(length - CHECK_SIZE)
    record.crc = crc
    d.n_frames += 1
    d.c.frames += 1
    d.c.bytes += length - CHECK_SIZE
    d.c.crc_frames += crc
    _earn(d, HEADER_SIZE + length)


cdef Py_ssize_t _command(eem_deframer* d, const unsigned char* data, Py_ssize_t pos,
                         Py_ssize_t end, unsigned int header, bint short) noexcept nogil:
    """A command at pos, queued for confirmation (same returns as _data)."""
    cdef int command = (header >> COMMAND_SHIFT) & COMMAND_MASK
    cdef int param = header & COMMAND_PARAM_MASK
    cdef Py_ssize_t size = HEADER_SIZE
    cdef Py_ssize_t payload = 0
    cdef eem_waiting* entry
    if command > CMD_TICKLE or header & DATA_CRC:
        d.c.reserved_commands += 1
        return 0
    if command == CMD_ECHO or command == CMD_ECHO_RESPONSE:
        payload = param
        size += param
        if pos + size > end:
            _incomplete(d, pos, end, short)
            return -1
    if d.n_waiting >= EEM_WAIT_LIMIT or d.waiting_bytes + size > EEM_WAIT_BYTES_LIMIT:
        d.c.unconfirmed_commands += 1  # this one; the waiting ones are dropped next
        return 0
    entry = &d.waiting[d.n_waiting]
    entry.command = command
    entry.param = param
    entry.size = size
    entry.data_offset = d.wait_data_len
    # Payloads add up to less than waiting_bytes, which stays within EEM_WAIT_BYTES_LIMIT.
    memcpy(d.wait_data + d.wait_data_len, data + pos + HEADER_SIZE, payload)
    d.wait_data_len += payload
    d.n_waiting += 1
    d.waiting_bytes += size
    return size


cdef void _incomplete(eem_deframer* d, Py_ssize_t pos, Py_ssize_t end, bint short) noexcept nogil:
    if short:
        d.c.truncated += 1
        _cut_off(d, end - pos)
    else:
        d.carry = end - pos


cdef void _cut_off(eem_deframer* d, Py_ssize_t nbytes) noexcept nogil:
    """The short transfer ended inside a packet: drop its bytes and what waited."""
    d.c.bytes_skipped += nbytes
    _drop_waiting(d)


cdef void _confirm(eem_deframer* d) noexcept nogil:
    cdef int i
    cdef eem_waiting* entry
    for i in range(d.n_waiting):
        entry = &d.waiting[i]
        if entry.command == CMD_ECHO:
            d.c.echo += 1
        elif entry.command == CMD_ECHO_RESPONSE:
            d.c.echo_response += 1
        else:
            d.c.hints += 1
        _push_command(d, entry.command, entry.param, d.wait_data + entry.data_offset,
                      entry.size - HEADER_SIZE)
    d.n_waiting = 0
    d.waiting_bytes = 0
    d.wait_data_len = 0


cdef void _push_command(eem_deframer* d, int command, int param, const unsigned char* payload,
                        Py_ssize_t length) noexcept nogil:
    """Append a confirmed command to the output, grown on demand (commands are rare, and
    a transfer's worth is bounded by its bytes plus what waited)."""
    cdef void* mem
    cdef Py_ssize_t capacity
    cdef eem_command_record* record
    if d.n_commands == d.command_capacity:
        capacity = 2 * d.command_capacity + EEM_WAIT_LIMIT
        mem = PyMem_RawRealloc(d.commands, capacity * sizeof(eem_command_record))
        if mem == NULL:
            d.failed = True
            return
        d.commands = <eem_command_record*>mem
        d.command_capacity = capacity
    if d.command_data_len + length > d.command_data_capacity:
        capacity = 2 * d.command_data_capacity + EEM_WAIT_BYTES_LIMIT
        mem = PyMem_RawRealloc(d.command_data, capacity)
        if mem == NULL:
            d.failed = True
            return
        d.command_data = <unsigned char*>mem
        d.command_data_capacity = capacity
    record = &d.commands[d.n_commands]
    record.command = command
    record.param = param
    record.data_offset = d.command_data_len
    record.before_frame = d.n_frames
    memcpy(d.command_data + d.command_data_len, payload, length)
    d.command_data_len += length
    d.n_commands += 1


cdef void _drop_waiting(eem_deframer* d) noexcept nogil:
    if d.n_waiting:
        d.c.unconfirmed_commands += d.n_waiting
        d.c.bytes_skipped += d.waiting_bytes
        d.n_waiting = 0
        d.waiting_bytes = 0
        d.wait_data_len = 0


# scanning

cdef Py_ssize_t _start_scan(eem_deframer* d, Py_ssize_t pos) noexcept nogil:
    """Garbage at pos: drop what waited, skip one byte, and look for a packet."""
    _drop_waiting(d)
    d.scanning = True
    d.c.bytes_skipped += 1
    _earn(d, 1)
    return pos + 1


cdef Py_ssize_t _scan(eem_deframer* d, const unsigned char* data, Py_ssize_t pos,
                      Py_ssize_t end, bint short) noexcept nogil:
    """codec.Deframer._scan: deliver the first packet at an offset >= pos that verifies
    (and is plausible, or passes a CRC check the budget allows) and return the offset
    after it (scanning ends); or end when the bytes run out first (the rest is carried,
    or skipped if short).

    Branch-light: on random bytes whether an offset is a candidate, and of which kind,
    is a coin toss the CPU cannot predict, so every offset computes the same few values
    and only an offset that needs more than "nothing to do" takes the one branch:
    a candidate running past the end (not short), a sentinel candidate whose sentinel
    matches, a CRC candidate the budget can pay for (budget earned up to here, as
    _candidate computes it). CRC candidates it cannot pay for are counted unchecked
    as _candidate would count them.
    """
    cdef Py_ssize_t start = pos
    cdef Py_ssize_t length, stop, s
    cdef unsigned int header
    cdef size_t span = <size_t>(d.max_length - MIN_DATA_LENGTH)
    cdef int64_t cap = _budget_cap(d)
    cdef int64_t budget_now, refused = 0
    cdef bint crc, affordable, interesting
    d.paid = pos
    while pos + HEADER_SIZE <= end:
        header = _le16(data + pos)
        # A data header with MIN_DATA_LENGTH <= bmLength <= max_length, in one unsigned
        # compare (bmType set makes the value too big).
        if <size_t>((header & ~(<unsigned int>DATA_CRC)) - MIN_DATA_LENGTH) <= span:
            length = header & DATA_LENGTH_MASK
            stop = pos + HEADER_SIZE + length
            if stop > end:
                if not short:
                    break  # this candidate decides; wait for the rest of it
            else:
                # Which kind of candidate is a coin toss on random bytes: decide without
                # a branch the CPU would mispredict.
                crc = (header >> 14) & 1
                budget_now = d.budget + CRC_BUDGET_PER_BYTE * <int64_t>(pos - d.paid)
                if budget_now > cap:
                    budget_now = cap
                affordable = length + CRC_CHECK_OVERHEAD <= budget_now
                refused += crc & (not affordable)
                interesting = (crc & affordable) | ((not crc) & (
                    _le32(data + stop - CHECK_SIZE) == SENTINEL_LE32))
                if interesting and _candidate(d, data, pos, length, crc):
                    d.c.unchecked += refused
                    d.c.bytes_skipped += pos - start
                    d.c.resyncs += 1
                    d.scanning = False
                    _earn(d, pos - d.paid)
                    _deliver(d, pos, length, crc)
                    return stop
        pos += 1
    d.c.unchecked += refused
    if short:
        pos = end
    d.c.bytes_skipped += pos - start
    _earn(d, pos - d.paid)
    d.carry = end - pos
    return end


cdef bint _candidate(eem_deframer* d, const unsigned char* data, Py_ssize_t pos,
                     Py_ssize_t length, bint crc) noexcept nogil:
    """codec.Deframer._candidate: whether the packet at pos, found by scanning, is taken."""
    cdef const unsigned char* packet = data + pos + HEADER_SIZE
    if not crc:
        if memcmp(packet + length - CHECK_SIZE, SENTINEL_BYTES, CHECK_SIZE) != 0:
            return False
        if not _plausible(d, packet, length - CHECK_SIZE):
            d.c.implausible += 1
            return False
        return not _spliced(d, data, pos, pos + HEADER_SIZE + length)
    cdef int64_t cost = length + CRC_CHECK_OVERHEAD
    _earn(d, pos - d.paid)  # what the scan passed pays before this check
    d.paid = pos
    if d.budget < cost or (d.budget < cost + d.max_length + CRC_CHECK_OVERHEAD
                           and not _plausible(d, packet, length - CHECK_SIZE)):
        d.c.unchecked += 1
        return False
    if _check_ok(packet, length, True):
        return True
    d.budget -= cost
    return False


# -- the framer core: codec.Framer's rules on an eem_framer -----------------------------

cdef void _seal(eem_framer* f, unsigned char* slot, Py_ssize_t frame_len) noexcept nogil:
    """Header at slot[0:2] and the CRC or sentinel after the frame at slot + 2."""
    cdef unsigned int header = (DATA_CRC if f.crc else 0) | <unsigned int>(frame_len + CHECK_SIZE)
    cdef unsigned char* check = slot + HEADER_SIZE + frame_len
    cdef uint32_t value
    slot[0] = header & 0xFF
    slot[1] = (header >> 8) & 0xFF
    if f.crc:
        value = <uint32_t>crc32(0, slot + HEADER_SIZE, <unsigned int>frame_len)
        check[0] = value & 0xFF
        check[1] = (value >> 8) & 0xFF
        check[2] = (value >> 16) & 0xFF
        check[3] = (value >> 24) & 0xFF
    else:
        memcpy(check, SENTINEL_BYTES, CHECK_SIZE)


cdef Py_ssize_t _frame_in_place(eem_framer* f, unsigned char* slot,
                                Py_ssize_t frame_len) noexcept nogil:
    """eem_frame_in_place(): pack()'s checks and counters, then _seal."""
    if frame_len + CHECK_SIZE > f.max_length:
        f.c.oversize += 1
        return 0
    if frame_len < ETH_HEADER:
        f.c.runts += 1
        return 0
    _seal(f, slot, frame_len)
    f.c.frames += 1
    f.c.bytes += frame_len
    return HEADER_SIZE + frame_len + CHECK_SIZE


cdef bint _fits(eem_framer* f, Py_ssize_t length) noexcept nogil:
    """codec.Framer._fits."""
    if not f.batch:
        return False
    if length % f.max_packet == 0:
        length += HEADER_SIZE
    return length <= f.max_transfer


cdef Py_ssize_t _close_transfer(eem_framer* f, unsigned char* transfer,
                                Py_ssize_t length) noexcept nogil:
    """codec.Framer._close, in place."""
    if length % f.max_packet == 0:
        transfer[length] = 0
        transfer[length + 1] = 0
        length += HEADER_SIZE
        f.c.zlps += 1
    f.c.transfers += 1
    f.c.transfer_bytes += length
    return length


# -- Python objects ---------------------------------------------------------------------

cdef class _FrameRecords:
    """Buffer export of a Deframer's frame records (for feed_buffer's numpy view); the
    Deframer cannot reallocate them while an export is alive."""

    cdef Deframer owner
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t shape[1]

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("frame records are read-only")
        self.shape[0] = self.nbytes
        view.buf = <void*>self.owner.d.frames
        view.obj = self
        view.len = self.nbytes
        view.readonly = 1
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL
        self.owner.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.owner.exports -= 1


cdef class Deframer:
    """EEM bulk IN stream to events: codec.Deframer's rules and API, plus in place.

    The reference API: feed(transfer, short), counters(), reset(), carried,
    waiting_commands, max_length. In place (the bridge): eem_deframe() from Cython
    (eem.pxd: &deframer.d), feed_buffer() and deframe_into() from Python, sized by
    set_capacity(). A stream uses feed() or in place, not both (reset() in between):
    feed() keeps carried bytes itself, in place expects them in the caller's memory.
    """

    def __cinit__(self):
        memset(&self.d, 0, sizeof(self.d))
        self.d.deframe = _deframe
        self.carry_mem = NULL

    def __init__(self, max_length=_protocol.DEFAULT_MAX_LENGTH, mac=None):
        validate_max_length(max_length)
        self.d.max_length = max_length
        self.mac = mac
        memset(&self.d.c, 0, sizeof(self.d.c))
        self.reset()
        self.set_capacity(DEFAULT_CAPACITY)

    def __dealloc__(self):
        PyMem_RawFree(self.d.frames)
        PyMem_RawFree(self.d.commands)
        PyMem_RawFree(self.d.command_data)
        PyMem_RawFree(self.carry_mem)

    @property
    def max_length(self) -> int:
        return self.d.max_length

    @max_length.setter
    def max_length(self, value) -> None:
        self._check_idle()
        validate_max_length(value)
        self.d.max_length = value
        self._reserve(_max_carry(self.d.max_length) + self.capacity)

    @property
    def carried(self) -> int:
        """Bytes held over to the next transfer (always less than one packet)."""
        return self.d.carry

    @property
    def mac(self):
        """The host's (TAP's) MAC the plausibility rule expects; None: any."""
        return bytes(self.d.mac[:6]) if self.d.has_mac else None

    @mac.setter
    def mac(self, value) -> None:
        cdef bytes mac = validate_mac(value)
        self._check_idle()
        self.d.has_mac = mac is not None
        if mac is not None:
            memcpy(self.d.mac, <const char*>mac, 6)

    @property
    def budget(self) -> int:
        return self.d.budget

    @property
    def waiting_commands(self) -> int:
        return self.d.n_waiting

    def reset(self) -> None:
        """Forget the stream (device reconnected); counters are kept."""
        self._check_idle()
        self.d.carry = 0
        self.d.scanning = False
        self.d.n_waiting = 0
        self.d.waiting_bytes = 0
        self.d.wait_data_len = 0
        self.d.n_frames = 0
        self.d.n_commands = 0
        self.d.command_data_len = 0
        self.d.failed = False
        self.d.mode = EEM_MODE_NONE
        self.d.budget = _budget_cap(&self.d)
        self.d.paid = 0

    def counters(self) -> dict:
        cdef const int64_t* values = <const int64_t*>&self.d.c
        return {name: values[i] for i, name in enumerate(_DEFRAMER_FIELDS)}

    def set_capacity(self, Py_ssize_t max_transfer) -> None:
        """Size the frame records for in-place transfers of up to max_transfer bytes (plus
        a carry); eem_deframe() refuses longer ones (DEFRAME_OVER_CAPACITY)."""
        self._check_idle()
        if max_transfer < 0:
            raise ValueError(f"max_transfer {max_transfer} is negative")
        self._reserve(_max_carry(self.d.max_length) + max_transfer)
        self.capacity = max_transfer

    cdef int _check_idle(self) except -1:
        if self.busy:
            raise RuntimeError("this Deframer is in use by another thread")
        return 0

    cdef int _reserve(self, Py_ssize_t total_bytes) except -1:
        """Room for the frame records of total_bytes of input, and for feed()'s carry."""
        cdef Py_ssize_t records = _records_for(total_bytes)
        cdef Py_ssize_t carry_size = _max_carry(self.d.max_length)
        cdef void* mem
        if records > self.d.frame_capacity:
            self.records_view = None  # our own export; the caller's block reallocation
            if self.exports:
                raise BufferError("frame records cannot grow while a view of them exists")
            mem = PyMem_RawRealloc(self.d.frames, records * sizeof(eem_frame_record))
            if mem == NULL:
                raise MemoryError()
            self.d.frames = <eem_frame_record*>mem
            self.d.frame_capacity = records
        if carry_size > self.carry_mem_size:
            self._grow_carry_mem(carry_size)
        return 0

    cdef int _grow_carry_mem(self, Py_ssize_t size) except -1:
        cdef void* mem = PyMem_RawRealloc(self.carry_mem, size)
        if mem == NULL:
            raise MemoryError()
        self.carry_mem = <unsigned char*>mem
        self.carry_mem_size = size
        return 0

    # -- events -------------------------------------------------------------------------

    cdef object _command_event(self, Py_ssize_t j):
        cdef eem_command_record* record = &self.d.commands[j]
        cdef bytes payload
        if record.command == CMD_ECHO or record.command == CMD_ECHO_RESPONSE:
            payload = PyBytes_FromStringAndSize(
                <const char*>self.d.command_data + record.data_offset, record.param
            )
            return Echo(payload) if record.command == CMD_ECHO else EchoResponse(payload)
        return Hint(record.command, record.param)

    cdef list _events(self, const unsigned char* base):
        """The last run's output as the reference's events, in the reference's order."""
        cdef list events = []
        cdef Py_ssize_t i, j = 0
        cdef eem_frame_record* record
        for i in range(self.d.n_frames):
            while j < self.d.n_commands and self.d.commands[j].before_frame == i:
                events.append(self._command_event(j))
                j += 1
            record = &self.d.frames[i]
            events.append(_new_frame(base + record.offset, record.length, record.crc))
        while j < self.d.n_commands:
            events.append(self._command_event(j))
            j += 1
        return events

    # -- the reference API --------------------------------------------------------------

    def feed(self, transfer, object short) -> list:
        """codec.Deframer.feed: one bulk IN transfer in, the events it completes out."""
        cdef Py_buffer view
        cdef bint is_short
        cdef Py_ssize_t n, total, result
        cdef const unsigned char* base
        cdef list events
        self._check_idle()
        if self.d.mode == EEM_MODE_IN_PLACE:
            raise RuntimeError("this stream is deframed in place (eem_deframe, feed_buffer, "
                               "deframe_into); reset() before feeding it with feed()")
        self.d.mode = EEM_MODE_FEED
        self.d.c.transfers += 1
        is_short = bool(short)
        self.d.c.short_transfers += is_short
        _acquire(transfer, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            self.d.c.bytes_in += n
            total = self.d.carry + n
            self._reserve(total)
            if self.d.carry:
                # Make carry + transfer contiguous, behind the carried bytes.
                if total > self.carry_mem_size:
                    self._grow_carry_mem(total)
                memcpy(self.carry_mem + self.d.carry, view.buf, n)
                base = self.carry_mem
            else:
                base = <const unsigned char*>view.buf  # deframe the caller's bytes in place
            result = _run(&self.d, base, total, is_short)
            try:
                events = self._events(base)
            finally:
                # Keep the new carry (the tail of base[0:total]) for the next transfer.
                if self.d.carry:
                    memmove(self.carry_mem, base + total - self.d.carry, self.d.carry)
        finally:
            PyBuffer_Release(&view)
        if result == DEFRAME_NO_MEMORY:
            raise MemoryError("no memory for the deframer's command output")
        return events

    # -- in place, from Python ----------------------------------------------------------

    cdef Py_ssize_t _in_place(self, object buffer, Py_ssize_t offset, Py_ssize_t carried,
                              Py_ssize_t n, bint short, bint grow) except? -9:
        """eem_deframe() on buffer[offset:offset+n] with the GIL released; errors raised."""
        cdef Py_buffer view
        cdef Py_ssize_t result
        self._check_idle()
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        try:
            if not (0 <= carried <= offset and n >= 0 and offset + n <= view.len):
                raise ValueError(
                    f"transfer [{offset}:{offset + n}] with {carried} carried bytes before it "
                    f"does not lie in a buffer of {view.len} bytes"
                )
            if grow and n > self.capacity:
                self.set_capacity(n)
            self.busy = True
            with nogil:
                result = _deframe(&self.d, <const unsigned char*>view.buf + offset, carried, n,
                                  short)
            self.busy = False
        finally:
            PyBuffer_Release(&view)
        if result == DEFRAME_WRONG_MODE:
            raise RuntimeError("this stream is fed through feed(); reset() before deframing "
                               "it in place")
        if result == DEFRAME_BAD_CARRY:
            raise ValueError(f"carried={carried}, but the deframer holds over {self.d.carry} bytes")
        if result == DEFRAME_OVER_CAPACITY:
            raise ValueError(f"{carried} carried + {n} new bytes exceed the capacity "
                             f"(set_capacity({self.capacity})): set_capacity({n}) first")
        if result == DEFRAME_NO_MEMORY:
            raise MemoryError("no memory for the deframer's command output")
        self.last_base = offset - carried
        return result

    def feed_buffer(self, buffer, Py_ssize_t offset, Py_ssize_t carried, Py_ssize_t n,
                    object short):
        """eem_deframe() from Python (tests, benchmarks), GIL released.

        The transfer is buffer[offset:offset+n]; the `carried` bytes held over from the
        previous call must be buffer[offset-carried:offset] (as in the bridge's mirrored
        ring). Returns (frames, commands): frames is a read-only numpy view of the frame
        records (FRAME_RECORD_DTYPE: offset counted from offset - carried, length, crc),
        valid until the next call; commands is a list of (before_frame, event), the event
        going just before frames[before_frame]. A transfer beyond set_capacity() is a
        ValueError, as eem_deframe() refuses it.
        """
        cdef Py_ssize_t count = self._in_place(buffer, offset, carried, n, bool(short), False)
        cdef _FrameRecords records
        if self.records_view is None:
            import numpy as np

            records = _FrameRecords()
            records.owner = self
            records.nbytes = self.d.frame_capacity * sizeof(eem_frame_record)
            self.records_view = np.frombuffer(records, dtype=_frame_record_dtype())
        frames = self.records_view[:count]
        commands = [(self.d.commands[j].before_frame, self._command_event(j))
                    for j in range(self.d.n_commands)]
        return frames, commands

    def deframe_into(self, buffer, Py_ssize_t offset, Py_ssize_t n, object short) -> list:
        """In place, as datapath.RingRxPath uses it: n new bytes at buffer[offset:], the
        carried bytes right before them. Returns the commands as events, in order;
        frame_records() gives the frames. Grows the capacity as needed."""
        self._in_place(buffer, offset, self.d.carry, n, bool(short), True)
        return [self._command_event(j) for j in range(self.d.n_commands)]

    def frame_records(self) -> list:
        """(buffer offset, length) of each frame the last deframe_into() found, in order."""
        return [(self.last_base + self.d.frames[i].offset, self.d.frames[i].length)
                for i in range(self.d.n_frames)]


cdef class Framer:
    """Ethernet frames to bulk OUT transfers: codec.Framer's rules and API, plus in place
    (eem_frame_in_place, eem_fits, eem_close_transfer from Cython via eem.pxd; the
    frame_buffer, fits and close_buffer wrappers from Python)."""

    def __cinit__(self):
        memset(&self.f, 0, sizeof(self.f))
        self.f.frame_in_place = _frame_in_place
        self.f.fits = _fits
        self.f.close_transfer = _close_transfer
        self.transfer_mem = NULL

    def __init__(self, crc=True, max_transfer=_protocol.DEFAULT_MAX_TRANSFER, max_packet=512,
                 max_length=_protocol.DEFAULT_MAX_LENGTH, out_chunk=0, batch=True):
        validate_framer_options(max_transfer, max_packet, max_length, out_chunk)
        self.f.crc = crc
        self.f.batch = batch
        self.f.max_transfer = max_transfer
        self.f.max_packet = max_packet
        self.f.max_length = max_length
        self.f.out_chunk = out_chunk
        memset(&self.f.c, 0, sizeof(self.f.c))

    def __dealloc__(self):
        PyMem_RawFree(self.transfer_mem)

    @property
    def crc(self) -> bool:
        return self.f.crc

    @crc.setter
    def crc(self, value) -> None:
        self.f.crc = value

    @property
    def max_transfer(self) -> int:
        return self.f.max_transfer

    @max_transfer.setter
    def max_transfer(self, value) -> None:
        validate_framer_options(value, self.f.max_packet, self.f.max_length)
        self.f.max_transfer = value

    @property
    def max_packet(self) -> int:
        return self.f.max_packet

    @max_packet.setter
    def max_packet(self, value) -> None:
        validate_framer_options(self.f.max_transfer, value, self.f.max_length)
        self.f.max_packet = value

    @property
    def max_length(self) -> int:
        return self.f.max_length

    @property
    def out_chunk(self) -> int:
        return self.f.out_chunk

    @property
    def batch(self) -> bool:
        return self.f.batch

    def place(self, Py_ssize_t pos, Py_ssize_t size) -> int:
        """codec.Framer.place."""
        return eem_place(&self.f, pos, size)

    @max_length.setter
    def max_length(self, value) -> None:
        validate_framer_options(self.f.max_transfer, self.f.max_packet, value)
        self.f.max_length = value

    def counters(self) -> dict:
        cdef const int64_t* values = <const int64_t*>&self.f.c
        return {name: values[i] for i, name in enumerate(_FRAMER_FIELDS)}

    cdef int _reserve(self, Py_ssize_t size) except -1:
        cdef void* mem
        if size > self.transfer_size:
            mem = PyMem_RawRealloc(self.transfer_mem, size)
            if mem == NULL:
                raise MemoryError()
            self.transfer_mem = <unsigned char*>mem
            self.transfer_size = size
        return 0

    # -- the reference API --------------------------------------------------------------

    def packet(self, frame) -> bytes:
        """One EEM data packet (header, frame, check); ValueError beyond bmLength's range."""
        cdef Py_buffer view
        cdef bytes packet
        cdef unsigned char* p
        _acquire(frame, &view, PyBUF_SIMPLE)
        try:
            _check_header_fits(view.len)
            packet = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + view.len + CHECK_SIZE)
            p = <unsigned char*>PyBytes_AS_STRING(packet)
            memcpy(p + HEADER_SIZE, view.buf, view.len)
            _seal(&self.f, p, view.len)
        finally:
            PyBuffer_Release(&view)
        return packet

    def pack(self, frames) -> list:
        """Frame and batch; frames that cannot be sent are counted and left out."""
        cdef list transfers = []
        cdef Py_ssize_t current = 0  # bytes of the transfer being assembled
        cdef Py_ssize_t n, start, size
        cdef bint padded
        cdef Py_buffer view
        for frame in frames:
            _acquire(frame, &view, PyBUF_SIMPLE)
            n = view.len
            PyBuffer_Release(&view)
            padded = self.f.out_chunk and n & 1
            n += padded
            if n + CHECK_SIZE > self.f.max_length:
                self.f.c.oversize += 1
                continue
            if n < ETH_HEADER:
                self.f.c.runts += 1
                continue
            start = eem_place(&self.f, current, HEADER_SIZE + n + CHECK_SIZE)
            if current and not _fits(&self.f, start + HEADER_SIZE + n + CHECK_SIZE):
                transfers.append(self._close_bytes(current))
                current = start = 0
            _acquire(frame, &view, PyBUF_SIMPLE)
            try:
                # Room for this packet and the zero-length packet that may close it.
                self._reserve(start + HEADER_SIZE + n + CHECK_SIZE + HEADER_SIZE)
                memcpy(self.transfer_mem + current + HEADER_SIZE, view.buf, view.len)
                # The TX path's own placement (padding, fill, seal, counters): checked
                # above already, so it accepts the frame and puts it at `start`.
                size = eem_frame_placed(&self.f, self.transfer_mem, current, view.len,
                                        &start)
                current = start + size
            finally:
                PyBuffer_Release(&view)
        if current:
            transfers.append(self._close_bytes(current))
        return transfers

    cdef bytes _close_bytes(self, Py_ssize_t length):
        length = _close_transfer(&self.f, self.transfer_mem, length)  # room: pack()
        return PyBytes_FromStringAndSize(<const char*>self.transfer_mem, length)

    def echo(self, data) -> bytes:
        transfer = self._command_transfer(CMD_ECHO, data)
        self.f.c.echo += 1  # counted only once it is built, as the reference does
        return transfer

    def echo_response(self, data) -> bytes:
        transfer = self._command_transfer(CMD_ECHO_RESPONSE, data)
        self.f.c.echo_response += 1
        return transfer

    cdef bytes _command_transfer(self, int command, object data):
        cdef Py_ssize_t length
        cdef Py_buffer view
        cdef bytes transfer
        cdef unsigned char* p
        cdef unsigned int header
        _acquire(data, &view, PyBUF_SIMPLE)
        try:
            if view.len > MAX_ECHO_DATA:
                raise ValueError(f"echo data of {view.len} bytes exceeds {MAX_ECHO_DATA}")
            header = TYPE_COMMAND | (command << COMMAND_SHIFT) | view.len
            length = HEADER_SIZE + view.len
            transfer = PyBytes_FromStringAndSize(
                NULL, length + (HEADER_SIZE if length % self.f.max_packet == 0 else 0)
            )
            p = <unsigned char*>PyBytes_AS_STRING(transfer)
            p[0] = header & 0xFF
            p[1] = (header >> 8) & 0xFF
            memcpy(p + HEADER_SIZE, view.buf, view.len)
            _close_transfer(&self.f, p, length)
        finally:
            PyBuffer_Release(&view)
        return transfer

    # -- in place, from Python (tests, benchmarks) --------------------------------------

    def fits(self, Py_ssize_t length) -> bool:
        """eem_fits(): whether a transfer holding packets may grow to length bytes."""
        return _fits(&self.f, length)

    def frame_buffer(self, buffer, Py_ssize_t offset, Py_ssize_t frame_len) -> int:
        """eem_frame_in_place() on buffer[offset:], the frame at offset + 2: the packet
        size, or 0 if the frame was refused (counted)."""
        cdef Py_buffer view
        cdef Py_ssize_t size
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if not (offset >= 0 and frame_len >= 0
                    and offset + HEADER_SIZE + frame_len + CHECK_SIZE <= view.len):
                raise ValueError(f"the packet of a {frame_len}-byte frame at {offset} does not "
                                 f"fit in a buffer of {view.len} bytes")
            with nogil:
                size = _frame_in_place(&self.f, <unsigned char*>view.buf + offset, frame_len)
        finally:
            PyBuffer_Release(&view)
        return size

    def close_buffer(self, buffer, Py_ssize_t offset, Py_ssize_t length) -> int:
        """eem_close_transfer() on the transfer buffer[offset:offset+length]: its final
        length (2 more if a zero-length packet was appended)."""
        cdef Py_ssize_t room
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            room = HEADER_SIZE if length % self.f.max_packet == 0 else 0
            if not (offset >= 0 and length >= 0 and offset + length + room <= view.len):
                raise ValueError(f"a transfer of {length} bytes at {offset} (+{room} for the "
                                 f"zero-length packet) does not fit in {view.len} bytes")
            length = _close_transfer(&self.f, <unsigned char*>view.buf + offset, length)
        finally:
            PyBuffer_Release(&view)
        return length


cdef int _check_header_fits(Py_ssize_t frame_len) except -1:
    """As codec.Framer.packet: refuse a frame bmLength cannot describe."""
    if frame_len + CHECK_SIZE > DATA_LENGTH_MASK:
        raise ValueError(f"frame of {frame_len} bytes does not fit an EEM data header")
    return 0


def _plausible_frame(frame, mac=None) -> bool:
    """The C plausibility rule on one frame (tests: it must be codec.plausible)."""
    cdef eem_deframer d
    cdef Py_buffer view
    cdef bytes m = validate_mac(mac)
    memset(&d, 0, sizeof(d))
    d.has_mac = m is not None
    if m is not None:
        memcpy(d.mac, <const char*>m, 6)
    _acquire(frame, &view, PyBUF_SIMPLE)
    try:
        return _plausible(&d, <const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def _l4_intact_frame(frame) -> bool:
    """The C checksum rule on one frame (tests: it must be codec.l4_intact)."""
    cdef Py_buffer view
    _acquire(frame, &view, PyBUF_SIMPLE)
    try:
        return _l4_intact(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def _crc32_blocks(buffer, Py_ssize_t block) -> int:
    """Benchmark bound (bench/codec.py): zlib's crc32 over buffer in consecutive blocks of
    `block` bytes, in C with the GIL released, as a deframer checking frames of that size
    must at least do. Returns the XOR of the CRCs (so the work is not optimised away)."""
    cdef Py_buffer view
    cdef Py_ssize_t pos
    cdef uint32_t result = 0
    cdef const unsigned char* data
    if block <= 0:
        raise ValueError("block must be positive")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    data = <const unsigned char*>view.buf
    try:
        with nogil:
            pos = 0
            while pos + block <= view.len:
                result ^= <uint32_t>crc32(0, data + pos, <unsigned int>block)
                pos += block
    finally:
        PyBuffer_Release(&view)
    return result
