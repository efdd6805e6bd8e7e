# The data path objects (eembridge._fast.datapath) as C types, for the engine: it
# cimports RxPath / TxPath and drives their rx_state / tx_state (rxdeliver.pxd,
# txfill.pxd) from its own thread. Whoever takes &path.state keeps the object alive and
# is the only one delivering (RX) or filling and releasing (TX) through it meanwhile.
# state.link is the link table (link.pxd): set from the descriptor and vnet by
# __init__; a link of another kind may replace it before the engine starts.

from eembridge._fast.eem cimport Deframer, Framer
from eembridge._fast.rxdeliver cimport rx_state
from eembridge._fast.taplink cimport tap_link
from eembridge._fast.txfill cimport tx_state


cdef class RxPath:
    cdef readonly Deframer deframer
    cdef readonly int tap_fd
    cdef readonly Py_ssize_t slot_size
    cdef readonly object ring
    cdef object _whole
    cdef Py_buffer _view
    cdef bint _have_view
    cdef rx_state state  # ring, link and counters, driven by the engine once it starts RX
    cdef tap_link tap  # the link's state when it is the offloading TAP (vnet)
    cdef object _gro_buf
    cdef Py_buffer _gro_view
    cdef bint _have_gro_view


cdef class TxPath:
    cdef readonly Framer framer
    cdef readonly int tap_fd
    cdef readonly Py_ssize_t max_bytes_in_flight
    cdef readonly Py_ssize_t read_size
    cdef readonly Py_ssize_t slot_size
    cdef readonly Py_ssize_t size
    cdef object _memory
    cdef object _whole
    cdef Py_buffer _view
    cdef bint _have_view
    cdef tx_state state  # memory, held transfers, link, counters; the engine's once it starts TX
    cdef tap_link tap  # the link's state when it is the offloading TAP (vnet)
    cdef object _scratch
    cdef Py_buffer _scratch_view
    cdef bint _have_scratch_view
