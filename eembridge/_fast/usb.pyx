# cython: language_level=3, boundscheck=False, wraparound=False
"""libusb-1.0 asynchronous bulk transfers behind eembridge.core.transport.Transport.

uvloop habits: libusb calls a C callback (no GIL) when a transfer ends. An event thread
polls libusb's fds (and, once start_tx runs, the TAP) with the GIL released and runs
libusb's event handling. Only completions() builds Python objects, one per transfer.

The data path itself is the engine (engine.pxi), which this module drives as its
transport: the engine's transfers become libusb_transfers here, their callback hands
them back to it, and libusb's fds are its event loop's. With the native data path
(start_rx, start_tx) that one thread carries every frame both ways, and the bridge's
Python thread only hears of commands, stalls, unplugs and its own timers. Transfers
the bridge submits itself (submit_in/submit_out: commands, or the whole data path
without the engine) are queued for completions() instead.

The device is opened with libusb_wrap_sys_device on a /dev/bus/usb/BBB/DDD descriptor
the caller opened: a permission problem is then a plain EACCES on a path we can name,
and the device is exactly the one discovery matched (no second enumeration here).
"""

include "engine.pxi"

from eembridge.core import environment
from eembridge.core.transport import Completion, DeviceInfo


cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

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


ERROR_NO_DEVICE = LIBUSB_ERROR_NO_DEVICE  # UsbError.code of a device that is gone


def error_name(int code):
    return libusb_error_name(code).decode()


class UsbError(OSError):
    """A libusb call failed; .code is the libusb error code."""

    def __init__(self, what, int code):
        super().__init__(f"{what}: {libusb_error_name(code).decode()}")
        self.code = code



cdef enum:
    QUEUE_SIZE = 1024  # more than the bridge ever keeps in flight


cdef int _ENGINE_STATUS[8]  # libusb_transfer_status (0..6) -> the engine's (ENG_*)
_ENGINE_STATUS[:] = [ENG_ERROR] * 8
for _libusb, _engine in ((LIBUSB_TRANSFER_COMPLETED, ENG_COMPLETED),
                         (LIBUSB_TRANSFER_TIMED_OUT, ENG_TIMED_OUT),
                         (LIBUSB_TRANSFER_CANCELLED, ENG_CANCELLED),
                         (LIBUSB_TRANSFER_STALL, ENG_STALL),
                         (LIBUSB_TRANSFER_NO_DEVICE, ENG_NO_DEVICE),
                         (LIBUSB_TRANSFER_OVERFLOW, ENG_OVERFLOW)):
    _ENGINE_STATUS[_libusb] = _engine


cdef inline int _eng_status(int status) noexcept nogil:
    return _ENGINE_STATUS[status] if <unsigned int>status < 8 else ENG_ERROR


cdef struct Link:
    # What the engine's calls into libusb need (eng_ops' ctx), plus the queue of the
    # bridge's own transfers: written by their callback (event thread), read by
    # completions(), under the engine's lock.
    libusb_context* ctx
    libusb_device_handle* handle
    unsigned char ep_in, ep_out
    bint timerfd  # libusb keeps its timeouts on a timerfd among its pollfds
    Shared* shared
    libusb_transfer* done[QUEUE_SIZE]
    int head
    int count


cdef void _on_transfer(libusb_transfer* transfer) noexcept nogil:
    """One of the bridge's own transfers ended: queue it for completions()."""
    cdef Link* link = <Link*>transfer.user_data
    pthread_mutex_lock(&link.shared.lock)
    # QUEUE_SIZE bounds what can be in flight (submit refuses beyond it), so no overflow.
    link.done[(link.head + link.count) % QUEUE_SIZE] = transfer
    link.count += 1
    pthread_mutex_unlock(&link.shared.lock)
    _notify(link.shared)


cdef void _on_engine_transfer(libusb_transfer* transfer) noexcept nogil:
    """One of the engine's transfers ended: hand it back to the engine."""
    cdef eng_xfer* x = <eng_xfer*>transfer.user_data
    x.status = _eng_status(transfer.status)
    x.actual = transfer.actual_length
    if x.direction == ENG_IN:
        engine_in_done(x)
    else:
        engine_out_done(x)


cdef int _link_submit(void* ctx, eng_xfer* x) noexcept nogil:
    cdef Link* link = <Link*>ctx
    cdef libusb_transfer* t = <libusb_transfer*>x.handle
    cdef int rc
    if t == NULL:
        t = libusb_alloc_transfer(0)
        if t == NULL:
            link.shared.submit_code = LIBUSB_ERROR_NO_MEM
            return ENG_SUBMIT_FAILED
        x.handle = t
    libusb_fill_bulk_transfer(t, link.handle,
                              link.ep_in if x.direction == ENG_IN else link.ep_out,
                              x.buffer, x.length, _on_engine_transfer, x, 0)
    # No LIBUSB_TRANSFER_ADD_ZERO_PACKET: the framer closed a transfer that ends on a
    # max-packet boundary with a zero-length EEM packet already.
    rc = libusb_submit_transfer(t)
    if rc == 0:
        return ENG_SUBMITTED
    if rc == LIBUSB_ERROR_NO_DEVICE:
        return ENG_SUBMIT_GONE
    link.shared.submit_code = rc
    return ENG_SUBMIT_FAILED


