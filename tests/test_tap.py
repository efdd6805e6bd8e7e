"""The link layer on real TAP devices and real network namespaces.

Every test creates its own uniquely named interfaces and namespaces and checks they are
gone afterwards. No skips: without root or /dev/net/tun these fail naming the facility.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import stat
import textwrap
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states as NUD_STATES

from eembridge.core.errors import UserError
from eembridge.link import netns as nsmod
from eembridge.link import networkmanager
from eembridge.link.tap import (
    TUNGETIFF,
    TUNSETCARRIER,
    TUNSETPERSIST,
    LinkStats,
    Tap,
    TapError,
    TapNameError,
    delete_link,
    link_stats,
    validate_ifname,
)

from netfixtures import (
    NETNS_PREFIX,
    TAP_PREFIX,
    free_linklocal_subnet,
    ping_in,
    require_tun_and_root,
    tcp_transfer,
    wait_for,
)
from netfixtures import netns as netns  # noqa: F401 - fixtures (conftest will own these)
from netfixtures import tap_pair_factory as tap_pair_factory  # noqa: F401

IFF_LOWER_UP = 0x10000


@pytest.fixture(autouse=True)
def _facilities() -> None:
    require_tun_and_root()


@pytest.fixture
def tap_name() -> Iterator[str]:
    """A unique TAP name; the interface is deleted at teardown if a test left it."""
    name = nsmod.unique_name(TAP_PREFIX)
    yield name
    leaked = delete_link(name)
    assert not leaked, f"test left interface {name} behind"


def root_link(name: str):
    with IPRoute(groups=0) as ipr:
        found = ipr.link_lookup(ifname=name)
        return ipr.link("get", index=found[0])[0] if found else None


# --- names --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bad",
    ["", "x" * 16, "a" * 40, "a/b", "a b", "a:b", ".", "..", "-tap", "tap\n0", "tap%d"],
)
def test_bad_names_are_rejected_with_one_line_errors(bad: str) -> None:
    with pytest.raises(TapNameError) as info:
        Tap(bad)
    message = str(info.value)
    assert "\n" not in message and message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    # Refused before any kernel call: nothing by that name (or its 15-char cut) exists.
    assert not {bad, bad[:15]} & set(nsmod.link_names())


def test_longest_legal_name_works() -> None:
    name = nsmod.unique_name(TAP_PREFIX, limit=15)
    assert len(name) == 15 and validate_ifname(name) == name
    with Tap.create(name) as tap:
        assert tap.name == name and root_link(name) is not None
    assert root_link(name) is None


# --- ioctl numbers ------------------------------------------------------------------------

def test_ioctl_numbers_match_linux_if_tun_h() -> None:
    # Values of _IOW('T', 203, int), _IOR('T', 210, unsigned int), _IOW('T', 226, int)
    # as <linux/if_tun.h> expands them.
    expected = {
        "generic": (0x400454CB, 0x800454D2, 0x400454E2),
        "ppc-mips-sparc-alpha": (0x800454CB, 0x400454D2, 0x800454E2),
    }
    machine = platform.machine().lower()
    layout = (
        "ppc-mips-sparc-alpha"
        if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha"))
        else "generic"
    )
    assert (TUNSETPERSIST, TUNGETIFF, TUNSETCARRIER) == expected[layout]


# --- MTU, MAC, up/down --------------------------------------------------------------------

def test_mtu_and_mac_set_and_read_back(tap_name: str) -> None:
    with Tap.create(tap_name, mtu=1400, mac="02:12:34:56:78:9A") as tap:
        assert tap.mtu == 1400 and tap.mac == "02:12:34:56:78:9a"
        tap.mtu = 9000
        tap.mac = "02:00:00:00:00:01"
        link = root_link(tap_name)
        assert link.get_attr("IFLA_MTU") == 9000  # seen by an independent netlink query
        assert link.get_attr("IFLA_ADDRESS") == "02:00:00:00:00:01"
        assert not tap.is_up
        tap.up()
        assert tap.is_up
        tap.down()
        assert not tap.is_up
        with pytest.raises(TapError, match="mtu"):
            tap.mtu = 10  # below the IPv4 minimum: the kernel refuses
    assert root_link(tap_name) is None


def test_txqueuelen_bounds_what_waits_for_us_and_the_rest_is_counted_dropped(tap_name: str) -> None:
    frame = bytes.fromhex("ffffffffffff 020000000001 88b5") + bytes(46)  # local experimental type
    with Tap.create(tap_name, txqueuelen=4) as tap:
        assert tap.txqueuelen == 4 and root_link(tap_name).get_attr("IFLA_TXQLEN") == 4
        tap.up()
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((tap_name, 0))
            for _ in range(10):  # nobody reads the TAP meanwhile
                raw.send(frame)
        queued = 0
        while tap.read_into(bytearray(2048)):
            queued += 1
        assert queued == 4
        stats = link_stats(tap_name)
        # Ours beyond the 4, and maybe the kernel's own IPv6 housekeeping frames too.
        assert stats.tx_packets == 4 and stats.tx_dropped >= 6


def test_fd_is_nonblocking_and_refused_writes_are_counted(tap_name: str) -> None:
    frame = bytes.fromhex("ffffffffffff 020000000001 0806") + bytes(46)
    with Tap.create(tap_name) as tap:
        assert not os.get_blocking(tap.fileno())
        assert tap.read_into(bytearray(2048)) == 0  # nothing waiting: 0, no exception
        assert tap.write(frame) == 0  # interface down: the kernel says EIO
        assert tap.write(b"\x01") == 0  # a runt: EINVAL
        assert tap.write_errors == {"EIO": 1, "EINVAL": 1}
        tap.up()
        assert tap.write(frame) == len(frame)
        assert tap.kernel_stats().rx_packets >= 1
        # Deleted under us: writes are counted drops, reads raise (the link is gone).
        assert delete_link(tap_name)
        assert tap.write(frame) == 0 and tap.write_errors["EBADFD"] == 1
        with pytest.raises(OSError):
            tap.read_into(bytearray(2048))
        assert tap.read_errors["EBADFD"] == 1
    with pytest.raises(ValueError, match="closed"):
        tap.fileno()


def test_open_modes_and_their_errors(tap_name: str) -> None:
    with pytest.raises(TapError, match="no interface"):
        Tap.attach(tap_name)
    with pytest.raises(TapError, match="not a TAP"):
        Tap("lo")
    with Tap.create(tap_name):
        with pytest.raises(TapError, match="already exists"):
            Tap.create(tap_name)
        with pytest.raises(TapError, match="in use"):
            Tap(tap_name)  # a single-queue TAP takes one fd


# --- persistence ----------------------------------------------------------------------------

def test_persistent_tap_survives_close_and_reopen(tap_name: str) -> None:
    subnet = free_linklocal_subnet()
    peer = str(subnet[2])
    with Tap.create(tap_name, persist=True, mtu=1280) as tap:
        assert tap.persistent
        tap.add_address(f"{subnet[1]}/24")
        tap.add_address("fe80::77/64", nodad=True)
        tap.add_neighbour(peer, "02:00:00:00:77:02")
        tap.up()
        addresses = set(tap.addresses())
    link = root_link(tap_name)
    assert link is not None, "persistent TAP vanished on close"
    # Nobody holds it: the kernel reports no carrier, but keeps it configured.
    wait_for(lambda: root_link(tap_name).get_attr("IFLA_CARRIER") == 0, what="NO-CARRIER")
    with Tap.attach(tap_name) as tap:
        assert tap.persistent and not tap.created
        assert tap.mtu == 1280
        assert set(tap.addresses()) == addresses
        assert (peer, "02:00:00:00:77:02", NUD_STATES["permanent"]) in tap.neighbours()
        wait_for(lambda: tap.carrier, what="carrier back on attach")
        tap.set_persist(False)
    assert root_link(tap_name) is None, "non-persistent TAP survived close"


# --- neighbours and carrier -----------------------------------------------------------------

def test_static_neighbour_is_visible_via_netlink(tap_name: str) -> None:
    subnet = free_linklocal_subnet()
    peer = str(subnet[2])
    with Tap.create(tap_name) as tap:
        tap.add_address(f"{subnet[1]}/24")
        tap.add_address("fe80::1/64", nodad=True)
        tap.up()
        tap.add_neighbour(peer, "02:AA:BB:CC:DD:EE")
        tap.add_neighbour("fe80::2", "02:aa:bb:cc:dd:ef")
        # A route through the peer, inside link-local space (nothing outside is touched).
        routed = f"169.254.{subnet[1].packed[2] ^ 0x80}.0/24"
        tap.add_route(routed, gateway=peer)
        with IPRoute(groups=0) as ipr:
            entries = {
                m.get_attr("NDA_DST"): (m.get_attr("NDA_LLADDR"), m["state"])
                for m in ipr.neigh("dump", ifindex=tap.ifindex)
            }
            routes = [
                r.get_attr("RTA_GATEWAY")
                for r in ipr.route("dump", oif=tap.ifindex)
                if r.get_attr("RTA_DST") == routed.split("/")[0]
            ]
        assert entries[peer] == ("02:aa:bb:cc:dd:ee", NUD_STATES["permanent"])
        assert entries["fe80::2"] == ("02:aa:bb:cc:dd:ef", NUD_STATES["permanent"])
        assert routes == [peer]


def test_carrier_off_reports_no_carrier_and_keeps_addresses(tap_pair_factory) -> None:  # noqa: F811
    pair = tap_pair_factory()
    near = pair.near
    near.add_neighbour(str(pair.far_ip.ip), pair.far.mac)
    ping_in(None, str(pair.far_ip.ip), count=1)
    addresses = set(near.addresses())

    near.set_carrier(False)
    wait_for(lambda: near.operstate in ("DOWN", "LOWERLAYERDOWN"), what="operstate down")
    link = root_link(near.name)
    assert link.get_attr("IFLA_CARRIER") == 0
    assert not link["flags"] & IFF_LOWER_UP  # what `ip link` shows as NO-CARRIER
    assert near.is_up  # administratively still up: only the carrier went
    assert set(near.addresses()) == addresses
    with pytest.raises(AssertionError, match="no echo reply"):
        ping_in(None, str(pair.far_ip.ip), count=1, timeout=0.3)

    near.carrier = True
    wait_for(lambda: near.operstate == "UP", what="operstate UP")
    assert near.carrier and root_link(near.name)["flags"] & IFF_LOWER_UP
    assert set(near.addresses()) == addresses
    neighbours = {ip: (mac, state) for ip, mac, state in near.neighbours()}
    assert neighbours[str(pair.far_ip.ip)] == (pair.far.mac, NUD_STATES["permanent"])
    ping_in(None, str(pair.far_ip.ip), count=2)


# --- two TAPs, one in a namespace, glued by a thread ------------------------------------------

def test_tap_moved_into_netns_keeps_its_fd_and_carries_ping_and_tcp(
    tap_pair_factory,  # noqa: F811
) -> None:
    pair = tap_pair_factory()
    # The far TAP was created here and moved: gone from our namespace, present there.
    assert pair.far.name not in nsmod.link_names()
    assert pair.far.name in nsmod.link_names(pair.netns)
    assert pair.far.netns == pair.netns

    ping_in(None, str(pair.far_ip.ip))
    ping_in(pair.netns, str(pair.near_ip.ip))
    ping_in(None, f"{pair.far_ll.ip}%{pair.near.name}")
    ping_in(pair.netns, f"{pair.near_ll.ip}%{pair.far.name}")

    stats_before = pair.far.kernel_stats()
    v4 = tcp_transfer(str(pair.far_ip.ip), server_netns=pair.netns)
    v4.assert_intact()
    v6 = tcp_transfer(
        f"{pair.near_ll.ip}%{pair.near.name}",
        server_netns=None,
        client_netns=pair.netns,
        connect_address=f"{pair.near_ll.ip}%{pair.far.name}",
        upload_bytes=2 << 20,
    )
    v6.assert_intact()

    copier = pair.copier
    assert copier is not None and copier.frames["a->b"] > 3000 and copier.frames["b->a"] > 1000
    after = pair.far.kernel_stats()
    assert isinstance(after, LinkStats)
    moved = v4.upload_bytes + v6.download_bytes
    assert after.rx_bytes - stats_before.rx_bytes > moved  # what we wrote into the far TAP
    assert link_stats(pair.far.name, pair.netns).rx_packets >= after.rx_packets
    assert not pair.near.write_errors and not pair.far.write_errors


# --- namespaces -----------------------------------------------------------------------------

def _own_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_run_in_netns_affects_only_that_thread(netns: str) -> None:  # noqa: F811
    mine = _own_netns_inode()
    theirs = nsmod.run_in_netns(netns, _own_netns_inode)
    assert theirs != mine and _own_netns_inode() == mine
    assert os.stat(f"{nsmod.NETNS_RUN_DIR}/{netns}").st_ino == theirs
    assert nsmod.run_in_netns(netns, nsmod.link_names) == ["lo"]

    def fails() -> None:
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        nsmod.run_in_netns(netns, fails)
    with nsmod.NetnsThread(netns, _own_netns_inode) as thread:
        pass
    assert thread.result == theirs


def _lo_has(address: str) -> bool:
    with nsmod.iproute() as ipr:
        return any(m.get_attr("IFA_ADDRESS") == address for m in ipr.addr("dump", index=1))


def test_namespace_and_its_interfaces_are_gone_after_delete() -> None:
    name = nsmod.create_netns(NETNS_PREFIX)
    try:
        assert nsmod.netns_exists(name)
        tap = Tap.create(nsmod.unique_name(TAP_PREFIX), persist=True)
        tap.move_to_netns(name)
        tap.add_address("169.254.99.1/24")  # inside the namespace: collides with nothing
        tap.up()
        nsmod.configure_link(name, "lo", addresses=["169.254.98.1/32"])
        assert nsmod.run_in_netns(name, _lo_has, "169.254.98.1")
        assert tap.name in nsmod.link_names(name)
    finally:
        deleted = nsmod.delete_netns(name)
    # Deleted while our fd is still open and the TAP persistent: gone all the same.
    assert deleted == [tap.name]
    assert not nsmod.netns_exists(name)
    assert tap.name not in nsmod.link_names()
    tap.close()
    assert tap.name not in nsmod.link_names()
    assert nsmod.delete_netns(name) == []  # idempotent


# --- NetworkManager ---------------------------------------------------------------------------

def test_networkmanager_absent_is_a_debug_note(tmp_path, caplog, tap_name: str) -> None:
    caplog.set_level(logging.DEBUG, logger="eembridge.link.networkmanager")
    absent = tmp_path / "no-networkmanager"
    assert networkmanager.unmanage(tap_name, run_dir=absent) is None
    assert "NetworkManager not running" in caplog.text
    with Tap.create(tap_name, nm_run_dir=absent):
        pass
    assert not absent.exists()


@pytest.mark.parametrize("name", ["", "a/b", "a b", "x" * 16, "a\nb", "a:b"])
def test_networkmanager_refuses_what_is_no_interface_name(tmp_path, name: str) -> None:
    (tmp_path / "NetworkManager").mkdir()
    with pytest.raises(ValueError, match="is not an interface name"):
        networkmanager.unmanage(name, run_dir=tmp_path / "NetworkManager", nmcli=None)
    assert not (tmp_path / "NetworkManager" / "conf.d").exists()


def fake_nmcli(tmp_path, tap_name: str, exit_code: int = 0):
    """An nmcli that records each call with whether the interface and keyfile existed."""
    calls = tmp_path / "nmcli.calls"
    keyfile = networkmanager.keyfile_path(tap_name, tmp_path / "NetworkManager")
    nmcli = tmp_path / "nmcli"
    nmcli.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        i=no; k=no
        [ -e /sys/class/net/{tap_name} ] && i=yes
        [ -e {keyfile} ] && k=yes
        echo "$* iface=$i keyfile=$k" >> {calls}
        [ {exit_code} = 0 ] || echo "Error: NetworkManager is not running." >&2
        exit {exit_code}
        """))
    nmcli.chmod(nmcli.stat().st_mode | stat.S_IXUSR)
    return str(nmcli), calls, keyfile


