# cython: language_level=3, boundscheck=False, wraparound=False
"""libusb-1.0 asynchronous bulk transfers behind eembridge.transport.Transport.

uvloop habits: libusb calls a C callback (no GIL) when a transfer ends; the callback
pushes the transfer onto a C queue under a mutex and writes an eventfd. An event thread
runs libusb_handle_events_timeout_completed with the GIL released. Only completions()
builds Python objects, one per transfer.

The device is opened with libusb_wrap_sys_device on a /dev/bus/usb/BBB/DDD descriptor
the caller opened: a permission problem is then a plain EACCES on a path we can name,
and the device is exactly the one discovery matched (no second enumeration here).
"""

from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.errno cimport errno
from posix.unistd cimport write, close, read
import os
import threading

from eembridge.transport import Completion, DeviceInfo, Direction, Status, TransportGone


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

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
    int libusb_handle_events_timeout_completed(libusb_context* ctx, timeval* tv, int* completed)
    void libusb_interrupt_event_handler(libusb_context* ctx)
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


cdef struct Shared:
    # Written by the libusb callback (event thread), read by completions().
    pthread_mutex_t lock
    libusb_transfer* done[QUEUE_SIZE]
    int head
    int count
    int efd


cdef void _on_transfer(libusb_transfer* transfer) noexcept nogil:
    cdef Shared* shared = <Shared*>transfer.user_data
    cdef unsigned long long one = 1
    pthread_mutex_lock(&shared.lock)
    # QUEUE_SIZE bounds what can be in flight (submit refuses beyond it), so no overflow.
    shared.done[(shared.head + shared.count) % QUEUE_SIZE] = transfer
    shared.count += 1
    pthread_mutex_unlock(&shared.lock)
    write(shared.efd, &one, 8)


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
    cdef public object info
    cdef public unsigned int timeout_ms

    def __cinit__(self):
        self.shared = <Shared*>malloc(sizeof(Shared))
        if self.shared == NULL:
            raise MemoryError()
        memset(self.shared, 0, sizeof(Shared))
        pthread_mutex_init(&self.shared.lock, NULL)
        self.shared.efd = -1
        self.dev_fd = -1

    def __init__(self, int dev_fd, int interface, int ep_in, int ep_out, info):
        """Take over `dev_fd` (an open /dev/bus/usb node): it is closed by close()."""
        cdef int rc
        if not (ep_in & 0x80) or (ep_out & 0x80):
            raise ValueError(f"bad endpoints IN 0x{ep_in:02x} OUT 0x{ep_out:02x}")
        if interface < 0 or interface > 255:
            raise ValueError(f"bad interface number {interface}")
        if not isinstance(info, DeviceInfo):
            raise TypeError("info must be an eembridge.transport.DeviceInfo")
        self.ep_in, self.ep_out, self.interface, self.info = ep_in, ep_out, interface, info
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
        self.thread = threading.Thread(target=self._events, name="libusb-events", daemon=True)
        self.thread.start()

    def _events(self):
        cdef timeval tv
        with nogil:
            while not self.stop:
                tv.tv_sec = 1
                tv.tv_usec = 0
                libusb_handle_events_timeout_completed(self.ctx, &tv, NULL)

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
        while self.by_address and time.monotonic() < deadline:
            self.completions()
            time.sleep(0.005)
        if self.by_address:
            done.append(f"{len(self.by_address)} transfers did not end after cancel")
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
        if not self.by_address:
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
