# The data path engine: IN transfers delivered to the link, the link's frames batched
# into OUT transfers, all in C, in one event thread, with no Python per transfer or per
# frame.
#
# It knows nothing of the transport. It fills its own transfer records (eng_xfer) and
# hands them to the transport through a table of C functions (eng_ops: submit,
# cancel, handle what is ready, ...); the transport calls engine_in_done /
# engine_out_done when one ends, in the engine's thread. Two transports drive it:
# libusb (usb.pyx: the real device) and the simulated device (simlink.pyx), so every
# test on the simulated device runs the code that moves frames on real hardware.
#
# Nor does it know the link: frames go out and come in through the link table of the
# RxPath / TxPath it drives (link.pxd: deliver, flush, fill, and the fd it polls; the
# TAP with offload in taplink.pxd, any one-frame-per-read descriptor in link.pxd).
# "TAP" below is whichever link that is.
#
# Included (not cimported) by each adapter's .pyx: each adapter subclasses Engine, and
# the engine's C functions are the transports' completion callbacks, so each extension
# compiles its own copy of the one source.
#
# Locking: Shared.lock guards the engine's state. The GIL may be taken while holding
# it (the simulated device's submit does), never the other way round: every Python
# method below takes the lock with the GIL released (_lock).

from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport int64_t
from libc.errno cimport errno
from posix.unistd cimport write, close, read
import os
import threading

from eembridge._fast.eem cimport eem_deframer, eem_command_record
from eembridge._fast.datapath cimport RxPath, TxPath
from eembridge._fast.rxdeliver cimport rx_state, rx_deliver, rx_flush, rx_slot_offset
from eembridge._fast.txfill cimport (tx_state, tx_has_room, tx_fill_one, tx_release_oldest,
                                     tx_unhold_newest, TX_HELD_MAX)

from eembridge.core.events import Echo, EchoResponse, Hint
from eembridge.core.protocol import CMD_ECHO, CMD_ECHO_RESPONSE
from eembridge.core.transport import Direction, Status, TransportGone


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN, POLLERR, POLLHUP, POLLNVAL

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_mutex_destroy(pthread_mutex_t*)


cdef enum:
    # How a transfer ended: the engine's own statuses (libusb_transfer_status order,
    # so the names line up with transport.Status; each adapter maps onto them).
    ENG_COMPLETED = 0
    ENG_ERROR = 1
    ENG_TIMED_OUT = 2
    ENG_CANCELLED = 3
    ENG_STALL = 4
    ENG_NO_DEVICE = 5
    ENG_OVERFLOW = 6
    N_STATUS = 7

cdef enum:
    ENG_IN = 0
    ENG_OUT = 1

cdef enum:
    # What eng_ops.submit returns.
    ENG_SUBMITTED = 0
    ENG_SUBMIT_GONE = -1  # the device is gone
    ENG_SUBMIT_FAILED = -2  # refused; the transport's code is in Shared.submit_code

cdef enum:
    MAX_IN = 64  # native IN transfers in flight, at most
    # Commands waiting for the bridge thread, and the bytes of their data (Echo
    # payloads); beyond either: dropped, counted. 32 whole-payload slots were too few:
    # the simulated device's 50 Echo Responses in a row, each in its own transfer, lost
    # 18 whenever the bridge thread polled late (a loaded machine); the Python loop
    # loses none. Now a burst that fills 64 KB of IN transfers fits.
    CMD_QUEUE = 1024
    CMD_ARENA = 65536
    MAX_POLLFDS = 15  # the transport's; libusb's on Linux: usbfs fd, event fd, timerfd
    MAX_BUSY_POLLS = 100000  # eembridge.core.transport.MAX_BUSY_POLLS

cdef object _STATUS = {
    ENG_COMPLETED: Status.COMPLETED,
    ENG_ERROR: Status.ERROR,
    ENG_TIMED_OUT: Status.TIMED_OUT,
    ENG_CANCELLED: Status.CANCELLED,
    ENG_STALL: Status.STALL,
    ENG_NO_DEVICE: Status.NO_DEVICE,
    ENG_OVERFLOW: Status.OVERFLOW,
}


