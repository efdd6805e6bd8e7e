"""The labgrid plugin (eembridge.farm) on this host: the bridge process, the driver
against a running bridge, and a real coordinator, exporter and client on loopback.

The round trip with real boards (acquire, link up, TCP, release) needs USB devices and
runs in the guest (tests/interop/labgrid_farm.sh, test_guest_two_boards.py). labgrid is
a test dependency here (install.sh installs `.[test,labgrid]`): without it these fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eembridge.core.errors import UserError

# labgrid must be importable: a missing plugin dependency fails here, not skipped.
from eembridge.farm import EEMBridgeDriver, RemoteEEMBoard
from eembridge.farm.bridgeproc import (
    BridgeProcess,
    addresses_of,
    bridge_command,
    check_link,
    default_log,
    forwarded_of,
    forwards_of,
    published_forwards,
)
from eembridge.link import netns as nsmod
from eembridge.observe.control import socket_path

from netfixtures import require_tun_and_root, start_sim_bridge, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_bridge_command_for_a_board():
    cmd = bridge_command(tap="farm0", port="1-1.2", addresses=("169.254.9.1/24", "fd00::1/64"),
                         peer="169.254.9.2", socket="/tmp/s.sock", args=("--mtu", "1400"),
                         python="py")
    assert cmd == ["py", "-m", "eembridge", "--tap", "farm0", "--port", "1-1.2",
                   "--stats-socket", "/tmp/s.sock", "--ip", "169.254.9.1/24", "--ip", "fd00::1/64",
                   "--peer", "169.254.9.2", "--mtu", "1400"]
    # The coordinator carries scalars: addresses cross it as one string.
    assert addresses_of("169.254.9.1/24,fd00::1/64") == ("169.254.9.1/24", "fd00::1/64")
    assert addresses_of(["169.254.9.1/24"]) == ("169.254.9.1/24",)


def test_a_user_link_boards_bridge_command_and_forwards():
    cmd = bridge_command(tap="farm0", port="1-1", link="user", forwarded={22: 40022, 80: 40080},
                         python="py")
    assert cmd[-6:] == ["--link", "user", "--forward", "tcp:40022:22", "--forward", "tcp:40080:80"]
    assert forwards_of("tcp:22, 80") == forwards_of(["tcp:22", 80]) == (22, 80)
    # What crosses the coordinator, and back.
    assert forwarded_of(published_forwards({22: 40022, 80: 40080})) == {22: 40022, 80: 40080}
    assert forwarded_of("") == {}
    with pytest.raises(ValueError, match="'udp:53' is not tcp:PORT"):
        forwards_of("tcp:22,udp:53")
    with pytest.raises(ValueError, match="link 'tun' is not tap or user"):
        check_link("tun")


@pytest.mark.parametrize("kwargs, problem", [
    ({"tap": "a-name-far-too-long", "port": "1-1"}, "limit is 15"),
    ({"tap": "farm0", "port": ""}, "no USB port path"),
])
def test_bad_board_settings_are_named(kwargs, problem):
    with pytest.raises((ValueError, UserError), match=problem):
        bridge_command(**kwargs)


@pytest.mark.parametrize("address", ["169.254.9.1", "169.254.9.300/24", "fd00::1/129"])
def test_a_bad_board_address_is_named(address):
    with pytest.raises(ValueError, match=f"{address!r} is not ADDR/PREFIX"):
        addresses_of(["169.254.9.1/24", address])


def test_a_bridge_process_comes_up_and_is_gone_after_stop(tmp_path):
    require_tun_and_root()
    tap = nsmod.unique_name("eemfarm")
    sock = str(tmp_path / "b.sock")
    bridge = BridgeProcess([sys.executable, "-m", "eembridge", "--sim", "--tap", tap,
                            "--stats-socket", sock], socket=sock, log=tmp_path / "b.log")
    bridge.start()
    try:
        snapshot = bridge.wait_connected(30)
        assert snapshot["connected"] and snapshot["tap"] == tap, snapshot
        assert os.path.exists(f"/sys/class/net/{tap}")
    finally:
        code = bridge.stop()
    assert code == 0, bridge.log_tail()
    assert not os.path.exists(f"/sys/class/net/{tap}") and not os.path.exists(sock)
    assert "simulated device up" in (tmp_path / "b.log").read_text()


def test_a_bridge_that_exits_is_reported_with_its_log(tmp_path):
    sock = str(tmp_path / "b.sock")
    bridge = BridgeProcess([sys.executable, "-m", "eembridge", "--sim", "--mtu", "100",
                            "--stats-socket", sock], socket=sock, log=tmp_path / "b.log")
    bridge.start()
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        bridge.wait_connected(60)
    assert time.monotonic() - start < 30  # at its exit, not at the deadline
    assert "exited 2 before the board was up" in str(info.value)
    assert "--mtu 100" in str(info.value)  # the bridge's own line, from its log


def test_the_driver_waits_for_a_boards_bridge_and_reports_stats_and_echo(tmp_path):
    """A RemoteEEMBoard on this very host (the exporter's bridge is a simulated one
    here): activate waits for the bridge, stats() and echo() go to its socket."""
    from labgrid import Target
    from labgrid.resource.common import ResourceManager

    bridge = start_sim_bridge(tmp_path, "eemfarm")
    try:
        target = Target("farm")
        board = RemoteEEMBoard(target, "board", host=socket.gethostname(), busnum=1, devnum=2,
                               path="1-1", vendor_id=0x1D6B, model_id=0x0104, tap=bridge.tap,
                               addresses=f"{bridge.subnet[2]}/24", peer=str(bridge.subnet[1]),
                               socket=bridge.sock)
        # No coordinator here: a manager that leaves it as set, available, as the
        # coordinator says of an exported, plugged-in board.
        board.manager = ResourceManager()
        board.avail = True
        driver = EEMBridgeDriver(target, "bridge", timeout=30)
        target.activate(driver)
        assert driver.local and driver.tap == bridge.tap
        assert driver.addresses == (f"{bridge.subnet[2]}/24",)
        stats = driver.stats()
        assert stats["connected"] and stats["tap"] == bridge.tap, stats
        echo = driver.echo(count=3, timeout=2.0, interval=0.05)
        assert echo["sent"] == echo["received"] == 3, echo
        assert driver.stats()["tx"]["echo"] >= 3
        target.deactivate(driver)
        assert bridge.proc.poll() is None  # a remote board's bridge is the exporter's to stop
    finally:
        code, err = bridge.stop()
    assert code == 0, err


def test_the_driver_reaches_a_remote_exporters_bridge_through_its_command_prefix(
        tmp_path, monkeypatch):
    """A board on another host: stats() and echo() run `eembridge stats/echo --json` there
    through the resource's command_prefix (labgrid's SSH connection). No sshd here: the
    prefix is replaced by `env --`, so the same commands run on this host."""
    from labgrid import Target
    from labgrid.resource.common import NetworkResource, ResourceManager

    monkeypatch.setattr(NetworkResource, "command_prefix", property(lambda self: ["env", "--"]))
    bridge = start_sim_bridge(tmp_path, "eemfarm")
    try:
        target = Target("farm")
        board = RemoteEEMBoard(target, "board", host="exporter.invalid", busnum=1, devnum=2,
                               path="1-1", vendor_id=0x1D6B, model_id=0x0104, tap=bridge.tap,
                               socket=bridge.sock, python=sys.executable)
        board.manager = ResourceManager()  # no coordinator: see the test above
        board.avail = True
        board.extra = {"proxy": "exporter.invalid", "proxy_required": False}
        driver = EEMBridgeDriver(target, "bridge", timeout=30)
        target.activate(driver)
        assert not driver.local and driver.host == "exporter.invalid"
        stats = driver.stats()
        assert stats["connected"] and stats["tap"] == bridge.tap, stats
        echo = driver.echo(count=2, timeout=2.0, interval=0.05)
        assert echo["sent"] == echo["received"] == 2 and len(echo["replies"]) == 2, echo
        target.deactivate(driver)
    finally:
        code, err = bridge.stop()
    assert code == 0, err


def test_off_the_exporter_connect_goes_through_labgrids_ssh_forward(monkeypatch):
    """A user-link board on another host: connect() asks labgrid's SSH manager for a
    forward through the exporter (the proxy, if the exporter is isolated) to its
    loopback port; no sshd here, so the forward is recorded and stands for itself."""
    from labgrid import Target
    from labgrid.resource.common import ResourceManager
    from labgrid.util.ssh import sshmanager

    requested = []
    monkeypatch.setattr(sshmanager, "request_forward",
                        lambda host, dest, port: requested.append((host, dest, port)) or 41000)
    target = Target("farm")
    board = RemoteEEMBoard(target, "board", host="exporter.invalid", busnum=1, devnum=2,
                           path="1-1", vendor_id=0x1D6B, model_id=0x0104, tap="farm0",
                           link="user", forwarded="tcp:22=40022")
    board.manager = ResourceManager()  # no coordinator: see the tests above
    board.avail = True
    board.extra = {"proxy": "jump.invalid", "proxy_required": True}
    driver = EEMBridgeDriver(target, "bridge", timeout=30)
    # activate's wait for the bridge would ssh there: this test is about connect()
    monkeypatch.setattr(EEMBridgeDriver, "on_activate", lambda self: None)
    target.activate(driver)
    assert driver.connect(22) == ("localhost", 41000)
    assert requested == [("jump.invalid", "127.0.0.1", 40022)]
    board.extra = {"proxy": "jump.invalid", "proxy_required": False}
    driver.connect(22)
    assert requested[-1] == ("exporter.invalid", "127.0.0.1", 40022)
    with pytest.raises(UserError, match="no forward to its port 80 \\(forwards: tcp:22;"):
        driver.connect(80)
    target.deactivate(driver)


EXPORTER_EXITS = """
import sys
from eembridge.farm.export import EEMBoardExport
export = EEMBoardExport({"cls": "EEMBoard", "params": {
    "match": {"ID_SERIAL_SHORT": "no-such-board"}, "tap": sys.argv[1], "socket": sys.argv[2],
    "args": ["--sim"]}}, host="exporter", proxy="exporter", proxy_required=False)
