"""link="frames" (eembridge/link/frames.py): the board's Ethernet frames end in this
program. Against the simulated device, whose network side is a TAP in its own namespace
with the kernel's ARP and ICMP: an ARP request and an ICMP echo built here get their
answers from that kernel; a reader that does not read makes the bridge drop, counted,
while the bridge goes on serving the device."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from eembridge.bridge import Bridge, BridgeOptions
from eembridge.core.offload import ones_sum
from eembridge.link.frames import QUEUE_BYTES
from eembridge.link.netns import run_in_netns, unique_name
from eembridge.sim.link import SimLink

from netfixtures import free_linklocal_subnet, require_tun_and_root, wait_for

ETH_ARP, ETH_IP = 0x0806, 0x0800
BROADCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, src_mac, socket.inet_aton(src_ip),
                      bytes(6), socket.inet_aton(target_ip))
    return BROADCAST + src_mac + struct.pack("!H", ETH_ARP) + arp


def icmp_echo(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, ident: int,
              payload: bytes) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload)
    icmp[2:4] = struct.pack("!H", ~ones_sum(icmp) & 0xFFFF)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                               socket.inet_aton(src_ip), socket.inet_aton(dst_ip)))
    ip[10:12] = struct.pack("!H", ~ones_sum(ip) & 0xFFFF)
    return dst_mac + src_mac + struct.pack("!H", ETH_IP) + bytes(ip) + bytes(icmp)


def ethertype(frame: bytes) -> int:
    return int.from_bytes(frame[12:14], "big")


class Rig:
    def __init__(self, sim: SimLink, bridge: Bridge, host_ip: str) -> None:
        self.sim, self.bridge, self.host_ip = sim, bridge, host_ip
        self.mac = mac_bytes(bridge.tap.mac)

    def await_frame(self, want, timeout: float = 5.0) -> bytes:
        """The first frame from the board `want` accepts (the board's kernel also sends
        IPv6 router solicitations and the like)."""
        for frame in self.bridge.tap.frames(timeout):
            if want(frame):
                return frame
        raise AssertionError(f"no such frame from the board within {timeout} s")


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_tun_and_root()
    subnet = free_linklocal_subnet()
    with SimLink(f"{subnet[1]}/24") as sim:
        bridge = Bridge(sim.connect, BridgeOptions(tap=unique_name("eemf"), link="frames",
                                                   stats_socket=None))
        with bridge:
            assert bridge.connected.wait(10), "bridge did not connect to the simulated device"
            yield Rig(sim, bridge, str(subnet[2]))
        assert bridge.error is None, f"bridge thread died: {bridge.error!r}"


def test_arp_and_icmp_echo_from_python_get_the_board_answers(rig: Rig) -> None:
    board_ip = rig.sim.ip
    assert rig.bridge.send_frame(arp_request(rig.mac, rig.host_ip, board_ip))
    reply = rig.await_frame(lambda f: ethertype(f) == ETH_ARP and f[20:22] == b"\x00\x02")
    assert reply[:6] == rig.mac  # to us
    sender_mac, sender_ip = reply[22:28], socket.inet_ntoa(reply[28:32])
    assert sender_mac == mac_bytes(rig.sim.mac) and sender_ip == board_ip

    ident, payload = int.from_bytes(os.urandom(2), "big"), os.urandom(48)
    assert rig.bridge.send_frame(icmp_echo(sender_mac, rig.mac, rig.host_ip, board_ip, ident,
                                           payload))

    def is_echo_reply(f: bytes) -> bool:
        return (ethertype(f) == ETH_IP and f[23] == 1 and f[34] == 0
                and int.from_bytes(f[38:40], "big") == ident)

    echo = rig.await_frame(is_echo_reply)
    assert echo[:6] == rig.mac and echo[6:12] == sender_mac and echo[42:] == payload
    frames = rig.bridge.stats()["frames"]
    assert frames["sent_frames"] == 2 and frames["received_frames"] >= 2, frames
    assert frames["send_refused"] == 0, frames


def _settled(read):
    """A wait_for predicate: the counters `read` gives, once unchanged for half a second."""
    last = {"at": 0.0, "value": None}

    def check():
        value, now = read(), time.monotonic()
        if value != last["value"]:
            last.update(at=now, value=value)
            return None
        return value if now - last["at"] >= 0.5 else None
    return check


def _flood(address: str, port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(i.to_bytes(4, "big") * 250, (address, port))


def test_a_reader_that_does_not_read_costs_drops_not_the_bridge(rig: Rig) -> None:
    """The board sends 4 MB the program does not read: the link's buffer fills, the
    bridge drops what does not fit and counts it, and meanwhile answers the device."""
    # The board knows us statically: nobody here answers its ARP while we do not read.
    subprocess.run(["ip", "-n", rig.sim.namespace, "neigh", "replace", rig.host_ip, "lladdr",
                    rig.bridge.tap.mac, "dev", rig.sim.network.name], check=True)
    sent = 4000
    run_in_netns(rig.sim.namespace, _flood, rig.host_ip, 9, sent)

    def rx_path() -> dict[str, int]:
        return dict(rig.bridge.stats()["rx_path"])

    wait_for(lambda: rx_path()["tap_write_errors"] > 0, 10, "the bridge to drop for the reader")
    # The engine did not wait for the reader: an EEM Echo goes through meanwhile.
    assert rig.bridge.echo(timeout=5) < 5
    # Once the flood is through the bridge (its counts still for half a second), read
    # what the link kept.
    counted = wait_for(_settled(rx_path), 30, "the flood to pass through the bridge")
    queued = sum(1 for f in rig.bridge.tap.frames(0.5) if ethertype(f) == ETH_IP)
    assert 0 < queued <= counted["tap_frames_written"], (queued, counted)
    # Bounded: a fraction of the 4 MB the board sent waited for the reader, in the
    # link's buffer (QUEUE_BYTES); the rest was dropped and counted.
    assert queued * 1000 < 2 * QUEUE_BYTES, (queued, counted)
    assert counted["tap_write_errors"] > queued, counted  # more dropped than kept
    # ... and the link works again once the program reads.
    assert rig.bridge.send_frame(arp_request(rig.mac, rig.host_ip, rig.sim.ip))
    rig.await_frame(lambda f: ethertype(f) == ETH_ARP and f[20:22] == b"\x00\x02")


def test_a_board_that_takes_nothing_makes_send_frame_wait_then_refuse(rig: Rig) -> None:
    """OUT full (the device NAKs everything): the bridge stops reading the link, the
    link's buffer fills, send_frame waits its timeout and says no; counted. Once the
    device takes transfers again, so does the link."""
    rig.sim.device.busy_out_for(30)
    frame = icmp_echo(mac_bytes(rig.sim.mac), rig.mac, rig.host_ip, rig.sim.ip, 1, bytes(1000))
    accepted = 0
    while rig.bridge.send_frame(frame, timeout=0.2):
        accepted += 1
        assert accepted < 100_000, "send_frame never found the link full"
    frames = rig.bridge.stats()["frames"]
    assert frames["send_refused"] == 1 and frames["sent_frames"] == accepted, frames
    rig.sim.device.busy_out_for(0)
    assert rig.bridge.send_frame(frame, timeout=10)
    assert rig.bridge.stats()["bridge"]["backpressure"] >= 1


def test_bad_frames_and_wrong_use_are_refused_in_one_line() -> None:
    subnet = free_linklocal_subnet()
    with SimLink(f"{subnet[1]}/24") as sim:
        with Bridge(sim.connect, BridgeOptions(tap=unique_name("eemf"), link="frames",
                                               stats_socket=None)) as bridge:
            with pytest.raises(ValueError, match="frame of 10 bytes"):
                bridge.send_frame(bytes(10))
            with pytest.raises(ValueError, match="frame of 1600 bytes"):
                bridge.send_frame(bytes(1600))
        assert bridge.error is None
        with Bridge(sim.connect, BridgeOptions(tap=unique_name("eemt"), link="tap",
                                               stats_socket=None)) as tap_bridge:
            with pytest.raises(RuntimeError, match='link="frames"'):
                tap_bridge.recv_frame(0)