cdef struct eng_xfer:
    # One transfer of the engine. The engine sets buffer, length, direction and index
    # before submit; the transport sets actual and status before the completion call.
    unsigned char* buffer
    int length
    int actual
    int status  # ENG_*
    int direction  # ENG_IN / ENG_OUT
    int index  # IN: its slot (sequence % in_flight); OUT: its place in NativeOut.pool
    bint done
    void* handle  # the transport's (a libusb_transfer*); made by submit, freed by release
    void* shared  # the engine's Shared


ctypedef struct eng_ops:
    # The transport, as the engine sees it. All called from the engine's thread with
    # Shared.lock held, except submit (also from rx_resume in the bridge thread, lock
    # held) and release / in_memory / free_in_memory (start and end, no transfer out).
    int (*submit)(void* ctx, eng_xfer* x) noexcept nogil  # ENG_SUBMITTED / _GONE / _FAILED
    void (*cancel)(void* ctx, eng_xfer* x) noexcept nogil  # it still completes, CANCELLED
    # One or more of the transport's poll fds is ready (or its timeouts are due):
    # complete what ended (engine_in_done / engine_out_done). Called without the lock.
    void (*handle_ready)(void* ctx) noexcept nogil
    # The longest the event thread may sleep given the transport's own timeouts; NULL: none.
    int (*next_timeout)(void* ctx, int wait_ms) noexcept nogil
    void (*interrupt)(void* ctx) noexcept nogil  # wake the event thread (its poll set changed)
    void (*release)(void* ctx, eng_xfer* x) noexcept nogil  # free x.handle; NULL: none kept
    # Memory IN transfers should land in (usbfs-mapped), copied into the ring on
    # completion; NULL function or result: they land in the ring.
    unsigned char* (*in_memory)(void* ctx, size_t size) noexcept nogil
    void (*free_in_memory)(void* ctx, unsigned char* memory, size_t size) noexcept nogil


cdef struct QueuedCommand:
    int command
    int param
    int length
    int offset  # of its data in NativeIn.command_data


cdef struct NativeIn:
    # The native IN path (start_rx): the event thread deframes and writes every IN
    # transfer to the TAP as it completes and resubmits it; the bridge thread only
    # sees commands, stalls and the device going (rx_poll). All under Shared.lock.
    rx_state* rx
    bint on
    bint closing
    bint gone
    int in_flight  # transfers to keep submitted
    int length  # bytes per transfer (the ring's slot size)
    # IN transfers may land in memory the transport provides (libusb: mapped from
    # usbfs), one slot per transfer in flight, and are copied into their ring slot on
    # completion. usbfs then neither allocates a kernel buffer per URB nor copies it
    # out: peer→host cost 14% less CPU per MB in the guest (bench/RESULTS.md,
    # session 9). NULL: transfers land in the ring itself.
    unsigned char* devmem
    size_t devmem_size  # asked of the transport (0: not asked); with devmem NULL, refused
    int64_t head  # sequence number of the oldest transfer not yet delivered
    int64_t next  # sequence number of the next transfer to submit
    eng_xfer xfer[MAX_IN]  # sequence % in_flight -> its transfer
    int pending  # submitted, completion not seen yet
    int stalls  # stalls not yet handed to the bridge (it clears the halt, then rx_resume)
    bint halted  # a stall is being cleared: do not resubmit until rx_resume
    int64_t completed
    int64_t status_counts[N_STATUS]
    int64_t submit_errors
    int64_t commands_dropped
    QueuedCommand commands[CMD_QUEUE]
    int n_commands
    unsigned char command_data[CMD_ARENA]
    int command_bytes


cdef struct NativeOut:
    # The native OUT path (start_tx): TAP frames are read, batched and submitted by
    # the event thread, when the TAP is readable and when an OUT transfer completes
    # and frees room. All under Shared.lock.
    tx_state* tx
    bint on
    bint closing
    bint gone
    bint halted  # a stall is being cleared: submit nothing until tx_resume
    bint wants_tap  # room left and the TAP drained: the event thread polls it
    bint tap_failed  # poll said the TAP is broken (deleted): the bridge thread stops
    int64_t backpressure  # times the TAP stopped being read because OUT was full
    # Data transfers in flight, in submission order (they complete in that order).
    eng_xfer* fifo[TX_HELD_MAX]
    int frames[TX_HELD_MAX]
    int first
    int count
    # Every record; those not in flight are spare, reused last out first in so that
    # the transport's handles stay few (one per transfer ever in flight at once).
    eng_xfer pool[TX_HELD_MAX]
    eng_xfer* spare[TX_HELD_MAX]
    int n_spare
    int pending  # submitted, completion not seen yet
    int stalls  # stalls not yet handed to the bridge (it clears the halt, then tx_resume)
    int64_t transfers  # completed in full: their frames were really sent
    int64_t frames_sent
    int64_t bytes_sent
    int64_t dropped_by_status[N_STATUS]  # frames of transfers that ended badly
    int64_t errors_by_status[N_STATUS]  # those transfers
    int64_t short_writes  # transfers the device took only part of (frames dropped)
    int64_t short_write_frames
    int64_t closing_frames  # frames in flight when the transport closed
    int64_t gone_frames  # frames of transfers that ended or were refused NO_DEVICE
    int64_t submit_errors
    int64_t submit_error_frames


