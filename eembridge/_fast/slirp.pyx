# cython: language_level=3
"""libslirp, QEMU's user-mode network stack, behind the user link's frame socket.

Why libslirp (and no longer passt)
----------------------------------
* It runs where the bridge would: QEMU uses it for its user networking on Linux, macOS and
  Windows (MacPorts and Homebrew carry it, MSYS2 too). passt is Linux-only (built on
  epoll, splice and unshare).
* Debian 12's passt (0.0~git20230309) stalled downloads from the board: lost frames or a
  batching device's bursts left the board's data unacknowledged for good, a flaky test
  and a link that could hang. libslirp's TCP is the BSD stack QEMU users have leaned on
  for twenty years, and it runs in our process: nothing to spawn, supervise or reap.
* What it costs: a binding (this file) and running the stack in our process rather than
  in a sandboxed one. libslirp is not thread-safe, so one thread owns a `Stack` from
  `run` to `close`; forwards are added before `run` starts it.

Theory of operation
-------------------
`run(frame_fd, stop_fd)` is the pump thread's whole life, without the GIL. frame_fd is
the pump's end of the link's SEQPACKET socketpair (link/pump.py): one Ethernet frame per
datagram. One loop:

  slirp_pollfds_fill (slirp's sockets, and its timeout) + the frame socket + the stop pipe
  -> poll(2), waking no later than slirp's timeout or its earliest timer
  -> slirp_pollfds_poll (slirp reads and writes the host's sockets; frames for the board
     arrive in send_packet), frames from the bridge into slirp_input, due timers fired.

Frames for the board (send_packet) are written to the frame socket at once. When it is
full (the bridge has not drained it) the thread waits for room, up to SEND_WAIT_MS, and
slirp with it: it reads no host socket meanwhile, so the host's TCP slows down. That is
the backpressure; a frame still without room after the wait is dropped and counted
(to_bridge_dropped) and TCP resends it.

Frames from the board go to slirp_input unless `egress` (eembridge.core.egress, the
policy without --nat) refuses them. TCP segments of an established flow (no bare SYN,
no fragment) pass without asking it: that is nearly every frame of a transfer, and it
keeps the GIL out of the data path. Anything else is judged by egress.check with the GIL;
its replies (resets) go back to the board. Slirp's own `restricted` mode is the second
wall: even what egress passes cannot leave for the host or its networks.

With a `--forward udp:` libslirp runs unrestricted and the policy alone guards: it lets
the board's datagrams through only along flows a forwarded client started, which it learns
from the frames slirp sends the board. send_packet hands it those frames only,
datagrams to a forwarded UDP port (_forwarded_datagram, held to core.egress's
forwarded_datagram by tests/test_egress.py), taking the GIL for them and nothing else.

Every callback checks nothing but its opaque pointer, which is always our `State`;
callbacks that need Python (guest_error, egress) take the GIL and hand any exception to
`State.error`, which ends `run` and is raised from it.
"""

from cpython.ref cimport PyObject, Py_XINCREF, Py_XDECREF
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint8_t, uint32_t, int64_t, uint64_t, UINT32_MAX
from libc.stdlib cimport malloc, realloc, free, calloc
from libc.string cimport memcpy, memset, strerror
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from eembridge._fast.libslirp cimport *

import logging

log = logging.getLogger("eembridge.link.user")


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLPRI
        POLLERR
        POLLHUP


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_NOSIGNAL


DEF FRAME_BUFFER = 65536 + 64  # longer than any frame; MSG_TRUNC shows what was longer
DEF BURST = 64  # frames from the bridge per wakeup before slirp's sockets are served again
DEF SEND_WAIT_MS = 1000  # how long slirp waits for room towards the bridge before dropping
DEF ETH_HLEN = 14

SEND_WAIT_SECONDS = SEND_WAIT_MS / 1000

COUNTERS = ("to_stack_frames", "from_stack_frames", "to_bridge_waits", "to_bridge_dropped",
            "oversize_from_bridge", "guest_errors", "timers_fired", "pump_wakeups")


