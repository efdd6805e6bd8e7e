"""eembridge against a real peer: the kernel's f_eem gadget on dummy_hcd, in the guest.

Two guest boots (BOOTS: high; SuperSpeed then full speed) run
tests/interop/bridge_checks.sh once per speed, which does every check of that speed as
shell and leaves its results as files in the rwdir; each test below reads its own. High speed
gets everything on a composite gadget (ACM before EEM, so discovery cannot assume
interface 0) including unplug/replug from the UDC mid-transfer; SuperSpeed and full
speed get the core: detach, ping, TCP both ways by SHA-256, EEM Echo, give-back.
After the high-speed checks the same boot runs tests/interop/tun_checks.sh: a second
bridge with `--link tun --dhcp` (no static neighbour on either side, the address leased
from dnsmasq on the gadget's side with a classless route), ARP and NDP learned, TCP
both ways by SHA-256, an unplug and replug from the UDC, SIGTERM; then
tests/interop/user_checks.sh: a third bridge with `--link user` as nobody with no
capability, the board's TCP server reached through forwarded localhost ports, by SHA-256
both ways, SIGTERM, and nothing left behind.

A machine that cannot boot the guest FAILS here naming what is missing
(tests/interop/setup_guest.sh installs it).
"""

from __future__ import annotations

import json

import pytest
from bootresults import BootResults, boot_guest
from guest import GuestResult

pytestmark = pytest.mark.interop

SERIAL = "eembridge-interop-0001"
# speed -> (sysfs speed, bulk max packet, checks level, composite)
SPEEDS = {
    "high": ("480", 512, "full", "acm"),
    "super": ("5000", 1024, "basic", ""),
    "full": ("12", 64, "basic", ""),
}


class Boot(BootResults):
    def __init__(self, speed: str, result: GuestResult) -> None:
        super().__init__(result, subdir=speed, label=f"{speed} speed: ")
        self.speed = speed

    def bridge_log(self) -> str:
        return self.read("bridge.log")

    def interfaces(self, stage: str) -> list[tuple[str, str, str]]:
        """(interface, class/subclass/protocol, driver) from interfaces_STAGE.txt."""
        rows = [tuple(line.split()) for line in self.read(f"interfaces_{stage}.txt").splitlines()]
        return [r for r in rows if len(r) == 3]  # type: ignore[misc]

    def eem_driver(self, stage: str) -> str:
        drivers = [d for _i, cls, d in self.interfaces(stage) if cls == "02/0c/07"]
        assert len(drivers) == 1, f"{stage}: one EEM interface expected, got {self.interfaces(stage)}"
        return drivers[0]


# Tests take `boot` through these (indirect): the module-scoped fixture boots once per
# speed and every test of that speed shares the boot.
ALL_SPEEDS = pytest.mark.parametrize("boot", list(SPEEDS), indirect=True,
                                     ids=[f"{s}-speed" for s in SPEEDS])
FULL_CHECKS = pytest.mark.parametrize("boot", [s for s, v in SPEEDS.items() if v[2] == "full"],
                                      indirect=True, ids=lambda s: f"{s}-speed")


# The speed whose boot also runs the TUN link's checks (tun_checks.sh) and then the user
# link's (user_checks.sh), after its own.
TUN_SPEED = "high"
TUN_NAME = "eemtun0"

# Boots: high alone (the full set of checks); SuperSpeed and full speed share one boot,
# one after the other (gadget.sh down in between reloads dummy_hcd with other options),
# which saves a 26 s boot. Each speed's files go to its own folder of the rwdir.
BOOTS = {"high": ("high",), "super+full": ("super", "full")}


