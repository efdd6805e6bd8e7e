"""--link user end to end: simulated device <-> bridge <-> socketpair <-> libslirp.

The board side is the simulated device's TAP in its own namespace, with the kernel's
TCP; the host side has no interface at all: a connection to a forwarded localhost port
goes into libslirp, which opens it to the board over the link. The board's own
connections out are refused (a reset, counted) unless --nat. The CLI's cases run as
nobody with no capability, as a user without root would run them.
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
TAP = "eemtuser0"  # the CLI bridge's link name: no interface of this name may appear


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def namespace_children() -> set[int]:
    """pids of every simulated device's namespace child (sim/userns.py) running."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"eembridge.sim.userns" in Path(f"/proc/{pid}/cmdline").read_bytes():
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
    """SHA-256 and count of a length-framed message."""
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


def _board_neighbour(ip: str) -> str:
    return subprocess.run(["ip", "neigh", "show", ip], capture_output=True, text=True,
                          check=True).stdout


def test_a_forwarded_localhost_port_reaches_the_board_intact_both_ways(user_rig):
    host_port = free_port()
    rig = user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"])
    framed_transfer(server_netns=rig.sim.namespace, bind=(rig.device_ip, BOARD_PORT),
                    client_netns=None, connect=("127.0.0.1", host_port), up=8_000_000,
                    down=8_000_000)
    stats = rig.bridge.stats()
    assert "link" not in stats  # no kernel interface on the host's side
    user = stats["user"]
    assert user["to_stack_frames"] > 1000 and user["from_stack_frames"] > 1000
    assert user["refused_tcp"] == 0 and user["to_bridge_dropped"] == 0, user
    assert rig.bridge.forwarded_ports == {f"tcp:{BOARD_PORT}": host_port}
    # The board answered the gateway, so it learnt slirp's MAC by ARP (no static entry).
    gateway_mac = "52:55:" + ":".join(f"{int(b):02x}" for b in rig.host_ip.split("."))
    assert gateway_mac in run_in_netns(rig.sim.namespace, _board_neighbour, rig.host_ip)


def test_the_python_face_opens_a_board_on_the_user_link_and_gives_its_ports():
    """eembridge.Bridge with link="user" and nothing else: QEMU's addresses (the board
    10.0.2.15), the forwards read back from the bridge."""
    import eembridge
    from eembridge.sim.link import SimLink

    host_port = free_port()
    with SimLink("10.0.2.15/24") as sim:
        options = eembridge.BridgeOptions(link="user", forwards=[f"tcp:{host_port}:{BOARD_PORT}"],
                                          tap=nsmod.unique_name("eemb"), stats_socket=None)
        with eembridge.Bridge(sim.connect, options) as bridge:
            assert bridge.connected.wait(10)
            assert bridge.forwarded_ports == {f"tcp:{BOARD_PORT}": host_port}
            framed_transfer(server_netns=sim.namespace, bind=("10.0.2.15", BOARD_PORT),
                            client_netns=None, up=1_000_000, down=1_000_000,
                            connect=("127.0.0.1", bridge.forwarded_ports[f"tcp:{BOARD_PORT}"]))
        assert bridge.error is None and bridge.forwarded_ports == {}


def test_board_connector_chooses_as_the_command_line_does():
    import eembridge
    from eembridge.core.errors import UserError

    with pytest.raises(UserError, match="--device 12: expected VID:PID"):
        eembridge.board_connector("12")


@pytest.mark.parametrize("batch", [False, True], ids=["loss", "loss+batch"])
def test_a_lossy_device_keeps_the_forwarded_transfer_intact(user_rig, batch):
    """1% of USB packets lost (a frame in 30 towards the board). Smaller than the lossless
    case: libslirp's TCP, the sender towards the board, recovers by timeouts of a second
    or more (no SACK), about 0.1 MB/s at this loss."""
    host_port = free_port()
    rig = user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"], loss=0.01, batch=batch)
    framed_transfer(server_netns=rig.sim.namespace, bind=(rig.device_ip, BOARD_PORT),
                    client_netns=None, connect=("127.0.0.1", host_port), up=1_000_000,
                    down=2_000_000)
    faults = rig.sim.fault_counters()
    assert faults["in_packets_lost"] and faults["out_packets_lost"], faults