cdef struct Timer:
    SlirpTimerCb cb          # timer_new's callback, or NULL for a timer_new_opaque one
    void *cb_opaque
    SlirpTimerId id
    int64_t expire_ms
    bint armed
    Timer *next


cdef struct Counters:
    uint64_t to_stack_frames
    uint64_t from_stack_frames
    uint64_t to_bridge_waits
    uint64_t to_bridge_dropped
    uint64_t oversize_from_bridge
    uint64_t guest_errors
    uint64_t timers_fired
    uint64_t pump_wakeups


cdef struct State:
    Slirp *slirp
    int frame_fd
    int stop_fd
    bint stopping
    bint notified
    pollfd *fds
    int nfds
    int fds_size
    Timer *timers
    size_t max_frame
    PyObject *egress         # core.egress.Egress, or NULL with --nat; a reference held
    bint udp_forwarded       # any forwarded UDP port: send_packet shows egress its datagrams
    uint8_t udp_forwards[8192]  # the forwarded UDP ports, one bit each
    PyObject *error          # the exception that ended run; a reference held
    Counters counters


# --- callbacks (the opaque pointer is always our State) -----------------------------------

cdef int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int64_t _clock_get_ns(void *opaque) noexcept nogil:
    return _now_ns()


cdef void _fail(State *st, object exc) noexcept:
    """Keep the first exception; run raises it once the loop has stopped."""
    if st.error == NULL:
        Py_XINCREF(<PyObject *>exc)
        st.error = <PyObject *>exc
    st.stopping = True


cdef bint _to_bridge(State *st, const void *buf, size_t n) noexcept nogil:
    """One frame into the frame socket, waiting for room while the bridge drains it. False
    when the bridge has gone."""
    cdef pollfd waits[2]
    cdef ssize_t sent
    cdef int ready
    cdef bint waited = False
    while True:
        sent = send(st.frame_fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent >= 0:
            return True
        if errno == EINTR:
            continue
        if errno != EAGAIN:
            st.counters.to_bridge_dropped += 1
            return False  # EPIPE, ECONNRESET: the bridge closed its end
        if waited:
            st.counters.to_bridge_dropped += 1
            return True
        st.counters.to_bridge_waits += 1
        waits[0].fd, waits[0].events, waits[0].revents = st.frame_fd, POLLOUT, 0
        waits[1].fd, waits[1].events, waits[1].revents = st.stop_fd, POLLIN, 0
        ready = poll(waits, 2, SEND_WAIT_MS)
        if ready > 0 and waits[1].revents:
            st.stopping = True
            return True
        waited = ready <= 0 or not waits[0].revents & POLLOUT


cdef bint _forwarded_datagram(const uint8_t *frame, size_t n,
                              const uint8_t *forwards) noexcept nogil:
    """An IPv4 datagram (or its first fragment) to a forwarded port: core.egress's
    forwarded_datagram, without the GIL."""
    cdef size_t header
    cdef unsigned int port
    if n < ETH_HLEN + 20 or frame[12] != 0x08 or frame[13] != 0x00:
        return False
    header = (frame[ETH_HLEN] & 0x0F) * 4
    if frame[ETH_HLEN] >> 4 != 4 or header < 20 or frame[ETH_HLEN + 9] != 17:
        return False
    if n < ETH_HLEN + header + 8 or (frame[ETH_HLEN + 6] & 0x1F) or frame[ETH_HLEN + 7]:
        return False  # short, or a later fragment (an offset)
    port = frame[ETH_HLEN + header + 2] << 8 | frame[ETH_HLEN + header + 3]
    return (forwards[port >> 3] >> (port & 7)) & 1


cdef int _port_bits(object ports, uint8_t *bits) except -1:
    memset(bits, 0, 8192)
    for port in ports:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"UDP port {port} is not from 0 to 65535")
        bits[<unsigned int>port >> 3] |= 1 << (<unsigned int>port & 7)
    return 0


