"""Inside the guest: can libusb see the f_eem gadget and talk EEM to it directly?

Does what the bridge will do: take the EEM interface from cdc_eem (sysfs unbind, or
libusb's detach), claim it with pyusb, send an EEM Echo and an ARP request in EEM
framing on bulk OUT, read the Echo Response and the peer's ARP reply from bulk IN,
then give the interface back to cdc_eem. Prints one JSON object; exits 1 if a step
failed. Self-contained on purpose (no eembridge import): it checks the plumbing, not
our codec.

    pyusb_probe.py [--detach sysfs|libusb] [--peer-ip IP] [--host-ip IP] [--host-mac MAC]
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from pathlib import Path

import usb.core
import usb.util

SENTINEL = b"\xde\xad\xbe\xef"
ECHO, ECHO_RESPONSE = 0, 1


def eem_command(cmd: int, data: bytes) -> bytes:
    return struct.pack("<H", 0x8000 | cmd << 11 | len(data)) + data


def eem_data(frame: bytes) -> bytes:
    return struct.pack("<H", len(frame) + 4) + frame + SENTINEL  # bmCRC=0: sentinel


def arp_request(src_mac: bytes, src_ip: str, dst_ip: str) -> bytes:
    eth = b"\xff" * 6 + src_mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac,
                      socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(dst_ip))
    return (eth + arp).ljust(60, b"\0")


def parse_transfer(buf: bytes) -> list[tuple[str, int, bytes]]:
    """Split one bulk IN transfer into (kind, header, body) EEM packets."""
    out, i = [], 0
    while i + 2 <= len(buf):
        (hdr,) = struct.unpack_from("<H", buf, i)
        i += 2
        if hdr == 0:
            out.append(("zlp", hdr, b""))
        elif hdr & 0x8000:
            cmd, n = hdr >> 11 & 7, hdr & 0x7FF
            n = n if cmd in (ECHO, ECHO_RESPONSE) else 0
            out.append((f"cmd{cmd}", hdr, bytes(buf[i:i + n])))
            i += n
        else:
            n = hdr & 0x3FFF
            out.append(("crc" if hdr & 0x4000 else "data", hdr, bytes(buf[i:i + n])))
            i += n
    return out


def find_eem() -> tuple[usb.core.Device, usb.core.Interface]:
    for dev in usb.core.find(find_all=True):
        for cfg in dev:
            for intf in cfg:
                if (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol) == (2, 0x0C, 7):
                    return dev, intf
    raise SystemExit("no CDC-EEM interface visible to libusb")


def sysfs_name(dev: usb.core.Device, intf: usb.core.Interface) -> str:
    ports = ".".join(str(p) for p in dev.port_numbers or ())
    return f"{dev.bus}-{ports}:{dev.get_active_configuration().bConfigurationValue}.{intf.bInterfaceNumber}"


def read_until(ep_in, want, deadline: float, log: list) -> bytes | None:
    size = ep_in.wMaxPacketSize * 32  # a multiple of max packet: never babbles
    while time.monotonic() < deadline:
        try:
            buf = bytes(ep_in.read(size, timeout=500))
        except usb.core.USBTimeoutError:
            continue
        for kind, hdr, body in parse_transfer(buf):
            log.append({"len": len(buf), "kind": kind, "hdr": f"0x{hdr:04x}", "body_len": len(body)})
            if want(kind, body):
                return body
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detach", choices=("sysfs", "libusb"), default="sysfs")
    ap.add_argument("--peer-ip", default="169.254.77.2")
    ap.add_argument("--host-ip", default="169.254.77.1")
    ap.add_argument("--host-mac", default="02:00:00:ee:00:01")
    args = ap.parse_args()
    res: dict[str, object] = {"devices": [f"{d.idVendor:04x}:{d.idProduct:04x} bus {d.bus} addr {d.address}"
                                          for d in usb.core.find(find_all=True)]}
    dev, intf = find_eem()
    name = sysfs_name(dev, intf)
    eps = {usb.util.endpoint_direction(e.bEndpointAddress): e for e in intf}
    ep_in, ep_out = eps[usb.util.ENDPOINT_IN], eps[usb.util.ENDPOINT_OUT]
    res.update(interface=name, max_packet_in=ep_in.wMaxPacketSize, max_packet_out=ep_out.wMaxPacketSize,
               speed=dev.speed, driver_before=_driver(name))
    n = intf.bInterfaceNumber
    if args.detach == "sysfs":
        Path("/sys/bus/usb/drivers/cdc_eem/unbind").write_text(name)
    elif dev.is_kernel_driver_active(n):
        dev.detach_kernel_driver(n)
    res["driver_after_detach"] = _driver(name)
    usb.util.claim_interface(dev, n)
    res["claimed"] = True
    log: list = []
    try:
        probe = b"eembridge-echo"
        ep_out.write(eem_command(ECHO, probe), timeout=2000)
        got = read_until(ep_in, lambda k, b: k == f"cmd{ECHO_RESPONSE}", time.monotonic() + 5, log)
        res["echo_response_ok"] = got == probe
        mac = bytes.fromhex(args.host_mac.replace(":", ""))
        ep_out.write(eem_data(arp_request(mac, args.host_ip, args.peer_ip)), timeout=2000)

        def is_arp_reply(kind: str, body: bytes) -> bool:
            return kind == "data" and body[12:14] == b"\x08\x06" and body[20:22] == b"\x00\x02" \
                and body[:6] == mac and body[-4:] == SENTINEL

        reply = read_until(ep_in, is_arp_reply, time.monotonic() + 5, log)
        res["arp_reply_ok"] = reply is not None
        if reply is not None:
            res["peer_mac"] = reply[6:12].hex(":")
    finally:
        res["in_packets"] = log[:20]
        usb.util.release_interface(dev, n)
        if args.detach == "sysfs":
            Path("/sys/bus/usb/drivers/cdc_eem/bind").write_text(name)
        else:
            dev.attach_kernel_driver(n)
        res["driver_after_release"] = _driver(name)
    print(json.dumps(res))
    ok = res["echo_response_ok"] and res["arp_reply_ok"] and res["driver_after_release"] == "cdc_eem"
    return 0 if ok else 1


def _driver(name: str) -> str | None:
    link = Path("/sys/bus/usb/devices") / name / "driver"
    return link.resolve().name if link.exists() else None


if __name__ == "__main__":
    sys.exit(main())