def _boot_script(speeds: tuple[str, ...]) -> str:
    steps = []
    for speed in speeds:
        _sysfs, _mp, level, composite = SPEEDS[speed]
        step = (f"mkdir -p $RW/{speed}\n"
                f"RW=$RW/{speed} bash $INTEROP/bridge_checks.sh {speed} {level} {composite}")
        if speed == TUN_SPEED:
            step += (f"\nmkdir -p $RW/{speed}/tun\n"
                     f"GADGET_ENV=$RW/{speed}/env.txt RW=$RW/{speed}/tun "
                     f"bash $INTEROP/tun_checks.sh\n"
                     f"mkdir -p $RW/{speed}/user\n"
                     f"GADGET_ENV=$RW/{speed}/env.txt RW=$RW/{speed}/user "
                     f"bash $INTEROP/user_checks.sh")
        steps.append(step)
    return "\nbash $INTEROP/gadget.sh down\n".join(steps)


@pytest.fixture(scope="module")
def booted() -> dict[str, GuestResult | str]:
    """Boots done so far in this module by BOOTS key, or why one failed (each boots once)."""
    return {}


@pytest.fixture
def boot(request: pytest.FixtureRequest, booted: dict[str, GuestResult | str],
         tmp_path_factory: pytest.TempPathFactory) -> Boot:
    speed = request.param
    group = next(name for name, speeds in BOOTS.items() if speed in speeds)
    if group not in booted:
        rwdir = tmp_path_factory.mktemp(f"eembridge-{group.replace('+', '-')}")
        booted[group] = boot_guest(_boot_script(BOOTS[group]), rwdir, timeout=600, label=f"boot {group}")
    result = booted[group]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return Boot(speed, result)


@ALL_SPEEDS
def test_gadget_runs_at_the_speed_asked_for(boot: Boot) -> None:
    sysfs_speed, max_packet, _level, composite = SPEEDS[boot.speed]
    env = boot.env()
    assert env["USB_SPEED"] == sysfs_speed
    if composite:
        # Discovery on a composite device: EEM is not interface 0, ACM comes first.
        assert not env["EEM_INTF"].endswith(":1.0"), env["EEM_INTF"]
        classes = [cls for _i, cls, _d in boot.interfaces("before")]
        assert classes[0] == "02/02/01", f"ACM should be interface 0: {classes}"
    # The bridge saw the bulk max packet of this speed.
    assert f"max packet {max_packet}" in boot.bridge_log(), boot.bridge_log()[-2000:]
    # Real USB takes the C data path, with the default busy polling.
    assert "frames moved in C, busy-poll 100" in boot.bridge_log(), boot.bridge_log()[-2000:]


@ALL_SPEEDS
def test_cdc_eem_holds_the_device_first(boot: Boot) -> None:
    assert boot.eem_driver("before") == "cdc_eem"


@ALL_SPEEDS
def test_eembridge_detaches_cdc_eem_and_says_so(boot: Boot) -> None:
    boot.rc("bridge_up")  # the TAP got carrier: the bridge has the device
    assert boot.eem_driver("bridged") != "cdc_eem"
    lines = [ln for ln in boot.bridge_log().splitlines() if "cdc_eem" in ln]
    assert any("detach" in ln.lower() for ln in lines), \
        f"no log line about detaching cdc_eem:\n{boot.bridge_log()[-2000:]}"


@ALL_SPEEDS
def test_list_shows_the_device_held_by_eembridge(boot: Boot) -> None:
    boot.rc("list")
    listing = json.loads(boot.read("list.json"))
    devices = listing["devices"] if isinstance(listing, dict) else listing
    ours = [d for d in devices if d.get("serial") == SERIAL]
    assert len(ours) == 1, f"device {SERIAL} not listed once: {listing}"
    dev = ours[0]
    assert dev.get("interface") == int(boot.env()["EEM_INTF"].rsplit(".", 1)[1]), dev
    holder = str(dev.get("held_by") or dev.get("driver") or dev.get("status"))
    assert "eembridge" in holder, f"not shown as held by eembridge: {dev}"
    # The kernel's f_eem, known by its interface string (sysfs), takes batched OUT transfers.
    assert dev["name"] == "CDC Ethernet Emulation Model (EEM)" and dev["takes_batches"], dev


