"""--link tun --dhcp against dnsmasq serving DHCP on the board's side.

The board is the simulated device; its network side is a TAP in its own namespace, and
dnsmasq runs there on that interface, as it does on a Linux USB gadget. The bridge has
no static address: everything the TUN gets comes from dnsmasq through the translation.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from eembridge.core.dhcp import Route
from eembridge.link.netns import iproute, link_index
from eembridge.link.tun import DHCP_ROUTE_METRIC

from netfixtures import ping, sim_rigs, wait_for


class Dnsmasq:
    """dnsmasq in the foreground in `namespace`, DHCP only (no DNS), on one interface;
    its log lines are kept for the checks."""

    def __init__(self, namespace: str, interface: str, network: ipaddress.IPv4Network,
                 leases: Path) -> None:
        self.namespace, self.interface, self.network, self.leases = (namespace, interface,
                                                                     network, leases)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self, first: int = 10, last: int = 20, *extra: str,
              ping_check: bool = False) -> Dnsmasq:
        """ping_check: dnsmasq's default, a ping of the address before offering it (3 s
        more to the lease); off in most checks here, on in the CLI's."""
        executable = shutil.which("dnsmasq")
        assert executable, "dnsmasq is not installed (install.sh installs dnsmasq-base)"
        net = self.network
        self.lines = []
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, executable, "--no-daemon",
             "--conf-file=/dev/null", "--port=0", "--pid-file=", "--log-dhcp",
             f"--interface={self.interface}", "--bind-interfaces", "--dhcp-authoritative",
             f"--dhcp-leasefile={self.leases}", *([] if ping_check else ["--no-ping"]),
             f"--dhcp-range={net[first]},{net[last]},{net.netmask},2m", *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        wait_for(lambda: any("sockets bound" in line for line in self.lines) or
                 self.proc.poll() is not None, 10, "dnsmasq to start")
        assert self.proc.poll() is None, "\n".join(self.lines)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip())

    def count(self, word: str) -> int:
        return sum(word in line for line in self.lines)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def dhcp_rig(tmp_path):
    """make(**bridge_options) -> (rig, dnsmasq): dnsmasq started on the board's side
    before the bridge, which has --link tun --dhcp and no address of its own."""
    servers: list[Dnsmasq] = []
    with sim_rigs() as make_rig:

        def make(dnsmasq_args: Any = (), ping_check: bool = False, **bridge_options: Any):
            """dnsmasq_args: a tuple, or a function of the board's address giving one."""
            holder: dict[str, Dnsmasq] = {}

            def before_bridge(sim: Any, network: ipaddress.IPv4Network) -> None:
                server = Dnsmasq(sim.namespace, sim.network.name, network,
                                 tmp_path / f"leases{len(servers)}")
                servers.append(server)
                args = dnsmasq_args(str(network[1])) if callable(dnsmasq_args) else dnsmasq_args
                holder["server"] = server.start(10, 20, *args, ping_check=ping_check)

            rig = make_rig({}, static_neighbour=False, link="tun", dhcp=True, addresses=[],
                           before_bridge=before_bridge, **bridge_options)
            return rig, holder["server"]

        try:
            yield make
        finally:
            for server in servers:
                server.stop()


def tun_addresses(rig: Any) -> list[str]:
    return ipv4_on(rig.bridge.tap.tun.name)


def ipv4_on(name: str) -> list[str]:
    """ADDR/PREFIX of every IPv4 address on interface `name`, as the kernel has them."""
    with iproute() as ipr:
        return [f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"
                for m in ipr.addr("dump", index=link_index(ipr, name), family=2)]


