"""Chooses the data path along with the codec (see __init__): with the Cython codec, RX
deframes in place on a mirrored ring; with the reference, everything is plain Python."""

from . import CODEC
from .datapath import RingRxPath, RxPath, TxPath

if CODEC == "cython":
    RxPath = RingRxPath  # type: ignore[misc]

__all__ = ["RxPath", "TxPath"]
