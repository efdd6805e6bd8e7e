# cython: language_level=3
"""The TUN link's fast path: Ethernet <-> IP for the common frames in C, behind the
engine's link table (link.pxd); eembridge.core.l3's Translator stays the specification
and runs, in the TUN link's pump thread (link/tun.py), everything else.

Theory of operation
-------------------
Three descriptors: the TUN (one IP packet per read and write), the bridge's end of the
frame socketpair (the pump's frames for the device arrive there, as before) and one end
of a second SEQPACKET socketpair, the *channel*, on which C hands the pump what it does
not carry itself, as tagged datagrams (a TAG byte, the CLOCK_MONOTONIC time C saw it as
a little-endian double, then the frame or packet):

* device -> host (deliver). A frame the Translator would turn into an IP packet for the
  TUN (for the host's MAC or a group, IPv4 / IPv6 with a sound length, not NDP, not UDP
  to port 68 while the DHCP client runs) is written to the TUN here, Ethernet header
  and padding stripped. Which packet that is depends on the frame alone, never on the
  Translator's state, so it may go at once. If the Translator would also change state
  for it (the board's MAC, learning or refreshing its source's neighbour entry), the
  frame follows on the channel as TAG_DELIVERED: the pump runs from_device on it for
  the state, the replies and the count, and does not write the packet again. Every
  other frame goes on the channel as TAG_FRAME, unchanged, and the pump does what it
  always did (ARP, NDP, DHCP, drops by reason).
* host -> device (fill). The pump's frames (socketpair) first, then the TUN: a packet
  whose destination resolves exactly as Translator._resolve would (group, broadcast,
  static, fresh neighbour, the board's MAC for off-link) gets its Ethernet header in
  place in the OUT transfer. Any other goes on the channel as TAG_PACKET (a handoff):
  the pump holds it and solicits, or drops it, as from_host says, and fill returns
  LINK_REFUSED (call again).

The decisions are taken from a snapshot of the Translator's state, which the pump
publishes after every change (Translator.on_change) under a seqlock: the event thread
reads it without the GIL and, on a torn read, takes the slow path, which is always
right. Times compare as in Python (now - seen < max_age in doubles), so the
differential test (tests/test_tunlink_diff.py) holds C and the Translator to the same
outputs, counters and state on every input.

Ordering. Device -> host: a packet goes to the TUN from C at once, or from the pump when
C handed the whole frame over (UDP to port 68 with the DHCP client on, a torn read, no
snapshot yet or one too large to mirror); only those can reach the TUN behind packets
that arrived after them. Host -> device: C reads the pump's frames before the TUN, and
the pump publishes only after it queued what a change released (held packets), so a
packet C resolves by a new neighbour entry does not overtake the held ones in the
socket. Held packets the socket had no room for wait in the pump's backlog: meanwhile
the pump closes the TUN to C (tun_open, and the TUN's epoll interest). A handed-off
packet goes out, if at all, after those C resolved meanwhile (other destinations). The
TUN is never read by both: the pump stops reading it before it opens it to C.

Readiness: `fd` is an epoll descriptor holding the bridge's end of the socketpair and,
once installed and while open, the TUN; poll(2) sees it readable when either is. A pump
that died shuts its end: the bridge's end reads EOF, leaves the epoll set (no busy
loop) and the bridge thread, which polls that end itself, stops the bridge. A failed
TUN read is counted (the link's read_errors) and fill returns LINK_ERROR; a deleted TUN
stays readable in the epoll set until the pump, which sees its POLLERR, stops the bridge.
"""

from libc.errno cimport errno, EAGAIN
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport read, write
from posix.uio cimport iovec, writev
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from eembridge._fast.datapath cimport RxPath, TxPath
from eembridge._fast.ring cimport load_acquire, load_relaxed, store_release
from eembridge._fast.link cimport (eng_link, link_count_write, link_count_refused,
                                   link_read_failed, LINK_DRAINED, LINK_REFUSED)

cdef extern from "<sys/epoll.h>" nogil:
    enum: EPOLL_CTL_DEL
    struct epoll_event:
        uint32_t events
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)

# The seqlock's fences (its loads and stores are the ring's, ring.pxd): the reader's
# loads of the snapshot stay before its second look at seq, the writer's stores after
# its first.
cdef extern from *:
    """
    static inline void tl_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void tl_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """
    void tl_fence_acquire() nogil
    void tl_fence_release() nogil

import struct as _struct

