# TCP segmentation and checksum offload for a TAP opened with IFF_VNET_HDR, in C,
# header-only (why header-only: see ring.pxd). The specification is the reference in
# eembridge/core/offload.py: same frames, same bytes, for every input (tests/test_offload.py).
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

    /* --- receive: consecutive TCP segments of one flow merged into one GSO packet ----
       (what the kernel's GRO does for a NIC; usbnet, and so cdc_eem, has none). One TAP
       write then carries up to 64 KB, and the host's TCP handles one packet, not 40.
       Merged only when the kernel's tcp_gro_receive would: same headers but for length,
       id, sequence and checksums; flags ACK (PSH allowed on the last); the sequence
       continues; every segment but the last exactly mss long. Each segment's checksum
       is verified before it is merged; the merged packet goes up CHECKSUM_PARTIAL
       (NEEDS_CSUM), as a virtio guest's TSO packets do. */

    #define GRO_MAX_SEGS 44  /* 44 * 1460 < 65535 - headers */
    #define GRO_BUF_SIZE (65535 + 18)

    enum { GRO_HELD = 0, GRO_PASS = 1, GRO_FLUSH_FIRST = 2 };

    typedef struct {
        unsigned char *buf;  /* GRO_BUF_SIZE bytes */
        ptrdiff_t len;  /* 0: nothing held */
        ptrdiff_t l3, l4, end;
        ptrdiff_t mss;
        int v6;
        int segs;
        int closed;  /* the last segment ended the run (short, or PSH) */
        uint32_t next_seq;
    } gro_state_t;

    /* l3/l4/end of a plain Ethernet/IP/TCP frame that could be merged, and its payload
       length; 0 if it is not one (IP options, fragments, extension headers, flags other
       than ACK and PSH, no payload). */
    static inline int gro_parse(const unsigned char *p, ptrdiff_t len, ptrdiff_t *l3,
                                ptrdiff_t *l4, ptrdiff_t *end, int *v6)
    {
        uint16_t ethertype;
        unsigned char flags;
        if (len < 14 + 40) return 0;
        ethertype = off_be16(p + 12);
        *l3 = 14;
        if (ethertype == 0x0800) {
            *v6 = 0;
            if (p[14] != 0x45 || p[14 + 9] != 6) return 0;
            if (off_be16(p + 14 + 6) & 0x3fff) return 0;  /* MF or an offset: a fragment */
            if (off_be16(p + 14 + 2) != len - 14) return 0;  /* no Ethernet padding */
            *l4 = 14 + 20;
        } else if (ethertype == 0x86DD) {
            *v6 = 1;
            if (len < 14 + 60 || (p[14] >> 4) != 6 || p[14 + 6] != 6) return 0;
            if (off_be16(p + 14 + 4) != len - 14 - 40) return 0;
            *l4 = 14 + 40;
        } else {
            return 0;
        }
        *end = *l4 + (p[*l4 + 12] >> 4) * 4;
        if (*end < *l4 + 20 || *end >= len) return 0;  /* no payload: nothing to merge */
        flags = p[*l4 + 13];
        if ((flags & ~0x08) != 0x10) return 0;  /* ACK, maybe PSH; nothing else */
        return 1;
    }

    /* Whether the segment's TCP checksum verifies. */
    static inline int gro_checksum_ok(const unsigned char *p, ptrdiff_t len, ptrdiff_t l3,
                                      ptrdiff_t l4, int v6)
    {
        uint64_t s = v6 ? off_sum(p + l3 + 8, 32, 0) : off_sum(p + l3 + 12, 8, 0);
        s += off_htons((uint16_t)(len - l4)) + off_htons(6);
        return off_fold(off_sum(p + l4, len - l4, s)) == 0xffff;
    }

    /* Offer one frame. GRO_HELD: it is in the held packet (copied). GRO_PASS: write it
       as it is, after flushing what is held. GRO_FLUSH_FIRST: flush, then offer again. */
    static inline int gro_offer(gro_state_t *g, const unsigned char *p, ptrdiff_t len)
    {
        ptrdiff_t l3, l4, end, payload;
        int v6;
        const unsigned char *h = g->buf;
        if (!gro_parse(p, len, &l3, &l4, &end, &v6))
            return g->len ? GRO_FLUSH_FIRST : GRO_PASS;
        payload = len - end;
        if (g->len) {
            /* Same flow and headers but for the fields a merge rewrites. */
            if (g->closed || v6 != g->v6 || end != g->end || payload > g->mss
                || g->segs >= GRO_MAX_SEGS || g->len + payload > GRO_BUF_SIZE
                || memcmp(p, h, l3) != 0
                || (v6 ? memcmp(p + l3, h + l3, 4) != 0 || memcmp(p + l3 + 6, h + l3 + 6, 34) != 0
                       : memcmp(p + l3, h + l3, 2) != 0 || memcmp(p + l3 + 6, h + l3 + 6, 4) != 0
                         || memcmp(p + l3 + 12, h + l3 + 12, 8) != 0)
                || memcmp(p + l4, h + l4, 4) != 0  /* ports */
                || memcmp(p + l4 + 8, h + l4 + 8, 5) != 0  /* ack, header length */
                || memcmp(p + l4 + 14, h + l4 + 14, 2) != 0  /* window */
                || memcmp(p + l4 + 18, h + l4 + 18, end - l4 - 18) != 0  /* urgent, options */
                || ((uint32_t)p[l4 + 4] << 24 | (uint32_t)p[l4 + 5] << 16
                    | (uint32_t)p[l4 + 6] << 8 | p[l4 + 7]) != g->next_seq)
                return GRO_FLUSH_FIRST;
            if (!gro_checksum_ok(p, len, l3, l4, v6))
                return GRO_FLUSH_FIRST;  /* then passed as it is: the kernel counts it */
            memcpy(g->buf + g->len, p + end, payload);
            g->len += payload;
            g->segs += 1;
            g->next_seq += (uint32_t)payload;
            if (payload < g->mss || (p[l4 + 13] & 0x08)) {
                g->closed = 1;
                g->buf[l4 + 13] |= p[l4 + 13] & 0x08;  /* the last one's PSH */
            }
            return GRO_HELD;
        }
        if ((p[l4 + 13] & 0x08) || !gro_checksum_ok(p, len, l3, l4, v6))
            return GRO_PASS;  /* a run of one, or bad: as it is */
        memcpy(g->buf, p, len);
        g->len = len; g->l3 = l3; g->l4 = l4; g->end = end; g->v6 = v6;
        g->mss = payload; g->segs = 1; g->closed = 0;
        g->next_seq = ((uint32_t)p[l4 + 4] << 24 | (uint32_t)p[l4 + 5] << 16
                       | (uint32_t)p[l4 + 6] << 8 | p[l4 + 7]) + (uint32_t)payload;
        return GRO_HELD;
    }

    /* Make the held packet ready to write: fix its headers, fill *h. Its length. A run
       of one segment goes as it came (zero header: nothing asked of the kernel). */
    static inline ptrdiff_t gro_finish(gro_state_t *g, vnet_hdr_t *h)
    {
        unsigned char *p = g->buf;
        ptrdiff_t l3 = g->l3, l4 = g->l4, tcp_length = g->len - l4;
        uint64_t s;
        uint16_t c;
        memset(h, 0, sizeof(*h));
        if (g->segs == 1)
            return g->len;
        if (g->v6) {
            off_put_be16(p + l3 + 4, (uint16_t)tcp_length);
            s = off_sum(p + l3 + 8, 32, 0);
        } else {
            off_put_be16(p + l3 + 2, (uint16_t)(g->len - l3));
            p[l3 + 10] = p[l3 + 11] = 0;
            c = (uint16_t)~off_fold(off_sum(p + l3, 20, 0));
            memcpy(p + l3 + 10, &c, 2);
            s = off_sum(p + l3 + 12, 8, 0);
        }
        s += off_htons((uint16_t)tcp_length) + off_htons(6);
        c = off_fold(s);  /* CHECKSUM_PARTIAL: the pseudo-header sum, not complemented */
        memcpy(p + l4 + 16, &c, 2);
        h->flags = VNET_F_NEEDS_CSUM;
        h->gso_type = g->v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
        h->hdr_len = (uint16_t)g->end;
        h->gso_size = (uint16_t)g->mss;
        h->csum_start = (uint16_t)l4;
        h->csum_offset = 16;
        return g->len;
    }
    """
    enum:
        GRO_HELD
        GRO_PASS
        GRO_FLUSH_FIRST
        GRO_BUF_SIZE
    ctypedef struct gro_state_t:
        unsigned char* buf
        Py_ssize_t len
        int segs
    int gro_offer(gro_state_t* g, const unsigned char* p, Py_ssize_t len) noexcept nogil
    Py_ssize_t gro_finish(gro_state_t* g, vnet_hdr_t* h) noexcept nogil
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