cdef void _link_cancel(void* ctx, eng_xfer* x) noexcept nogil:
    if x.handle != NULL:
        libusb_cancel_transfer(<libusb_transfer*>x.handle)


cdef void _link_handle_ready(void* ctx) noexcept nogil:
    cdef timeval zero
    zero.tv_sec = 0
    zero.tv_usec = 0
    libusb_handle_events_timeout_completed((<Link*>ctx).ctx, &zero, NULL)


cdef int _link_next_timeout(void* ctx, int wait_ms) noexcept nogil:
    cdef Link* link = <Link*>ctx
    cdef timeval next_timeout
    cdef int due
    if not link.timerfd and libusb_get_next_timeout(link.ctx, &next_timeout) == 1:
        due = next_timeout.tv_sec * 1000 + next_timeout.tv_usec // 1000 + 1
        return due if due < wait_ms else wait_ms
    return wait_ms


cdef void _link_interrupt(void* ctx) noexcept nogil:
    libusb_interrupt_event_handler((<Link*>ctx).ctx)


cdef void _link_release(void* ctx, eng_xfer* x) noexcept nogil:
    libusb_free_transfer(<libusb_transfer*>x.handle)


cdef unsigned char* _link_in_memory(void* ctx, size_t size) noexcept nogil:
    return libusb_dev_mem_alloc((<Link*>ctx).handle, size)


cdef void _link_free_in_memory(void* ctx, unsigned char* memory, size_t size) noexcept nogil:
    cdef Link* link = <Link*>ctx
    if link.handle != NULL:
        libusb_dev_mem_free(link.handle, memory, size)