def forwarded_datagram(const uint8_t[:] frame, ports) -> bool:
    """_forwarded_datagram for tests: held to core.egress.forwarded_datagram."""
    cdef uint8_t bits[8192]
    _port_bits(ports, bits)
    return _forwarded_datagram(&frame[0], frame.shape[0], bits) if frame.shape[0] else False


cdef void _egress_learns(State *st, const void *frame, size_t n) noexcept with gil:
    cdef object view
    try:
        view = PyMemoryView_FromMemory(<char *>frame, n, PyBUF_READ)
        (<object>st.egress).learn(view)
        view.release()
    except BaseException as exc:
        _fail(st, exc)


cdef ssize_t _send_packet(const void *buf, size_t n, void *opaque) noexcept nogil:
    cdef State *st = <State *>opaque
    if st.udp_forwarded and _forwarded_datagram(<const uint8_t *>buf, n, st.udp_forwards):
        _egress_learns(st, buf, n)  # before the board can answer it
    if not _to_bridge(st, buf, n):
        st.stopping = True
        return -1
    st.counters.from_stack_frames += 1
    return <ssize_t>n


cdef void _guest_error(const char *msg, void *opaque) noexcept nogil:
    cdef State *st = <State *>opaque
    st.counters.guest_errors += 1
    with gil:
        try:
            log.debug("slirp: the board sent something it refused: %s",
                      msg.decode(errors="replace"))
        except BaseException as exc:
            _fail(st, exc)


cdef Timer *_timer_add(State *st) noexcept nogil:
    cdef Timer *timer = <Timer *>calloc(1, sizeof(Timer))
    if timer != NULL:
        timer.next = st.timers
        st.timers = timer
    return timer


cdef void *_timer_new(SlirpTimerCb cb, void *cb_opaque, void *opaque) noexcept nogil:
    cdef Timer *timer = _timer_add(<State *>opaque)
    if timer != NULL:
        timer.cb, timer.cb_opaque = cb, cb_opaque
    return timer


cdef void *_timer_new_opaque(SlirpTimerId id, void *cb_opaque, void *opaque) noexcept nogil:
    cdef Timer *timer = _timer_add(<State *>opaque)
    if timer != NULL:
        timer.id, timer.cb_opaque = id, cb_opaque
    return timer


cdef void _timer_free(void *timer, void *opaque) noexcept nogil:
    cdef State *st = <State *>opaque
    cdef Timer **at = &st.timers
    while at[0] != NULL:
        if at[0] == <Timer *>timer:
            at[0] = at[0].next
            free(timer)
            return
        at = &at[0].next


cdef void _timer_mod(void *timer, int64_t expire_ms, void *opaque) noexcept nogil:
    (<Timer *>timer).expire_ms = expire_ms
    (<Timer *>timer).armed = True


cdef void _ignore_fd(int fd, void *opaque) noexcept nogil:
    pass  # for event loops that register sockets once (QEMU on Windows); we poll each time


cdef void _notify(void *opaque) noexcept nogil:
    (<State *>opaque).notified = True  # a socket can take data again: poll without sleeping


# SLIRP_POLL_* and poll(2)'s flag, pair by pair (slirp asks for the first three).
cdef int POLL_FLAGS[10]
POLL_FLAGS[:] = [SLIRP_POLL_IN, POLLIN, SLIRP_POLL_OUT, POLLOUT, SLIRP_POLL_PRI, POLLPRI,
                 SLIRP_POLL_ERR, POLLERR, SLIRP_POLL_HUP, POLLHUP]


cdef int _translate(int flags, bint to_poll) noexcept nogil:
    cdef int i, result = 0
    cdef int have = 0 if to_poll else 1
    for i in range(0, 10, 2):
        if flags & POLL_FLAGS[i + have]:
            result |= POLL_FLAGS[i + 1 - have]
    return result