cdef struct Shared:
    pthread_mutex_t lock
    int efd  # readable while the bridge thread has something to look at
    eng_ops ops
    void* ctx  # the transport's, passed to every ops call
    int submit_code  # the transport's code of the last ENG_SUBMIT_FAILED
    NativeIn nin
    NativeOut nout


cdef inline void _notify(Shared* shared) noexcept nogil:
    cdef unsigned long long one = 1
    write(shared.efd, &one, 8)


cdef inline void _lock(Shared* shared) noexcept:
    """Take the lock from a thread holding the GIL: released meanwhile (see the top)."""
    with nogil:
        pthread_mutex_lock(&shared.lock)


cdef inline void _unlock(Shared* shared) noexcept nogil:
    pthread_mutex_unlock(&shared.lock)


cdef inline unsigned char* _in_ring_slot(NativeIn* n, int64_t seq) noexcept nogil:
    """Where IN transfer `seq` is deframed: its slot in the ring."""
    return <unsigned char*>n.rx.ring + rx_slot_offset(n.rx, seq)


cdef inline unsigned char* _in_landing(NativeIn* n, int64_t seq) noexcept nogil:
    """Where the data of IN transfer `seq` lands: its slot of the transport's memory
    (a slot is free again once `seq` is delivered, before `seq + in_flight` is
    submitted), or straight in its ring slot."""
    if n.devmem != NULL:
        return n.devmem + (seq % n.in_flight) * n.length
    return _in_ring_slot(n, seq)


cdef int _rx_submit(Shared* shared) noexcept nogil:
    """Submit the transfer for the next sequence number. Caller holds the lock."""
    cdef NativeIn* n = &shared.nin
    cdef eng_xfer* x
    cdef int rc
    if n.next - n.head >= n.in_flight:
        return ENG_SUBMITTED
    x = &n.xfer[n.next % n.in_flight]
    x.buffer = _in_landing(n, n.next)
    x.length = n.length
    x.actual = 0
    x.status = ENG_COMPLETED
    x.done = False
    rc = shared.ops.submit(shared.ctx, x)
    if rc != ENG_SUBMITTED:
        if rc == ENG_SUBMIT_GONE:
            n.gone = True
        else:
            n.submit_errors += 1
        return rc
    n.next += 1
    n.pending += 1
    return ENG_SUBMITTED


cdef void _queue_commands(NativeIn* n) noexcept nogil:
    """Copy the commands of the last deframe for the bridge thread (rx_poll)."""
    cdef eem_deframer* d = n.rx.d
    cdef eem_command_record* record
    cdef QueuedCommand* q
    cdef Py_ssize_t j
    cdef int length
    for j in range(d.n_commands):
        record = &d.commands[j]
        length = 0
        if record.command == 0 or record.command == 1:  # Echo / Echo Response carry data
            length = record.param
        if n.n_commands >= CMD_QUEUE or n.command_bytes + length > CMD_ARENA:
            n.commands_dropped += 1
            continue
        q = &n.commands[n.n_commands]
        q.command = record.command
        q.param = record.param
        q.length = length
        q.offset = n.command_bytes
        memcpy(n.command_data + n.command_bytes, d.command_data + record.data_offset, length)
        n.command_bytes += length
        n.n_commands += 1


