"""The board farm: eembridge as a labgrid plugin (resources, exporter, driver).

Importing this package registers with labgrid's target factory the resources
`EEMBoard` (a board on this host, matched by udev like labgrid's USB resources) and
`RemoteEEMBoard` (the same board exported by `eembridge-labgrid-exporter`), and the
driver `EEMBridgeDriver`; a labgrid environment names it under `imports:`.
`pip install eembridge[labgrid]` brings labgrid.
"""

from __future__ import annotations

try:
    import labgrid  # noqa: F401
except ImportError as exc:  # the optional extra is missing: say which
    raise ImportError("eembridge.farm needs labgrid: pip install 'eembridge[labgrid]'") from exc

from .driver import EEMBridgeDriver
from .resource import EEMBoard, RemoteEEMBoard

__all__ = ["EEMBoard", "EEMBridgeDriver", "RemoteEEMBoard"]
