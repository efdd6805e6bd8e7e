"""--link user end to end: simulated device <-> bridge <-> socketpair <-> pump <-> passt.

The board side is the simulated device's TAP in its own namespace, with the kernel's
TCP; the host side has no interface at all: a connection to a forwarded localhost port
goes into passt, which opens it to the board over the link. The board's own connections
out are refused (a reset, counted) unless --nat.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from eembridge.link import netns as nsmod
from eembridge.link.netns import run_in_netns

from netfixtures import sim_rigs, wait_for

ROOT = Path(__file__).resolve().parent.parent
BOARD_PORT = 5022  # the board's namespace is fresh: any port is free there


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def passt_processes() -> set[int]:
    """pids of every passt running (other tests' bridges may run theirs)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("passt"):
                found.add(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def user_rig():
    with sim_rigs() as make_rig:
        def make(*, forwards=(), nat=False, **sim_options):
            return make_rig(sim_options, link="user", forwards=list(forwards), nat=nat)
        yield make


def _receive_exactly_raw(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def _receive_exactly(conn: socket.socket) -> tuple[str, int]:
    """SHA-256 and count of a length-framed message. Framed, not ended by a half-close:
    passt 0.0~git20230309 stalls a connection one side half-closed (either side)."""
    n = int.from_bytes(_receive_exactly_raw(conn, 8), "big")
    digest, total, buf = hashlib.sha256(), 0, bytearray(1 << 18)
    view = memoryview(buf)
    while total < n:
        got = conn.recv_into(view[:min(len(buf), n - total)])
        assert got, f"connection closed after {total} of {n} bytes"
        digest.update(view[:got])
        total += got
    return digest.hexdigest(), total


def _serve(address: tuple[str, int], ports: queue.Queue[int], download: bytes) -> tuple[str, int]:
    with socket.create_server(address) as server:
        server.settimeout(30)
        ports.put(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            result = _receive_exactly(conn)
            conn.sendall(len(download).to_bytes(8, "big") + download)
            _receive_exactly_raw(conn, 1)  # the client's word that it has everything
            return result


def _client(address: tuple[str, int], upload: bytes) -> tuple[str, int]:
    with socket.create_connection(address, timeout=30) as conn:
        conn.sendall(len(upload).to_bytes(8, "big") + upload)
        result = _receive_exactly(conn)
        conn.sendall(b"k")
        return result


def framed_transfer(*, server_netns: str | None, bind: tuple[str, int],
                    client_netns: str | None, connect: tuple[str, int | None],
                    up: int = 4_000_000, down: int = 4_000_000) -> None:
    """A server bound to `bind` in server_netns, a client in client_netns connecting to
    `connect` (port None: the server's): SHA-256 of both directions."""
    upload, download = os.urandom(up), os.urandom(down)
    ports: queue.Queue[int] = queue.Queue()
    with nsmod.NetnsThread(server_netns, _serve, bind, ports, download) as server:
        port = ports.get(timeout=10)
        received = run_in_netns(client_netns, _client, (connect[0], connect[1] or port), upload)
    assert server.result == (hashlib.sha256(upload).hexdigest(), up)
    assert received == (hashlib.sha256(download).hexdigest(), down)


def test_a_forwarded_localhost_port_reaches_the_board_intact_both_ways(user_rig):
    host_port = free_port()
    rig = user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"])
    framed_transfer(server_netns=rig.sim.namespace, bind=(rig.device_ip, BOARD_PORT),
                    client_netns=None, connect=("127.0.0.1", host_port))
    stats = rig.bridge.stats()
    assert "link" not in stats  # no kernel interface on the host's side
    user = stats["user"]
    assert user["to_stack_frames"] > 1000 and user["from_stack_frames"] > 1000
    assert user["refused_tcp"] == 0 and user["backlog_dropped"] == 0, user


def test_the_forward_listens_on_loopback_only(user_rig):
    host_port = free_port()
    user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"])
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{host_port}"], check=True,
                               capture_output=True, text=True).stdout.split()
    assert f"127.0.0.1:{host_port}" in listening, listening


def _connect_from_board(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=5):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"failed: {exc}"


def test_the_board_cannot_reach_the_host_without_nat(user_rig):
    rig = user_rig()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # passt maps the gateway address (the host's --ip) to the host's loopback.
        outcome = run_in_netns(rig.sim.namespace, _connect_from_board, rig.host_ip, port)
    assert outcome == "refused"  # at once, by the link's reset, not by a timeout
    user = rig.bridge.stats()["user"]
    assert user["refused_tcp"] >= 1 and user["resets_sent"] >= 1, user


def test_with_nat_the_board_reaches_a_host_listener_intact(user_rig):
    rig = user_rig(nat=True)
    # passt maps the gateway address (the host's --ip) to the host's loopback.
    framed_transfer(server_netns=None, bind=("127.0.0.1", 0), client_netns=rig.sim.namespace,
                    connect=(rig.host_ip, None))
    assert rig.bridge.stats()["user"]["refused_tcp"] == 0


def test_passt_and_its_port_are_gone_after_stop(user_rig):
    host_port = free_port()
    rig = user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"])
    pid = rig.bridge.tap.passt_pid
    assert Path(f"/proc/{pid}").exists()
    rig.bridge.stop()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 5, "passt to exit")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("forward, problem", [
    ("tcp:8022", "not PROTO:HOSTPORT:BOARDPORT"),
    ("sctp:8022:22", "protocol sctp is not tcp or udp"),
    ("udp:0:53", "host port 0 is not a number from 1 to 65535"),
    ("tcp:8022:70000", "board port 70000 is not a number"),
])
def test_a_bad_forward_is_one_line(forward, problem):
    result = _run_cli("--sim", "--link", "user", "--forward", forward)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr


def test_forward_without_the_user_link_is_one_line():
    result = _run_cli("--sim", "--forward", "tcp:8022:22")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "is for --link user" in result.stderr


def test_passt_refusing_to_start_is_one_line_with_its_reason(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = _run_cli("--sim", "--link", "user", "--ip", "169.254.99.2/24", "--peer",
                          "169.254.99.1", "--sim-ip", "169.254.99.1/24", "--stats-socket",
                          str(tmp_path / "s.sock"), "--forward", f"tcp:{port}:22")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines == [f"eembridge: error: passt refused to start: Failed to bind any port for "
                     f"'-t 127.0.0.1/{port}:22', exiting"], result.stderr


def test_the_demo_on_the_user_link_needs_no_tap_and_leaves_nothing():
    """demo --link user: the device's network side in an unprivileged user namespace
    (sim/userns.py), the trace through passt and a forwarded localhost port."""
    links_before = set(os.listdir("/sys/class/net"))
    passt_before = passt_processes()
    result = _run_cli("demo", "--link", "user", "--size", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["bytes_received"] == 3_000_000
    assert summary["sha256_received"] == summary["sha256_expected"]
    assert set(os.listdir("/sys/class/net")) == links_before  # no TAP, no TUN on the host
    assert passt_processes() <= passt_before, "a passt outlived the demo"


# --- as nobody, with no capability --------------------------------------------------------

def test_the_demo_runs_as_nobody_on_the_user_link(tmp_path):
    """demo chooses --link user when not root: the device in an unprivileged user
    namespace, the host's side in passt; nothing needs a capability."""
    from test_badinput_cli import as_nobody

    result = as_nobody(tmp_path, "demo", "--size", "3", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["sha256_received"] == summary["sha256_expected"]


def test_a_sim_bridge_on_the_user_link_runs_as_nobody(tmp_path):
    """eembridge --sim --link user as nobody: up, connected, holding no capability, and a
    clean stop on SIGTERM."""
    from test_badinput_cli import nobody_argv

    # nobody's control socket: pytest's tmp_path is below a directory only root enters.
    run_dir = Path(tempfile.mkdtemp(prefix="eembridge-nobody-"))
    run_dir.chmod(0o777)
    sock = run_dir / "bridge.sock"
    proc = subprocess.Popen(
        nobody_argv(tmp_path, "--sim", "--link", "user", "--ip", "169.254.98.2/24", "--peer",
                    "169.254.98.1", "--sim-ip", "169.254.98.1/24", "--forward",
                    f"tcp:{free_port()}:22", "--stats-socket", str(sock)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "the control socket")
        assert proc.poll() is None, proc.communicate()[1]
        stats = subprocess.run([sys.executable, "-m", "eembridge", "stats", "--socket",
                                str(sock), "--json"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
        snapshot = next(iter(json.loads(stats).values()))
        assert snapshot["connected"] and "user" in snapshot
        assert snapshot["capabilities"]["effective"] == [], snapshot["capabilities"]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert proc.returncode == 0, stderr
