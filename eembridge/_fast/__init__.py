"""The compiled data path: the Cython codec (eem), the mirrored ring (ring), RX and TX
in place (datapath), the engine driven by libusb (usb) or by the simulated device
(simlink). Built in place by setup.py; nothing here is imported unless compiled."""