def default_routes(rig: Any) -> list[tuple[str, int]]:
    """(gateway, metric) of the default routes through the TUN."""
    with iproute() as ipr:
        index = link_index(ipr, rig.bridge.tap.tun.name)
        return [(r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_PRIORITY"))
                for r in ipr.route("dump", family=2, oif=index) if r["dst_len"] == 0]


def wait_bound(rig: Any, timeout: float = 20.0, **expected: int) -> dict[str, Any]:
    """The dhcp section once bound with the counters `expected` reached, and the address
    on the TUN (the pump adds it just after the client says bound)."""
    def ready() -> dict[str, Any] | None:
        section = rig.bridge.stats()["dhcp"]
        done = section["state"] == "bound" and all(section[k] >= v for k, v in expected.items())
        done = done and section["address"] in tun_addresses(rig)
        return section if done else None

    return dict(wait_for(ready, timeout, f"a DHCP lease ({expected or 'first'})"))


def test_the_lease_configures_the_tun_and_carries_traffic_and_renews(dhcp_rig):
    # T1 4 s: dnsmasq's shortest lease is 2 minutes, its T1 may be anything shorter.
    rig, server = dhcp_rig(("--dhcp-option=option:T1,4", "--dhcp-option=option:T2,100"),
                           ping_check=True)
    section = wait_bound(rig)
    # At once: dnsmasq's ping of the address before it offered it left the board's
    # kernel a neighbour entry for it that fails, and drops the first reply to the host,
    # unless the client's ARP announcement has put it right.
    assert len(ping(rig.device_ip)) == 3
    address = ipaddress.IPv4Interface(section["address"])
    network = ipaddress.IPv4Network(f"{rig.device_ip}/24", strict=False)
    assert address.network == network and network[10] <= address.ip <= network[20]
    assert tun_addresses(rig) == [str(address)]
    assert section["router"] == section["server"] == rig.device_ip
    assert default_routes(rig) == [(rig.device_ip, DHCP_ROUTE_METRIC)]
    assert 110 <= section["expires_in"] <= 120
    # The board reaches the host at the leased address, and the host the board.
    rig.host_ip = str(address.ip)
    rig.transfer(2_000_000, 2_000_000, server_on_board=True)
    rig.transfer(2_000_000, 2_000_000, server_on_board=False)
    # Renewal at T1, by unicast to the server: dnsmasq ACKs it and the lease runs on.
    section = wait_bound(rig, 15, renewals=1)
    assert server.count("DHCPACK") >= 2 and section["lost"] == 0 and section["naks"] == 0
    assert tun_addresses(rig) == [str(address)] and section["expires_in"] > 110
    assert len(ping(rig.device_ip)) == 3


def test_a_silent_server_loses_the_lease_then_a_new_one_comes(dhcp_rig):
    # The client's clock 20 times the real one: the 2-minute lease lasts 6 s, T1 3 s.
    rig, server = dhcp_rig(dhcp_time_scale=20.0)
    section = wait_bound(rig)
    address = section["address"]
    assert tun_addresses(rig) == [address]
    server.stop()

    def lost() -> dict[str, Any] | None:
        now = rig.bridge.stats()["dhcp"]
        return now if now["lost"] >= 1 and not tun_addresses(rig) else None

    section = wait_for(lost, 20, "the lease to expire and its address to go")
    assert section["rebinds"] == 1 and section["address"] is None
    assert section["state"] == "selecting" and default_routes(rig) == []
    server.start(10, 20)
    section = wait_bound(rig, 30, leases=2)
    assert tun_addresses(rig) == [section["address"]]
    rig.host_ip = section["address"].split("/")[0]
    assert len(ping(rig.device_ip)) == 3


def test_a_replug_keeps_the_lease_or_gets_a_new_one_from_another_network(dhcp_rig):
    rig, server = dhcp_rig()
    first = wait_bound(rig)["address"]
    # The same board back: it ACKs the address asked for again (REBOOTING).
    rig.sim.device.unplug()
    wait_for(lambda: rig.bridge.stats()["dhcp"]["state"] == "off", 5, "the client to see the unplug")
    rig.sim.device.replug()
    section = wait_bound(rig, 20, leases=2)
    assert section["address"] == first and section["naks"] == 0 and section["discovers"] == 1
    rig.sim.device.unplug()
    wait_for(lambda: rig.bridge.stats()["dhcp"]["state"] == "off", 5, "the client to see the unplug")
    assert tun_addresses(rig) == [first]  # kept over the unplug
    # The board comes back serving another range: it NAKs the old address.
    server.stop()
    server.leases.unlink()
    server.start(100, 110)
    rig.sim.device.replug()
    section = wait_bound(rig, 20, leases=3)
    address = ipaddress.IPv4Interface(section["address"])
    network = address.network
    assert section["naks"] == 1 and network[100] <= address.ip <= network[110]
    assert tun_addresses(rig) == [str(address)]
    rig.host_ip = str(address.ip)
    assert len(ping(rig.device_ip)) == 3
    rig.transfer(1_000_000, 1_000_000, server_on_board=True)


def _eembridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)


