"""--link tun end to end: simulated device <-> bridge <-> socketpair <-> translation <-> TUN.

The board side is the simulated device's TAP in its own namespace, with the kernel's
ARP and NDP; the host side is a TUN, on which the kernel does neither, so every
neighbour either side knows was learned through eembridge.core.l3. No static neighbour
entries anywhere.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eembridge.core.offload import ones_sum
from eembridge.link.netns import (
    iproute,
    link_index,
    run_in_netns,
)

from netfixtures import (
    SimRig,
    ping,
    ping_in,
    sim_rigs,
    start_sim_bridge,
    tcp_transfer,
    wait_for,
)


class TunRig(SimRig):
    @property
    def l3(self) -> dict[str, int]:
        return self.bridge.stats()["l3"]

    def board_neighbours(self, family: int = 4) -> dict[str, str]:
        """The board kernel's neighbour table on its interface: ip -> MAC (resolved only)."""
        out = subprocess.run(["ip", f"-{family}", "-n", self.sim.namespace, "neigh", "show",
                              "dev", self.sim.network.name], check=True, capture_output=True,
                             text=True).stdout
        found = {}
        for line in out.splitlines():
            words = line.split()
            if "lladdr" in words:
                found[words[0]] = words[words.index("lladdr") + 1]
        return found

    def flush_board_neighbours(self) -> None:
        subprocess.run(["ip", "-n", self.sim.namespace, "neigh", "flush", "dev",
                        self.sim.network.name], check=True)

    def board_link_local(self) -> str:
        """The board's fe80:: address once DAD is done with it."""
        def ready() -> str | None:
            with iproute(self.sim.namespace) as ipr:
                for msg in ipr.addr("dump", index=link_index(ipr, self.sim.network.name)):
                    address = msg.get_attr("IFA_ADDRESS")
                    tentative = msg.get_attr("IFA_FLAGS", msg["flags"]) & 0x40
                    if address.startswith("fe80:") and not tentative:
                        return str(address)
            return None
        return str(wait_for(ready, 10, "the board's link-local address"))


@pytest.fixture
def tun_rig():
    """No static neighbour: the translator and the board's kernel learn each other."""
    with sim_rigs() as make_rig:

        def make(**sim_options) -> TunRig:
            rig = make_rig(sim_options, static_neighbour=False, link="tun")
            return TunRig(**vars(rig))

        yield make


def test_the_host_side_is_a_tun_without_offload(tun_rig):
    rig = tun_rig()
    tun = rig.bridge.tap.tun
    with iproute() as ipr:
        link = ipr.link("get", index=link_index(ipr, tun.name))[0]
    assert link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA").get_attr("IFLA_TUN_TYPE") == 1
    assert rig.bridge.options.offload is False
    assert rig.bridge.stats()["link"]["rx_packets"] >= 0  # the kernel's counters of the TUN


def test_ipv4_ping_both_ways_with_arp_learned(tun_rig):
    rig = tun_rig()
    host_mac = rig.bridge.tap.mac
    # Host first: nobody knows anybody; the translator asks for the board by ARP.
    rig.bridge.tap.translator.flush()
    assert len(ping(rig.device_ip)) == 3
    l3 = rig.l3
    assert l3["arp_sent"] >= 1 and l3["arp_replies"] >= 1 and l3["released"] >= 1
    assert rig.sim.mac in rig.bridge.tap.translator.neighbours(time.monotonic()).values()
    # The board learned the host from that request; forget it and let the board ask.
    rig.flush_board_neighbours()
    before = rig.l3["arp_answered"]
    assert len(ping_in(rig.sim.namespace, rig.host_ip)) == 3
    assert rig.l3["arp_answered"] > before
    assert rig.board_neighbours(4)[rig.host_ip] == host_mac