cdef int _add_poll(int fd, int events, void *opaque) noexcept nogil:
    cdef State *st = <State *>opaque
    cdef pollfd *grown
    if st.nfds == st.fds_size:
        grown = <pollfd *>realloc(st.fds, 2 * st.fds_size * sizeof(pollfd))
        if grown == NULL:
            return -1  # slirp_pollfds_poll then asks for index -1: no events for it
        st.fds, st.fds_size = grown, 2 * st.fds_size
    st.fds[st.nfds].fd, st.fds[st.nfds].revents = fd, 0
    st.fds[st.nfds].events = <short>_translate(events, True)
    st.nfds += 1
    return st.nfds - 1


cdef int _get_revents(int idx, void *opaque) noexcept nogil:
    cdef State *st = <State *>opaque
    if idx < 0 or idx >= st.nfds:
        return 0
    return _translate(st.fds[idx].revents, False)


cdef SlirpCb CALLBACKS = SlirpCb(
    send_packet=_send_packet, guest_error=_guest_error, clock_get_ns=_clock_get_ns,
    timer_new=_timer_new, timer_free=_timer_free, timer_mod=_timer_mod,
    register_poll_fd=_ignore_fd, unregister_poll_fd=_ignore_fd, notify=_notify,
    init_completed=NULL, timer_new_opaque=_timer_new_opaque)


# --- the loop ----------------------------------------------------------------------------

cdef bint _established_tcp(const uint8_t *frame, ssize_t n) noexcept nogil:
    """A TCP segment that starts nothing (no bare SYN) and is not a fragment: what the
    egress policy always passes, decided without the GIL."""
    cdef int header
    cdef const uint8_t *tcp
    if n < ETH_HLEN + 40:
        return False
    if frame[12] == 0x08 and frame[13] == 0x00:  # IPv4
        header = (frame[ETH_HLEN] & 0x0F) * 4
        if frame[ETH_HLEN] >> 4 != 4 or frame[ETH_HLEN + 9] != 6 or header < 20:
            return False
        if (frame[ETH_HLEN + 6] & 0x3F) or frame[ETH_HLEN + 7]:  # MF or an offset
            return False
    elif frame[12] == 0x86 and frame[13] == 0xDD:  # IPv6, no extension header
        header = 40
        if frame[ETH_HLEN] >> 4 != 6 or frame[ETH_HLEN + 6] != 6:
            return False
    else:
        return False
    if n < ETH_HLEN + header + 20:
        return False
    tcp = frame + ETH_HLEN + header
    return (tcp[13] & 0x12) != 0x02  # not SYN without ACK


def established_tcp(const uint8_t[:] frame) -> bool:
    """_established_tcp for tests: held to core.egress, which must pass all it passes."""
    return _established_tcp(&frame[0], frame.shape[0]) if frame.shape[0] else False


cdef bint _egress_passes(State *st, uint8_t *frame, ssize_t n) noexcept with gil:
    cdef object view
    cdef bytes reply
    cdef const char *data
    cdef size_t length
    try:
        view = PyMemoryView_FromMemory(<char *>frame, n, PyBUF_READ)
        passed, replies = (<object>st.egress).check(view)
        view.release()
        for reply in replies:  # held by `replies` while the GIL is let go
            data, length = reply, len(reply)
            with nogil:  # _to_bridge may wait for the bridge, which may need the GIL
                _to_bridge(st, data, length)
        return passed
    except BaseException as exc:
        _fail(st, exc)
        return False


cdef void _from_bridge(State *st, uint8_t *buffer) noexcept nogil:
    cdef ssize_t n
    cdef int i
    for i in range(BURST):
        n = recv(st.frame_fd, buffer, FRAME_BUFFER, MSG_DONTWAIT | MSG_TRUNC)
        if n < 0:
            return  # EAGAIN: drained (a failing socket shows as POLLERR next)
        if n == 0:
            st.stopping = True  # the bridge closed its end
            return
        if <size_t>n > st.max_frame:
            st.counters.oversize_from_bridge += 1
            continue
        if st.egress != NULL and not _established_tcp(buffer, n):
            if not _egress_passes(st, buffer, n):
                if st.stopping:
                    return
                continue
        st.counters.to_stack_frames += 1
        slirp_input(st.slirp, buffer, <int>n)