@pytest.mark.parametrize(("args", "words"), [
    (("--sim", "--dhcp"), "--dhcp needs --link tun"),
    (("--sim", "--link", "tap", "--dhcp"), "--dhcp needs --link tun"),
    (("--sim", "--link", "tun", "--dhcp", "--ip", "10.0.0.2/24"), "drop --ip 10.0.0.2/24"),
])
def test_dhcp_refuses_what_it_cannot_do_in_one_line(args, words):
    bad = _eembridge(*args)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and words in bad.stderr, bad.stderr


def test_cli_takes_a_lease_from_a_server_that_starts_later(tmp_path):
    """`eembridge --sim --link tun --dhcp` as a user runs it; the board's dnsmasq starts
    after the bridge (a board still booting): the client's DISCOVERs find it."""
    from eembridge.link.netns import free_linklocal_subnet, unique_name
    from eembridge.observe.metrics import snapshot_families

    from netfixtures import SimBridgeProcess, require_tun_and_root

    require_tun_and_root()
    subnet = free_linklocal_subnet()
    tap, sock = unique_name("eemdh"), str(tmp_path / "bridge.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eembridge", "--sim", "--tap", tap, "--link", "tun", "--dhcp",
         "--sim-ip", f"{subnet[1]}/24", "--stats-socket", sock, "--log-format", "text"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    bridge = SimBridgeProcess(proc, tap, subnet, sock)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stderr),
                     daemon=True).start()
    server = None
    try:
        bridge.wait_connected()
        namespace = wait_for(lambda: next((line.split()[-1] for line in lines
                                           if "simulated device up" in line), None), 10,
                             "the simulated device's namespace in the log")
        wait_for(lambda: bridge.snapshot()["dhcp"]["state"] == "selecting", 10,
                 "DISCOVERs with nobody to answer them")
        server = Dnsmasq(namespace, next(n for n in _links(namespace) if n.startswith("eemsim")),
                         subnet, tmp_path / "leases").start(ping_check=True)
        section = wait_for(lambda: (lambda d: d if d["state"] == "bound"
                                    and d["address"] in ipv4_on(tap) else None)(
            bridge.snapshot()["dhcp"]), 30, "the lease")
        assert section["leases"] == 1 and section["discovers"] >= 2
        # At once: the board's kernel has a failed neighbour entry for the address from
        # dnsmasq's ping check, which the client's ARP announcement put right.
        assert len(ping(str(subnet[1]))) == 3
        table = bridge.eembridge("stats")
        assert table.returncode == 0 and "dhcp:state" in table.stdout and "bound" in table.stdout
        names = {family.name for family in snapshot_families(bridge.snapshot())}
        assert {"eembridge_dhcp_leases", "eembridge_dhcp_lost"} <= names
    finally:
        code, _err = bridge.stop()
        if server is not None:
            server.stop()
    assert code == 0, "\n".join(lines)
    # The lease's address comes and goes while the bridge runs: CAP_NET_ADMIN is kept.
    assert any("dropped capabilities" in line and "kept: net_admin" in line for line in lines)
    changes = [line for line in lines if "dhcp on" in line]
    assert sum("SELECTING -> REQUESTING" in line for line in changes) == 1, changes
    assert sum("REQUESTING -> BOUND" in line for line in changes) == 1, changes