cdef enum:
    TAG_FRAME = 1  # a frame from the device, not carried: the pump translates it
    TAG_DELIVERED = 2  # a frame whose packet C wrote to the TUN: the pump updates state only
    TAG_PACKET = 3  # a packet from the TUN C could not resolve: the pump holds or drops it

TAGS = {"frame": TAG_FRAME, "delivered": TAG_DELIVERED, "packet": TAG_PACKET}
HEADER = _struct.Struct("<Bd")  # TAG, the time C saw it (CLOCK_MONOTONIC)

cdef enum:
    HDR = 9
    ETH = 14
    # What the snapshot mirrors at most; a Translator with more goes all slow path.
    MAX_TABLE = 1024
    MAX_STATIC = 64
    MAX_ONLINK = 64
    MAX_BCAST = 64
    MAX_PENDING = 64
    # What deliver decided
    SLOW = 0  # to the pump
    FAST = 1  # to the TUN, nothing else to do
    NOTE = 2  # to the TUN, and to the pump for its state

cdef struct tl_entry:
    int length  # 4 or 16
    unsigned char ip[16]
    unsigned char mac[6]
    double seen

cdef struct tl_prefix:
    int length
    unsigned char net[16]
    unsigned char mask[16]

cdef struct tl_snap:
    uint64_t seq  # odd while being written
    int valid  # 0: nothing published, or too much to mirror: everything to the pump
    unsigned char host_mac[6]
    unsigned char peer_mac[6]
    int have_peer
    int fixed_peer
    int dhcp  # UDP to port 68 goes to the pump (its DHCP client)
    int tun_open  # 0: C reads no TUN packet (the pump's still, or its backlog goes first)
    double max_age
    double confirm_every
    int n_table, n_static, n_onlink, n_bcast, n_pending
    tl_entry table[MAX_TABLE]
    tl_entry statics[MAX_STATIC]
    tl_prefix onlink[MAX_ONLINK]
    unsigned char bcast[MAX_BCAST][4]
    tl_entry pending[MAX_PENDING]

cdef struct tl_state:
    tl_snap snap
    int tun_fd
    int bridge_fd  # the bridge's end of the frame socketpair
    int chan_fd  # C's end of the channel to the pump
    int epoll_fd
    bint bridge_gone  # EOF on bridge_fd: taken out of the epoll set
    double fixed_now  # >= 0: the clock (tests)
    # device -> host (deliver)
    int64_t to_host_packets  # written to the TUN with nothing for the pump
    int64_t tun_write_errors
    int64_t notes  # TAG_DELIVERED sent
    int64_t note_errors  # TAG_DELIVERED lost (channel full): packet counted here
    int64_t slow_frames  # TAG_FRAME sent
    int64_t torn  # snapshot changed under a read: slow path
    # host -> device (fill)
    int64_t to_device_frames
    int64_t handoffs  # TAG_PACKET sent
    int64_t handoff_errors  # TAG_PACKET lost (channel full): the packet is lost


cdef inline double _now(tl_state* st) noexcept nogil:
    cdef timespec ts
    if st.fixed_now >= 0:
        return st.fixed_now
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline tl_entry* _find(tl_entry* entries, int n, int cap, const unsigned char* ip,
                            int length) noexcept nogil:
    cdef int i
    if n > cap:
        n = cap  # a torn count: the seqlock check rejects what was read
    for i in range(n):
        if entries[i].length == length and memcmp(entries[i].ip, ip, length) == 0:
            return &entries[i]
    return NULL


cdef inline bint _on_link(tl_snap* s, const unsigned char* ip, int length) noexcept nogil:
    cdef int i, k, n = s.n_onlink
    cdef tl_prefix* p
    if n > MAX_ONLINK:
        n = MAX_ONLINK
    for i in range(n):
        p = &s.onlink[i]
        if p.length != length:
            continue
        for k in range(length):
            if ip[k] & p.mask[k] != p.net[k]:
                break
        else:
            return True
    return False


cdef inline Py_ssize_t _ip_length(const unsigned char* frame, Py_ssize_t length,
                                  int ethertype) noexcept nogil:
    """The IP packet's length behind the Ethernet header (Translator._ipv4 / _ipv6), or -1."""
    cdef const unsigned char* p = frame + ETH
    cdef Py_ssize_t n = length - ETH, header, total
    if ethertype == 0x0800:
        if n < 20 or p[0] >> 4 != 4:
            return -1
        header = (p[0] & 0x0F) * 4
        total = p[2] << 8 | p[3]
        if header < 20 or total < header or total > n:
            return -1
        return total
    if n < 40 or p[0] >> 4 != 6:
        return -1
    total = 40 + (p[4] << 8 | p[5])
    return -1 if total > n else total


