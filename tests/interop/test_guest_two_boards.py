"""Two EEM boards on one machine, against the kernel's f_eem gadget (real peers), one boot.

tests/interop/two_boards.sh makes two UDCs (dummy_hcd num=2), two configfs EEM gadgets
with the SAME VID:PID and different serials, each peer in its own namespace, one TOML
config with a section per board, and starts two bridges the way eembridge@.service does
(`--instance %i --wait`): board A by `serial:SERIAL` (systemd-escaped), board B by its
USB port path. The tests below read the files it leaves in the rwdir: the TAPs as
configured (name, address, MTU, MAC, static neighbour), ping and TCP both ways on both
links at once (SHA-256), `stats --json`, `stats --watch --json`, `list --json`, an
unplug/replug of board B alone, the udev rule on the real sysfs paths, and SIGTERM.
Board B also runs under a shim that makes usbfs refuse to map its IN buffers. Then
(labgrid_farm.sh) the same boards as a labgrid board farm: coordinator, exporter and
clients in the guest, a place acquired, the driver's link, TCP, release.

A machine that cannot boot the guest FAILS here naming what is missing
(tests/interop/setup_guest.sh installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from bootresults import BootResults, boot_or_fail

pytestmark = pytest.mark.interop

BOARDS = ("a", "b")
SHIM = Path(__file__).with_name("refuse_usbfs_mmap.c")


class Boot(BootResults):
    def log(self, board: str) -> str:
        return self.read(f"bridge_{board}.log")

    def drivers(self, stage: str) -> dict[str, tuple[str, str]]:
        """board -> (EEM interface, driver) from drivers_STAGE.txt."""
        rows = [line.split() for line in self.read(f"drivers_{stage}.txt").splitlines()]
        return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3}


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    rwdir = tmp_path_factory.mktemp("eembridge-two-boards")
    # Board B runs under a shim that makes usbfs refuse its memory mapping.
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                    str(rwdir / "refuse_usbfs_mmap.so"), str(SHIM), "-ldl"], check=True)
    # The labgrid stage took the boot from ~190 s to ~525 s of a loaded machine's TCG.
    result = boot_or_fail("bash $INTEROP/two_boards.sh", rwdir, timeout=1200, label="two-boards boot")
    return Boot(result, logs=tuple(f"bridge_{b}.log" for b in BOARDS))


def test_two_udcs_two_gadgets_both_bound_to_cdc_eem_first(boot: Boot) -> None:
    assert boot.read("udcs.txt").split() == ["dummy_udc.0", "dummy_udc.1"]
    boot.rc("gadgets")
    env = boot.env()
    # Two USB devices on two buses, same VID:PID, told apart by serial and port.
    assert {env["PORT_a"], env["PORT_b"]} == {"1-1", "2-1"}, env
    assert env["SPEED_a"] == env["SPEED_b"] == "480"
    before = boot.drivers("before")
    assert {b: d for b, (_i, d) in before.items()} == {"a": "cdc_eem", "b": "cdc_eem"}, before


@pytest.mark.parametrize("board", BOARDS)
def test_each_bridge_takes_its_own_board_as_configured(boot: Boot, board: str) -> None:
    boot.rc(f"up_{board}")
    env = boot.env()
    log = boot.log(board)
    instance = dict(line.split("=", 1) for line in boot.read("instances.txt").splitlines())[f"INSTANCE_{board}"]
    if board == "a":  # by serial, escaped as systemd-escape writes it
        assert instance == "serial:" + env["SERIAL_a"].replace("-", r"\x2d"), instance
    else:  # by port path
        assert instance == env["PORT_b"]
    assert f"[board-{board}]" in log or f"board-{board}" in log, f"config section not used:\n{log[-2000:]}"
    # It detached cdc_eem from its own interface, and from no other.
    own = f"{env[f'PORT_{board}']}:1.0"
    other = env["PORT_b" if board == "a" else "PORT_a"] + ":1.0"
    detached = [ln for ln in log.splitlines() if "detached cdc_eem" in ln]
    assert detached and all(own in ln for ln in detached), f"{own}:\n{log[-2000:]}"
    assert not any(other in ln for ln in detached)
    bridged = boot.drivers("bridged")
    assert bridged[board][1] != "cdc_eem", bridged


@pytest.mark.parametrize("board", BOARDS)
def test_tap_has_the_configured_name_address_mtu_mac_and_neighbour(boot: Boot, board: str) -> None:
    env = boot.env()
    (link,) = boot.json(f"link_{board}.json")
    assert link["ifname"] == env[f"TAP_{board}"]
    assert link["mtu"] == int(env[f"MTU_{board}"])
    assert link["address"] == env[f"TAP_MAC_{board}"]
    assert "LOWER_UP" in link["flags"], link
    (addr,) = boot.json(f"addr_{board}.json")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [(env[f"HOST_IP_{board}"], 24)]
    neigh = boot.json(f"neigh_{board}.json")
    static = [n for n in neigh if n["dst"] == env[f"PEER_IP_{board}"]]
    assert static and static[0]["lladdr"] == env[f"DEV_MAC_{board}"], neigh
    assert "PERMANENT" in static[0]["state"], neigh


@pytest.mark.parametrize("board", BOARDS)
def test_ping_each_peer_over_its_own_link(boot: Boot, board: str) -> None:
    boot.rc(f"ping_{board}")
    assert " 0% packet loss" in boot.read(f"ping_{board}.txt")


@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_tcp_both_ways_on_both_links_at_once(boot: Boot, board: str, direction: str) -> None:
    name = f"{direction}_{board}"
    boot.rc(name)
    sent = boot.read(f"{name}.sent")
    assert len(sent) == 64
    assert boot.read(f"{name}.recv") == sent


def test_the_four_transfers_ran_at_the_same_time(boot: Boot) -> None:
    spans = {f"{d}_{b}": tuple(map(float, boot.read(f"{d}_{b}.span").split()))
             for b in BOARDS for d in ("h2p", "p2h")}
    # Every transfer overlaps every other: the latest start comes before the first end.
    latest_start = max(start for start, _end in spans.values())
    first_end = min(end for _start, end in spans.values())
    assert latest_start < first_end, spans


def test_stats_json_lists_both_bridges_with_their_serials(boot: Boot) -> None:
    boot.rc("stats")
    env = boot.env()
    stats = boot.json("stats.json")
    serials = {tap: (s.get("device") or {}).get("serial") for tap, s in stats.items()}
    assert serials == {env["TAP_a"]: env["SERIAL_a"], env["TAP_b"]: env["SERIAL_b"]}, serials
    for tap, s in stats.items():
        assert s["connected"], (tap, s)
        assert s["rx"]["frames"] > 0 and s["bridge"]["tx_frames"] > 0, (tap, s)
    # Board a batches (f_eem, the default); board b's section says max-transfer = "frame":
    # every frame of its TCP transfers went in a transfer of its own, and f_eem took them.
    a, b = stats[env["TAP_a"]], stats[env["TAP_b"]]
    assert a["out_layout"]["batch"] and a["tx"]["frames"] > a["tx"]["transfers"], a["tx"]
    tx = b["tx"]
    assert b["out_layout"] == {"batch": False, "max_transfer": 1526, "chunk": 0}, b["out_layout"]
    assert tx["transfers"] == tx["frames"] + tx["echo"] + tx["echo_response"] > 1000, tx


def test_a_refused_usbfs_mapping_is_a_warning_and_the_ring_carries_in(boot: Boot) -> None:
    """Board B's usbfs refuses the IN buffers' mapping: said once per connect, and its
    IN transfers land in the ring, carrying the TCP transfers checked above."""
    boot.rc("stats")
    env = boot.env()
    stats = boot.json("stats.json")
    assert stats[env["TAP_a"]]["in_buffers"] == "usbfs-mapped"
    assert stats[env["TAP_b"]]["in_buffers"] == "ring"
    assert stats[env["TAP_b"]]["rx"]["frames"] > 1000, stats[env["TAP_b"]]["rx"]
    log_a, log_b = boot.log("a"), boot.log("b")
    warnings = [ln for ln in log_b.splitlines() if "usbfs refused to map" in ln]
    connects = [ln for ln in log_b.splitlines() if re.search(r"\b(claimed|reconnected): ", ln)]
    assert len(warnings) == len(connects) >= 2, log_b[-3000:]  # claimed, then replugged
    assert "131072 bytes" in warnings[0] and "usbfs_memory_mb" in warnings[0], warnings[0]
    assert "IN buffers mapped from usbfs" not in log_b
    assert "usbfs refused" not in log_a and "IN buffers mapped from usbfs" in log_a


def test_stats_watch_shows_both(boot: Boot) -> None:
    boot.rc("watch")
    env = boot.env()
    refreshes = [json.loads(line) for line in boot.read("watch.jsonl").splitlines()]
    assert len(refreshes) == 2, refreshes
    for r in refreshes:
        rows = {row["tap"]: row for row in r["bridges"]}
        assert {t: row["serial"] for t, row in rows.items()} == {
            env["TAP_a"]: env["SERIAL_a"], env["TAP_b"]: env["SERIAL_b"]}, r
        assert all(row["connected"] for row in rows.values()) and r["not_answering"] == [], r
    # The second refresh has rates (two snapshots of each bridge).
    assert all(row["in_frames_per_s"] is not None for row in refreshes[1]["bridges"]), refreshes[1]


def test_list_shows_both_devices_held_by_eembridge(boot: Boot) -> None:
    boot.rc("list")
    env = boot.env()
    devices = {d["serial"]: d for d in boot.json("list.json")["devices"]}
    assert set(devices) == {env["SERIAL_a"], env["SERIAL_b"]}, devices
    for b in BOARDS:
        d = devices[env[f"SERIAL_{b}"]]
        assert d["port"] == env[f"PORT_{b}"], d
        assert f"eembridge:{env[f'TAP_{b}']}" in str(d["held_by"]), d


def test_unplug_replug_one_board_leaves_the_other_alone(boot: Boot) -> None:
    boot.rc("replug_off_b")   # board B's TAP lost carrier
    boot.rc("replug_on_b")    # and got it back
    boot.rc("replug_ping_b")  # B carries traffic again
    boot.rc("replug_ping_a")  # A carried traffic all along (25 pings across it)
    assert " 0% packet loss" in boot.read("replug_ping_a.txt")
    boot.rc("replug_carrier_a")
    log_a, log_b = boot.log("a"), boot.log("b")
    assert "device gone" in log_b and "reconnected" in log_b, log_b[-2000:]
    assert "device gone" not in log_a and "reconnected" not in log_a, log_a[-2000:]
    assert boot.drivers("replugged")["b"][1] != "cdc_eem"


@pytest.mark.parametrize("board", BOARDS)
def test_udev_rule_wants_the_unit_for_each_board_port(boot: Boot, board: str) -> None:
    boot.rc("install")
    boot.rc(f"udev_{board}")
    env = boot.env()
    syspath = boot.read(f"udev_{board}.syspath")
    assert syspath.endswith(f"/{env[f'PORT_{board}']}/{env[f'INTF_{board}']}"), syspath
    out = boot.read(f"udev_{board}.txt")
    wants = re.findall(r"^SYSTEMD_WANTS=(.*)$", out, re.M)
    assert wants == [f"eembridge@{env[f'PORT_{board}']}.service"], out[-3000:]
    assert re.search(rf"^EEMBRIDGE_PORT={re.escape(env[f'PORT_{board}'])}$", out, re.M), out[-3000:]


@pytest.mark.parametrize("board", BOARDS)
def test_sigterm_or_a_deleted_tap_gives_each_board_back_to_cdc_eem(boot: Boot, board: str) -> None:
    if board == "a":  # SIGTERM: a clean exit
        assert boot.read(f"exit_{board}.rc") == "0", boot.log(board)[-2000:]
    else:  # its TAP deleted under it: the C data path stops reading, the bridge stops
        assert boot.read(f"exit_{board}.rc") == "2", boot.log(board)[-2000:]
        assert "is gone (deleted while the bridge ran?): stopping" in boot.log(board), \
            boot.log(board)[-2000:]
    assert boot.drivers("after")[board][1] == "cdc_eem", boot.read("drivers_after.txt")


# -- the same boards as a labgrid board farm (labgrid_farm.sh, results in labgrid/) -------

def _farm(boot: Boot) -> BootResults:
    return BootResults(boot.result, subdir="labgrid", label="labgrid farm: ",
                       logs=("exporter.log", "coordinator.log"))


def test_farm_exporter_publishes_both_boards_and_a_client_acquires_one(boot: Boot) -> None:
    farm = _farm(boot)
    farm.rc("coordinator")
    farm.rc("exporter_up")
    farm.rc("place")
    farm.rc("resources")  # both boards matched by udev (ID_SERIAL_SHORT, sys_name), available
    resources = farm.read("resources.txt").split()
    assert {"guest/board-a/RemoteEEMBoard", "guest/board-b/RemoteEEMBoard"} <= set(resources), resources
    farm.rc("acquire")
    assert "acquired place farm-a" in farm.read("acquire.txt")


def test_farm_driver_brings_the_link_up_and_carries_tcp(boot: Boot) -> None:
    farm = _farm(boot)
    farm.rc("client_a")
    env = boot.env()
    client = farm.json("client_a.json")
    assert "error" not in client, client.get("traceback", client)
    # What the driver told the test: the exporter's TAP for board A, as exported.
    assert (client["board"], client["tap"], client["local"]) == ("RemoteEEMBoard", "farmA", True)
    assert client["addresses"] == [f"{env['HOST_IP_a']}/24"] and client["peer"] == env["PEER_IP_a"]
    # Its bridge claimed board A (by port path, from the udev match on the serial).
    before, after = client["stats_before"], client["stats_after"]
    assert before["connected"] and before["tap"] == "farmA", before
    assert (before.get("device") or {}).get("serial") == env["SERIAL_a"], before.get("device")
    assert " 0% packet loss" in boot.read("lg_ping_a.txt")
    for name in ("lg_h2p_a", "lg_p2h_a"):
        boot.rc(name)
        sent = boot.read(f"{name}.sent")
        assert len(sent) == 64 and boot.read(f"{name}.recv") == sent, name
    # The counters through driver.stats() moved with the megabyte each way.
    assert after["rx"]["frames"] - before["rx"]["frames"] > 500, (before["rx"], after["rx"])
    assert after["tx"]["frames"] - before["tx"]["frames"] > 500, (before["tx"], after["tx"])
    echo = client["echo"]
    assert echo["sent"] == echo["received"] == 5 and echo["loss"] == 0, echo
    assert client["deactivated"]
    # Deactivating a remote board's driver leaves the bridge to the exporter: the place
    # is still acquired, so the TAP was still there afterwards.
    (link,) = farm.json("held_link_a.json")
    assert link["ifname"] == "farmA" and "LOWER_UP" in link["flags"], link


def test_farm_a_second_user_cannot_take_the_acquired_place(boot: Boot) -> None:
    farm = _farm(boot)
    assert farm.read("intruder.rc") != "0", farm.read("intruder.txt")
    assert "already acquired" in farm.read("intruder.txt"), farm.read("intruder.txt")


def test_farm_release_stops_the_bridge_and_gives_the_board_back(boot: Boot) -> None:
    farm = _farm(boot)
    farm.rc("release")
    farm.rc("released_gone")  # TAP farmA gone, cdc_eem bound to board A again
    log = farm.read("exporter.log")
    assert "started bridge for " + boot.env()["PORT_a"] in log, log[-3000:]
    assert re.search(r"stopped bridge for \S+ \(exit 0\)", log), log[-3000:]


def test_farm_driver_owns_the_bridge_of_a_board_on_its_own_host(boot: Boot) -> None:
    """Board B as an EEMBoard in the client's environment (no exporter involved): the
    driver starts its bridge at activate and it is gone after deactivate."""
    farm = _farm(boot)
    client = farm.json("client_b.json")
    assert "error" not in client, client.get("traceback", client)
    farm.rc("client_b")
    assert (client["board"], client["tap"]) == ("EEMBoard", "farmLocal"), client
    assert client["stats_before"]["connected"], client["stats_before"]
    assert " 0% packet loss" in boot.read("lg_ping_b.txt")
    assert client["echo"]["received"] == 5, client["echo"]
    farm.rc("local_gone")
