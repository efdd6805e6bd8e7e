# cython: language_level=3, boundscheck=False, wraparound=False
"""libusb-1.0 asynchronous bulk transfers behind eembridge.core.transport.Transport.

uvloop habits: libusb calls a C callback (no GIL) when a transfer ends; the callback
pushes the transfer onto a C queue under a mutex and writes an eventfd. An event thread
polls libusb's fds (and, once start_tx runs, the TAP) with the GIL released and runs
libusb's event handling. Only completions() builds Python objects, one per transfer.

With the native data path (start_rx, start_tx) that one thread carries every frame both
ways: IN completions go to the TAP, TAP frames go into OUT transfers, and the bridge's
Python thread only hears of commands, stalls, unplugs and its own timers.

The device is opened with libusb_wrap_sys_device on a /dev/bus/usb/BBB/DDD descriptor
the caller opened: a permission problem is then a plain EACCES on a path we can name,
and the device is exactly the one discovery matched (no second enumeration here).
"""

from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport int64_t
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport errno
from posix.unistd cimport write, close, read
import os
import threading

from eem cimport eem_deframer, eem_command_record
from rxdeliver cimport rx_state, rx_deliver, rx_flush, rx_slot_offset, RX_STATE_CAPSULE
from txfill cimport (tx_state, tx_has_room, tx_fill_one, tx_release_oldest, tx_unhold_newest,
                     TX_STATE_CAPSULE, TX_HELD_MAX)

from eembridge.core.events import Echo, EchoResponse, Hint
from eembridge.core.protocol import CMD_ECHO, CMD_ECHO_RESPONSE
from eembridge.core.transport import Completion, DeviceInfo, Direction, Status, TransportGone


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

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_mutex_destroy(pthread_mutex_t*)

cdef extern from "libusb.h" nogil:
    ctypedef struct libusb_context:
        pass
    ctypedef struct libusb_device_handle:
        pass
    cdef struct libusb_transfer
    ctypedef void (*libusb_transfer_cb_fn)(libusb_transfer*) noexcept nogil
    cdef struct libusb_transfer:
        libusb_device_handle* dev_handle
        unsigned char flags
        unsigned char endpoint
        unsigned char type
        unsigned int timeout
        int status
        int length
        int actual_length
        libusb_transfer_cb_fn callback
        void* user_data
        unsigned char* buffer
    int LIBUSB_TRANSFER_COMPLETED, LIBUSB_TRANSFER_ERROR, LIBUSB_TRANSFER_TIMED_OUT
    int LIBUSB_TRANSFER_CANCELLED, LIBUSB_TRANSFER_STALL, LIBUSB_TRANSFER_NO_DEVICE
    int LIBUSB_TRANSFER_OVERFLOW
    int LIBUSB_ERROR_NO_DEVICE, LIBUSB_ERROR_NOT_FOUND, LIBUSB_ERROR_ACCESS, LIBUSB_ERROR_BUSY
    int LIBUSB_ERROR_NO_MEM
    int LIBUSB_OPTION_NO_DEVICE_DISCOVERY
    int libusb_init(libusb_context** ctx)
    void libusb_exit(libusb_context* ctx)
    int libusb_set_option(libusb_context* ctx, int option, ...)
    int libusb_wrap_sys_device(libusb_context* ctx, long sys_dev, libusb_device_handle** handle)
    void libusb_close(libusb_device_handle* handle)
    int libusb_kernel_driver_active(libusb_device_handle* handle, int interface_number)
    int libusb_detach_kernel_driver(libusb_device_handle* handle, int interface_number)
    int libusb_attach_kernel_driver(libusb_device_handle* handle, int interface_number)
    int libusb_claim_interface(libusb_device_handle* handle, int interface_number)
    int libusb_release_interface(libusb_device_handle* handle, int interface_number)
    int libusb_set_interface_alt_setting(libusb_device_handle* handle, int intf, int alt)
    int libusb_clear_halt(libusb_device_handle* handle, unsigned char endpoint)
    libusb_transfer* libusb_alloc_transfer(int iso_packets)
    void libusb_free_transfer(libusb_transfer* transfer)
    void libusb_fill_bulk_transfer(libusb_transfer* transfer, libusb_device_handle* handle,
                                   unsigned char endpoint, unsigned char* buffer, int length,
                                   libusb_transfer_cb_fn callback, void* user_data,
                                   unsigned int timeout)
    int libusb_submit_transfer(libusb_transfer* transfer)
    int libusb_cancel_transfer(libusb_transfer* transfer)
    unsigned char* libusb_dev_mem_alloc(libusb_device_handle* dev_handle, size_t length)
    int libusb_dev_mem_free(libusb_device_handle* dev_handle, unsigned char* buffer,
                            size_t length)
    int libusb_handle_events_timeout_completed(libusb_context* ctx, timeval* tv, int* completed)
    void libusb_interrupt_event_handler(libusb_context* ctx)
    cdef struct libusb_pollfd:
        int fd
        short events
    libusb_pollfd** libusb_get_pollfds(libusb_context* ctx)
    void libusb_free_pollfds(libusb_pollfd** pollfds)
    int libusb_pollfds_handle_timeouts(libusb_context* ctx)
    int libusb_get_next_timeout(libusb_context* ctx, timeval* tv)
    const char* libusb_error_name(int code)


