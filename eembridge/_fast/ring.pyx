# cython: language_level=3
"""Mirrored single-producer/single-consumer ring buffer (eembridge._fast.ring).

Theory of operation
-------------------
Memory: one memfd of `size` bytes (rounded up to the page size) is mapped twice,
back to back, into a 2*size reservation of address space:

    base                 base+size              base+2*size
    | copy A: memfd 0..size | copy B: memfd 0..size |

Mirror property: base[i] and base[i + size] are the same byte for 0 <= i < size.
So for any offset o < size and length n <= size, base[o : o+n] is one contiguous
region of the stream even when it crosses the end of the memfd: nothing ever wraps,
and neither the producer (libusb writing a transfer) nor the consumer (the deframer
scanning packets, a frame handed to the TAP fd) needs a wrap-around case.

Stream positions: `head` and `tail` are monotonic 64-bit byte counts (they never
wrap in practice: 2**64 bytes is centuries at USB speeds). Position p lives at
base + p % size. Invariants, at every instant:

    tail <= head <= tail + size
    [tail, head)         readable: committed by the producer, not yet consumed
    [head, tail + size)  free: the producer may reserve and write it

Threads: exactly one producer and one consumer, each may be any thread, with or
without the GIL (the producer may be a libusb event thread in pure C).
  producer only: ring_reserve / ring_commit (Python: reserve, commit); it is the
                 only writer of head and of `reserved`.
  consumer only: ring_peek / ring_consume (Python: peek, consume); the only writer
                 of tail.
  any thread:    ring_at, ring_head, ring_tail, ring_used, ring_free (snapshots).
Synchronisation is two release/acquire pairs: commit stores head with release after
the bytes are written, the consumer loads head with acquire before reading them;
consume stores tail with release after the bytes are read, the producer loads tail
with acquire before overwriting them. No locks, no syscalls after construction.

The C-level API is header-only in ring.pxd; this module adds the `Ring` Python
object, which owns the memory (freed in __dealloc__), and checked Python methods.
"""

import os

from cpython.buffer cimport PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdlib cimport free
from libc.string cimport memset

cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char* name, unsigned int flags)
    unsigned int MFD_CLOEXEC
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    void* MAP_FAILED
    int PROT_NONE, PROT_READ, PROT_WRITE
    int MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS, MAP_FIXED

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int close(int fd)
    long sysconf(int name)
    int _SC_PAGESIZE


cdef object _os_error(str call):
    """OSError for the failed syscall `call`, from errno (read before any Python runs)."""
    cdef int err = errno
    return OSError(err, f"{call} failed: {os.strerror(err)}")


