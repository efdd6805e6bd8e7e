"""Chooses the data path along with the codec (see __init__): with the Cython codec, the
C data path of eembridge/_fast/datapath.pyx (RX in place on a mirrored ring, TX framed in place,
TAP I/O in C loops); with the reference, everything is plain Python (datapath.py)."""

from .. import CODEC
from ..core import environment
from .reference import RxPath, TxPath

OFFLOAD = False  # whether the data path reads and writes a TAP with IFF_VNET_HDR
COMPILED = False  # RxPath / TxPath are the C ones, which the engine can drive
if CODEC == "cython":
    try:
        from .._fast.datapath import RxPath, TxPath  # type: ignore[assignment, no-redef]

        OFFLOAD = COMPILED = True
    except ImportError:
        if environment.ENV.require_cython:
            raise
        from .reference import RingRxPath as RxPath  # type: ignore[assignment, misc]

__all__ = ["COMPILED", "OFFLOAD", "RxPath", "TxPath"]
