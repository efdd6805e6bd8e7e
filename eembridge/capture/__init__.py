"""Offline captures: pcap/pcapng, usbmon, `eembridge decode` and `eembridge replay`."""