class UsbError(OSError):
    """A libusb call failed; .code is the libusb error code."""

    def __init__(self, what, int code):
        super().__init__(f"{what}: {libusb_error_name(code).decode()}")
        self.code = code


cdef object _STATUS = {
    LIBUSB_TRANSFER_COMPLETED: Status.COMPLETED,
    LIBUSB_TRANSFER_ERROR: Status.ERROR,
    LIBUSB_TRANSFER_TIMED_OUT: Status.TIMED_OUT,
    LIBUSB_TRANSFER_CANCELLED: Status.CANCELLED,
    LIBUSB_TRANSFER_STALL: Status.STALL,
    LIBUSB_TRANSFER_NO_DEVICE: Status.NO_DEVICE,
    LIBUSB_TRANSFER_OVERFLOW: Status.OVERFLOW,
}

DEF QUEUE_SIZE = 1024  # more than the bridge ever keeps in flight
DEF MAX_IN = 64  # native IN transfers in flight, at most
DEF CMD_QUEUE = 32  # commands waiting for the bridge thread; beyond: dropped, counted
DEF CMD_DATA = 2048  # room for the longest Echo payload (11-bit length)
DEF N_STATUS = 8  # libusb_transfer_status values
DEF MAX_POLLFDS = 15  # libusb's on Linux: the device's usbfs fd, its event fd and timerfd
DEF MAX_BUSY_POLLS = 100000  # eembridge.core.transport.MAX_BUSY_POLLS


cdef struct QueuedCommand:
    int command
    int param
    int length
    unsigned char data[CMD_DATA]


cdef struct NativeIn:
    # The native IN path (start_rx): the event thread deframes and writes every IN
    # transfer to the TAP from the callback and resubmits it; the bridge thread only
    # sees commands, stalls and the device going (rx_poll). All under Shared.lock.
    rx_state* rx
    bint on
    bint closing
    bint gone
    int in_flight  # transfers to keep submitted
    int length  # bytes per transfer (the ring's slot size)
    # IN transfers land in memory mapped from usbfs (libusb_dev_mem_alloc), one slot
    # per transfer in flight, and are copied into their ring slot on completion. usbfs
    # then neither allocates a kernel buffer per URB nor copies it out: peer→host cost
    # 14% less CPU per MB in the guest (bench/RESULTS.md, session 9). NULL: the kernel
    # could not map it (or EEMBRIDGE_USBFS_MMAP=0); transfers land in the ring itself.
    unsigned char* devmem
    size_t devmem_size  # asked of usbfs (0: not asked); with devmem NULL, refused
    int64_t head  # sequence number of the oldest transfer not yet delivered
    int64_t next  # sequence number of the next transfer to submit
    libusb_transfer* by_slot[MAX_IN]  # sequence % in_flight -> its transfer
    int done[MAX_IN]
    int status[MAX_IN]
    int actual[MAX_IN]
    libusb_transfer* spare[MAX_IN]  # allocated, not submitted
    int n_spare
    int pending  # submitted, callback not run yet
    int stalls  # stalls not yet handed to the bridge (it clears the halt, then rx_resume)
    bint halted  # a stall is being cleared: do not resubmit until rx_resume
    int64_t completed
    int64_t status_counts[N_STATUS]
    int64_t submit_errors
    int64_t commands_dropped
    QueuedCommand commands[CMD_QUEUE]
    int n_commands


cdef struct NativeOut:
    # The native OUT path (start_tx): TAP frames are read, batched and submitted from C
    # by the event thread, when the TAP is readable and when an OUT transfer completes
    # and frees room. All under Shared.lock.
    tx_state* tx
    libusb_device_handle* handle
    unsigned char endpoint
    bint on
    bint closing
    bint gone
    bint halted  # a stall is being cleared: submit nothing until tx_resume
    bint wants_tap  # room left and the TAP drained: the event thread polls it
    bint tap_failed  # poll said the TAP is broken (deleted): the bridge thread stops
    int64_t backpressure  # times the TAP stopped being read because OUT was full
    # Data transfers in flight, in submission order (they complete in that order).
    libusb_transfer* fifo[TX_HELD_MAX]
    int frames[TX_HELD_MAX]
    int done[TX_HELD_MAX]
    int first
    int count
    libusb_transfer* spare[TX_HELD_MAX]
    int n_spare
    int pending  # submitted, callback not run yet
    int stalls  # stalls not yet handed to the bridge (it clears the halt, then tx_resume)
    int64_t transfers  # completed in full: their frames were really sent
    int64_t frames_sent
    int64_t bytes_sent
    int64_t dropped_by_status[N_STATUS]  # frames of transfers that ended badly
    int64_t errors_by_status[N_STATUS]  # those transfers
    int64_t short_writes  # transfers the device took only part of (frames dropped)
    int64_t short_write_frames
    int64_t closing_frames  # frames in flight when the transport closed
    int64_t submit_errors
    int64_t submit_error_frames


cdef struct Shared:
    # Written by the libusb callback (event thread), read by completions().
    pthread_mutex_t lock
    libusb_transfer* done[QUEUE_SIZE]
    int head
    int count
    int efd
    NativeIn nin
    NativeOut nout