def _links(namespace: str | None) -> list[str]:
    with iproute(namespace) as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def test_a_persistent_tun_keeps_no_leased_address_after_exit(dhcp_rig):
    rig, _server = dhcp_rig(persist=True)
    tun = rig.bridge.tap.tun
    try:
        address = wait_bound(rig)["address"]
        assert tun_addresses(rig) == [address]
        rig.bridge.stop()
        assert ipv4_on(tun.name) == []  # nobody renews it once the bridge is gone
    finally:
        rig.bridge.stop()  # a persistent TUN outlives its bridge, so the test deletes it
        subprocess.run(["ip", "link", "del", tun.name], check=False)
        assert tun.name not in _links(None)


def test_dhcp_in_a_config_file_is_checked_the_same_way(tmp_path):
    config = tmp_path / "rig.toml"
    config.write_text('[defaults]\ndhcp = true\n')
    bad = _eembridge("--sim", "--config", str(config))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "rig.toml:2: [defaults] dhcp: needs --link tun" in bad.stderr.splitlines()[-1]
    config.write_text('[defaults]\ndhcp = true\nlink = "tun"\naddresses = ["10.1.1.2/24"]\n')
    bad = _eembridge("--sim", "--config", str(config))
    assert bad.returncode == 2 and "drop --ip 10.1.1.2/24" in bad.stderr.splitlines()[-1]


def tun_routes(rig: Any) -> list[tuple[str, str | None, int]]:
    """(destination, gateway or None, metric) of the IPv4 unicast routes the bridge put on
    the TUN (not the kernel's own prefix route for the address)."""
    with iproute() as ipr:
        index = link_index(ipr, rig.bridge.tap.tun.name)
        return sorted((f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}",
                       r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_PRIORITY"))
                      for r in ipr.route("dump", family=2, oif=index, table=254)
                      if r["proto"] != 2)  # RTPROT_KERNEL: the address's prefix route


def test_classless_routes_replace_the_router_and_go_with_the_lease(dhcp_rig):
    """Option 121 (RFC 3442): its routes go on the TUN at DHCP_ROUTE_METRIC, option 3's
    router (dnsmasq sends its own address) makes no default route, and they go with the
    lease. The DNS server and domain are shown in stats, nothing else is done with them."""
    def options(board: str) -> tuple[str, ...]:
        # 198.51.100.0/24's router is reached through the on-link 192.0.2.0/24 given after it.
        return (f"--dhcp-option=121,10.98.0.0/16,{board},198.51.100.0/24,192.0.2.1,"
                "192.0.2.0/24,0.0.0.0",
                f"--dhcp-option=6,{board},192.0.2.53", "--dhcp-option=15,board.test")

    rig, server = dhcp_rig(options, dhcp_time_scale=20.0)
    board = rig.device_ip
    section = wait_bound(rig)
    assert section["router"] is None
    assert section["routes"] == [f"10.98.0.0/16 via {board}", "198.51.100.0/24 via 192.0.2.1",
                                 "192.0.2.0/24"]
    assert section["dns"] == [board, "192.0.2.53"] and section["domain"] == "board.test"
    # The pump puts the routes on just after the address wait_bound waited for.
    wait_for(lambda: len(tun_routes(rig)) == 3, 5, "the lease's routes")
    assert tun_routes(rig) == [("10.98.0.0/16", board, DHCP_ROUTE_METRIC),
                               ("192.0.2.0/24", None, DHCP_ROUTE_METRIC),
                               ("198.51.100.0/24", "192.0.2.1", DHCP_ROUTE_METRIC)]
    assert default_routes(rig) == []
    table = _rendered(rig.bridge.stats())
    assert f"dhcp:dns  {board}, 192.0.2.53" in table and "dhcp:domain  board.test" in table
    # A renewal (or a replug) whose ACK brings other routes: the old ones go, the new come.
    tun, lease = rig.bridge.tap, rig.bridge.tap.dhcp.lease
    other = dataclasses.replace(lease, classless=(Route("10.97.0.0/16", board),))
    tun._configure(other, lease)
    assert tun_routes(rig) == [("10.97.0.0/16", board, DHCP_ROUTE_METRIC)]
    tun._configure(lease, other)  # back to what the client holds, for its expiry below
    assert len(tun_routes(rig)) == 3 and tun.dhcp_counters["config_errors"] == 0
    with open("/etc/resolv.conf", "rb") as before:
        resolv = before.read()
    server.stop()

    def lost() -> dict[str, Any] | None:
        now = rig.bridge.stats()["dhcp"]
        return now if now["lost"] >= 1 and not tun_addresses(rig) else None

    section = wait_for(lost, 20, "the lease to expire and its address to go")
    assert section["routes"] == [] and tun_routes(rig) == []
    with open("/etc/resolv.conf", "rb") as after:
        assert after.read() == resolv