params = export._get_params()
assert params["tap"] == sys.argv[1] and params["socket"] == sys.argv[2], params
export._start({"path": "1-1"})  # as at acquire (--sim stands in for the board at 1-1)
export.bridge.wait_connected(30)
print("up", export.bridge.proc.pid, flush=True)
"""  # ...and the exporter process ends with the place still acquired


def test_bridges_of_acquired_places_stop_when_the_exporter_exits(tmp_path):
    require_tun_and_root()
    tap = nsmod.unique_name("eemfarm")
    sock = str(tmp_path / "b.sock")
    run = subprocess.run([sys.executable, "-c", EXPORTER_EXITS, tap, sock], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("up "), run.stdout + run.stderr
    pid = int(run.stdout.split()[1])
    alive = os.path.exists(f"/proc/{pid}")
    if alive:  # leave nothing behind, whatever the verdict
        os.kill(pid, 15)
        wait_for(lambda: not os.path.exists(f"/sys/class/net/{tap}"), 20, f"{tap} gone")
    assert not alive, "the bridge outlived its exporter"
    assert not os.path.exists(f"/sys/class/net/{tap}") and not os.path.exists(sock)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def labgrid_farm(tmp_path: Path, exporter_yaml: str, exporter: list[str]) -> Iterator[Any]:
    """labgrid's own coordinator on loopback and `exporter` (argv, the YAML's path
    appended) exporting `exporter_yaml` as "exp"; yields `client(*args, **env)` running
    labgrid-client; both stopped at exit."""
    port = _free_port()
    env = {**os.environ, "LG_COORDINATOR": f"127.0.0.1:{port}", "LG_USERNAME": "farmer",
           "PYTHONPATH": str(ROOT)}
    (tmp_path / "exporter.yaml").write_text(exporter_yaml)
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "labgrid-coordinator"), "-l", f"127.0.0.1:{port}"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]

    def client(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bindir / "labgrid-client"), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    client.env = env  # type: ignore[attr-defined]
    try:
        wait_for(lambda: client("places").returncode == 0, 30, "the coordinator")
        client.log = tmp_path / "exporter.log"  # type: ignore[attr-defined]
        with open(client.log, "w") as log:  # type: ignore[attr-defined]
            procs.append(subprocess.Popen(
                [*exporter, "--name", "exp", str(tmp_path / "exporter.yaml")],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield client
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)


def _acquire(client: Any, place: str, match: str) -> None:
    assert client("-p", place, "create").returncode == 0
    assert client("-p", place, "add-match", match).returncode == 0
    wait_for(lambda: client("-p", place, "acquire").returncode == 0, 30,
             f"the place acquired; exporter log:\n{client.log.read_text()}")


ENV_YAML = ("targets:\n  main:\n    resources:\n      RemotePlace:\n        name: {place}\n"
            "    drivers:\n      EEMBridgeDriver: {{}}\nimports:\n  - eembridge.farm\n")


def test_coordinator_exporter_and_client_on_loopback(tmp_path):
    """labgrid's own coordinator and client, our exporter: the board is published as a
    RemoteEEMBoard with its TAP settings, a place takes it, a second user cannot, and
    a client's driver refuses to start on a board that is not plugged in."""
    with labgrid_farm(tmp_path,
                      "board-a:\n  EEMBoard:\n    match:\n      ID_SERIAL_SHORT: no-such-board\n"
                      "    tap: farmA\n    addresses: [169.254.81.1/24]\n    peer: 169.254.81.2\n",
                      [sys.executable, "-m", "eembridge.farm.export"]) as client:
        _acquire(client, "farm-a", "exp/board-a/RemoteEEMBoard")
        shown = client("-p", "farm-a", "show").stdout
        assert "'cls': 'RemoteEEMBoard'" in shown and "'tap': 'farmA'" in shown, shown
        assert "'addresses': '169.254.81.1/24'" in shown and "'avail': False" in shown, shown
        intruder = client("-p", "farm-a", "acquire", LG_USERNAME="intruder")
        assert intruder.returncode != 0 and "already acquired" in intruder.stderr, intruder

        (tmp_path / "env.yaml").write_text(ENV_YAML.format(place="farm-a"))
        used = subprocess.run(
            [sys.executable, str(ROOT / "tests/interop/farm_client.py"), str(tmp_path / "env.yaml"),
             str(tmp_path / "out.json"), "--", "true"], env=client.env, capture_output=True,
            text=True, timeout=120)
        out = (tmp_path / "out.json").read_text()
        assert used.returncode == 3 and "Not all resources are available" in out, out
        assert "tap='farmA', addresses=('169.254.81.1/24',)" in out, out
        assert client("-p", "farm-a", "release").returncode == 0


