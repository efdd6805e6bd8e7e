# The C-level API of the mirrored ring buffer (eembridge._fast.ring).
#
# The ring operations are `cdef inline` functions, so cimporting them
# (`from eembridge._fast.ring cimport Ring, ring_t, ring_reserve, ...`) compiles the
# calls straight into the caller, with no runtime call through the module.
# The Python-level `Ring` class lives in ring.pyx and is declared here, so a Cython user
# takes its ring_t* with a type Cython checks: `ring_of(ring)` (or `ring._ring`).
# Theory of operation (invariants, who calls what): top of ring.pyx.

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>

    /* One ring. head and tail each sit on their own cache line, so the producer
       (writes head) and the consumer (writes tail) do not false-share. */
    typedef struct eembridge_ring {
        unsigned char *base;  /* first of the two mappings; constant */
        size_t size;          /* bytes per mapping, a page multiple; constant */
        char pad0[64];
        uint64_t head;        /* stream position of the next byte to write; producer */
        size_t reserved;      /* bytes of the last reservation not yet committed; producer */
        char pad1[64];
        uint64_t tail;        /* stream position of the next byte to read; consumer */
        char pad2[64];
    } eembridge_ring_t;

    static inline uint64_t eembridge_load_acquire(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t eembridge_load_relaxed(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void eembridge_store_release(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    ctypedef struct ring_t "eembridge_ring_t":
        unsigned char* base
        size_t size
        uint64_t head
        size_t reserved
        uint64_t tail
    uint64_t load_acquire "eembridge_load_acquire"(const uint64_t* p) noexcept nogil
    uint64_t load_relaxed "eembridge_load_relaxed"(const uint64_t* p) noexcept nogil
    void store_release "eembridge_store_release"(uint64_t* p, uint64_t v) noexcept nogil


cdef class Ring:
    cdef ring_t* _ring
    cdef int _fd
    cdef Py_ssize_t _mapped_len  # 2 * size: what the buffer protocol exports

    cdef object _window(self, unsigned char* start, Py_ssize_t n, bint readonly)
    cdef Py_ssize_t _length(self, Py_ssize_t n, str what) except -1


cdef inline ring_t* ring_of(Ring ring) except NULL:
    """The ring_t behind a Ring. Valid only while the caller holds the Ring."""
    if ring is None:
        raise TypeError("expected a Ring, got None")
    return ring._ring


# --- producer side (one thread at a time) -----------------------------------

cdef inline unsigned char* ring_reserve(ring_t* r, size_t n) noexcept nogil:
    """n contiguous free bytes at the head, or NULL if fewer than n are free.

    Nothing is published until ring_commit. A new reservation replaces the last.
    """
    # Acquire pairs with the consumer's release in ring_consume: it has finished
    # reading the bytes we are about to overwrite.
    cdef uint64_t tail = load_acquire(&r.tail)
    cdef uint64_t head = r.head  # only this thread writes head
    if n > r.size - <size_t>(head - tail):
        return NULL
    r.reserved = n
    return r.base + head % r.size


cdef inline void ring_commit(ring_t* r, size_t n) noexcept nogil:
    """Publish the first n reserved bytes. n must not exceed the reservation."""
    r.reserved = r.reserved - n if n <= r.reserved else 0
    # Release: the bytes written before this store are visible to a consumer
    # that acquires the new head.
    store_release(&r.head, r.head + n)


cdef inline size_t ring_free(ring_t* r) noexcept nogil:
    """Bytes that can be reserved now (exact for the producer, a snapshot for others)."""
    cdef uint64_t tail = load_acquire(&r.tail)
    cdef uint64_t head = load_acquire(&r.head)
    cdef uint64_t used = head - tail
    return r.size - <size_t>used if used < r.size else 0


# --- consumer side (one thread at a time) -----------------------------------

cdef inline unsigned char* ring_peek(ring_t* r, size_t* n) noexcept nogil:
    """The readable bytes: sets n[0] to their count, returns a pointer to the first."""
    cdef uint64_t tail = r.tail  # only this thread writes tail
    # Acquire pairs with the producer's release in ring_commit.
    n[0] = <size_t>(load_acquire(&r.head) - tail)
    return r.base + tail % r.size


cdef inline void ring_consume(ring_t* r, size_t n) noexcept nogil:
    """Hand n read bytes back to the producer. n must not exceed ring_used."""
    # Release: our reads of these bytes happen before the producer reuses them.
    store_release(&r.tail, r.tail + n)


cdef inline size_t ring_used(ring_t* r) noexcept nogil:
    """Bytes readable now (exact for the consumer, a snapshot for others)."""
    # tail first: head only grows, so head - tail never goes negative; an
    # observer thread may see more than size in between, hence the clamp.
    cdef uint64_t tail = load_acquire(&r.tail)
    cdef uint64_t used = load_acquire(&r.head) - tail
    return <size_t>used if used < r.size else r.size


# --- either side --------------------------------------------------------------

cdef inline unsigned char* ring_at(ring_t* r, uint64_t position) noexcept nogil:
    """The address of absolute stream position `position`; the next size bytes
    from there are contiguous (mirror)."""
    return r.base + position % r.size


cdef inline uint64_t ring_head(ring_t* r) noexcept nogil:
    return load_acquire(&r.head)


cdef inline uint64_t ring_tail(ring_t* r) noexcept nogil:
    return load_acquire(&r.tail)