@ALL_SPEEDS
def test_ping_crosses_the_bridge(boot: Boot) -> None:
    boot.rc("ping")
    assert " 0% packet loss" in boot.read("ping.txt")


@ALL_SPEEDS
@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_tcp_payload_matches_its_sha256(boot: Boot, direction: str) -> None:
    boot.rc(direction)
    sent = boot.read(f"{direction}.sent")
    assert len(sent) == 64
    assert boot.read(f"{direction}.recv") == sent


@ALL_SPEEDS
def test_f_eem_takes_every_out_transfer_whole(boot: Boot) -> None:
    """The default OUT batching against the kernel's own f_eem, which fails a request when
    an EEM packet crosses its buffers and ends a transfer short at a partial packet: at
    high speed many frames per transfer (--out-chunk f_eem, 12 KB); at full speed and
    SuperSpeed one buffer's worth (bridge.OUT_DEFAULTS)."""
    boot.rc("peer_rx_errors")
    assert boot.read("peer_rx_errors.txt").strip() == "0"
    boot.rc("stats")
    stats = next(iter(json.loads(boot.read("stats.json")).values()))
    bridge = stats["bridge"]
    assert stats["drop_reasons"] == {} and bridge["out_errors"] == 0, stats
    assert stats["device"]["takes_batches"] and stats["out_layout"]["batch"], stats
    # IN transfers land in memory mapped from usbfs (no kernel buffer, no copy per URB).
    assert stats["in_buffers"] == "usbfs-mapped", stats["in_buffers"]
    assert "IN buffers mapped from usbfs" in boot.bridge_log()
    if boot.speed == "high":
        assert bridge["tx_frames"] > bridge["tx_transfers"] > 0, bridge  # some carried several


@ALL_SPEEDS
def test_the_event_thread_counts_what_it_did(boot: Boot) -> None:
    """`eembridge stats` shows the thread that moves frames in C: it went through
    libusb for the IN transfers and read the TAP for the OUT ones, no more passes than
    transfers (one pass reaps every completion ready), and slept when idle."""
    boot.rc("stats")
    stats = next(iter(json.loads(boot.read("stats.json")).values()))
    loop, rx, bridge = stats["event_loop"], stats["rx"], stats["bridge"]
    assert 0 < loop["usb_passes"] <= rx["transfers"] + bridge["tx_transfers"] + loop["sleeps"], stats
    assert 0 < loop["tap_passes"] <= bridge["tx_frames"] + loop["sleeps"], stats
    assert loop["sleeps"] > 0 and loop["empty_polls"] >= 0, loop


@ALL_SPEEDS
def test_eem_echo_is_answered_by_the_gadget(boot: Boot) -> None:
    boot.rc("echo")
    echo = json.loads(boot.read("echo.json"))
    assert echo["sent"] == 3 and echo["received"] == 3, echo
    assert echo["rtt_max_ms"] < 1000, echo


@FULL_CHECKS
def test_unplug_replug_mid_transfer_recovers(boot: Boot) -> None:
    boot.rc("replug_carrier_off")  # the TAP lost carrier when the gadget left the bus
    boot.rc("replug_carrier_on")   # and got it back on replug
    boot.rc("replug")               # the TCP transfer spanning it finished ...
    assert boot.read("replug.recv") == boot.read("replug.sent")  # ... intact
    boot.rc("replug_ping")
    assert boot.eem_driver("replugged") != "cdc_eem"
    # Counters run on across the reconnect, the event thread's included: its thread and
    # counters are new, and the snapshot is taken just after carrier came back, before
    # the new connection could catch up with what the old one had counted.
    boot.rc("stats_replugged")
    before = next(iter(json.loads(boot.read("stats.json")).values()))
    after = next(iter(json.loads(boot.read("stats_replugged.json")).values()))
    for section, name in (("event_loop", "usb_passes"), ("event_loop", "sleeps"),
                          ("event_loop", "tap_passes"), ("bridge", "tx_frames"), ("rx", "frames")):
        assert after[section][name] >= before[section][name], (section, name, before, after)