cdef void _on_transfer(libusb_transfer* transfer) noexcept nogil:
    cdef Shared* shared = <Shared*>transfer.user_data
    cdef unsigned long long one = 1
    pthread_mutex_lock(&shared.lock)
    # QUEUE_SIZE bounds what can be in flight (submit refuses beyond it), so no overflow.
    shared.done[(shared.head + shared.count) % QUEUE_SIZE] = transfer
    shared.count += 1
    pthread_mutex_unlock(&shared.lock)
    write(shared.efd, &one, 8)


cdef void _free_spares(libusb_transfer** spare, int* n_spare) noexcept nogil:
    """Free the transfers a native path kept for reuse (all ended: none is with libusb)."""
    cdef int i
    for i in range(n_spare[0]):
        libusb_free_transfer(spare[i])
    n_spare[0] = 0


cdef inline void _notify(Shared* shared) noexcept nogil:
    cdef unsigned long long one = 1
    write(shared.efd, &one, 8)


cdef inline unsigned char* _in_ring_slot(NativeIn* n, int64_t seq) noexcept nogil:
    """Where IN transfer `seq` is deframed: its slot in the ring."""
    return <unsigned char*>n.rx.ring + rx_slot_offset(n.rx, seq)


cdef inline unsigned char* _in_landing(NativeIn* n, int64_t seq) noexcept nogil:
    """Where the USB data of IN transfer `seq` lands: its usbfs-mapped slot (a slot is
    free again once `seq` is delivered, before `seq + in_flight` is submitted), or
    straight in its ring slot."""
    if n.devmem != NULL:
        return n.devmem + (seq % n.in_flight) * n.length
    return _in_ring_slot(n, seq)


cdef int _rx_submit(Shared* shared, libusb_device_handle* handle,
                    unsigned char endpoint) noexcept nogil:
    """Submit a spare transfer for the next sequence number. Caller holds the lock."""
    cdef NativeIn* n = &shared.nin
    cdef libusb_transfer* t
    cdef int slot, rc
    if n.n_spare == 0 or n.next - n.head >= n.in_flight:
        return 0
    n.n_spare -= 1
    t = n.spare[n.n_spare]
    libusb_fill_bulk_transfer(t, handle, endpoint, _in_landing(n, n.next), n.length,
                              _on_in_native, shared, 0)
    rc = libusb_submit_transfer(t)
    if rc < 0:
        n.spare[n.n_spare] = t
        n.n_spare += 1
        if rc == LIBUSB_ERROR_NO_DEVICE:
            n.gone = True
        else:
            n.submit_errors += 1
        return rc
    slot = n.next % n.in_flight
    n.by_slot[slot] = t
    n.done[slot] = 0
    n.next += 1
    n.pending += 1
    return 0


cdef void _queue_commands(NativeIn* n) noexcept nogil:
    """Copy the commands of the last deframe for the bridge thread (rx_poll)."""
    cdef eem_deframer* d = n.rx.d
    cdef eem_command_record* record
    cdef QueuedCommand* q
    cdef Py_ssize_t j
    cdef int length
    for j in range(d.n_commands):
        if n.n_commands >= CMD_QUEUE:
            n.commands_dropped += 1
            continue
        record = &d.commands[j]
        q = &n.commands[n.n_commands]
        q.command = record.command
        q.param = record.param
        length = 0
        if record.command == 0 or record.command == 1:  # Echo / Echo Response carry data
            length = record.param if record.param <= CMD_DATA else CMD_DATA
            memcpy(q.data, d.command_data + record.data_offset, length)
        q.length = length
        n.n_commands += 1


cdef void _on_in_native(libusb_transfer* transfer) noexcept nogil:
    """An IN transfer of the native path ended: deliver, in order, what is ready."""
    cdef Shared* shared = <Shared*>transfer.user_data
    cdef NativeIn* n = &shared.nin
    cdef int slot, status, actual
    cdef int64_t seq
    cdef bint tell = False
    cdef Py_ssize_t commands
    pthread_mutex_lock(&shared.lock)
    n.pending -= 1
    for seq in range(n.head, n.next):
        slot = seq % n.in_flight
        if n.by_slot[slot] == transfer:
            n.done[slot] = 1
            n.status[slot] = transfer.status
            n.actual[slot] = transfer.actual_length
            break
    # Completions come back in order on one endpoint; delivering strictly by sequence
    # number keeps the deframer's stream right even if they did not.
    while n.head < n.next and n.done[n.head % n.in_flight]:
        slot = n.head % n.in_flight
        status = n.status[slot]
        actual = n.actual[slot]
        n.spare[n.n_spare] = n.by_slot[slot]
        n.n_spare += 1
        n.by_slot[slot] = NULL
        seq = n.head
        n.head += 1
        if status == LIBUSB_TRANSFER_CANCELLED or n.closing:
            continue
        if status == LIBUSB_TRANSFER_NO_DEVICE:
            n.gone = True
            tell = True
            continue
        if status != LIBUSB_TRANSFER_COMPLETED:
            n.status_counts[status if <unsigned int>status < N_STATUS else 1] += 1  # 1: ERROR
            if status != LIBUSB_TRANSFER_TIMED_OUT:
                actual = 0  # an error's data, if any, is not to be trusted
            if status == LIBUSB_TRANSFER_STALL:
                n.stalls += 1
                n.halted = True
            tell = True
        if n.devmem != NULL and actual > 0:
            memcpy(_in_ring_slot(n, seq), _in_landing(n, seq), actual)
        # Every non-normal end of a transfer also ends the EEM stream (short).
        commands = rx_deliver(n.rx, seq, actual,
                              status != LIBUSB_TRANSFER_COMPLETED or actual < n.length)
        n.completed += 1
        if commands > 0:
            _queue_commands(n)
            tell = True
    if not (n.halted or n.gone or n.closing):
        while n.n_spare and n.next - n.head < n.in_flight:
            if _rx_submit(shared, transfer.dev_handle, transfer.endpoint) < 0:
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
    cdef libusb_transfer* t
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
            if o.n_spare:
                o.n_spare -= 1
                t = o.spare[o.n_spare]
            else:
                t = libusb_alloc_transfer(0)
            if t != NULL:
                libusb_fill_bulk_transfer(t, o.handle, o.endpoint, tx.base + start, length,
                                          _on_out_native, shared, 0)
                # No LIBUSB_TRANSFER_ADD_ZERO_PACKET: the framer closed a transfer that
                # ends on a max-packet boundary with a zero-length EEM packet already.
                rc = libusb_submit_transfer(t)
            else:
                rc = LIBUSB_ERROR_NO_MEM
            if rc < 0:
                tx_unhold_newest(tx)
                if t != NULL:
                    o.spare[o.n_spare] = t
                    o.n_spare += 1
                if rc == LIBUSB_ERROR_NO_DEVICE:
                    o.gone = True
                o.submit_errors += 1
                o.submit_error_frames += frames
                return True
            k = (o.first + o.count) % TX_HELD_MAX
            o.fifo[k] = t
            o.frames[k] = frames
            o.done[k] = 0
            o.count += 1
            o.pending += 1
        if drained or length < 0:
            o.wants_tap = True  # the TAP is polled again (the event loop's next turn)
            return False
    return False