cdef int64_t _fire_timers(State *st) noexcept nogil:
    """Fire what is due; the earliest still armed (ms), or -1."""
    cdef Timer *timer
    cdef int64_t now_ms, earliest
    cdef bint fired = True
    while fired:  # a callback may free or re-arm timers: walk again after each one
        fired = False
        now_ms = _now_ns() // 1000000
        earliest = -1
        timer = st.timers
        while timer != NULL:
            if timer.armed and timer.expire_ms <= now_ms:
                timer.armed = False
                st.counters.timers_fired += 1
                if timer.cb != NULL:
                    timer.cb(timer.cb_opaque)
                else:
                    slirp_handle_timer(st.slirp, timer.id, timer.cb_opaque)
                fired = True
                break
            if timer.armed and (earliest < 0 or timer.expire_ms < earliest):
                earliest = timer.expire_ms
            timer = timer.next
    return earliest


cdef int _loop(State *st, uint8_t *buffer) noexcept nogil:
    """The pump thread's loop; 0 when asked to stop or the bridge went, else an errno."""
    cdef uint32_t timeout
    cdef int64_t earliest, wait_ms
    cdef int ready
    while not st.stopping:
        earliest = _fire_timers(st)
        timeout = UINT32_MAX
        st.nfds = 2
        st.fds[0].fd, st.fds[0].events, st.fds[0].revents = st.frame_fd, POLLIN, 0
        st.fds[1].fd, st.fds[1].events, st.fds[1].revents = st.stop_fd, POLLIN, 0
        slirp_pollfds_fill(st.slirp, &timeout, _add_poll, <void *>st)
        wait_ms = -1 if timeout == UINT32_MAX else <int64_t>timeout
        if earliest >= 0:
            earliest -= _now_ns() // 1000000
            if earliest < 0:
                earliest = 0
            if wait_ms < 0 or earliest < wait_ms:
                wait_ms = earliest
        if st.notified:
            wait_ms, st.notified = 0, False
        ready = poll(st.fds, st.nfds, <int>wait_ms)
        st.counters.pump_wakeups += 1
        if ready < 0 and errno != EINTR:
            return errno
        if ready > 0 and st.fds[1].revents:
            return 0
        slirp_pollfds_poll(st.slirp, ready < 0, _get_revents, <void *>st)
        if ready > 0 and st.fds[0].revents & POLLIN:
            _from_bridge(st, buffer)
        elif ready > 0 and st.fds[0].revents & (POLLHUP | POLLERR):
            return 0  # the bridge closed its end
    return 0


cdef int _parse4(object packed, in_addr *out) except -1:
    if len(packed) != 4:
        raise ValueError("an IPv4 address is 4 bytes")
    memcpy(&out.s_addr, <const char *>packed, 4)
    return 0


cdef int _parse6(object packed, in6_addr *out) except -1:
    if len(packed) != 16:
        raise ValueError("an IPv6 address is 16 bytes")
    memcpy(out.s6_addr, <const char *>packed, 16)
    return 0


