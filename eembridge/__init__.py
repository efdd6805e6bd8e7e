"""eembridge: a userspace, driverless USB CDC-EEM host bridge.

The package face: `Bridge` and `BridgeOptions` (the bridge, to embed), `board_connector`
(a USB board for it, chosen as on the command line), `Transport` (what a device offers
it), `Deframer` and `Framer` (the EEM codec), the events they produce and the errors.
The layers live in sub-packages: core (sans-IO: protocol, codec, options, events,
errors, the transport interface), datapath (the data path's Python face), usb (real
devices), link (the TAP and the host's network; the TUN link; the user link,
`BridgeOptions(link="user", forwards=[...])` with `Bridge.forwarded_ports`, where the
board's traffic ends in libslirp and its ports are reached on localhost; the frames
link, `BridgeOptions(link="frames")` with `Bridge.send_frame` / `recv_frame`, where the
board's Ethernet frames end in the embedding program), observe
(control socket, metrics, logs, captures of a running bridge), capture (offline
pcap/usbmon), sim (the simulated device), cli (the subcommands).

The codec is chosen here, once: EEMBRIDGE_PUREPYTHON=1 forces the pure-Python
reference (eembridge.core.codec); otherwise the Cython extension is used, falling back to
the reference only if the extension is not built. EEMBRIDGE_REQUIRE_CYTHON=1 turns
that fallback into an ImportError, so CI cannot pass on a broken build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import environment, errors, events
from .core.events import Echo, EchoResponse, Event, Frame, Hint
from .core.transport import Transport

if TYPE_CHECKING:
    from .bridge import Bridge, BridgeOptions
    from .usb.device import board_connector

__version__ = "0.1.0"

if environment.ENV.purepython:
    from .core.codec import Deframer, Framer

    CODEC = "python"
else:
    try:
        from ._fast.eem import Deframer, Framer  # type: ignore[no-redef]

        CODEC = "cython"
    except ImportError:
        if environment.ENV.require_cython:
            raise
        from .core.codec import Deframer, Framer  # type: ignore[assignment]

        CODEC = "python"


def __getattr__(name: str) -> Any:
    # The bridge imports this module (for the codec): loaded on first use, not here.
    if name in ("Bridge", "BridgeOptions"):
        from . import bridge

        return getattr(bridge, name)
    if name == "board_connector":  # pyusb: loaded on first use
        from .usb.device import board_connector

        return board_connector
    raise AttributeError(f"module 'eembridge' has no attribute {name!r}")


__all__ = [
    "Bridge",
    "BridgeOptions",
    "CODEC",
    "board_connector",
    "Deframer",
    "Echo",
    "EchoResponse",
    "Event",
    "Frame",
    "Framer",
    "Hint",
    "Transport",
    "__version__",
    "errors",
    "events",
]