cdef class Ring:
    """A mirrored SPSC ring buffer of `size` bytes (rounded up to the page size).

    Producer: reserve(n) -> writable memoryview or None, write into it, commit(n).
    Consumer: peek() -> readonly memoryview of the readable bytes, consume(n).
    view(position, n) / numpy(position, n) give a window at an absolute stream
    position, contiguous for any n <= size.

    Every view shares the ring's memory and keeps the Ring alive, so it never
    dangles; but it is a window, not a snapshot: once its bytes are consumed the
    producer may overwrite them. Copy what must outlive consume().

    The buffer protocol exports both mappings (2*size bytes starting at
    `address`); Cython code takes the ring_t* with ring.pxd's ring_of.
    """

    def __cinit__(self, Py_ssize_t size):
        self._ring = NULL
        self._fd = -1
        if size <= 0:
            raise ValueError(f"ring size must be positive, got {size}")
        cdef Py_ssize_t page = sysconf(_SC_PAGESIZE)
        if size > (<Py_ssize_t>(<size_t>-1 >> 2)) - page:
            raise ValueError(f"ring size {size} is too large")
        size = (size + page - 1) // page * page

        cdef void* memory = NULL
        if posix_memalign(&memory, 64, sizeof(ring_t)) != 0:
            raise MemoryError()
        memset(memory, 0, sizeof(ring_t))
        self._ring = <ring_t*>memory
        self._ring.size = size

        self._fd = memfd_create(b"eembridge-ring", MFD_CLOEXEC)
        if self._fd < 0:
            raise _os_error("memfd_create")
        if ftruncate(self._fd, size) != 0:
            raise _os_error("ftruncate")
        # Reserve 2*size of address space first so both fixed mappings below land
        # in space we own, never over someone else's mapping.
        cdef unsigned char* base = <unsigned char*>mmap(
            NULL, 2 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if <void*>base == MAP_FAILED:
            raise _os_error("mmap (reserve)")
        self._ring.base = base  # from here on __dealloc__ unmaps the whole 2*size
        cdef int copy
        for copy in range(2):
            if mmap(base + copy * size, size, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_FIXED, self._fd, 0) == MAP_FAILED:
                raise _os_error("mmap (mirror)")
        self._mapped_len = 2 * size

    def __dealloc__(self):
        if self._ring != NULL:
            if self._ring.base != NULL:
                munmap(self._ring.base, 2 * self._ring.size)
            free(self._ring)
            self._ring = NULL
        if self._fd >= 0:
            close(self._fd)
            self._fd = -1

    # --- buffer protocol: both mappings, writable ------------------------------

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._ring.base, self._mapped_len, 0, flags)

    def __releasebuffer__(self, Py_buffer* buffer):
        pass

    cdef object _window(self, unsigned char* start, Py_ssize_t n, bint readonly):
        # A slice of a memoryview on self: it holds a reference to the Ring.
        cdef Py_ssize_t offset = start - self._ring.base
        window = memoryview(self)[offset:offset + n]
        return window.toreadonly() if readonly else window

    cdef Py_ssize_t _length(self, Py_ssize_t n, str what) except -1:
        if n < 0:
            raise ValueError(f"{what}: length must not be negative, got {n}")
        if <size_t>n > self._ring.size:
            raise ValueError(f"{what}: {n} bytes exceeds the ring size {self._ring.size}")
        return n

    # --- producer ----------------------------------------------------------------

    def reserve(self, Py_ssize_t n):
        """A writable view of n contiguous free bytes at the head, or None if fewer
        than n are free. Replaces any earlier reservation. Producer only."""
        self._length(n, "reserve")
        cdef unsigned char* start = ring_reserve(self._ring, n)
        if start == NULL:
            return None
        return self._window(start, n, False)

    def commit(self, Py_ssize_t n):
        """Publish the first n reserved bytes to the consumer. Producer only."""
        if n < 0 or <size_t>n > self._ring.reserved:
            raise ValueError(
                f"commit({n}) exceeds the {self._ring.reserved} bytes reserved")
        ring_commit(self._ring, n)

    # --- consumer ----------------------------------------------------------------

    def peek(self):
        """A read-only view of every readable byte, from the tail. Consumer only."""
        cdef size_t n = 0
        cdef unsigned char* start = ring_peek(self._ring, &n)
        return self._window(start, n, True)

    def consume(self, Py_ssize_t n):
        """Release the first n readable bytes to the producer. Consumer only."""
        cdef size_t used = ring_used(self._ring)
        if n < 0 or <size_t>n > used:
            raise ValueError(f"consume({n}) exceeds the {used} bytes used")
        ring_consume(self._ring, n)

    # --- windows at absolute stream positions --------------------------------------

    def view(self, position, Py_ssize_t n):
        """A writable view of n <= size bytes at absolute stream position `position`."""
        if not 0 <= position < 2**64:
            raise ValueError(f"view: position {position} is not a 64-bit stream position")
        self._length(n, "view")
        return self._window(ring_at(self._ring, position), n, False)

    def numpy(self, position, Py_ssize_t n):
        """As view(), as a numpy uint8 array sharing the ring's memory."""
        import numpy  # only users of this method pay for importing numpy

        return numpy.frombuffer(self.view(position, n), dtype=numpy.uint8)

    # --- state -------------------------------------------------------------------

    @property
    def size(self):
        """Bytes per mapping: the requested size rounded up to the page size."""
        return self._ring.size

    @property
    def used(self):
        """Readable bytes (committed, not consumed)."""
        return ring_used(self._ring)

    @property
    def free(self):
        """Bytes the producer can reserve."""
        return ring_free(self._ring)

    @property
    def head(self):
        """Absolute stream position of the next byte to be committed."""
        return ring_head(self._ring)

    @property
    def tail(self):
        """Absolute stream position of the next byte to be consumed."""
        return ring_tail(self._ring)

    @property
    def address(self):
        """Address of the first mapping (the second follows at address + size)."""
        return <size_t>self._ring.base

    @property
    def fd(self):
        """The memfd behind both mappings; owned by the Ring, closed with it."""
        return self._fd

    def __repr__(self):
        return (f"<Ring size={self._ring.size} head={ring_head(self._ring)} "
                f"tail={ring_tail(self._ring)}>")
