"""Chooses the data path implementation along with the codec (see __init__)."""

from . import CODEC

if CODEC == "cython":
    try:
        from ._datapath import RxPath, TxPath
    except ImportError:  # built without the data path extension: the reference still works
        from .datapath import RxPath, TxPath  # type: ignore[assignment]
else:
    from .datapath import RxPath, TxPath  # type: ignore[assignment]

__all__ = ["RxPath", "TxPath"]
