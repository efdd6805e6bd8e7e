"""eembridge: a userspace, driverless USB CDC-EEM host bridge.

The codec is chosen here, once: EEMBRIDGE_PUREPYTHON=1 forces the pure-Python
reference (eembridge.codec); otherwise the Cython extension is used, falling back to
the reference only if the extension is not built. EEMBRIDGE_REQUIRE_CYTHON=1 turns
that fallback into an ImportError, so CI cannot pass on a broken build.
"""

from __future__ import annotations

import os

from .events import Echo, EchoResponse, Event, Frame, Hint

__version__ = "0.1.0"

if os.environ.get("EEMBRIDGE_PUREPYTHON"):
    from .codec import Deframer, Framer

    CODEC = "python"
else:
    try:
        from ._eem import Deframer, Framer  # type: ignore[no-redef]

        CODEC = "cython"
    except ImportError:
        if os.environ.get("EEMBRIDGE_REQUIRE_CYTHON"):
            raise
        from .codec import Deframer, Framer  # type: ignore[assignment]

        CODEC = "python"

__all__ = [
    "CODEC",
    "Deframer",
    "Echo",
    "EchoResponse",
    "Event",
    "Frame",
    "Framer",
    "Hint",
    "__version__",
]