# The exporter for a simulated board: the EEMBoard export with the board always plugged
# in at "1-1" (its args carry --sim, which stands in for the USB device).
SIM_EXPORTER = """
from labgrid.remote import exporter
from eembridge.farm.export import EEMBoardExport

class SimBoardExport(EEMBoardExport):
    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.local.avail = True

    def _get_start_params(self):
        return {"path": "1-1"}

exporter.exports["EEMBoard"] = SimBoardExport
exporter.main()
"""

CONNECT_CLIENT = """
import json, sys
from labgrid import Environment
driver = Environment(sys.argv[1]).get_target("main").get_driver("EEMBridgeDriver")
print(json.dumps({"address": driver.connect(int(sys.argv[2])), "forwarded": driver.forwarded,
                  "link": driver.board.link}))
"""


def _running_with(word: str) -> list[int]:
    """pids whose command line has `word`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if word.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_clients_driver_connects_to_a_user_link_boards_port(tmp_path):
    """`link: user` with a forward: the exporter runs the bridge on libslirp with the
    board's port on one of its loopback ports, publishes it, and the client's driver
    gives the address reaching it; TCP through it both ways by SHA-256. At release the
    bridge is gone and nothing listens there any more."""
    from test_user_link import framed_transfer

    tap = nsmod.unique_name("farmU")
    board_port = 5022
    log = Path(default_log(tap))
    with labgrid_farm(tmp_path,
                      f"board-u:\n  EEMBoard:\n    match:\n      ID_SERIAL_SHORT: sim\n"
                      f"    tap: {tap}\n    link: user\n    forwards: tcp:{board_port}\n"
                      f"    args: [--sim, --sim-ip, 10.0.2.15/24]\n",
                      [sys.executable, "-c", SIM_EXPORTER]) as client:
        try:
            _acquire(client, "farm-u", "exp/board-u/RemoteEEMBoard")
            (tmp_path / "env.yaml").write_text(ENV_YAML.format(place="farm-u"))
            used = subprocess.run([sys.executable, "-c", CONNECT_CLIENT, str(tmp_path / "env.yaml"),
                                   str(board_port)], env=client.env, capture_output=True,
                                  text=True, timeout=120)
            assert used.returncode == 0, used.stderr[-2000:] + client.log.read_text()
            seen = json.loads(used.stdout)
            (host, port), link = seen["address"], seen["link"]
            assert link == "user" and seen["forwarded"] == {str(board_port): port}, seen
            namespace = re.search(r"in namespace (\S+)", log.read_text()).group(1)
            framed_transfer(server_netns=namespace, bind=("10.0.2.15", board_port),
                            client_netns=None, connect=(host, port), up=2_000_000,
                            down=2_000_000)
            assert client("-p", "farm-u", "release").returncode == 0
            wait_for(lambda: not os.path.exists(socket_path(tap)), 30, "the bridge gone")
            assert not _listening(port), f"127.0.0.1:{port} still listens after release"
            assert not _running_with(tap), "the bridge outlived the release"
        finally:
            log.unlink(missing_ok=True)