cdef void _on_out_native(libusb_transfer* transfer) noexcept nogil:
    """A data OUT transfer ended: count it, free its memory in order, refill."""
    cdef Shared* shared = <Shared*>transfer.user_data
    cdef NativeOut* o = &shared.nout
    cdef libusb_transfer* t
    cdef int i, k, status, frames
    cdef bint tell = False
    pthread_mutex_lock(&shared.lock)
    o.pending -= 1
    for i in range(o.count):
        k = (o.first + i) % TX_HELD_MAX
        if o.fifo[k] == transfer:
            o.done[k] = 1
            break
    while o.count and o.done[o.first]:
        t = o.fifo[o.first]
        frames = o.frames[o.first]
        status = t.status
        if o.closing or status == LIBUSB_TRANSFER_CANCELLED:
            o.closing_frames += frames
        elif status == LIBUSB_TRANSFER_COMPLETED and t.actual_length == t.length:
            o.transfers += 1
            o.frames_sent += frames
            o.bytes_sent += t.actual_length
        elif status == LIBUSB_TRANSFER_COMPLETED:
            o.short_writes += 1  # part of it went: its frames may be cut, count them lost
            o.short_write_frames += frames
        else:
            # The OUT-failure policy, the same as the Python loop's (Bridge._out_done):
            # a stalled or timed-out batch is dropped and counted, the bridge thread
            # clears the halt, and TCP resends what mattered. Not resent: the rest would
            # reach the device after the transfers queued behind it, and after a stall
            # a resend could duplicate what the device already took.
            k = status if <unsigned int>status < N_STATUS else 1
            o.errors_by_status[k] += 1
            o.dropped_by_status[k] += frames
            if status == LIBUSB_TRANSFER_STALL:
                o.stalls += 1
                o.halted = True
                tell = True
            elif status == LIBUSB_TRANSFER_NO_DEVICE:
                o.gone = True
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