cdef void engine_in_done(eng_xfer* x) noexcept nogil:
    """An IN transfer ended (x.status, x.actual set): deliver, in order, what is ready."""
    cdef Shared* shared = <Shared*>x.shared
    cdef NativeIn* n = &shared.nin
    cdef eng_xfer* head
    cdef int status, actual
    cdef int64_t seq
    cdef bint tell = False
    cdef Py_ssize_t commands
    pthread_mutex_lock(&shared.lock)
    n.pending -= 1
    x.done = True
    # Completions come back in order on one endpoint; delivering strictly by sequence
    # number keeps the deframer's stream right even if they did not.
    while n.head < n.next and n.xfer[n.head % n.in_flight].done:
        head = &n.xfer[n.head % n.in_flight]
        status = head.status
        actual = head.actual
        seq = n.head
        n.head += 1
        if status == ENG_CANCELLED or n.closing:
            continue
        if status == ENG_NO_DEVICE:
            n.gone = True
            tell = True
            continue
        if status != ENG_COMPLETED:
            n.status_counts[status if <unsigned int>status < N_STATUS else ENG_ERROR] += 1
            if status != ENG_TIMED_OUT:
                actual = 0  # an error's data, if any, is not to be trusted
            if status == ENG_STALL:
                n.stalls += 1
                n.halted = True
            tell = True
        if n.devmem != NULL and actual > 0:
            memcpy(_in_ring_slot(n, seq), _in_landing(n, seq), actual)
        # Every non-normal end of a transfer also ends the EEM stream (short).
        commands = rx_deliver(n.rx, seq, actual,
                              status != ENG_COMPLETED or actual < n.length)
        n.completed += 1
        if commands > 0:
            _queue_commands(n)
            tell = True
    if not (n.halted or n.gone or n.closing):
        while n.next - n.head < n.in_flight:
            if _rx_submit(shared) != ENG_SUBMITTED:
                tell = True
                break
    pthread_mutex_unlock(&shared.lock)
    if tell:
        _notify(shared)


cdef bint _tx_pump(Shared* shared) noexcept nogil:
    """Fill and submit OUT transfers while there is room and the TAP has frames.

    Event thread, lock held. Returns True if the bridge thread must be told (a
    submission failed: the device may be gone).
    """
    cdef NativeOut* o = &shared.nout
    cdef tx_state* tx = o.tx
    cdef eng_xfer* x
    cdef Py_ssize_t start, length
    cdef int frames, rc, k
    cdef bint drained = False
    while not (o.halted or o.closing or o.gone):
        if not tx_has_room(tx):
            if o.wants_tap:
                o.wants_tap = False  # backpressure: completions refill from here
                o.backpressure += 1
            return False
        length = tx_fill_one(tx, &start, &frames, &drained)
        if length > 0:
            # tx_has_room bounds what is held to TX_HELD_MAX: a spare is always there.
            o.n_spare -= 1
            x = o.spare[o.n_spare]
            x.buffer = tx.base + start
            x.length = <int>length
            x.actual = 0
            x.status = ENG_COMPLETED
            x.done = False
            rc = shared.ops.submit(shared.ctx, x)
            if rc != ENG_SUBMITTED:
                tx_unhold_newest(tx)
                o.spare[o.n_spare] = x
                o.n_spare += 1
                if rc == ENG_SUBMIT_GONE:
                    o.gone = True
                    o.gone_frames += frames  # lost with the device, not refused by it
                else:
                    o.submit_errors += 1
                    o.submit_error_frames += frames
                return True
            k = (o.first + o.count) % TX_HELD_MAX
            o.fifo[k] = x
            o.frames[k] = frames
            o.count += 1
            o.pending += 1
        if drained or length < 0:
            o.wants_tap = True  # the TAP is polled again (the event loop's next turn)
            return False
    return False


