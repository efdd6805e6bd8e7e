# TCP segmentation and checksum offload for a TAP opened with IFF_VNET_HDR, in C,
# header-only (why header-only: see ring.pxd). The specification is the reference in
# eembridge/offload.py: same frames, same bytes, for every input (tests/test_offload.py).
#
# Checksums are summed in native byte order over the bytes as they lie in memory and
# stored back the same way (RFC 1071: the one's-complement sum does not care which byte
# of a word is the high one, as long as every word is read and written alike).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    #define VNET_HDR_SIZE 10
    #define VNET_F_NEEDS_CSUM 1
    #define VNET_GSO_NONE 0
    #define VNET_GSO_TCPV4 1
    #define VNET_GSO_TCPV6 4

    /* struct virtio_net_hdr, legacy layout (native byte order) */
    typedef struct {
        uint8_t flags;
        uint8_t gso_type;
        uint16_t hdr_len;
        uint16_t gso_size;
        uint16_t csum_start;
        uint16_t csum_offset;
    } __attribute__((packed)) vnet_hdr_t;

    /* One GSO packet being cut into frames: gso_begin, then gso_next until it gives 0. */
    typedef struct {
        const unsigned char *pkt;
        ptrdiff_t len;
        ptrdiff_t l3, l4, end;  /* IP header, TCP header, first payload byte */
        ptrdiff_t mss;
        ptrdiff_t next;  /* payload offset of the next segment */
        uint32_t seq0;
        uint16_t id0;
        int v6;
        int index;
        int pending;
    } gso_state_t;

    static inline uint64_t off_sum(const unsigned char *p, ptrdiff_t n, uint64_t s)
    {
        uint32_t w;
        uint16_t h;
        unsigned char last[2] = {0, 0};
        while (n >= 4) { memcpy(&w, p, 4); s += w; p += 4; n -= 4; }
        if (n >= 2) { memcpy(&h, p, 2); s += h; p += 2; n -= 2; }
        if (n) { last[0] = p[0]; memcpy(&h, last, 2); s += h; }
        return s;
    }

    static inline uint16_t off_fold(uint64_t s)
    {
        s = (s & 0xffffffffu) + (s >> 32);
        s = (s & 0xffffffffu) + (s >> 32);
        s = (s & 0xffffu) + (s >> 16);
        s = (s & 0xffffu) + (s >> 16);
        s = (s & 0xffffu) + (s >> 16);
        return (uint16_t)s;
    }

    static inline uint16_t off_be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
    static inline void off_put_be16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
    static inline uint16_t off_htons(uint16_t v)
    { unsigned char b[2] = {v >> 8, v & 0xff}; uint16_t r; memcpy(&r, b, 2); return r; }

    /* Finish a partial checksum in place; 0 if it lies outside the frame. */
    static inline int off_complete_checksum(unsigned char *p, ptrdiff_t len, ptrdiff_t start,
                                            ptrdiff_t offset)
    {
        uint16_t c;
        if (start >= len || start + offset + 2 > len)
            return 0;
        c = (uint16_t)~off_fold(off_sum(p + start, len - start, 0));
        if (c == 0)
            c = 0xffff;
        memcpy(p + start + offset, &c, 2);
        return 1;
    }

    /* Parse a TCPv4/TCPv6 GSO packet; 0 if it is not one we can segment. */
    static inline int gso_begin(gso_state_t *st, const vnet_hdr_t *h, const unsigned char *p,
                                ptrdiff_t len)
    {
        ptrdiff_t l3 = 14, l4, end;
        uint16_t ethertype;
        int v6;
        st->pending = 0;
        if (h->gso_type == VNET_GSO_TCPV4) v6 = 0;
        else if (h->gso_type == VNET_GSO_TCPV6) v6 = 1;
        else return 0;
        if (h->gso_size == 0 || len < 14) return 0;
        ethertype = off_be16(p + 12);
        if (ethertype == 0x8100 && len >= 18) { l3 = 18; ethertype = off_be16(p + 16); }
        if (ethertype != (v6 ? 0x86DD : 0x0800)) return 0;
        if (v6) {
            if (len < l3 + 40 || p[l3 + 6] != 6) return 0;
            l4 = l3 + 40;
        } else {
            if (len < l3 + 20) return 0;
            l4 = l3 + (p[l3] & 0x0f) * 4;
            if (l4 < l3 + 20 || p[l3 + 9] != 6) return 0;
        }
        if (len < l4 + 20) return 0;
        end = l4 + (p[l4 + 12] >> 4) * 4;
        if (end < l4 + 20 || end > len) return 0;
        st->pkt = p; st->len = len; st->l3 = l3; st->l4 = l4; st->end = end;
        st->mss = h->gso_size; st->next = 0; st->v6 = v6; st->index = 0;
        st->seq0 = (uint32_t)p[l4 + 4] << 24 | (uint32_t)p[l4 + 5] << 16
                   | (uint32_t)p[l4 + 6] << 8 | p[l4 + 7];
        st->id0 = v6 ? 0 : off_be16(p + l3 + 4);
        st->pending = 1;
        return 1;
    }

    /* The longest frame this packet's segments make. */
    static inline ptrdiff_t gso_longest(const gso_state_t *st)
    {
        ptrdiff_t payload = st->len - st->end;
        return st->end + (payload < st->mss ? payload : st->mss);
    }

    /* Write the next segment, a complete frame, to dst; its length, or 0 when done. */
    static inline ptrdiff_t gso_next(gso_state_t *st, unsigned char *dst)
    {
        ptrdiff_t payload = st->len - st->end, piece, tcp_length, l3 = st->l3, l4 = st->l4;
        uint64_t s;
        uint16_t c;
        uint32_t seq;
        int last;
        if (!st->pending)
            return 0;
        piece = payload - st->next < st->mss ? payload - st->next : st->mss;
        last = st->next + piece >= payload;
        memcpy(dst, st->pkt, st->end);
        memcpy(dst + st->end, st->pkt + st->end + st->next, piece);
        tcp_length = st->end - l4 + piece;
        if (st->v6) {
            off_put_be16(dst + l3 + 4, (uint16_t)tcp_length);
            s = off_sum(dst + l3 + 8, 32, 0);
        } else {
            off_put_be16(dst + l3 + 2, (uint16_t)(l4 - l3 + tcp_length));
            off_put_be16(dst + l3 + 4, (uint16_t)(st->id0 + st->index));
            dst[l3 + 10] = dst[l3 + 11] = 0;
            c = (uint16_t)~off_fold(off_sum(dst + l3, l4 - l3, 0));
            memcpy(dst + l3 + 10, &c, 2);
            s = off_sum(dst + l3 + 12, 8, 0);
        }
        s += off_htons((uint16_t)tcp_length) + off_htons(6);
        seq = st->seq0 + (uint32_t)st->next;
        dst[l4 + 4] = seq >> 24; dst[l4 + 5] = seq >> 16; dst[l4 + 6] = seq >> 8; dst[l4 + 7] = seq;
        if (!last) dst[l4 + 13] &= (unsigned char)~(0x01 | 0x08);  /* FIN, PSH */
        if (st->index) dst[l4 + 13] &= (unsigned char)~0x80;  /* CWR */
        dst[l4 + 16] = dst[l4 + 17] = 0;
        c = (uint16_t)~off_fold(off_sum(dst + l4, tcp_length, s));
        memcpy(dst + l4 + 16, &c, 2);
        st->next += piece;
        st->index += 1;
        if (last)
            st->pending = 0;
        return st->end + piece;
    }
    """
    enum:
        VNET_HDR_SIZE
        VNET_F_NEEDS_CSUM
        VNET_GSO_NONE
        VNET_GSO_TCPV4
        VNET_GSO_TCPV6
    ctypedef struct vnet_hdr_t:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    ctypedef struct gso_state_t:
        int pending
    int off_complete_checksum(unsigned char* p, Py_ssize_t len, Py_ssize_t start,
                              Py_ssize_t offset) noexcept nogil
    int gso_begin(gso_state_t* st, const vnet_hdr_t* h, const unsigned char* p,
                  Py_ssize_t len) noexcept nogil
    Py_ssize_t gso_longest(const gso_state_t* st) noexcept nogil
    Py_ssize_t gso_next(gso_state_t* st, unsigned char* dst) noexcept nogil