def _rendered(snapshot: dict[str, Any]) -> str:
    """`eembridge stats`'s table of a snapshot as text, each row's cells two spaces apart."""
    import io

    from rich.console import Console

    from eembridge.cli.stats import render

    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(render("eemtest", snapshot))
    return "\n".join("  ".join(c.strip() for c in line.split("│") if c.strip())
                     for line in out.getvalue().splitlines())


def test_a_route_the_host_has_already_is_left_alone(dhcp_rig):
    """The lease's route to a destination the host already reaches at the same metric
    through another interface is not added over it: the user's route stays, before, during
    and after the lease, and the conflict is counted and logged."""
    from eembridge.link.netns import unique_name

    dummy = unique_name("eemrt", 14)  # and its veth peer, one more letter
    with iproute() as ipr:
        ipr.link("add", ifname=dummy, kind="veth", peer=dummy + "p")  # no dummy module here
        try:
            index = link_index(ipr, dummy)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=link_index(ipr, dummy + "p"), state="up")
            ipr.route("add", dst="10.96.0.0/16", oif=index, priority=DHCP_ROUTE_METRIC)

            def dummy_routes() -> list[str]:
                return [f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                        for r in ipr.route("dump", family=2, oif=index, table=254)
                        if r.get_attr("RTA_PRIORITY") == DHCP_ROUTE_METRIC]

            rig, server = dhcp_rig(lambda board: (
                f"--dhcp-option=121,10.96.0.0/16,{board},10.95.0.0/16,{board}",))
            board = rig.device_ip
            wait_bound(rig)
            wait_for(lambda: tun_routes(rig), 5, "the lease's routes")
            assert tun_routes(rig) == [("10.95.0.0/16", board, DHCP_ROUTE_METRIC)]
            assert dummy_routes() == ["10.96.0.0/16"]
            tun = rig.bridge.tap
            assert tun.dhcp_counters["route_conflicts"] == 1
            assert tun.dhcp_counters["config_errors"] == 0
            # A renewal puts the same routes on again: ours are kept, not a conflict.
            tun._configure(tun.dhcp.lease, tun.dhcp.lease)
            assert tun.dhcp_counters["route_conflicts"] == 2  # the user's, once more
            assert tun_routes(rig) == [("10.95.0.0/16", board, DHCP_ROUTE_METRIC)]
            tun._deconfigure(tun.dhcp.lease)
            assert tun_routes(rig) == [] and dummy_routes() == ["10.96.0.0/16"]
        finally:
            ipr.link("del", index=link_index(ipr, dummy))