cdef void engine_out_done(eng_xfer* x) noexcept nogil:
    """A data OUT transfer ended (x.status, x.actual set): count it, free its memory
    in order, refill."""
    cdef Shared* shared = <Shared*>x.shared
    cdef NativeOut* o = &shared.nout
    cdef eng_xfer* t
    cdef int k, status, frames
    cdef bint tell = False
    pthread_mutex_lock(&shared.lock)
    o.pending -= 1
    x.done = True
    while o.count and o.fifo[o.first].done:
        t = o.fifo[o.first]
        frames = o.frames[o.first]
        status = t.status
        if o.closing or status == ENG_CANCELLED:
            o.closing_frames += frames
        elif status == ENG_NO_DEVICE:
            # Lost with the device, as the Python loop counts them (the disconnect's
            # no_device, in its log line): not an error of the transfer.
            o.gone_frames += frames
            o.gone = True
            tell = True
        elif status == ENG_COMPLETED and t.actual == t.length:
            o.transfers += 1
            o.frames_sent += frames
            o.bytes_sent += t.actual
        elif status == ENG_COMPLETED:
            o.short_writes += 1  # part of it went: its frames may be cut, count them lost
            o.short_write_frames += frames
        else:
            # The OUT-failure policy, the same as the Python loop's (Bridge._out_done):
            # a stalled or timed-out batch is dropped and counted, the bridge thread
            # clears the halt, and TCP resends what mattered. Not resent: the rest would
            # reach the device after the transfers queued behind it, and after a stall
            # a resend could duplicate what the device already took.
            k = status if <unsigned int>status < N_STATUS else ENG_ERROR
            o.errors_by_status[k] += 1
            o.dropped_by_status[k] += frames
            if status == ENG_STALL:
                o.stalls += 1
                o.halted = True
                tell = True
        tx_release_oldest(o.tx)
        o.spare[o.n_spare] = t
        o.n_spare += 1
        o.first = (o.first + 1) % TX_HELD_MAX
        o.count -= 1
    # Refill from here only under backpressure: otherwise the event loop polls the TAP
    # and a read here would mostly find it empty (one wasted syscall per completion,
    # e.g. per TCP ACK sent).
    if not o.wants_tap and _tx_pump(shared):
        tell = True
    pthread_mutex_unlock(&shared.lock)
    if tell:
        _notify(shared)