cdef inline bint _dhcp_reply(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """dhcp.is_dhcp_reply: an unfragmented IPv4 packet carrying UDP to port 68."""
    cdef Py_ssize_t header
    if n < 28 or p[0] >> 4 != 4 or p[9] != 17:
        return False
    if (p[6] << 8 | p[7]) & 0x3FFF:
        return False
    header = (p[0] & 0x0F) * 4
    return n >= header + 8 and (p[header + 2] << 8 | p[header + 3]) == 68


cdef inline int _classify(tl_state* st, const unsigned char* frame, Py_ssize_t length,
                          double now, Py_ssize_t* packet_length) noexcept nogil:
    """What Translator.from_device would do with this frame: SLOW, FAST or NOTE."""
    cdef tl_snap* s = &st.snap
    cdef uint64_t seq = load_acquire(&s.seq)
    cdef int ethertype, verdict, length_ip
    cdef Py_ssize_t n
    cdef const unsigned char* p = frame + ETH
    cdef const unsigned char* source
    cdef tl_entry* known
    if seq & 1 or not s.valid or length < ETH:
        return SLOW
    if frame[0] & 1 == 0 and memcmp(frame, s.host_mac, 6) != 0:
        return SLOW  # other_mac
    ethertype = frame[12] << 8 | frame[13]
    if ethertype != 0x0800 and ethertype != 0x86DD:
        return SLOW
    n = _ip_length(frame, length, ethertype)
    if n < 0:
        return SLOW  # bad_ip
    if s.dhcp and _dhcp_reply(p, n):
        return SLOW
    verdict = FAST
    if frame[6] & 1 == 0:  # a unicast source: the board's MAC, maybe a neighbour
        if ethertype == 0x86DD and n >= 42 and p[6] == 58 and (p[40] == 135 or p[40] == 136):
            return SLOW  # NDP
        if not s.fixed_peer and (not s.have_peer or memcmp(s.peer_mac, frame + 6, 6) != 0):
            verdict = NOTE
        if ethertype == 0x0800:
            source, length_ip = p + 12, 4
        else:
            source, length_ip = p + 8, 16
        known = _find(s.table, s.n_table, MAX_TABLE, source, length_ip)
        if known is not NULL and memcmp(known.mac, frame + 6, 6) == 0 \
                and now - known.seen < s.confirm_every:
            pass
        elif (known is not NULL or _find(s.pending, s.n_pending, MAX_PENDING, source, length_ip)
              is not NULL or _on_link(s, source, length_ip)):
            verdict = NOTE  # learn
    tl_fence_acquire()
    if load_relaxed(&s.seq) != seq:
        st.torn += 1
        return SLOW
    packet_length[0] = n
    return verdict


cdef inline bint _to_pump(tl_state* st, int tag, double now, const unsigned char* data,
                          Py_ssize_t length) noexcept nogil:
    cdef unsigned char header[HDR]
    cdef iovec iov[2]
    header[0] = tag
    memcpy(header + 1, &now, 8)  # little-endian hosts only, as the pump unpacks it
    iov[0].iov_base = header
    iov[0].iov_len = HDR
    iov[1].iov_base = <void*>data
    iov[1].iov_len = length
    return writev(st.chan_fd, iov, 2) == HDR + length


cdef void tl_deliver(eng_link* link, const unsigned char* frame,
                     Py_ssize_t length) noexcept nogil:
    cdef tl_state* st = <tl_state*>link.ctx
    cdef double now = _now(st)
    cdef Py_ssize_t n = 0
    cdef int verdict = _classify(st, frame, length, now, &n)
    if verdict == SLOW:
        if _to_pump(st, TAG_FRAME, now, frame, length):
            st.slow_frames += 1
            link_count_write(link, length, length, 1, length)
        else:
            link_count_refused(link, errno, 1)
        return
    if write(st.tun_fd, frame + ETH, n) != n:
        st.tun_write_errors += 1  # link down, queue full: a lost packet, as the pump counts it
    link_count_write(link, length, length, 1, length)
    if verdict == NOTE:
        if _to_pump(st, TAG_DELIVERED, now, frame, length):
            st.notes += 1
            return
        st.note_errors += 1  # the state change is lost, not the packet
    st.to_host_packets += 1


cdef inline bint _resolve(tl_snap* s, const unsigned char* d, int length, double now,
                          unsigned char* mac) noexcept nogil:
    """Translator._resolve: the destination's MAC into mac, or False."""
    cdef int i, n
    cdef tl_entry* e
    if length == 4 and 224 <= d[0] < 240:
        mac[0], mac[1], mac[2] = 0x01, 0x00, 0x5E
        mac[3], mac[4], mac[5] = d[1] & 0x7F, d[2], d[3]
        return True
    if length == 16 and d[0] == 0xFF:
        mac[0], mac[1] = 0x33, 0x33
        memcpy(mac + 2, d + 12, 4)
        return True
    if length == 4:
        n = s.n_bcast if s.n_bcast <= MAX_BCAST else MAX_BCAST
        for i in range(n):
            if memcmp(s.bcast[i], d, 4) == 0:
                memset(mac, 0xFF, 6)
                return True
    e = _find(s.statics, s.n_static, MAX_STATIC, d, length)
    if e is not NULL:
        memcpy(mac, e.mac, 6)
        return True
    e = _find(s.table, s.n_table, MAX_TABLE, d, length)
    if e is not NULL and now - e.seen < s.max_age:
        memcpy(mac, e.mac, 6)
        return True
    if s.have_peer and not _on_link(s, d, length):
        memcpy(mac, s.peer_mac, 6)
        return True
    return False


cdef Py_ssize_t tl_fill(eng_link* link, unsigned char* dst, Py_ssize_t room) noexcept nogil:
    cdef tl_state* st = <tl_state*>link.ctx
    cdef tl_snap* s = &st.snap
    cdef Py_ssize_t n = read(st.bridge_fd, dst, room)
    cdef uint64_t seq
    cdef unsigned char* p = dst + ETH
    cdef bint resolved = False
    cdef double now
    cdef epoll_event unused
    if n > 0:
        return n  # longer than room: cut to room, oversize
    if n == 0 and not st.bridge_gone:  # the pump is gone: the bridge thread stops the bridge
        st.bridge_gone = True
        epoll_ctl(st.epoll_fd, EPOLL_CTL_DEL, st.bridge_fd, &unused)
    elif n < 0 and errno != EAGAIN:
        return link_read_failed(link)
    seq = load_acquire(&s.seq)
    if not (seq & 1) and not s.tun_open:
        tl_fence_acquire()
        if load_relaxed(&s.seq) == seq:
            return LINK_DRAINED  # not C's yet, or the pump's backlog goes first
    n = read(st.tun_fd, p, room - ETH)
    if n < 0:
        return link_read_failed(link)
    now = _now(st)
    seq = load_acquire(&s.seq)
    if not (seq & 1) and s.valid:
        if n >= 20 and p[0] >> 4 == 4:
            resolved = _resolve(s, p + 16, 4, now, dst)
            dst[12], dst[13] = 0x08, 0x00
        elif n >= 40 and p[0] >> 4 == 6:
            resolved = _resolve(s, p + 24, 16, now, dst)
            dst[12], dst[13] = 0x86, 0xDD
        memcpy(dst + 6, s.host_mac, 6)
        tl_fence_acquire()
        if load_relaxed(&s.seq) != seq:
            st.torn += 1
            resolved = False
    if resolved:
        st.to_device_frames += 1
        return n + ETH
    if _to_pump(st, TAG_PACKET, now, p, n):
        st.handoffs += 1
    else:
        st.handoff_errors += 1
    return LINK_REFUSED


cdef void _put_entry(tl_entry* e, bytes ip, bytes mac, double seen):
    e.length = len(ip)
    memcpy(e.ip, <const char*>ip, e.length)
    memcpy(e.mac, <const char*>mac, 6)
    e.seen = seen


COUNTERS = ("to_host_packets", "tun_write_errors", "notes", "note_errors", "slow_frames",
            "torn", "to_device_frames", "handoffs", "handoff_errors")


cdef class TunFast:
    """The fast path's state and its link tables (install), for one TUN link.

    The descriptors stay their owner's (link/tun.py): it keeps them open while the
    bridge runs and closes them after. `publish` is the only writer of the snapshot:
    its callers serialise it (one lock).
    """

    cdef tl_state st
    cdef eng_link rx_link  # for tests: deliver / fill without a data path
    cdef eng_link tx_link

    def __cinit__(self, int tun_fd, int bridge_fd, int chan_fd, int epoll_fd):
        memset(&self.st, 0, sizeof(self.st))
        self.st.tun_fd = tun_fd
        self.st.bridge_fd = bridge_fd
        self.st.chan_fd = chan_fd
        self.st.epoll_fd = epoll_fd
        self.st.fixed_now = -1.0
        self._set_link(&self.rx_link)
        self._set_link(&self.tx_link)

    cdef void _set_link(self, eng_link* link):
        """The table's functions; counters are left as they are."""
        link.deliver = tl_deliver
        link.flush = NULL
        link.fill = tl_fill
        link.fd = self.st.epoll_fd
        link.ctx = &self.st

    def install(self, RxPath rx not None, TxPath tx not None) -> None:
        """Make this the link of rx and tx (before the engine starts); their counters stay."""
        self._set_link(&rx.state.link)
        self._set_link(&tx.state.link)

    def publish(self, *, bytes host_mac, object peer_mac, bint fixed_peer, bint dhcp,
                bint tun_open, double max_age, double confirm_every, list table,
                list statics, list on_link, list broadcasts, list pending) -> None:
        """A new snapshot of the Translator's state. table: (ip, mac, seen); statics:
        (ip, mac); on_link: (length, network, mask) as ints; broadcasts, pending: ips."""
        cdef tl_snap* s = &self.st.snap
        cdef uint64_t seq = (s.seq + 1) | 1  # (odd already if a test tore it)
        cdef int i
        cdef bytes network_bytes, mask_bytes
        cdef bint fits = (len(table) <= MAX_TABLE and len(statics) <= MAX_STATIC
                          and len(on_link) <= MAX_ONLINK and len(broadcasts) <= MAX_BCAST
                          and len(pending) <= MAX_PENDING)
        store_release(&s.seq, seq)  # odd: readers take the slow path
        tl_fence_release()
        s.valid = fits
        s.tun_open = tun_open
        if fits:
            memcpy(s.host_mac, <const char*>host_mac, 6)
            s.have_peer = peer_mac is not None
            if peer_mac is not None:
                memcpy(s.peer_mac, <const char*>(<bytes>peer_mac), 6)
            s.fixed_peer = fixed_peer
            s.dhcp = dhcp
            s.max_age = max_age
            s.confirm_every = confirm_every
            for i, (ip, mac, seen) in enumerate(table):
                _put_entry(&s.table[i], ip, mac, seen)
            s.n_table = len(table)
            for i, (ip, mac) in enumerate(statics):
                _put_entry(&s.statics[i], ip, mac, 0.0)
            s.n_static = len(statics)
            for i, ip in enumerate(pending):
                _put_entry(&s.pending[i], ip, bytes(6), 0.0)
            s.n_pending = len(pending)
            for i, ip in enumerate(broadcasts):
                memcpy(s.bcast[i], <const char*>(<bytes>ip), 4)
            s.n_bcast = len(broadcasts)
            for i, (length, network, mask) in enumerate(on_link):
                network_bytes = network.to_bytes(length, "big")
                mask_bytes = mask.to_bytes(length, "big")
                s.onlink[i].length = length
                memcpy(s.onlink[i].net, <const char*>network_bytes, length)
                memcpy(s.onlink[i].mask, <const char*>mask_bytes, length)
            s.n_onlink = len(on_link)
        store_release(&s.seq, seq + 1)

    def counters(self) -> dict:
        cdef tl_state* st = &self.st
        return dict(zip(COUNTERS, (st.to_host_packets, st.tun_write_errors, st.notes,
                                   st.note_errors, st.slow_frames, st.torn,
                                   st.to_device_frames, st.handoffs, st.handoff_errors)))

    # --- for tests: the link driven synchronously, at a given time --------------------

    def deliver(self, bytes frame, double now) -> None:
        self.st.fixed_now = now
        tl_deliver(&self.rx_link, <const unsigned char*><const char*>frame, len(frame))
        self.st.fixed_now = -1.0

    def fill(self, double now, Py_ssize_t room=2048):
        """(the frame or None, refused: a handoff)."""
        buf = bytearray(room)
        cdef unsigned char* p = buf
        self.st.fixed_now = now
        n = tl_fill(&self.tx_link, p, room)
        self.st.fixed_now = -1.0
        if n == LINK_REFUSED:
            return None, True
        return (bytes(buf[:n]) if n > 0 else None), False

    def tear(self) -> None:
        """Leave the snapshot being written (odd): what reads it takes the slow path."""
        self.st.snap.seq += 1

    def link_counters(self) -> dict:
        return {"frames_written": self.rx_link.frames_written,
                "write_errors": self.rx_link.write_errors,
                "read_errors": self.tx_link.read_errors}