cdef class UsbTransport(Engine):
    """A claimed EEM interface on a device opened from its /dev/bus/usb fd."""

    cdef Link link
    cdef int dev_fd
    cdef readonly int interface
    cdef readonly bint claimed
    cdef readonly bint detached
    cdef object in_flight  # direction -> list of [transfer address, tag, buffer, done]
    cdef object by_address
    cdef public object info
    cdef public unsigned int timeout_ms

    def __cinit__(self, *args, **kwargs):
        self.dev_fd = -1
        self.link.shared = self.shared
        self.shared.ctx = &self.link
        self.shared.ops.submit = _link_submit
        self.shared.ops.cancel = _link_cancel
        self.shared.ops.handle_ready = _link_handle_ready
        self.shared.ops.next_timeout = _link_next_timeout
        self.shared.ops.interrupt = _link_interrupt
        self.shared.ops.release = _link_release
        if environment.ENV.usbfs_mmap:
            self.shared.ops.in_memory = _link_in_memory
        self.shared.ops.free_in_memory = _link_free_in_memory

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
        self._set_busy_polls(busy_polls)
        self.link.ep_in, self.link.ep_out = ep_in, ep_out
        self.interface, self.info = interface, info
        self.timeout_ms = 0  # bulk IN waits for the device; a stuck OUT is seen by keepalive
        self.in_flight = {Direction.IN: [], Direction.OUT: []}
        self.by_address = {}
        rc = libusb_set_option(NULL, LIBUSB_OPTION_NO_DEVICE_DISCOVERY)
        rc = libusb_init(&self.link.ctx)
        if rc < 0:
            raise UsbError("libusb_init", rc)
        rc = libusb_wrap_sys_device(self.link.ctx, dev_fd, &self.link.handle)
        if rc < 0:
            raise UsbError("libusb_wrap_sys_device", rc)
        self.dev_fd = dev_fd

    cdef int _check_open(self) except -1:
        if self.link.handle == NULL or not self.claimed:
            raise TransportGone("transport closed")
        return 0

    cdef int _submit_failed(self, int code) except -1:
        raise UsbError("libusb_submit_transfer (IN)", code)

    def detach_kernel_driver(self):
        """Detach the kernel driver bound to the interface; True if there was one."""
        cdef int rc = libusb_kernel_driver_active(self.link.handle, self.interface)
        if rc == 0:
            return False
        if rc < 0:
            raise UsbError("libusb_kernel_driver_active", rc)
        rc = libusb_detach_kernel_driver(self.link.handle, self.interface)
        if rc < 0 and rc != LIBUSB_ERROR_NOT_FOUND:
            raise UsbError("libusb_detach_kernel_driver", rc)
        self.detached = rc == 0
        return self.detached

    def claim(self, int alt_setting=0):
        cdef int rc = libusb_claim_interface(self.link.handle, self.interface)
        if rc < 0:
            raise UsbError("libusb_claim_interface", rc)
        self.claimed = True
        if alt_setting:
            rc = libusb_set_interface_alt_setting(self.link.handle, self.interface, alt_setting)
            if rc < 0:
                raise UsbError("libusb_set_interface_alt_setting", rc)
        self._read_pollfds()
        self._start_thread("libusb-events")

    cdef int _read_pollfds(self) except -1:
        # libusb adds a device's fd when it is opened and drops it when closed; the
        # device was opened before the event thread and is closed after it, so the set
        # is fixed for the thread's life. Read here so that a failure is the caller's
        # error, not a dead event thread.
        cdef libusb_pollfd** lfds = libusb_get_pollfds(self.link.ctx)
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
        self.link.timerfd = libusb_pollfds_handle_timeouts(self.link.ctx)
        # libusb's own wait (libusb_handle_events) cannot include the TAP, so the
        # engine polls libusb's fds itself; without a timerfd a timed-out poll means
        # libusb's timeouts are due.
        self.poll_timeouts = not self.link.timerfd
        return 0

    cdef _submit(self, direction, unsigned char endpoint, unsigned char* data, int length,
                 object keep, long tag):
        cdef libusb_transfer* transfer
        cdef int rc
        if self.link.handle == NULL or not self.claimed:
            raise TransportGone("transport closed")
        if len(self.by_address) >= QUEUE_SIZE:
            raise RuntimeError(f"more than {QUEUE_SIZE} transfers in flight")
        transfer = libusb_alloc_transfer(0)
        if transfer == NULL:
            raise MemoryError()
        libusb_fill_bulk_transfer(transfer, self.link.handle, endpoint, data, length,
                                  _on_transfer, &self.link, self.timeout_ms)
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
        self._submit(Direction.IN, self.link.ep_in, data, view.shape[0], (buffer, view), tag)

    def submit_out(self, buffer, long tag):
        cdef const unsigned char[::1] view = buffer
        cdef const unsigned char* data = &view[0] if view.shape[0] else NULL
        self._submit(Direction.OUT, self.link.ep_out, <unsigned char*>data, view.shape[0],
                     (buffer, view), tag)

    def completions(self):
        cdef unsigned long long counter
        cdef libusb_transfer* transfer
        cdef list finished = []
        read(self.shared.efd, &counter, 8)
        _lock(self.shared)
        while self.link.count:
            finished.append(<size_t>self.link.done[self.link.head])
            self.link.head = (self.link.head + 1) % QUEUE_SIZE
            self.link.count -= 1
        _unlock(self.shared)
        for address in finished:
            transfer = <libusb_transfer*><size_t>address
            direction, entry = self.by_address.pop(address)
            entry[3] = Completion(direction, entry[1], transfer.length, transfer.actual_length,
                                  _STATUS[_eng_status(transfer.status)])
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

    def clear_halt(self, direction):
        cdef int rc
        if self.link.handle == NULL:
            raise TransportGone("transport closed")
        rc = libusb_clear_halt(self.link.handle, self.link.ep_in if direction is Direction.IN else self.link.ep_out)
        if rc == LIBUSB_ERROR_NO_DEVICE:
            raise TransportGone("device gone")
        if rc < 0:
            raise UsbError("libusb_clear_halt", rc)

    def cancel_all(self):
        for address in list(self.by_address):
            libusb_cancel_transfer(<libusb_transfer*><size_t>address)

    def close(self, reattach=True):
        """Cancel, wait for every transfer to end, release, re-attach, close.

        Returns what was done, for the caller to log: (step, libusb error code) pairs,
        code 0 when it worked: ("release", code), ("reattach", code); and
        ("cancel", transfers that did not end) if any did not.
        """
        cdef int rc
        done = []
        if self.link.handle == NULL:
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
            done.append(("cancel", len(self.by_address) + rx_pending))
        self._stop_thread()
        if self.claimed:
            rc = libusb_release_interface(self.link.handle, self.interface)
            self.claimed = False
            done.append(("release", rc))
        if self.detached and reattach:
            rc = libusb_attach_kernel_driver(self.link.handle, self.interface)
            done.append(("reattach", rc))
            self.detached = False
        if not self.by_address and not rx_pending:
            self._rx_free()
            self._tx_free()
            libusb_close(self.link.handle)
            self.link.handle = NULL
            libusb_exit(self.link.ctx)
            self.link.ctx = NULL
        else:
            self.link.handle = NULL  # leak rather than free memory libusb may still write
        if self.dev_fd >= 0:
            close(self.dev_fd)
            self.dev_fd = -1
        return done

    def __dealloc__(self):
        if self.link.handle != NULL:
            self.stop = 1
            libusb_close(self.link.handle)
            libusb_exit(self.link.ctx)
        if self.dev_fd >= 0:
            close(self.dev_fd)