@ALL_SPEEDS
def test_sigterm_exits_cleanly_and_gives_the_device_back(boot: Boot) -> None:
    assert boot.read("bridge_exit.rc") == "0", boot.bridge_log()[-2000:]
    assert boot.eem_driver("after") == "cdc_eem"


# --- `--link tun` against f_eem (tun_checks.sh, in the TUN_SPEED boot) ---------------------

@pytest.fixture
def tun(boot: Boot) -> BootResults:
    """The files tun_checks.sh wrote in the boot of TUN_SPEED."""
    return BootResults(boot.result, subdir=f"{TUN_SPEED}/tun", label="--link tun: ")


TUN_BOOT = pytest.mark.parametrize("boot", [TUN_SPEED], indirect=True, ids=[f"{TUN_SPEED}-speed"])


def _l3(tun: BootResults, name: str) -> dict[str, int]:
    tun.rc(name)
    return dict(tun.json(f"{name}.json")["l3"])


def _learned(tun: BootResults, name: str, address: str) -> str:
    """The peer kernel's neighbour entry for `address` (from NAME.txt): learned, not static."""
    lines = [ln for ln in tun.read(f"{name}.txt").splitlines() if ln.split()[:1] == [address]]
    assert len(lines) == 1, f"peer has no neighbour entry for {address}: {tun.read(f'{name}.txt')}"
    assert "PERMANENT" not in lines[0] and "lladdr" in lines[0], lines[0]
    return lines[0]


def _tun_mac() -> str:
    from eembridge.core.l3 import stable_mac

    return stable_mac(TUN_NAME).hex(":")


def _same_sha256(results: BootResults, direction: str) -> None:
    """The transfer DIRECTION ended well and both ends hashed the same bytes."""
    results.rc(direction)
    sent = results.read(f"{direction}.sent")
    assert len(sent) == 64 and results.read(f"{direction}.recv") == sent


@TUN_BOOT
def test_tun_link_ipv4_ping_both_ways_with_arp_learned(tun: BootResults) -> None:
    tun.rc("tun_up")
    for step in ("ping4_h2p", "ping4_p2h"):
        tun.rc(step)
        assert " 0% packet loss" in tun.read(f"{step}.txt")
    # The host's ping: the translator asked for the peer, and the peer, asked, learned us.
    _learned(tun, "neigh4_after_h2p", tun_env(tun)["HOST_IP"])
    # The peer's ping after it forgot us: it asked, the translator answered with our MAC.
    assert f"lladdr {_tun_mac()}" in _learned(tun, "neigh4", tun_env(tun)["HOST_IP"])
    l3 = _l3(tun, "stats_arp")
    assert l3["arp_sent"] >= 1 and l3["arp_replies"] >= 1 and l3["arp_answered"] >= 1, l3
    assert l3["released"] >= 1, l3  # the first ping waited for the answer, then went


@TUN_BOOT
def test_tun_link_ipv6_link_local_ping_both_ways_through_ndp(tun: BootResults) -> None:
    tun.rc("tun_up")
    tun.rc("peer_ll_ready")
    for step in ("ping6_h2p", "ping6_p2h"):
        tun.rc(step)
        assert " 0% packet loss" in tun.read(f"{step}.txt")
    host_ll = tun_env(tun)["HOST_LL"]
    assert host_ll.startswith("fe80:"), tun.read("tun_ll.txt")
    assert f"lladdr {_tun_mac()}" in _learned(tun, "neigh6", host_ll)
    l3 = _l3(tun, "stats_ndp")
    assert l3["ns_sent"] >= 1 and l3["na_received"] >= 1 and l3["ns_answered"] >= 1, l3