def _dhcp_lease(interface: str) -> str:
    return subprocess.run(["busybox", "udhcpc", "-i", interface, "-n", "-q", "-f", "-t", "5",
                           "-T", "1", "-s", "/bin/true"], capture_output=True, text=True,
                          timeout=30).stderr


def test_the_board_gets_its_address_from_the_stacks_dhcp(user_rig):
    """The first lease is --peer, the forwards' destination (a board may be static too)."""
    rig = user_rig()
    said = run_in_netns(rig.sim.namespace, _dhcp_lease, rig.sim.network.name)
    assert f"lease of {rig.device_ip} obtained" in said, said


def _udp_echo_once(address: str, port: int, ready: queue.Queue[bool]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        sock.settimeout(30)
        ready.put(True)
        data, peer = sock.recvfrom(2048)
        sock.sendto(data[::-1], peer)


def _udp_echo_through_the_forward(rig, host_port: int) -> None:
    """A host client's datagram to the forward, the board's echo from the forwarded port."""
    ready: queue.Queue[bool] = queue.Queue()
    with nsmod.NetnsThread(rig.sim.namespace, _udp_echo_once, rig.device_ip, BOARD_PORT,
                           ready):
        ready.get(timeout=10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"datagram", ("127.0.0.1", host_port))
            assert client.recv(2048) == b"margatad"


def test_a_udp_forward_reaches_the_board_and_its_reply_comes_back(user_rig):
    """The board's reply leaves from the forwarded port to the client's flow: egress lets
    it through."""
    host_port = free_port()
    rig = user_rig(forwards=[f"udp:{host_port}:{BOARD_PORT}"])
    _udp_echo_through_the_forward(rig, host_port)
    _udp_echo_through_the_forward(rig, host_port)  # a second flow, from a new client port
    user = rig.bridge.stats()["user"]
    assert user["refused_udp"] == 0 and user["udp_flows_learned"] == 2, user


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


def _udp_from_board(address: str, port: int, source: tuple[str, int] | None = None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if source is not None:
            sock.bind(source)
        sock.sendto(b"out", (address, port))


def test_the_board_cannot_reach_the_host_without_nat(user_rig):
    rig = user_rig()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # The gateway address (the host's --ip) is the host's loopback to slirp.
        outcome = run_in_netns(rig.sim.namespace, _connect_from_board, rig.host_ip, port)
        run_in_netns(rig.sim.namespace, _udp_from_board, rig.host_ip, port)
    assert outcome == "refused"  # at once, by the link's reset, not by a timeout
    wait_for(lambda: rig.bridge.stats()["user"]["refused_udp"] >= 1, 5, "the UDP refusal")
    user = rig.bridge.stats()["user"]
    assert user["refused_tcp"] >= 1 and user["resets_sent"] >= 1, user


@pytest.mark.parametrize("nat", [False, True], ids=["no-nat", "nat"])
def test_a_udp_forward_lets_the_board_answer_its_client_and_no_one_else(user_rig, nat):
    """From the forwarded port, after a client's flow, to the gateway at another host
    loopback port: refused and counted without --nat (slirp runs unrestricted for the
    forward, so the filter alone stands between the board and the host's loopback);
    carried with --nat."""
    host_port = free_port()
    rig = user_rig(forwards=[f"udp:{host_port}:{BOARD_PORT}"], nat=nat)
    _udp_echo_through_the_forward(rig, host_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bystander:
        bystander.bind(("127.0.0.1", 0))
        run_in_netns(rig.sim.namespace, _udp_from_board, rig.host_ip,
                     bystander.getsockname()[1], (rig.device_ip, BOARD_PORT))
        if nat:
            bystander.settimeout(10)
            assert bystander.recv(64) == b"out"
            return
        wait_for(lambda: rig.bridge.stats()["user"]["refused_udp"] >= 1, 5, "the UDP refusal")
        bystander.setblocking(False)
        with pytest.raises(BlockingIOError):  # refused at the filter: it never reached slirp
            bystander.recv(64)
    _udp_echo_through_the_forward(rig, host_port)  # the forward's own flows still pass
    assert rig.bridge.stats()["user"]["refused_udp"] == 1


def test_with_nat_the_board_reaches_a_host_listener_intact(user_rig):
    rig = user_rig(nat=True)
    # The gateway address (the host's --ip) is the host's loopback to slirp.
    framed_transfer(server_netns=None, bind=("127.0.0.1", 0), client_netns=rig.sim.namespace,
                    connect=(rig.host_ip, None))
    user = rig.bridge.stats()["user"]
    assert user["refused_tcp"] == user["refused_udp"] == 0, user


def _open_fds() -> set[str]:
    """This process's sockets and pipes (by inode): what a link opens."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            found.add(target)
    return found


def test_the_stack_its_thread_and_its_port_are_gone_after_stop(user_rig):
    fds = _open_fds()
    host_port = free_port()
    rig = user_rig(forwards=[f"tcp:{host_port}:{BOARD_PORT}"])
    link = rig.bridge.tap
    rig.bridge.stop()
    rig.sim.close()
    assert not link._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()
    assert _open_fds() <= fds, _open_fds() - fds


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


def test_a_forward_port_in_use_is_one_line(tmp_path):
    from test_badinput_cli import as_nobody

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = as_nobody(tmp_path, "--sim", "--link", "user", "--ip", "169.254.99.2/24",
                           "--peer", "169.254.99.1", "--sim-ip", "169.254.99.1/24",
                           "--stats-socket", str(tmp_path / "s.sock"), "--forward",
                           f"tcp:{port}:22")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"eembridge: error: --forward tcp:{port}:22: cannot listen on "
                      f"127.0.0.1:{port}: Address already in use"], result.stderr


def test_the_demo_on_the_user_link_leaves_nothing():
    """demo --link user as root: the device's network side in an unprivileged user
    namespace (sim/userns.py), the trace through libslirp and a forwarded localhost port;
    no namespace child outlives it. (That no interface is made shows as nobody below: it
    could not make one.)"""
    children_before = namespace_children()
    result = _run_cli("demo", "--link", "user", "--size", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["link"] == "user" and summary["bytes_received"] == 3_000_000
    assert summary["sha256_received"] == summary["sha256_expected"]
    assert summary["usb_faults"]["in_packets_lost"] > 0  # lossy on this link too
    assert namespace_children() <= children_before, "a namespace child outlived the demo"


# --- as nobody, with no capability --------------------------------------------------------

def test_the_demo_runs_as_nobody_on_the_user_link(tmp_path):
    """demo chooses --link user when not root: the device in an unprivileged user
    namespace, the host's side in libslirp; nothing needs a capability."""
    from test_badinput_cli import as_nobody

    children_before = namespace_children()
    result = as_nobody(tmp_path, "demo", "--size", "3", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["link"] == "user"  # auto: nobody gets the user link
    assert summary["sha256_received"] == summary["sha256_expected"]
    assert namespace_children() <= children_before, "a namespace child outlived the demo"


def test_a_sim_bridge_on_the_user_link_runs_as_nobody_and_leaves_nothing(tmp_path):
    """eembridge --sim --link user as nobody: up, connected, its forward listening,
    holding no capability; on SIGTERM a clean stop leaving no interface, no process, no
    socket file and no listener."""
    from test_badinput_cli import nobody_argv

    # nobody's control socket: pytest's tmp_path is below a directory only root enters.
    run_dir = Path(tempfile.mkdtemp(prefix="eembridge-nobody-"))
    run_dir.chmod(0o777)
    sock = run_dir / "bridge.sock"
    host_port = free_port()
    children_before = namespace_children()
    proc = subprocess.Popen(
        nobody_argv(tmp_path, "--sim", "--link", "user", "--ip", "169.254.98.2/24", "--peer",
                    "169.254.98.1", "--sim-ip", "169.254.98.1/24", "--tap", TAP, "--forward",
                    f"tcp:{host_port}:22", "--stats-socket", str(sock)),
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
        socket.create_connection(("127.0.0.1", host_port), timeout=5).close()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        socket_left = sock.exists()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert proc.returncode == 0, stderr
    assert not socket_left, "the control socket outlived the bridge"
    assert TAP not in os.listdir("/sys/class/net")
    assert namespace_children() <= children_before, "a namespace child outlived the bridge"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()