def test_ipv6_link_local_ping_both_ways_through_ndp(tun_rig):
    rig = tun_rig()
    rig.board_link_local()  # the board's IPv6 is up
    # A second link-local address on the board: its router solicitations and MLD
    # reports come from the first, so only a Neighbor Solicitation can find this one.
    board = "fe80::beef"
    subprocess.run(["ip", "-n", rig.sim.namespace, "addr", "add", f"{board}/64", "dev",
                    rig.sim.network.name, "nodad"], check=True)
    host = str(l3_link_local(rig))
    assert len(ping(f"{board}%{rig.bridge.tap.tun.name}")) == 3
    l3 = rig.l3
    assert l3["ns_sent"] >= 1 and l3["na_received"] >= 1 and l3["released"] >= 1
    assert rig.bridge.tap.translator.neighbours(time.monotonic())[board] == rig.sim.mac
    rig.flush_board_neighbours()
    before = rig.l3["ns_answered"]
    assert len(ping_in(rig.sim.namespace, f"{host}%{rig.sim.network.name}")) == 3
    assert rig.l3["ns_answered"] > before
    assert rig.board_neighbours(6)[host] == rig.bridge.tap.mac


def test_tcp_both_ways_intact(tun_rig):
    rig = tun_rig()
    rig.transfer(4_000_000, 4_000_000, server_on_board=True)
    rig.transfer(4_000_000, 4_000_000, server_on_board=False)
    l3 = rig.l3
    assert all(v == 0 for k, v in l3.items() if k.startswith("dropped_")), l3
    assert rig.bridge.stats()["bridge"]["tx_dropped"] == 0


def test_tcp_over_ipv6_link_local_both_ways_intact(tun_rig):
    rig = tun_rig()
    board = rig.board_link_local()
    host = str(l3_link_local(rig))
    tun, board_if = rig.bridge.tap.tun.name, rig.sim.network.name
    tcp_transfer(f"{board}%{board_if}", server_netns=rig.sim.namespace,
                 connect_address=f"{board}%{tun}", upload_bytes=2_000_000,
                 download_bytes=2_000_000, timeout=60).assert_intact()
    tcp_transfer(f"{host}%{tun}", server_netns=None, client_netns=rig.sim.namespace,
                 connect_address=f"{host}%{board_if}", upload_bytes=2_000_000,
                 download_bytes=2_000_000, timeout=60).assert_intact()


def l3_link_local(rig: TunRig) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(next(a for a in rig.bridge.tap.translator.host_addresses
                                      if a.startswith("fe80:")))


def test_a_deleted_tun_stops_the_bridge_with_one_line(tun_rig):
    rig = tun_rig()
    subprocess.run(["ip", "link", "del", rig.bridge.tap.tun.name], check=True)
    assert rig.bridge.wait(10), "the bridge did not stop"
    assert "is gone" in str(rig.bridge.error)
    rig.bridge.error = None  # expected here; the fixture checks for others


def test_replug_then_traffic_again(tun_rig):
    rig = tun_rig()
    rig.transfer(1_000_000, 1_000_000)
    rig.sim.device.unplug()
    wait_for(lambda: not rig.bridge.connected.is_set(), 5, "the bridge to see the unplug")
    assert rig.bridge.tap.tun.carrier is False
    rig.sim.device.replug()
    assert rig.bridge.connected.wait(5)
    wait_for(lambda: rig.bridge.tap.tun.carrier, 5, "carrier back on the TUN")
    assert len(ping(rig.device_ip)) == 3
    rig.transfer(1_000_000, 1_000_000)
    assert rig.bridge.stats()["bridge"]["connects"] >= 2


@pytest.mark.parametrize("device_crc", [True, False], ids=["crc", "sentinel"])
def test_loss_and_bit_flips_keep_tcp_intact_and_are_counted(tun_rig, device_crc):
    """USB packets lost and bits flipped both ways: TCP through the translator by SHA-256
    both ways, every fault seen and counted by the bridge, no IP packet invented."""
    rig = tun_rig(loss=0.01, flip=0.005, tx_crc=device_crc, seed=7)
    rig.transfer(1_000_000, 1_000_000, server_on_board=True)
    rig.transfer(1_000_000, 1_000_000, server_on_board=False)
    faults = rig.sim.fault_counters()
    assert faults["in_packets_lost"] > 0 and faults["out_packets_lost"] > 0, faults
    assert faults["in_bits_flipped"] > 0 and faults["out_bits_flipped"] > 0, faults
    stats = rig.bridge.stats()
    rx = stats["rx"]
    damaged = rx["truncated"] + rx["crc_errors"] + rx["sentinel_errors"] + rx["runts"]
    assert damaged > 0, rx  # the losses were seen and counted, not absorbed
    if device_crc:
        assert rx["crc_errors"] > 0 and rx["crc_frames"] == rx["frames"], rx
    # What the deframer let through, the translator handed on whole or counted: every
    # frame the bridge wrote is an IP packet for the TUN, a neighbour message or a drop
    # (waited for: the pump may still hold the last few).
    wait_for(lambda: _translated(rig.bridge.stats()), 5, "every frame written translated")
    # Towards the device: the bridge frames with CRC, so the device's deframer saw the
    # OUT damage (what the bridge cannot see: an OUT transfer completes whole for it).
    device = rig.sim.device.counters()
    assert device["rx_truncated"] + device["rx_crc_errors"] > 0, device