@TUN_BOOT
@pytest.mark.parametrize("direction", ["tun_h2p", "tun_p2h"])
def test_tun_link_tcp_payload_matches_its_sha256(tun: BootResults, direction: str) -> None:
    _same_sha256(tun, direction)
    snapshot = tun.json("stats_tcp.json")
    l3 = snapshot["l3"]
    # Nothing IP needs was dropped on the way (what a TUN cannot carry, e.g. LLDP, may be).
    assert all(l3[f"dropped_{r}"] == 0 for r in ("bad_ip", "bad_arp", "bad_ndp", "not_ip",
                                                 "hold_full", "pending_full", "unresolved")), l3
    assert snapshot["bridge"]["tx_dropped"] == 0 and snapshot["drop_reasons"] == {}, snapshot


@TUN_BOOT
def test_tun_link_traffic_flows_again_after_a_replug(tun: BootResults) -> None:
    tun.rc("tun_carrier_off")  # the TUN lost carrier when the gadget left the bus
    tun.rc("tun_carrier_on")   # and got it back once the bridge had the device again
    tun.rc("tun_replug_ping")
    for direction in ("tun_replug_h2p", "tun_replug_p2h"):
        tun.rc(direction)
        assert tun.read(f"{direction}.recv") == tun.read(f"{direction}.sent")
    tun.rc("stats_replug")
    assert tun.json("stats_replug.json")["bridge"]["connects"] >= 2


@TUN_BOOT
def test_tun_link_takes_the_boards_dhcp_lease_with_its_routes_and_dns(tun: BootResults) -> None:
    """dnsmasq on f_eem's interface leased HOST_IP with an option 121 route, a DNS server
    and a domain; every TUN check above ran on that address."""
    from eembridge.link.tun import DHCP_ROUTE_METRIC

    tun.rc("dnsmasq_up")
    tun.rc("tun_leased")
    env = tun_env(tun)
    section = tun.json("stats_arp.json")["dhcp"]  # the first snapshot, taken once bound
    assert section["state"] == "bound" and section["address"] == f"{env['HOST_IP']}/24", section
    assert section["server"] == env["PEER_IP"] and section["leases"] == 1, section
    # RFC 3442: with option 121 the router of option 3 (dnsmasq sends its own) is ignored.
    assert section["router"] is None, section
    assert section["routes"] == [f"{env['DHCP_ROUTE']} via {env['PEER_IP']}"], section
    assert section["dns"] == [env["PEER_IP"]] and section["domain"] == env["DHCP_DOMAIN"], section
    routes = tun.read("dhcp_routes.txt").splitlines()
    assert any(f"src {env['HOST_IP']}" in line for line in routes), routes  # the address
    assert any(line.startswith(f"{env['DHCP_ROUTE']} via {env['PEER_IP']} ") and
               f"metric {DHCP_ROUTE_METRIC}" in line for line in routes), routes
    assert not any(line.startswith("default") for line in routes), routes
    assert "DHCPACK" in tun.read("dnsmasq.log")


@TUN_BOOT
def test_tun_link_asks_for_its_lease_again_after_a_replug(tun: BootResults) -> None:
    tun.rc("tun_rebound")
    env = tun_env(tun)
    before = tun.json("stats_arp.json")["dhcp"]
    section = tun.json("stats_replug.json")["dhcp"]
    # The same board back: the kept lease asked for again (REBOOTING) and ACKed, no DISCOVER.
    assert section["state"] == "bound" and section["address"] == f"{env['HOST_IP']}/24", section
    assert section["leases"] == 2 and section["naks"] == 0, section
    assert section["discovers"] == before["discovers"], (before, section)
    assert "REBOOTING -> BOUND" in tun.read("bridge.log")
    assert any(line.startswith(f"{env['DHCP_ROUTE']} via ")
               for line in tun.read("dhcp_routes_replug.txt").splitlines())


@TUN_BOOT
def test_tun_link_sigterm_exits_cleanly(tun: BootResults) -> None:
    assert tun.read("tun_exit.rc") == "0", tun.read("bridge.log")[-2000:]