def test_networkmanager_reloads_before_the_interface_appears(tmp_path, tap_name: str) -> None:
    """NM reads conf.d only on start and reload: the keyfile is useless without one."""
    (tmp_path / "NetworkManager").mkdir()
    nmcli, calls, keyfile = fake_nmcli(tmp_path, tap_name)
    with Tap.create(tap_name, nm_run_dir=tmp_path / "NetworkManager", nmcli=nmcli):
        assert keyfile.read_text() == f"[keyfile]\nunmanaged-devices=interface-name:{tap_name}\n"
        assert calls.read_text().splitlines() == [
            "general reload conf iface=no keyfile=yes",  # read before NM sees the interface
            f"device set {tap_name} managed no iface=yes keyfile=yes",  # and told again
        ]
    # Gone with the interface, and NM reloads so that it stops ignoring the name (usb0
    # may be a kernel usbnet interface next).
    assert not keyfile.exists()
    assert calls.read_text().splitlines()[2:] == ["general reload conf iface=no keyfile=no"]


def test_networkmanager_keeps_ignoring_a_persistent_interface(tmp_path, tap_name: str) -> None:
    (tmp_path / "NetworkManager").mkdir()
    nmcli, calls, keyfile = fake_nmcli(tmp_path, tap_name)
    Tap.create(tap_name, persist=True, nm_run_dir=tmp_path / "NetworkManager",
               nmcli=nmcli).close()
    assert root_link(tap_name) is not None
    assert keyfile.exists()
    assert len(calls.read_text().splitlines()) == 2  # no reload that would forget it
    assert delete_link(tap_name)


def test_networkmanager_refusing_everything_is_one_warning(tmp_path, caplog,
                                                           tap_name: str) -> None:
    (tmp_path / "NetworkManager").mkdir()
    nmcli, calls, keyfile = fake_nmcli(tmp_path, tap_name, exit_code=8)
    caplog.set_level(logging.DEBUG, logger="eembridge.link.networkmanager")
    with Tap.create(tap_name, nm_run_dir=tmp_path / "NetworkManager", nmcli=nmcli) as tap:
        assert tap.fileno() >= 0  # the bridge works without NM's consent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"NetworkManager is running and may manage {tap_name} (it may flush its addresses): "
        f"neither a reload nor nmcli could tell it otherwise; run "
        f"'nmcli device set {tap_name} managed no'"]
    assert "exit 8: Error: NetworkManager is not running." in caplog.text
    assert not keyfile.exists()
    assert len(calls.read_text().splitlines()) == 2  # no reload after a refused one
