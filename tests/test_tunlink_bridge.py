"""--link tun with its C fast path (eembridge._fast.tunlink) in the bridge: TCP both ways
intact, nearly every packet carried by C, whichever thread drives the data path."""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from dataclasses import replace

import pytest
from test_tun_link import tun_rig  # noqa: F401  (the fixture)

from eembridge._fast.datapath import RxPath, TxPath
from eembridge._fast.eem import Deframer, Framer
from eembridge.core import environment, l3
from eembridge.link.netns import unique_name
from eembridge.link.tun import TunLink

from netfixtures import require_tun_and_root, wait_for

BOARD_MAC = bytes.fromhex("525400123456")


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@pytest.mark.parametrize("native", [True, False], ids=["engine", "bridge-loop"])
def test_tcp_takes_the_fast_path_both_ways(tun_rig, native, monkeypatch):  # noqa: F811
    monkeypatch.setattr(environment, "ENV", replace(environment.ENV, native=native))
    rig = tun_rig()
    rig.transfer(2_000_000, 2_000_000, server_on_board=True)
    rig.transfer(2_000_000, 2_000_000, server_on_board=False)
    l3 = rig.l3
    assert all(v == 0 for k, v in l3.items() if k.startswith("dropped_")), l3
    assert l3["fast_handoffs_lost"] == l3["fast_notes_lost"] == l3["tun_write_errors"] == 0, l3
    # The first packets (the board unknown) and one a second per neighbour (CONFIRM_EVERY)
    # take the pump; the rest C alone.
    assert l3["fast_to_host_packets"] > 0.95 * l3["to_host_packets"] > 1000, l3
    assert l3["fast_to_device_frames"] > 0.95 * l3["to_device_frames"] > 1000, l3
    assert rig.bridge.stats()["bridge"]["tx_dropped"] == 0


def test_a_pump_that_dies_stops_the_bridge_with_one_line(tun_rig):  # noqa: F811
    rig = tun_rig()
    rig.transfer(100_000, 100_000)

    def broken(now: float) -> list[bytes]:
        raise RuntimeError("translator broken")

    rig.bridge.tap.translator.tick = broken
    assert rig.bridge.wait(10), "the bridge did not stop"
    assert "is gone" in str(rig.bridge.error)
    rig.bridge.error = None  # expected here; the fixture checks for others


def test_a_pump_backlog_closes_the_tun_to_c_until_it_went():
    """The pump's frames for the device go before any TUN packet: while they wait in its
    backlog (the socket full) C reads no TUN packet, and the TUN is out of the readiness
    set (or C would be woken for a TUN it may not read, and spin)."""
    require_tun_and_root()
    link = TunLink(unique_name("eemtl"))
    try:
        link.add_address("10.77.0.1/24", nodad=True)
        link.up()
        link.set_carrier(True)
        fd = link.fileno()
        link.install_fast_path(RxPath(Deframer(), fd, 2, 16384), TxPath(Framer(), fd, 65536))
        wait_for(lambda: link._tun_open, 3, "the TUN given to C")
        fast, tun_fd = link._fast, link.tun.fileno()
        # ARP requests for the host: the pump answers each into the socket, which nobody
        # reads, until the socket is full and the answers wait in the backlog.
        request = l3.ethernet(l3.BROADCAST, BOARD_MAC, l3.ETH_P_ARP, l3.arp_packet(
            1, BOARD_MAC, packed("10.77.0.2"), bytes(6), packed("10.77.0.1")))
        delivered = 0

        def ask() -> None:
            nonlocal delivered
            fast.deliver(request, time.monotonic())
            delivered += 1

        def handled() -> int:
            stats = link.l3_stats()
            return stats["arp_answered"] + stats["arp_ignored"] + stats["dropped_bad_arp"]

        # Until the pump's first look at the TUN's addresses (racing add_address) is done.
        wait_for(lambda: ask() or link.l3_stats()["arp_answered"], 5, "an answer for 10.77.0.1")
        for _ in range(400):
            ask()  # (one the channel had no room for is refused: counted)
        refused = fast.link_counters()["write_errors"]
        wait_for(lambda: handled() == delivered - refused, 5, "every request handled")
        wait_for(lambda: not link._tun_open, 3, "the TUN closed to C")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"after the answers", ("10.77.0.2", 9))
        wait_for(lambda: select.select([tun_fd], [], [], 0)[0], 3, "the packet in the TUN")
        assert tun_fd not in [ready for ready, _ in link._epoll.poll(0)]
        # C takes the answers, then (the backlog gone) the TUN's packet.
        frames: list[bytes] = []
        deadline = time.monotonic() + 5
        while not frames or frames[-1][12:14] != b"\x08\x00":
            assert time.monotonic() < deadline, (len(frames), link.l3_stats())
            frame, handed_off = fast.fill(time.monotonic())
            assert not handed_off  # 10.77.0.2 is the board's: learned from the requests
            if frame is None:
                link._epoll.poll(0.1)
            else:
                frames.append(frame)
        stats = link.l3_stats()
        kinds = [f[12:14] for f in frames[:-1]]
        assert kinds.count(b"\x08\x06") == stats["arp_answered"] - stats["backlog_dropped"]
        # Before the answers at most what the pump translated from the TUN before the
        # fast path was installed (the kernel's IPv6 router solicitation, MLD).
        first = kinds.index(b"\x08\x06")
        assert set(kinds[first:]) == {b"\x08\x06"} and b"\x08\x00" not in kinds[:first]
        assert frames[-1][:6] == BOARD_MAC and frames[-1].endswith(b"after the answers")
    finally:
        link.close()