def tun_env(tun: BootResults) -> dict[str, str]:
    """HOST_IP and the rest of the gadget's facts, with what tun_checks.sh found."""
    env = dict(line.split("=", 1) for line in
               (tun.dir.parent / "env.txt").read_text().splitlines() if "=" in line)
    for name in ("tun_env.txt", "dhcp_env.txt"):
        env.update(word.split("=", 1) for word in tun.read(name).split())
    return env


# --- `--link user` against f_eem (user_checks.sh, after tun_checks.sh) ----------------------

@pytest.fixture
def user(boot: Boot) -> BootResults:
    """The files user_checks.sh wrote in the boot of TUN_SPEED."""
    return BootResults(boot.result, subdir=f"{TUN_SPEED}/user", label="--link user: ")


def _lines(results: BootResults, name: str) -> set[str]:
    return set(results.read(f"{name}.txt").splitlines())


@TUN_BOOT
def test_user_link_runs_as_nobody_with_no_capability(user: BootResults) -> None:
    user.rc("user_up")  # the bridge had the device: connected, in its stats
    status = dict(line.split(":", 1) for line in user.read("proc_status.txt").splitlines())
    assert status["Uid"].split() == ["65534"] * 4, status
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status)
    # No interface of its own: what runs is what was there, less cdc_eem's netdev (detached).
    assert _lines(user, "interfaces_running") < _lines(user, "interfaces_before")


@TUN_BOOT
@pytest.mark.parametrize("direction", ["user_h2p", "user_p2h"])
def test_user_link_forwarded_port_carries_tcp_by_sha256(user: BootResults, direction: str) -> None:
    _same_sha256(user, direction)
    # The forwards listen on the host's loopback only.
    env = dict(word.split("=", 1) for word in user.read("user_env.txt").split())
    assert {f"127.0.0.1:{env['PORT_H2P']}", f"127.0.0.1:{env['PORT_P2H']}"} <= \
        _lines(user, "listeners_running"), user.read("listeners_running.txt")


@TUN_BOOT
def test_user_link_stats_show_the_stack_carried_both_ways(user: BootResults) -> None:
    user.rc("stats_tcp")
    snapshot = user.json("stats_tcp.json")
    assert "link" not in snapshot  # no kernel interface on the host's side
    counters = snapshot["user"]
    # 3 MB each way is over 2000 full frames each way.
    assert counters["to_stack_frames"] > 2000 and counters["from_stack_frames"] > 2000, counters
    assert counters["refused_tcp"] == 0 and counters["to_bridge_dropped"] == 0, counters
    assert snapshot["bridge"]["tx_dropped"] == 0 and snapshot["drop_reasons"] == {}, snapshot
    # The board found the gateway by ARP: libslirp's MAC, 52:55 then the gateway's address.
    host_ip = (user.dir.parent / "env.txt").read_text().split("HOST_IP=", 1)[1].split()[0]
    gateway_mac = "52:55:" + ":".join(f"{int(b):02x}" for b in host_ip.split("."))
    assert f"{host_ip} lladdr {gateway_mac}" in user.read("peer_neigh.txt"), \
        user.read("peer_neigh.txt")


@TUN_BOOT
def test_user_link_sigterm_exits_cleanly_and_leaves_nothing(user: BootResults) -> None:
    assert user.read("user_exit.rc") == "0", user.read("bridge.log")[-2000:]
    assert user.read("nobody_processes.txt") == "", user.read("nobody_processes.txt")
    # Every interface there is was there before, but cdc_eem's netdev: back, maybe renamed.
    assert _lines(user, "interfaces_after") - {user.read("cdc_eem_netdev.txt")} <= \
        _lines(user, "interfaces_before")
    assert _lines(user, "listeners_after") <= _lines(user, "listeners_before")
    assert user.read("driver_after.txt") == "cdc_eem"