cdef class Engine:
    """The engine's Python face: the bridge's NativeDataPath (eembridge.core.transport).

    A transport adapter subclasses it, sets shared.ops / shared.ctx and the poll set
    (poll_fds, n_poll_fds, poll_timeouts), and calls _start_thread once it can run.
    """

    cdef Shared* shared
    cdef int stop
    cdef object thread
    cdef object _rx_owner  # the RxPath whose rx_state the native IN path delivers through
    cdef object _tx_owner  # the TxPath whose tx_state the native OUT path fills
    cdef readonly int busy_polls
    # What the event thread did (its thread only writes them; racy reads are fine):
    # polls that found nothing, waits that slept, passes through the transport and TAP.
    cdef int64_t loop_empty_polls, loop_sleeps, loop_usb_passes, loop_tap_passes
    # The transport's fds, fixed for the thread's life; one more slot for the TAP.
    cdef pollfd poll_fds[MAX_POLLFDS + 1]
    cdef int n_poll_fds
    # With no fd of its own for timeouts (libusb without timerfd), a poll that timed
    # out means the transport's timeouts are due: handle_ready runs then too.
    cdef bint poll_timeouts

    def __cinit__(self, *args, **kwargs):
        cdef int i
        self.shared = <Shared*>malloc(sizeof(Shared))
        if self.shared == NULL:
            raise MemoryError()
        memset(self.shared, 0, sizeof(Shared))
        pthread_mutex_init(&self.shared.lock, NULL)
        self.shared.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.shared.efd < 0:
            raise OSError(errno, os.strerror(errno))
        for i in range(MAX_IN):
            self.shared.nin.xfer[i].shared = self.shared
        for i in range(TX_HELD_MAX):
            self.shared.nout.pool[i].shared = self.shared

    cdef int _set_busy_polls(self, int busy_polls) except -1:
        if not 0 <= busy_polls <= MAX_BUSY_POLLS:
            raise ValueError(f"busy_polls {busy_polls} out of range (0..{MAX_BUSY_POLLS})")
        self.busy_polls = busy_polls
        return 0

    cdef int _check_open(self) except -1:
        """Raise TransportGone unless transfers can be submitted (the adapter says)."""
        return 0

    cdef int _submit_failed(self, int code) except -1:
        """Raise the adapter's error for a refused submission (its code)."""
        raise OSError(f"submitting an IN transfer failed ({code})")

    cdef _start_thread(self, name):
        self.thread = threading.Thread(target=self._events, name=name, daemon=True)
        self.thread.start()

    cdef _stop_thread(self):
        self.stop = 1
        if self.shared.ops.interrupt != NULL:
            self.shared.ops.interrupt(self.shared.ctx)
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _events(self):
        """The event thread: poll the transport's fds and the TAP, run what is ready.

        One thread for both directions: a ping costs one wakeup fewer than with the TAP
        read by another thread, and no lock passes between two busy threads
        (bench/RESULTS.md, session 7).
        """
        cdef pollfd* fds = self.poll_fds
        cdef Shared* shared = self.shared
        cdef int n = self.n_poll_fds, nf, rc, i, idle = 0, wait_ms
        cdef bint ready, tell
        cdef NativeOut* o = &shared.nout
        with nogil:
            while not self.stop:
                nf = n
                if o.on and o.wants_tap and not (o.halted or o.gone or o.closing
                                                 or o.tap_failed):
                    fds[n].fd = o.tx.link.fd
                    fds[n].events = POLLIN
                    nf = n + 1
                # Busy polling: right after work, more work is likely within
                # microseconds (the next completion, the next TCP segment); sleeping
                # and being woken for it costs more than looking again.
                wait_ms = 0 if idle < self.busy_polls else 1000
                if wait_ms and shared.ops.next_timeout != NULL:
                    wait_ms = shared.ops.next_timeout(shared.ctx, wait_ms)
                rc = poll(fds, nf, wait_ms)
                if rc < 0:
                    continue  # EINTR
                if wait_ms:
                    self.loop_sleeps += 1
                ready = rc == 0 and self.poll_timeouts  # the transport's timeouts are due
                if rc == 0:
                    idle += 1
                    self.loop_empty_polls += 1
                else:
                    idle = 0
                for i in range(n):
                    if fds[i].revents:
                        ready = True
                if ready:
                    self.loop_usb_passes += 1
                    shared.ops.handle_ready(shared.ctx)
                    # Offload merges the TCP segments of every IN transfer this pass
                    # completed; they go up now, before the next wait.
                    pthread_mutex_lock(&shared.lock)
                    if shared.nin.rx != NULL:
                        rx_flush(shared.nin.rx)
                    pthread_mutex_unlock(&shared.lock)
                if nf > n and fds[n].revents & (POLLERR | POLLHUP | POLLNVAL):
                    # Reading would fail at once, every turn: stop looking; the bridge
                    # thread sees the same error on its own poll and stops the bridge.
                    o.tap_failed = True
                elif nf > n and fds[n].revents:
                    self.loop_tap_passes += 1
                    pthread_mutex_lock(&shared.lock)
                    tell = _tx_pump(shared)
                    pthread_mutex_unlock(&shared.lock)
                    if tell:
                        _notify(shared)

    def fileno(self):
        return self.shared.efd

    # -- the native IN path ------------------------------------------------------------

    def start_rx(self, RxPath rxpath not None, int in_flight):
        """Keep `in_flight` IN transfers submitted into rxpath's ring, delivered from C.

        From now on IN transfers never reach completions(): the event thread deframes
        each one in place, writes its frames to the TAP, and resubmits it. The caller
        must not deliver through rxpath itself while this transport lives, and polls
        rx_poll() when fileno() is readable (commands, stalls, the device going).
        """
        cdef rx_state* rx = &rxpath.state
        cdef Shared* shared = self.shared
        cdef NativeIn* n = &shared.nin
        cdef int rc = ENG_SUBMITTED
        cdef int i
        self._check_open()
        if n.on:
            raise RuntimeError("the native IN path is already running")
        if not 1 <= in_flight <= MAX_IN:
            raise ValueError(f"in_flight {in_flight} out of range 1..{MAX_IN}")
        if rx.size // rx.slot_size < in_flight + 1:
            raise ValueError(f"the ring holds {rx.size // rx.slot_size} slots; "
                             f"{in_flight} in flight need {in_flight + 1}")
        _lock(shared)
        n.rx = rx
        n.in_flight = in_flight
        n.length = rx.slot_size
        for i in range(MAX_IN):
            n.xfer[i].direction = ENG_IN
            n.xfer[i].index = i
        if shared.ops.in_memory != NULL:
            n.devmem_size = in_flight * n.length
            n.devmem = shared.ops.in_memory(shared.ctx, n.devmem_size)
        self._rx_owner = rxpath
        n.on = True
        while n.next - n.head < in_flight and rc == ENG_SUBMITTED:
            rc = _rx_submit(shared)
        _unlock(shared)
        if n.gone:
            raise TransportGone("device gone")
        if rc != ENG_SUBMITTED:
            self._submit_failed(shared.submit_code)

    @property
    def native_rx(self):
        """Whether IN transfers are delivered from C (start_rx)."""
        return bool(self.shared.nin.on)

    def rx_poll(self):
        """(commands, stalls, gone, short_of): what the bridge thread must act on.

        commands: Echo / EchoResponse / Hint events, in arrival order; stalls: IN stalls
        since the last poll (clear the halt, then rx_resume); gone: the device went;
        short_of: transfers that could not be resubmitted (rx_resume retries).
        """
        cdef NativeIn* n = &self.shared.nin
        cdef QueuedCommand* q
        cdef int i, stalls, short_of
        cdef bint gone
        events = []
        _lock(self.shared)
        try:
            for i in range(n.n_commands):
                q = &n.commands[i]
                if q.command == CMD_ECHO:
                    events.append(Echo(n.command_data[q.offset:q.offset + q.length]))
                elif q.command == CMD_ECHO_RESPONSE:
                    events.append(EchoResponse(n.command_data[q.offset:q.offset + q.length]))
                else:
                    events.append(Hint(q.command, q.param))
            n.n_commands = 0
            n.command_bytes = 0
            stalls = n.stalls
            n.stalls = 0
            gone = n.gone
            short_of = 0 if (n.halted or not n.on) else n.in_flight - <int>(n.next - n.head)
        finally:
            _unlock(self.shared)
        return events, stalls, gone, short_of

    def rx_resume(self):
        """After a stall was cleared (or a submission failed): fill up the IN transfers."""
        cdef Shared* shared = self.shared
        cdef NativeIn* n = &shared.nin
        cdef int rc = ENG_SUBMITTED
        if not n.on:
            return
        self._check_open()
        _lock(shared)
        n.halted = False
        while n.next - n.head < n.in_flight and rc == ENG_SUBMITTED and not n.closing:
            rc = _rx_submit(shared)
        _unlock(shared)
        if n.gone:
            raise TransportGone("device gone")
        if rc != ENG_SUBMITTED:
            self._submit_failed(shared.submit_code)

    def rx_stats(self):
        """Counters of the native IN path (racy reads of int64s: fine for counters)."""
        cdef NativeIn* n = &self.shared.nin
        errors = {}
        for status, count in enumerate(n.status_counts):
            if count:
                errors[_STATUS.get(status, Status.ERROR).value] = count
        return {"in_flight": n.next - n.head, "completed": n.completed, "errors": errors,
                "stalls": n.status_counts[ENG_STALL],
                "submit_errors": n.submit_errors, "commands_dropped": n.commands_dropped,
                "deframe_failures": n.rx.deframe_failures if n.rx != NULL else 0,
                # Where IN transfers land, and the bytes usbfs refused to map (0: none).
                "in_buffers": "usbfs-mapped" if n.devmem != NULL else "ring",
                "usbfs_refused": n.devmem_size if n.devmem == NULL else 0}

    cdef int _rx_cancel(self) except -1:
        """Cancel the native IN transfers; returns how many the transport still has."""
        cdef Shared* shared = self.shared
        cdef NativeIn* n = &shared.nin
        cdef int64_t seq
        cdef int pending
        if not n.on:
            return 0
        _lock(shared)
        n.closing = True
        for seq in range(n.head, n.next):
            if not n.xfer[seq % n.in_flight].done:
                shared.ops.cancel(shared.ctx, &n.xfer[seq % n.in_flight])
        pending = n.pending
        _unlock(shared)
        return pending

    cdef void _rx_free(self):
        """Once no IN transfer is with the transport: give back what it holds."""
        cdef Shared* shared = self.shared
        cdef NativeIn* n = &shared.nin
        cdef int i
        n.on = False
        _lock(shared)  # the event thread flushes too
        if n.rx != NULL:
            rx_flush(n.rx)  # segments held to merge are whole: they still go up
        n.rx = NULL
        _unlock(shared)
        self._release(n.xfer, MAX_IN)
        if n.devmem != NULL and shared.ops.free_in_memory != NULL:
            shared.ops.free_in_memory(shared.ctx, n.devmem, n.devmem_size)
        n.devmem = NULL
        n.devmem_size = 0
        self._rx_owner = None

    cdef void _release(self, eng_xfer* xfers, int count):
        cdef int i
        if self.shared.ops.release == NULL:
            return
        for i in range(count):
            if xfers[i].handle != NULL:
                self.shared.ops.release(self.shared.ctx, &xfers[i])
                xfers[i].handle = NULL

    # -- the native OUT path -----------------------------------------------------------

    def start_tx(self, TxPath txpath not None):
        """Send TAP frames from C: batched by txpath's rules, in txpath's memory.

        From now on the event thread reads txpath's TAP whenever there is room in
        flight; the caller no longer fills or releases txpath, and calls tx_poll() when
        fileno() is readable. Command transfers still go through submit_out.
        """
        cdef tx_state* tx = &txpath.state
        cdef Shared* shared = self.shared
        cdef NativeOut* o = &shared.nout
        cdef int i
        self._check_open()
        if o.on:
            raise RuntimeError("the native OUT path is already running")
        _lock(shared)
        o.tx = tx
        o.n_spare = 0
        for i in range(TX_HELD_MAX - 1, -1, -1):
            o.pool[i].direction = ENG_OUT
            o.pool[i].index = i
            o.spare[o.n_spare] = &o.pool[i]
            o.n_spare += 1
        o.wants_tap = True
        o.on = True
        _unlock(shared)
        self._tx_owner = txpath
        shared.ops.interrupt(shared.ctx)  # the event loop adds the TAP to its poll

    def tx_poll(self):
        """(stalls, gone): OUT stalls since the last poll (clear the halt, then
        tx_resume), and whether the device went."""
        cdef int stalls
        _lock(self.shared)
        stalls = self.shared.nout.stalls
        self.shared.nout.stalls = 0
        gone = bool(self.shared.nout.gone)
        _unlock(self.shared)
        return stalls, gone

    def tx_resume(self):
        """After an OUT stall was cleared: send again."""
        if not self.shared.nout.on:
            return
        _lock(self.shared)
        self.shared.nout.halted = False
        self.shared.nout.wants_tap = True
        _unlock(self.shared)
        self.shared.ops.interrupt(self.shared.ctx)  # the event loop polls the TAP again

    def tx_stats(self):
        """Counters of the native OUT path (racy reads of int64s: fine for counters)."""
        cdef NativeOut* o = &self.shared.nout
        dropped = {}
        errors = {}
        for status in range(N_STATUS):
            name = _STATUS.get(status, Status.ERROR).value
            if o.dropped_by_status[status]:
                dropped[name] = dropped.get(name, 0) + o.dropped_by_status[status]
            if o.errors_by_status[status]:
                errors[name] = errors.get(name, 0) + o.errors_by_status[status]
        if o.short_write_frames:
            dropped["short_write"] = o.short_write_frames
        if o.submit_error_frames:
            dropped["submit_error"] = o.submit_error_frames
        return {"transfers": o.transfers, "frames": o.frames_sent, "bytes": o.bytes_sent,
                "dropped": dropped, "errors": errors, "short_writes": o.short_writes,
                "submit_errors": o.submit_errors, "stalls": o.errors_by_status[ENG_STALL],
                "closing_frames": o.closing_frames, "gone_frames": o.gone_frames,
                "in_flight": o.count,
                "backpressure": o.backpressure,
                "bytes_in_flight": o.tx.in_flight if o.tx != NULL else 0}

    def loop_stats(self):
        """What the event thread did: per frame moved, these say what busy polling
        costs (empty polls) and what it saves (sleeps)."""
        return {"sleeps": self.loop_sleeps, "empty_polls": self.loop_empty_polls,
                "usb_passes": self.loop_usb_passes, "tap_passes": self.loop_tap_passes}

    cdef int _tx_cancel(self) except -1:
        """Cancel the native OUT transfers; returns how many the transport still has."""
        cdef Shared* shared = self.shared
        cdef NativeOut* o = &shared.nout
        cdef int i, pending
        cdef eng_xfer* x
        if not o.on:
            return 0
        _lock(shared)
        o.closing = True
        for i in range(o.count):
            x = o.fifo[(o.first + i) % TX_HELD_MAX]
            if not x.done:
                shared.ops.cancel(shared.ctx, x)
        pending = o.pending
        _unlock(shared)
        return pending

    cdef void _tx_free(self):
        """Once no OUT transfer is with the transport: give back what it holds."""
        cdef NativeOut* o = &self.shared.nout
        self._release(o.pool, TX_HELD_MAX)
        o.on = False
        o.tx = NULL
        self._tx_owner = None

    def __dealloc__(self):
        if self.shared != NULL:
            if self.shared.efd >= 0:
                close(self.shared.efd)
            pthread_mutex_destroy(&self.shared.lock)
            free(self.shared)
            self.shared = NULL
