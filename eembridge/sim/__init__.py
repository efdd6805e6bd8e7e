"""A simulated USB EEM device, seen by the bridge through the same Transport as real USB.

    device = SimDevice(QueueNetworkSide(), max_packet=512, batch=True, faults=Faults(loss=0.01))
    transport = device.connect()  # a SimTransport; the bridge cannot tell it from libusb

See device.py (the device and its network side), transport.py (host controller
semantics) and faults.py (what can go wrong, and the counters of what did).
"""

from .device import EemFunction, NetworkSide, QueueNetworkSide, SimDevice
from .faults import FAULT_COUNTERS, Faults
from .transport import SimTransport

__all__ = ["FAULT_COUNTERS", "EemFunction", "Faults", "NetworkSide", "QueueNetworkSide", "SimDevice", "SimTransport"]
