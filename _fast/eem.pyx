# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython EEM codec: the same rules as eembridge/codec.py, with the byte loops in C.

The reference (eembridge/codec.py) is the specification; this module is a line-for-line
port of its state machine, so every event and counter agrees (tests/test_codec.py runs
the behaviour tests over both, including the split-invariance and accounting property).
What changes is only where the work happens: headers, lengths, the scan for a packet
that verifies and the CRC-32 (zlib's C crc32, the same library Python's zlib wraps) run
in C on a pointer into the buffer, and counters are C integers. Events, constants and
option validation come from the pure-Python modules, so both implementations emit the
same classes and raise the same errors.

Two entry points share that one state machine (_run): feed() keeps the reference's API
(copies carry + transfer into one bytes object, one Frame object per frame), and
deframe_into() works in place on caller memory, a mirrored ring whose carried bytes lie
right before the new transfer, recording frames as (offset, length) with no per-frame
Python object, for the bridge's data path.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp

from eembridge.codec import validate_framer_options, validate_max_length
from eembridge.events import Echo, EchoResponse, Frame, Hint
from eembridge.protocol import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_TRANSFER,
    DEFRAMER_COUNTERS,
    FRAMER_COUNTERS,
    MAX_ECHO_DATA,
    SENTINEL,
)

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len)

# Protocol constants as C values (the same numbers as eembridge/protocol.py).
DEF HEADER_SIZE = 2
DEF CHECK_SIZE = 4
DEF TYPE_COMMAND = 0x8000
DEF DATA_CRC = 0x4000
DEF DATA_LENGTH_MASK = 0x3FFF
DEF COMMAND_SHIFT = 11
DEF COMMAND_MASK = 0x7
DEF COMMAND_PARAM_MASK = 0x07FF
DEF CMD_ECHO = 0
DEF CMD_ECHO_RESPONSE = 1
DEF CMD_TICKLE = 5
DEF MIN_DATA_LENGTH = 18
DEF MAX_PENDING_COMMANDS = 16
DEF MAX_PENDING_COMMAND_BYTES = 4 * (0x07FF + 2)
DEF ETH_HEADER = 14

# Counter slots, in DEFRAMER_COUNTERS order (checked at import below).
DEF C_TRANSFERS = 0
DEF C_SHORT_TRANSFERS = 1
DEF C_BYTES_IN = 2
DEF C_FRAMES = 3
DEF C_BYTES = 4
DEF C_CRC_FRAMES = 5
DEF C_ZLPS = 6
DEF C_CRC_ERRORS = 7
DEF C_SENTINEL_ERRORS = 8
DEF C_OVERSIZE = 9
DEF C_RUNTS = 10
DEF C_TRUNCATED = 11
DEF C_RESERVED_COMMANDS = 12
DEF C_UNCONFIRMED_COMMANDS = 13
DEF C_RESYNCS = 14
DEF C_BYTES_SKIPPED = 15
DEF C_ECHO = 16
DEF C_ECHO_RESPONSE = 17
DEF C_HINTS = 18
DEF N_DEFRAMER_COUNTERS = 19

assert len(DEFRAMER_COUNTERS) == N_DEFRAMER_COUNTERS
assert DEFRAMER_COUNTERS[C_BYTES_SKIPPED] == "bytes_skipped" and DEFRAMER_COUNTERS[C_HINTS] == "hints"

cdef const unsigned char* SENTINEL_BYTES = b"\xde\xad\xbe\xef"

# Returns of the packet parsers, as in the reference: size > 0, garbage, or stop.
DEF GARBAGE = 0
DEF STOP = -1


cdef inline unsigned int le16(const unsigned char* p) noexcept nogil:
    return p[0] | (p[1] << 8)


cdef inline bint check_ok(const unsigned char* body, Py_ssize_t length, bint crc) noexcept nogil:
    """Whether a packet body of `length` bytes (frame + 4-byte check) verifies."""
    cdef const unsigned char* check = body + length - CHECK_SIZE
    cdef unsigned long stored
    if crc:
        stored = (<unsigned long>check[0] | (<unsigned long>check[1] << 8)
                  | (<unsigned long>check[2] << 16) | (<unsigned long>check[3] << 24))
        return crc32(0, body, <unsigned int>(length - CHECK_SIZE)) == stored
    return memcmp(check, SENTINEL_BYTES, CHECK_SIZE) == 0