cdef class UsbTransport:
    """A claimed EEM interface on a device opened from its /dev/bus/usb fd."""

    cdef libusb_context* ctx
    cdef libusb_device_handle* handle
    cdef Shared* shared
    cdef int dev_fd
    cdef int stop
    cdef unsigned char ep_in, ep_out
    cdef readonly int interface
    cdef readonly bint claimed
    cdef readonly bint detached
    cdef object in_flight  # direction -> list of [transfer address, tag, buffer, done]
    cdef object by_address
    cdef object thread
    cdef object _rx_owner  # the RxPath whose rx_state the native IN path delivers through
    cdef object _tx_owner  # the TxPath whose tx_state the native OUT path fills
    cdef public object info
    cdef public unsigned int timeout_ms
    cdef readonly int busy_polls
    # What the event thread did (its thread only writes them; racy reads are fine):
    # polls that found nothing, waits that slept, passes through libusb and the TAP.
    cdef int64_t loop_empty_polls, loop_sleeps, loop_usb_passes, loop_tap_passes
    # libusb's fds, read once in claim() so that a failure is the caller's error, not a
    # dead event thread; one more slot for the TAP.
    cdef pollfd poll_fds[MAX_POLLFDS + 1]
    cdef int n_poll_fds

    def __cinit__(self):
        self.shared = <Shared*>malloc(sizeof(Shared))
        if self.shared == NULL:
            raise MemoryError()
        memset(self.shared, 0, sizeof(Shared))
        pthread_mutex_init(&self.shared.lock, NULL)
        self.shared.efd = -1
        self.dev_fd = -1

    def __init__(self, int dev_fd, int interface, int ep_in, int ep_out, info,
                 int busy_polls=0):
        """Take over `dev_fd` (an open /dev/bus/usb node): it is closed by close().

        busy_polls: after each poll that found work, the event thread polls up to this
        many more times without sleeping before it blocks (0: it always blocks)."""
        cdef int rc
        if not (ep_in & 0x80) or (ep_out & 0x80):
            raise ValueError(f"bad endpoints IN 0x{ep_in:02x} OUT 0x{ep_out:02x}")
        if interface < 0 or interface > 255:
            raise ValueError(f"bad interface number {interface}")
        if not isinstance(info, DeviceInfo):
            raise TypeError("info must be an eembridge.core.transport.DeviceInfo")
        if not 0 <= busy_polls <= MAX_BUSY_POLLS:
            raise ValueError(f"busy_polls {busy_polls} out of range (0..{MAX_BUSY_POLLS})")
        self.ep_in, self.ep_out, self.interface, self.info = ep_in, ep_out, interface, info
        self.busy_polls = busy_polls
        self.timeout_ms = 0  # bulk IN waits for the device; a stuck OUT is seen by keepalive
        self.in_flight = {Direction.IN: [], Direction.OUT: []}
        self.by_address = {}
        rc = libusb_set_option(NULL, LIBUSB_OPTION_NO_DEVICE_DISCOVERY)
        rc = libusb_init(&self.ctx)
        if rc < 0:
            raise UsbError("libusb_init", rc)
        rc = libusb_wrap_sys_device(self.ctx, dev_fd, &self.handle)
        if rc < 0:
            raise UsbError("libusb_wrap_sys_device", rc)
        self.dev_fd = dev_fd
        self.shared.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.shared.efd < 0:
            raise OSError(errno, os.strerror(errno))

    def detach_kernel_driver(self):
        """Detach the kernel driver bound to the interface; True if there was one."""
        cdef int rc = libusb_kernel_driver_active(self.handle, self.interface)
        if rc == 0:
            return False
        if rc < 0:
            raise UsbError("libusb_kernel_driver_active", rc)
        rc = libusb_detach_kernel_driver(self.handle, self.interface)
        if rc < 0 and rc != LIBUSB_ERROR_NOT_FOUND:
            raise UsbError("libusb_detach_kernel_driver", rc)
        self.detached = rc == 0
        return self.detached

    def claim(self, int alt_setting=0):
        cdef int rc = libusb_claim_interface(self.handle, self.interface)
        if rc < 0:
            raise UsbError("libusb_claim_interface", rc)
        self.claimed = True
        if alt_setting:
            rc = libusb_set_interface_alt_setting(self.handle, self.interface, alt_setting)
            if rc < 0:
                raise UsbError("libusb_set_interface_alt_setting", rc)
        self._read_pollfds()
        self.thread = threading.Thread(target=self._events, name="libusb-events", daemon=True)
        self.thread.start()

    cdef int _read_pollfds(self) except -1:
        # libusb adds a device's fd when it is opened and drops it when closed; the
        # device was opened before the event thread and is closed after it, so the set
        # is fixed for the thread's life.
        cdef libusb_pollfd** lfds = libusb_get_pollfds(self.ctx)
        cdef int n = 0
        if lfds == NULL:
            raise UsbError("libusb_get_pollfds", LIBUSB_ERROR_NO_MEM)
        while lfds[n] != NULL:
            if n == MAX_POLLFDS:
                libusb_free_pollfds(lfds)
                raise UsbError("libusb_get_pollfds (more fds than expected)", LIBUSB_ERROR_NO_MEM)
            self.poll_fds[n].fd = lfds[n].fd
            self.poll_fds[n].events = lfds[n].events
            n += 1
        libusb_free_pollfds(lfds)
        self.n_poll_fds = n
        return 0

    def _events(self):
        """The event thread: poll libusb's fds and the TAP, run what is ready.

        libusb's own wait (libusb_handle_events) cannot include the TAP, so this loop
        polls libusb's fds itself and calls libusb with a zero timeout when one is ready.
        One thread for both directions: a ping costs one wakeup fewer than with the TAP
        read by another thread, and no lock passes between two busy threads
        (bench/RESULTS.md, session 7).
        """
        cdef pollfd* fds = self.poll_fds
        cdef int n = self.n_poll_fds, nf, rc, i, idle = 0, wait_ms
        cdef bint usb_ready, tell
        cdef bint timerfd = libusb_pollfds_handle_timeouts(self.ctx)
        cdef timeval zero, next_timeout
        cdef NativeOut* o = &self.shared.nout
        zero.tv_sec = 0
        zero.tv_usec = 0
        with nogil:
            while not self.stop:
                nf = n
                if o.on and o.wants_tap and not (o.halted or o.gone or o.closing
                                                 or o.tap_failed):
                    fds[n].fd = o.tx.tap_fd
                    fds[n].events = POLLIN
                    nf = n + 1
                # Busy polling: right after work, more work is likely within
                # microseconds (the next completion, the next TCP segment); sleeping
                # and being woken for it costs more than looking again.
                wait_ms = 0 if idle < self.busy_polls else 1000
                if wait_ms and not timerfd and libusb_get_next_timeout(self.ctx,
                                                                       &next_timeout) == 1:
                    wait_ms = min(wait_ms, next_timeout.tv_sec * 1000
                                  + next_timeout.tv_usec // 1000 + 1)
                rc = poll(fds, nf, wait_ms)
                if rc < 0:
                    continue  # EINTR
                if wait_ms:
                    self.loop_sleeps += 1
                usb_ready = rc == 0 and not timerfd  # libusb's timeouts are due
                if rc == 0:
                    idle += 1
                    self.loop_empty_polls += 1
                else:
                    idle = 0
                for i in range(n):
                    if fds[i].revents:
                        usb_ready = True
                if usb_ready:
                    self.loop_usb_passes += 1
                    libusb_handle_events_timeout_completed(self.ctx, &zero, NULL)
                    # Offload merges the TCP segments of every IN transfer this pass
                    # completed; they go up now, before the next wait.
                    pthread_mutex_lock(&self.shared.lock)
                    if self.shared.nin.rx != NULL:
                        rx_flush(self.shared.nin.rx)
                    pthread_mutex_unlock(&self.shared.lock)
                if nf > n and fds[n].revents & (POLLERR | POLLHUP | POLLNVAL):
                    # Reading would fail at once, every turn: stop looking; the bridge
                    # thread sees the same error on its own poll and stops the bridge.
                    o.tap_failed = True
                elif nf > n and fds[n].revents:
                    self.loop_tap_passes += 1
                    pthread_mutex_lock(&self.shared.lock)
                    tell = _tx_pump(self.shared)
                    pthread_mutex_unlock(&self.shared.lock)
                    if tell:
                        _notify(self.shared)

    def fileno(self):
        return self.shared.efd

    cdef _submit(self, direction, unsigned char endpoint, unsigned char* data, int length,
                 object keep, long tag):
        cdef libusb_transfer* transfer
        cdef int rc
        if self.handle == NULL or not self.claimed:
            raise TransportGone("transport closed")
        if len(self.by_address) >= QUEUE_SIZE:
            raise RuntimeError(f"more than {QUEUE_SIZE} transfers in flight")
        transfer = libusb_alloc_transfer(0)
        if transfer == NULL:
            raise MemoryError()
        libusb_fill_bulk_transfer(transfer, self.handle, endpoint, data, length,
                                  _on_transfer, self.shared, self.timeout_ms)
        # No LIBUSB_TRANSFER_ADD_ZERO_PACKET: the framer already closes a transfer that is
        # a multiple of wMaxPacketSize with a zero-length EEM packet (one mechanism).
        rc = libusb_submit_transfer(transfer)
        if rc < 0:
            libusb_free_transfer(transfer)
            if rc == LIBUSB_ERROR_NO_DEVICE:
                raise TransportGone("device gone")
            raise UsbError("libusb_submit_transfer", rc)
        entry = [<size_t>transfer, tag, keep, None]
        self.in_flight[direction].append(entry)
        self.by_address[<size_t>transfer] = (direction, entry)

    def submit_in(self, buffer, long tag):
        cdef unsigned char[::1] view = buffer
        cdef unsigned char* data = &view[0] if view.shape[0] else NULL
        self._submit(Direction.IN, self.ep_in, data, view.shape[0], (buffer, view), tag)

    def submit_out(self, buffer, long tag):
        cdef const unsigned char[::1] view = buffer
        cdef const unsigned char* data = &view[0] if view.shape[0] else NULL
        self._submit(Direction.OUT, self.ep_out, <unsigned char*>data, view.shape[0],
                     (buffer, view), tag)

    def completions(self):
        cdef unsigned long long counter
        cdef libusb_transfer* transfer
        cdef list finished = []
        read(self.shared.efd, &counter, 8)
        pthread_mutex_lock(&self.shared.lock)
        while self.shared.count:
            finished.append(<size_t>self.shared.done[self.shared.head])
            self.shared.head = (self.shared.head + 1) % QUEUE_SIZE
            self.shared.count -= 1
        pthread_mutex_unlock(&self.shared.lock)
        for address in finished:
            transfer = <libusb_transfer*><size_t>address
            direction, entry = self.by_address.pop(address)
            entry[3] = Completion(direction, entry[1], transfer.length, transfer.actual_length,
                                  _STATUS.get(transfer.status, Status.ERROR))
            libusb_free_transfer(transfer)
        out = []
        # Each direction in submission order: an entry leaves only once all before it did.
        for direction in (Direction.IN, Direction.OUT):
            queue = self.in_flight[direction]
            n = 0
            while n < len(queue) and queue[n][3] is not None:
                out.append(queue[n][3])
                n += 1
            del queue[:n]
        return out

    # -- the native IN path ------------------------------------------------------------

    def start_rx(self, rxpath, int in_flight):
        """Keep `in_flight` IN transfers submitted into rxpath's ring, delivered from C.

        From now on IN transfers never reach completions(): the event thread deframes
        each one in place, writes its frames to the TAP, and resubmits it. The caller
        must not deliver through rxpath itself while this transport lives, and polls
        rx_poll() when fileno() is readable (commands, stalls, the device going).
        """
        cdef rx_state* rx = <rx_state*>PyCapsule_GetPointer(rxpath.capsule, RX_STATE_CAPSULE)
        cdef NativeIn* n = &self.shared.nin
        cdef libusb_transfer* t
        cdef int rc = 0
        if self.handle == NULL or not self.claimed:
            raise TransportGone("transport closed")
        if n.on:
            raise RuntimeError("the native IN path is already running")
        if not 1 <= in_flight <= MAX_IN:
            raise ValueError(f"in_flight {in_flight} out of range 1..{MAX_IN}")
        if rx.size // rx.slot_size < in_flight + 1:
            raise ValueError(f"the ring holds {rx.size // rx.slot_size} slots; "
                             f"{in_flight} in flight need {in_flight + 1}")
        memset(n, 0, sizeof(NativeIn))
        n.rx = rx
        n.in_flight = in_flight
        n.length = rx.slot_size
        for _ in range(in_flight):
            t = libusb_alloc_transfer(0)
            if t == NULL:
                raise MemoryError()
            n.spare[n.n_spare] = t
            n.n_spare += 1
        if os.environ.get("EEMBRIDGE_USBFS_MMAP") != "0":
            n.devmem_size = in_flight * n.length
            n.devmem = libusb_dev_mem_alloc(self.handle, n.devmem_size)
        self._rx_owner = rxpath
        pthread_mutex_lock(&self.shared.lock)
        n.on = True
        while n.next - n.head < in_flight and rc == 0:
            rc = _rx_submit(self.shared, self.handle, self.ep_in)
        pthread_mutex_unlock(&self.shared.lock)
        if n.gone:
            raise TransportGone("device gone")
        if rc < 0:
            raise UsbError("libusb_submit_transfer (IN)", rc)

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
        pthread_mutex_lock(&self.shared.lock)
        try:
            for i in range(n.n_commands):
                q = &n.commands[i]
                if q.command == CMD_ECHO:
                    events.append(Echo(q.data[:q.length]))
                elif q.command == CMD_ECHO_RESPONSE:
                    events.append(EchoResponse(q.data[:q.length]))
                else:
                    events.append(Hint(q.command, q.param))
            n.n_commands = 0
            stalls = n.stalls
            n.stalls = 0
            gone = n.gone
            short_of = 0 if (n.halted or not n.on) else n.in_flight - <int>(n.next - n.head)
        finally:
            pthread_mutex_unlock(&self.shared.lock)
        return events, stalls, gone, short_of

    def rx_resume(self):
        """After a stall was cleared (or a submission failed): fill up the IN transfers."""
        cdef NativeIn* n = &self.shared.nin
        cdef int rc = 0
        if self.handle == NULL or not n.on:
            return
        pthread_mutex_lock(&self.shared.lock)
        n.halted = False
        while n.next - n.head < n.in_flight and n.n_spare and rc == 0 and not n.closing:
            rc = _rx_submit(self.shared, self.handle, self.ep_in)
        pthread_mutex_unlock(&self.shared.lock)
        if n.gone:
            raise TransportGone("device gone")
        if rc < 0:
            raise UsbError("libusb_submit_transfer (IN)", rc)

    def rx_stats(self):
        """Counters of the native IN path (racy reads of int64s: fine for counters)."""
        cdef NativeIn* n = &self.shared.nin
        errors = {}
        for status, count in enumerate(n.status_counts):
            if count:
                errors[_STATUS.get(status, Status.ERROR).value] = count
        return {"in_flight": n.next - n.head, "completed": n.completed, "errors": errors,
                "stalls": n.status_counts[LIBUSB_TRANSFER_STALL],
                "submit_errors": n.submit_errors, "commands_dropped": n.commands_dropped,
                "deframe_failures": n.rx.deframe_failures if n.rx != NULL else 0,
                # Where IN transfers land, and the bytes usbfs refused to map (0: none).
                "in_buffers": "usbfs-mapped" if n.devmem != NULL else "ring",
                "usbfs_refused": n.devmem_size if n.devmem == NULL else 0}

    cdef int _rx_cancel(self) except -1:
        """Cancel the native IN transfers; True while some are still with libusb."""
        cdef NativeIn* n = &self.shared.nin
        cdef int64_t seq
        cdef int pending
        if not n.on:
            return 0
        pthread_mutex_lock(&self.shared.lock)
        n.closing = True
        for seq in range(n.head, n.next):
            if n.by_slot[seq % n.in_flight] != NULL and not n.done[seq % n.in_flight]:
                libusb_cancel_transfer(n.by_slot[seq % n.in_flight])
        pending = n.pending
        pthread_mutex_unlock(&self.shared.lock)
        return pending

    cdef void _rx_free(self):
        cdef NativeIn* n = &self.shared.nin
        _free_spares(n.spare, &n.n_spare)
        n.on = False
        pthread_mutex_lock(&self.shared.lock)  # the event thread flushes too
        if n.rx != NULL:
            rx_flush(n.rx)  # segments held to merge are whole: they still go up
        n.rx = NULL
        pthread_mutex_unlock(&self.shared.lock)
        if n.devmem != NULL and self.handle != NULL:
            libusb_dev_mem_free(self.handle, n.devmem, n.devmem_size)
        n.devmem = NULL
        n.devmem_size = 0
        self._rx_owner = None

    # -- the native OUT path -----------------------------------------------------------

    def start_tx(self, txpath):
        """Send TAP frames from C: batched by txpath's rules, in txpath's memory.

        From now on the event thread reads txpath's TAP whenever there is room in
        flight; the caller no longer fills or releases txpath, and calls tx_poll() when
        fileno() is readable. Command transfers still go through submit_out.
        """
        cdef tx_state* tx = <tx_state*>PyCapsule_GetPointer(txpath.capsule, TX_STATE_CAPSULE)
        cdef NativeOut* o = &self.shared.nout
        if self.handle == NULL or not self.claimed:
            raise TransportGone("transport closed")
        if o.on:
            raise RuntimeError("the native OUT path is already running")
        pthread_mutex_lock(&self.shared.lock)
        memset(o, 0, sizeof(NativeOut))
        o.tx = tx
        o.handle = self.handle
        o.endpoint = self.ep_out
        o.wants_tap = True
        o.on = True
        pthread_mutex_unlock(&self.shared.lock)
        self._tx_owner = txpath
        libusb_interrupt_event_handler(self.ctx)  # the event loop adds the TAP to its poll

    def tx_poll(self):
        """(stalls, gone): OUT stalls since the last poll (clear the halt, then
        tx_resume), and whether the device went."""
        cdef int stalls
        pthread_mutex_lock(&self.shared.lock)
        stalls = self.shared.nout.stalls
        self.shared.nout.stalls = 0
        gone = bool(self.shared.nout.gone)
        pthread_mutex_unlock(&self.shared.lock)
        return stalls, gone

    def tx_resume(self):
        """After an OUT stall was cleared: send again."""
        if not self.shared.nout.on:
            return
        with nogil:
            pthread_mutex_lock(&self.shared.lock)
            self.shared.nout.halted = False
            self.shared.nout.wants_tap = True
            pthread_mutex_unlock(&self.shared.lock)
            libusb_interrupt_event_handler(self.ctx)  # the event loop polls the TAP again

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
                "submit_errors": o.submit_errors, "stalls": o.errors_by_status[LIBUSB_TRANSFER_STALL],
                "closing_frames": o.closing_frames, "in_flight": o.count,
                "backpressure": o.backpressure,
                "bytes_in_flight": o.tx.in_flight if o.tx != NULL else 0}

    def loop_stats(self):
        """What the event thread did: per frame moved, these say what busy polling
        costs (empty polls) and what it saves (sleeps)."""
        return {"sleeps": self.loop_sleeps, "empty_polls": self.loop_empty_polls,
                "usb_passes": self.loop_usb_passes, "tap_passes": self.loop_tap_passes}

    cdef int _tx_cancel(self) except -1:
        """Cancel the native OUT transfers; returns how many are still with libusb."""
        cdef NativeOut* o = &self.shared.nout
        cdef int i, pending
        if not o.on:
            return 0
        pthread_mutex_lock(&self.shared.lock)
        o.closing = True
        for i in range(o.count):
            if not o.done[(o.first + i) % TX_HELD_MAX]:
                libusb_cancel_transfer(o.fifo[(o.first + i) % TX_HELD_MAX])
        pending = o.pending
        pthread_mutex_unlock(&self.shared.lock)
        return pending

    cdef void _tx_free(self):
        cdef NativeOut* o = &self.shared.nout
        _free_spares(o.spare, &o.n_spare)
        o.on = False
        o.tx = NULL
        self._tx_owner = None

    def clear_halt(self, direction):
        cdef int rc
        if self.handle == NULL:
            raise TransportGone("transport closed")
        rc = libusb_clear_halt(self.handle, self.ep_in if direction is Direction.IN else self.ep_out)
        if rc == LIBUSB_ERROR_NO_DEVICE:
            raise TransportGone("device gone")
        if rc < 0:
            raise UsbError("libusb_clear_halt", rc)

    def cancel_all(self):
        for address in list(self.by_address):
            libusb_cancel_transfer(<libusb_transfer*><size_t>address)

    def close(self, reattach=True):
        """Cancel, wait for every transfer to end, release, re-attach, close.

        Returns a list of what was done, for the caller to log.
        """
        cdef int rc
        done = []
        if self.handle == NULL:
            return done
        import time
        self.cancel_all()
        deadline = time.monotonic() + 5.0
        while ((self.by_address or self._rx_cancel() or self._tx_cancel())
               and time.monotonic() < deadline):
            self.completions()
            time.sleep(0.005)
        rx_pending = self._rx_cancel() + self._tx_cancel()
        if self.by_address or rx_pending:
            done.append(f"{len(self.by_address) + rx_pending} transfers did not end after cancel")
        self.stop = 1
        libusb_interrupt_event_handler(self.ctx)
        if self.thread is not None:
            self.thread.join()
        if self.claimed:
            rc = libusb_release_interface(self.handle, self.interface)
            self.claimed = False
            done.append("released" if rc == 0 else f"release: {libusb_error_name(rc).decode()}")
        if self.detached and reattach:
            rc = libusb_attach_kernel_driver(self.handle, self.interface)
            done.append("reattached" if rc == 0 else
                        f"reattach failed: {libusb_error_name(rc).decode()}")
            self.detached = False
        if not self.by_address and not rx_pending:
            self._rx_free()
            self._tx_free()
            libusb_close(self.handle)
            self.handle = NULL
            libusb_exit(self.ctx)
            self.ctx = NULL
        else:
            self.handle = NULL  # leak rather than free memory libusb may still write
        if self.dev_fd >= 0:
            close(self.dev_fd)
            self.dev_fd = -1
        return done

    def __dealloc__(self):
        if self.handle != NULL:
            self.stop = 1
            libusb_close(self.handle)
            libusb_exit(self.ctx)
        if self.dev_fd >= 0:
            close(self.dev_fd)
        if self.shared != NULL:
            if self.shared.efd >= 0:
                close(self.shared.efd)
            pthread_mutex_destroy(&self.shared.lock)
            free(self.shared)