cdef class Stack:
    """One libslirp instance. Addresses are packed (ipaddress's .packed)."""

    cdef State st
    cdef object _running

    def __cinit__(self):
        memset(&self.st, 0, sizeof(State))
        self.st.frame_fd = self.st.stop_fd = -1
        self.st.fds_size = 16
        self.st.fds = <pollfd *>malloc(self.st.fds_size * sizeof(pollfd))
        if self.st.fds == NULL:
            raise MemoryError()

    def __init__(self, *, bytes network, bytes netmask, bytes host, bytes dhcp_start,
                 bytes nameserver, bytes prefix6, int prefix6_len, bytes host6,
                 bytes nameserver6, int mtu, bint restricted, bint dns, object egress=None):
        """restricted: slirp carries nothing from the board to the host or its networks
        (forwards still work); dns: slirp's nameserver address answers from the host's
        resolver; egress: core.egress.Egress judging the board's frames and learning the
        flows of its udp_forwards from the frames towards the board, or None."""
        cdef SlirpConfig cfg
        memset(&cfg, 0, sizeof(SlirpConfig))
        cfg.version = 4
        cfg.restricted = 1 if restricted else 0
        cfg.in_enabled = True
        _parse4(network, &cfg.vnetwork)
        _parse4(netmask, &cfg.vnetmask)
        _parse4(host, &cfg.vhost)
        _parse4(dhcp_start, &cfg.vdhcp_start)
        _parse4(nameserver, &cfg.vnameserver)
        cfg.in6_enabled = True
        _parse6(prefix6, &cfg.vprefix_addr6)
        cfg.vprefix_len = prefix6_len
        _parse6(host6, &cfg.vhost6)
        _parse6(nameserver6, &cfg.vnameserver6)
        cfg.if_mtu = mtu
        cfg.if_mru = mtu
        cfg.disable_dns = not dns
        self.st.max_frame = mtu + ETH_HLEN + 4
        if egress is not None:
            Py_XINCREF(<PyObject *>egress)
            self.st.egress = <PyObject *>egress
            _port_bits(egress.udp_forwards, self.st.udp_forwards)
            self.st.udp_forwarded = bool(egress.udp_forwards)
        self.st.slirp = slirp_new(&cfg, &CALLBACKS, &self.st)
        if self.st.slirp == NULL:
            raise OSError("libslirp refused its configuration")

    def add_forward(self, bint udp, bytes host_addr, int host_port, bytes board_addr,
                    int board_port) -> int:
        """slirp_add_hostfwd before `run`; 0, or the errno of the failed bind."""
        cdef in_addr host, board
        _parse4(host_addr, &host)
        _parse4(board_addr, &board)
        self._check_open()
        errno = 0
        if slirp_add_hostfwd(self.st.slirp, udp, host, host_port, board, board_port) < 0:
            return errno or 98  # EADDRINUSE is what a failed listen mostly is
        return 0

    def run(self, int frame_fd, int stop_fd) -> None:
        """Serve until stop_fd is readable or frame_fd's peer closes; in one thread only."""
        cdef uint8_t *buffer
        cdef int failed
        cdef object error
        self._check_open()
        buffer = <uint8_t *>malloc(FRAME_BUFFER)
        if buffer == NULL:
            raise MemoryError()
        self.st.frame_fd, self.st.stop_fd, self.st.stopping = frame_fd, stop_fd, False
        try:
            with nogil:
                failed = _loop(&self.st, buffer)
        finally:
            free(buffer)
        if self.st.error != NULL:
            error = <object>self.st.error
            Py_XDECREF(self.st.error)
            self.st.error = NULL
            raise error
        if failed:
            raise OSError(failed, strerror(failed).decode())

    def counters(self) -> dict:
        cdef Counters c = self.st.counters
        return dict(zip(COUNTERS, (c.to_stack_frames, c.from_stack_frames, c.to_bridge_waits,
                                   c.to_bridge_dropped, c.oversize_from_bridge, c.guest_errors,
                                   c.timers_fired, c.pump_wakeups)))

    def close(self) -> None:
        """slirp_cleanup (closes its sockets, the forwards' listeners too); after `run`."""
        self._release()

    cdef void _release(self) noexcept:
        cdef Timer *timer
        if self.st.slirp != NULL:
            slirp_cleanup(self.st.slirp)  # frees its timers through timer_free
            self.st.slirp = NULL
        while self.st.timers != NULL:  # any it did not free
            timer = self.st.timers
            self.st.timers = timer.next
            free(timer)
        Py_XDECREF(self.st.egress)
        self.st.egress = NULL

    def _check_open(self):
        if self.st.slirp == NULL:
            raise ValueError("the slirp stack is closed")

    def __dealloc__(self):
        self._release()
        Py_XDECREF(self.st.error)
        self.st.error = NULL
        free(self.st.fds)


def version() -> str:
    """The libslirp this module was linked with at run time."""
    return slirp_version_string().decode()