cdef class Deframer:
    """EEM bulk IN stream to events (see eembridge/codec.py for the rules)."""

    cdef readonly int max_length
    cdef long long c[N_DEFRAMER_COUNTERS]
    cdef bytes _carry
    cdef bint _scanning
    cdef list _waiting
    cdef Py_ssize_t _waiting_bytes
    # Where the unfinished tail starts in the buffer being parsed (-1: none).
    cdef Py_ssize_t _carry_at
    # In-place mode (deframe_into): frames are recorded as (offset, length, crc) in
    # these C arrays instead of becoming Frame objects, and the carried tail stays in
    # the caller's memory, _carried bytes before the next transfer.
    cdef bint _record
    cdef Py_ssize_t _carried
    cdef Py_ssize_t* _rec_offset
    cdef Py_ssize_t* _rec_length
    cdef Py_ssize_t _nrecords
    cdef Py_ssize_t _capacity

    def __init__(self, int max_length=DEFAULT_MAX_LENGTH):
        validate_max_length(max_length)
        self.max_length = max_length
        cdef int i
        for i in range(N_DEFRAMER_COUNTERS):
            self.c[i] = 0
        self.reset()

    def __dealloc__(self):
        free(self._rec_offset)
        free(self._rec_length)

    def reset(self):
        self._carry = b""
        self._carried = 0
        self._scanning = False
        self._waiting = []
        self._waiting_bytes = 0

    def counters(self):
        return {name: self.c[i] for i, name in enumerate(DEFRAMER_COUNTERS)}

    @property
    def carried(self):
        return self._carried if self._record else len(self._carry)

    @property
    def waiting_commands(self):
        return len(self._waiting)

    def feed(self, transfer, bint short):
        """Deframe one bulk IN transfer; return its events (see eembridge/codec.py)."""
        if self._record:
            raise RuntimeError("this Deframer deframes in place (deframe_into); use another")
        cdef bytes data = self._carry + bytes(transfer)
        cdef list events = []
        self.c[C_BYTES_IN] += len(data) - len(self._carry)
        self._carry = b""
        self._run(data, len(data), short, events)
        if self._carry_at >= 0:
            self._carry = data[self._carry_at:]
        return events

    def deframe_into(self, buffer, Py_ssize_t offset, Py_ssize_t n, bint short):
        """Deframe in place: `n` new bytes at buffer[offset:], with the bytes this deframer
        carried over lying right before them in the same buffer (a mirrored ring makes that
        so). Frames are recorded, not copied: read them with frame_records() or, from
        Cython, through the record arrays. Returns the commands (rare) as events.
        """
        cdef const unsigned char[::1] view = buffer
        if offset - self._carried < 0 or offset + n > view.shape[0]:
            raise ValueError("the transfer and its carried bytes do not lie within the buffer")
        self._record = True
        self._ensure_capacity(self._carried + n)
        cdef list commands = []
        cdef Py_ssize_t start = offset - self._carried
        self.c[C_BYTES_IN] += n
        self._nrecords = 0
        self._run(&view[start] if view.shape[0] else NULL, self._carried + n, short, commands)
        for i in range(self._nrecords):
            self._rec_offset[i] += start
        self._carried = (self._carried + n - self._carry_at) if self._carry_at >= 0 else 0
        return commands

    def frame_records(self):
        """(offset, length) of each frame the last deframe_into found, in order."""
        return [(self._rec_offset[i], self._rec_length[i]) for i in range(self._nrecords)]

    cdef int _ensure_capacity(self, Py_ssize_t nbytes) except -1:
        cdef Py_ssize_t needed = nbytes // (HEADER_SIZE + MIN_DATA_LENGTH) + 1
        if needed <= self._capacity:
            return 0
        free(self._rec_offset)
        free(self._rec_length)
        self._rec_offset = <Py_ssize_t*>malloc(needed * sizeof(Py_ssize_t))
        self._rec_length = <Py_ssize_t*>malloc(needed * sizeof(Py_ssize_t))
        if self._rec_offset is NULL or self._rec_length is NULL:
            self._capacity = 0
            raise MemoryError()
        self._capacity = needed
        return 0

    cdef int _run(self, const unsigned char* d, Py_ssize_t end, bint short, list events) except -1:
        """The state machine of codec.Deframer.feed over d[0:end] (carry included)."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t size
        cdef unsigned int header
        self.c[C_TRANSFERS] += 1
        self.c[C_SHORT_TRANSFERS] += short
        self._carry_at = -1
        while True:
            if self._scanning:
                pos = self._scan(d, pos, end, short)
                if self._scanning:
                    break
            if pos == end:
                break
            if end - pos < HEADER_SIZE:
                if short:
                    self._cut_off(end - pos)
                else:
                    self._carry_at = pos
                break
            header = le16(d + pos)
            if header == 0:
                self.c[C_ZLPS] += 1
                pos += HEADER_SIZE
                continue
            if header & TYPE_COMMAND:
                size = self._command(d, pos, end, header, short)
            else:
                size = self._data(d, pos, end, header, short, events)
            if size == STOP:
                break
            if size == GARBAGE:
                pos = self._start_scan(pos)
            else:
                pos += size
        if short:
            if self._carry_at < 0 and not self._scanning:
                self._confirm(events)
            elif self._scanning:
                self.c[C_RESYNCS] += 1
            self._drop_waiting()
            self._scanning = False
            self._carry_at = -1
        return 0

    # -- in sync -----------------------------------------------------------------

    cdef Py_ssize_t _data(self, const unsigned char* d, Py_ssize_t pos,
                          Py_ssize_t end, unsigned int header, bint short, list events) except -2:
        cdef Py_ssize_t length = header & DATA_LENGTH_MASK
        cdef Py_ssize_t size
        cdef bint crc
        if length > self.max_length:
            self.c[C_OVERSIZE] += 1
            return GARBAGE
        if length < MIN_DATA_LENGTH:
            self.c[C_RUNTS] += 1
            return GARBAGE
        size = HEADER_SIZE + length
        if pos + size > end:
            self._incomplete(pos, end, short)
            return STOP
        crc = (header & DATA_CRC) != 0
        if not check_ok(d + pos + HEADER_SIZE, length, crc):
            self.c[C_CRC_ERRORS if crc else C_SENTINEL_ERRORS] += 1
            return GARBAGE
        self._confirm(events)
        if self._record:
            self._rec_offset[self._nrecords] = pos + HEADER_SIZE
            self._rec_length[self._nrecords] = length - CHECK_SIZE
            self._nrecords += 1
        else:
            events.append(Frame(PyBytes_FromStringAndSize(<const char*>d + pos + HEADER_SIZE,
                                                          length - CHECK_SIZE), crc))
        self.c[C_FRAMES] += 1
        self.c[C_BYTES] += length - CHECK_SIZE
        self.c[C_CRC_FRAMES] += crc
        return size

    cdef Py_ssize_t _command(self, const unsigned char* d, Py_ssize_t pos,
                             Py_ssize_t end, unsigned int header, bint short) except -2:
        cdef unsigned int command = (header >> COMMAND_SHIFT) & COMMAND_MASK
        cdef unsigned int param = header & COMMAND_PARAM_MASK
        cdef Py_ssize_t size = HEADER_SIZE
        if command > CMD_TICKLE or header & DATA_CRC:
            self.c[C_RESERVED_COMMANDS] += 1
            return GARBAGE
        if command == CMD_ECHO or command == CMD_ECHO_RESPONSE:
            size += param
            if pos + size > end:
                self._incomplete(pos, end, short)
                return STOP
            payload = PyBytes_FromStringAndSize(<const char*>d + pos + HEADER_SIZE, param)
            event = Echo(payload) if command == CMD_ECHO else EchoResponse(payload)
        else:
            event = Hint(command, param)
        if (len(self._waiting) >= MAX_PENDING_COMMANDS
                or self._waiting_bytes + size > MAX_PENDING_COMMAND_BYTES):
            self.c[C_UNCONFIRMED_COMMANDS] += 1
            return GARBAGE
        self._waiting.append((event, size))
        self._waiting_bytes += size
        return size

    cdef int _incomplete(self, Py_ssize_t pos, Py_ssize_t end, bint short) except -1:
        if short:
            self.c[C_TRUNCATED] += 1
            self._cut_off(end - pos)
        else:
            self._carry_at = pos
        return 0

    cdef int _cut_off(self, Py_ssize_t nbytes) except -1:
        self.c[C_BYTES_SKIPPED] += nbytes
        self._drop_waiting()
        return 0

    cdef int _confirm(self, list events) except -1:
        if not self._waiting:
            return 0
        for event, _size in self._waiting:
            if type(event) is Echo:
                self.c[C_ECHO] += 1
            elif type(event) is EchoResponse:
                self.c[C_ECHO_RESPONSE] += 1
            else:
                self.c[C_HINTS] += 1
            events.append(event)
        self._waiting = []
        self._waiting_bytes = 0
        return 0

    cdef int _drop_waiting(self) except -1:
        if self._waiting:
            self.c[C_UNCONFIRMED_COMMANDS] += len(self._waiting)
            self.c[C_BYTES_SKIPPED] += self._waiting_bytes
            self._waiting = []
            self._waiting_bytes = 0
        return 0

    # -- scanning ------------------------------------------------------------------

    cdef Py_ssize_t _start_scan(self, Py_ssize_t pos) except -1:
        self._drop_waiting()
        self._scanning = True
        self.c[C_BYTES_SKIPPED] += 1
        return pos + 1

    cdef Py_ssize_t _scan(self, const unsigned char* d, Py_ssize_t pos,
                          Py_ssize_t end, bint short) except -1:
        cdef Py_ssize_t start = pos
        cdef Py_ssize_t stop, length
        cdef unsigned int header
        cdef int max_length = self.max_length
        cdef bint found = False
        with nogil:
            while pos + HEADER_SIZE <= end:
                header = le16(d + pos)
                length = header & DATA_LENGTH_MASK
                if not (header & TYPE_COMMAND) and MIN_DATA_LENGTH <= length <= max_length:
                    stop = pos + HEADER_SIZE + length
                    if stop > end:
                        if not short:
                            break  # this candidate decides; wait for the rest of it
                    elif check_ok(d + pos + HEADER_SIZE, length, (header & DATA_CRC) != 0):
                        found = True
                        break
                pos += 1
        if found:
            self.c[C_BYTES_SKIPPED] += pos - start
            self.c[C_RESYNCS] += 1
            self._scanning = False
            return pos
        if short:
            pos = end
        self.c[C_BYTES_SKIPPED] += pos - start
        if pos < end:
            self._carry_at = pos
        return end


cdef class Framer:
    """Ethernet frames to bulk OUT transfers (see eembridge/codec.py)."""

    cdef readonly bint crc
    cdef readonly Py_ssize_t max_transfer
    cdef readonly Py_ssize_t max_packet
    cdef readonly int max_length
    cdef dict _counters

    def __init__(self, bint crc=True, Py_ssize_t max_transfer=DEFAULT_MAX_TRANSFER,
                 Py_ssize_t max_packet=512, int max_length=DEFAULT_MAX_LENGTH):
        validate_framer_options(max_transfer, max_packet, max_length)
        self.crc = crc
        self.max_transfer = max_transfer
        self.max_packet = max_packet
        self.max_length = max_length
        self._counters = dict.fromkeys(FRAMER_COUNTERS, 0)

    def counters(self):
        return dict(self._counters)

    cdef int _append_packet(self, bytearray out, const unsigned char[:] frame) except -1:
        cdef Py_ssize_t n = frame.shape[0]
        cdef unsigned long value
        cdef unsigned int header = (DATA_CRC if self.crc else 0) | (n + CHECK_SIZE)
        out.append(header & 0xFF)
        out.append(header >> 8)
        out += frame
        if self.crc:
            value = crc32(0, &frame[0], <unsigned int>n) if n else 0
            out += bytes((value & 0xFF, (value >> 8) & 0xFF, (value >> 16) & 0xFF, (value >> 24) & 0xFF))
        else:
            out += SENTINEL
        return 0

    def packet(self, frame):
        cdef bytearray out = bytearray()
        self._append_packet(out, bytes(frame))
        return bytes(out)

    cdef bint _fits(self, Py_ssize_t length):
        if length % self.max_packet == 0:
            length += HEADER_SIZE
        return length <= self.max_transfer

    cdef bytes _close(self, bytearray transfer):
        if len(transfer) % self.max_packet == 0:
            transfer += b"\x00\x00"
            self._counters["zlps"] += 1
        self._counters["transfers"] += 1
        self._counters["transfer_bytes"] += len(transfer)
        return bytes(transfer)

    def pack(self, frames):
        c = self._counters
        cdef list transfers = []
        cdef bytearray current = bytearray()
        cdef Py_ssize_t n, size
        for frame in frames:
            frame = bytes(frame)
            n = len(frame)
            if n + CHECK_SIZE > self.max_length:
                c["oversize"] += 1
                continue
            if n < ETH_HEADER:
                c["runts"] += 1
                continue
            size = HEADER_SIZE + n + CHECK_SIZE
            if current and not self._fits(len(current) + size):
                transfers.append(self._close(current))
                current = bytearray()
            self._append_packet(current, frame)
            c["frames"] += 1
            c["bytes"] += n
        if current:
            transfers.append(self._close(current))
        return transfers

    def echo(self, data):
        self._counters["echo"] += 1
        return self._command_transfer(CMD_ECHO, data)

    def echo_response(self, data):
        self._counters["echo_response"] += 1
        return self._command_transfer(CMD_ECHO_RESPONSE, data)

    cdef bytes _command_transfer(self, unsigned int command, data):
        data = bytes(data)
        if len(data) > MAX_ECHO_DATA:
            raise ValueError(f"echo data of {len(data)} bytes exceeds {MAX_ECHO_DATA}")
        cdef unsigned int header = TYPE_COMMAND | (command << COMMAND_SHIFT) | len(data)
        cdef bytearray out = bytearray((header & 0xFF, header >> 8))
        out += data
        return self._close(out)
