# cython: language_level=3, boundscheck=False, wraparound=False
"""The simulated device as the engine's transport: `--sim`, `eembridge demo` and every
test on the simulated device run the data path real USB runs (engine.pxi).

The engine's calls become calls of the SimTransport (eembridge.sim.transport), made
from the engine's one thread as libusb's are: submit takes the GIL and submits a
memoryview over the engine's buffer, tagged with the engine's record (negative tags;
the bridge's own transfers keep theirs, >= 0); the simulated device's eventfd is the
engine's "fd to poll", and "handle what is ready" takes the GIL once, collects the
completions and hands the engine's to it with the GIL released. The bridge's own
transfers (commands) come back through completions(), as with libusb.

There is no per-transfer cancel on the simulated bus: close() stops the event thread,
closes the SimTransport (which completes everything CANCELLED and guarantees that no
device thread touches the buffers after), and hands those completions to the engine.
"""

include "engine.pxi"

from cpython.ref cimport PyObject
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE

cdef object _ENGINE_STATUS = {status: code for code, status in _STATUS.items()}

cdef enum:
    MAX_READY = MAX_IN + TX_HELD_MAX  # every record of the engine, each in flight once


cdef struct Link:
    # eng_ops' ctx. engine: the SimEngine owning this struct (borrowed: it outlives it).
    PyObject* engine
    int wake_fd  # in the poll set: interrupt() makes the event thread look again
    eng_xfer* ready[MAX_READY]


cdef int _sim_submit(void* ctx, eng_xfer* x) noexcept nogil:
    with gil:
        return (<SimEngine><object>(<Link*>ctx).engine)._submit(x)


cdef void _sim_cancel(void* ctx, eng_xfer* x) noexcept nogil:
    pass  # no per-transfer cancel on the simulated bus: close() ends them all


cdef void _sim_handle_ready(void* ctx) noexcept nogil:
    cdef Link* link = <Link*>ctx
    cdef int i, n
    cdef eng_xfer* x
    with gil:
        n = (<SimEngine><object>link.engine)._collect()
    for i in range(n):
        x = link.ready[i]
        if x.direction == ENG_IN:
            engine_in_done(x)
        else:
            engine_out_done(x)


cdef void _sim_interrupt(void* ctx) noexcept nogil:
    cdef unsigned long long one = 1
    write((<Link*>ctx).wake_fd, &one, 8)


cdef class SimEngine(Engine):
    """A SimTransport driven by the engine: a Transport and a NativeDataPath."""

    cdef Link link
    cdef readonly object transport
    cdef public object info
    cdef list mine  # completions of the bridge's own transfers, for completions()
    cdef object submit_error  # what the SimTransport raised at the last refused submit
    cdef bint closed

    def __cinit__(self, *args, **kwargs):
        self.link.engine = <PyObject*>self
        self.link.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.link.wake_fd < 0:
            raise OSError(errno, os.strerror(errno))
        self.shared.ctx = &self.link
        self.shared.ops.submit = _sim_submit
        self.shared.ops.cancel = _sim_cancel
        self.shared.ops.handle_ready = _sim_handle_ready
        self.shared.ops.interrupt = _sim_interrupt

    def __init__(self, transport, int busy_polls=0):
        """Drive `transport` (a SimTransport, opened, nothing in flight) from now on;
        busy_polls as for the libusb transport (eembridge._fast.usb.UsbTransport)."""
        self._set_busy_polls(busy_polls)
        self.transport = transport
        self.info = transport.info
        self.mine = []
        self.poll_fds[0].fd = transport.fileno()
        self.poll_fds[0].events = POLLIN
        self.poll_fds[1].fd = self.link.wake_fd
        self.poll_fds[1].events = POLLIN
        self.n_poll_fds = 2
        self._start_thread("sim-engine")

    cdef int _check_open(self) except -1:
        if self.closed:
            raise TransportGone("transport closed")
        return 0

    cdef int _submit_failed(self, int code) except -1:
        raise OSError(f"submitting an IN transfer failed: {self.submit_error}")

    cdef int _submit(self, eng_xfer* x) noexcept:
        """eng_ops.submit, GIL held."""
        try:
            if x.direction == ENG_IN:
                self.transport.submit_in(
                    PyMemoryView_FromMemory(<char*>x.buffer, x.length, PyBUF_WRITE), ~x.index)
            else:
                self.transport.submit_out(
                    PyMemoryView_FromMemory(<char*>x.buffer, x.length, PyBUF_READ),
                    ~(MAX_IN + x.index))
        except TransportGone:
            return ENG_SUBMIT_GONE
        except Exception as exc:  # closed meanwhile, or a bug: counted by the engine
            self.submit_error = exc
            return ENG_SUBMIT_FAILED
        return ENG_SUBMITTED

    cdef int _collect(self) noexcept:
        """The SimTransport's completions: the engine's into link.ready (returns how
        many), the bridge's for completions(). GIL held."""
        cdef unsigned long long counter
        cdef int n = 0, index
        cdef bint theirs = False
        cdef eng_xfer* x
        read(self.link.wake_fd, &counter, 8)
        try:
            done = self.transport.completions()
        except Exception:
            return 0
        for completion in done:
            if completion.tag >= 0:
                self.mine.append(completion)
                theirs = True
                continue
            index = ~completion.tag
            x = &self.shared.nin.xfer[index] if index < MAX_IN else \
                &self.shared.nout.pool[index - MAX_IN]
            x.status = _ENGINE_STATUS.get(completion.status, ENG_ERROR)
            x.actual = completion.actual
            self.link.ready[n] = x
            n += 1
        if theirs:
            _notify(self.shared)
        return n

    # -- Transport ---------------------------------------------------------------------

    def submit_in(self, buffer, tag):
        if tag < 0:
            raise ValueError("negative tags are the engine's")
        self.transport.submit_in(buffer, tag)

    def submit_out(self, buffer, tag):
        if tag < 0:
            raise ValueError("negative tags are the engine's")
        self.transport.submit_out(buffer, tag)

    def completions(self):
        cdef unsigned long long counter
        read(self.shared.efd, &counter, 8)
        done, self.mine = self.mine, []
        return done

    def clear_halt(self, direction):
        self.transport.clear_halt(direction)

    def close(self):
        """Stop the engine, close the SimTransport, end every transfer."""
        if self.closed:
            return
        self.closed = True
        self._rx_cancel()  # marks them closing: nothing is resubmitted
        self._tx_cancel()
        self._stop_thread()
        try:
            self.transport.close()
        finally:
            with nogil:
                _sim_handle_ready(&self.link)  # all CANCELLED or NO_DEVICE by now
            self._rx_free()
            self._tx_free()

    def __getattr__(self, name):
        return getattr(self.transport, name)  # fault_counters, gone, device, ...

    def __repr__(self):
        return f"<SimEngine over {self.transport!r}>"

    def __dealloc__(self):
        if self.link.wake_fd >= 0:
            close(self.link.wake_fd)