def _translated(stats: dict) -> bool:
    l3 = stats["l3"]
    handled = (l3["to_host_packets"] + l3["arp_answered"] + l3["arp_ignored"]
               + l3["arp_replies"] + l3["ns_answered"] + l3["ns_ignored"] + l3["na_received"]
               + sum(v for k, v in l3.items() if k.startswith("dropped_")))
    return bool(handled == stats["rx_path"]["tap_frames_written"] > 0)


def _send_raw(ifname: str, frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for frame in frames:
            sock.send(frame)


def test_what_a_tun_cannot_carry_is_dropped_and_counted(tun_rig):
    rig = tun_rig()
    host_mac = bytes.fromhex(rig.bridge.tap.mac.replace(":", ""))
    board_mac = bytes.fromhex(rig.sim.mac.replace(":", ""))
    ip = ipaddress.IPv4Address(rig.host_ip).packed
    # A well-formed IPv4 header (protocol 253, for experiments): the sentinel-checked
    # frames of the simulated device must pass the deframer's trust rule (codec.py).
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 253, 0, ip, ip))
    header[10:12] = struct.pack("!H", ~ones_sum(header) & 0xFFFF)
    ipv4 = bytes(header) + bytes(8)
    frames = [
        host_mac + board_mac + b"\x88\xb5" + b"local experimental ethertype" + bytes(20),
        host_mac + board_mac + b"\x81\x00\x00\x07\x08\x00" + ipv4 + bytes(20),  # VLAN 7
        b"\x02\x99\x99\x99\x99\x99" + board_mac + b"\x08\x00" + ipv4 + bytes(20),  # not us
    ]
    run_in_netns(rig.sim.namespace, _send_raw, rig.sim.network.name, frames)
    wait_for(lambda: rig.l3["dropped_non_ip"] >= 1 and rig.l3["dropped_vlan"] >= 1
             and rig.l3["dropped_other_mac"] >= 1, 5, "the three drops to be counted")
    stats = rig.bridge.stats()
    from eembridge.observe.metrics import snapshot_families

    names = {family.name for family in snapshot_families(stats)}
    assert "eembridge_l3_dropped_non_ip" in names and "eembridge_l3_dropped_vlan" in names


def _eembridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)


def test_cli_link_tun_shows_its_counters_in_stats(tmp_path):
    bridge = start_sim_bridge(tmp_path, "eemcli", "--link", "tun")
    try:
        bridge.wait_connected()
        assert len(ping(str(bridge.subnet[1]))) == 3
        l3 = bridge.snapshot()["l3"]
        assert l3["arp_sent"] >= 1 and l3["to_device_frames"] >= 3 and "dropped_vlan" in l3
        table = bridge.eembridge("stats")
        assert table.returncode == 0 and "l3:arp_sent" in table.stdout
    finally:
        code, err = bridge.stop()
    assert code == 0, err


def test_cli_refuses_offload_with_the_tun_link_in_one_line():
    bad = _eembridge("--sim", "--link", "tun", "--offload")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--offload" in bad.stderr
    bad = _eembridge("--sim", "--link", "tn")
    assert bad.returncode != 0 and "--link tn: expected one of tap, tun" in bad.stderr


def test_the_link_is_a_config_key_checked_by_the_option_table(tmp_path):
    from eembridge.core.config import ConfigError, DeviceIdentity, load

    good = tmp_path / "good.toml"
    good.write_text('[defaults]\nlink = "tun"\n')
    values, _ = load([str(good)]).values_for(DeviceIdentity())
    assert values == {"link": "tun"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\nlink = "tnu"\n')
    with pytest.raises(ConfigError) as refused:
        load([str(bad)])
    assert "bad.toml:2" in str(refused.value) and "expected one of tap, tun" in str(refused.value)
