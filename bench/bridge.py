"""TCP throughput through bridge + simulated device vs the kernel-only veth ceiling.

Both links join the root namespace to a fresh namespace with the same MTU and no
offloads (TAP devices have none unless asked; veth's are turned off with ethtool), so
the ratio says what the userspace bridge costs relative to the kernel moving the same
frames. Prints one table; run as root:

    python3 bench/bridge.py [--mb 64] [--json] [--tun] [--user]
    python3 bench/bridge.py --links all|tap,tap-no-offload,tun,user,frames [--rounds 3]
                            [--mb 32] [--json]

--tun adds the TUN link (--link tun: Ethernet translated by a Python pump thread between
a socketpair and the TUN) beside the TAP link, in the same run, and their ratio.
--user adds the user link (--link user: libslirp in a thread of its own, reached through
--forward ports on localhost): the same transfers, the clients connecting to the
forwarded localhost port instead of the board, beside the TAP link without offload (the
user link has none).

--links measures the links it names against the TAP link with offload (always measured),
in one run: ROUNDS rounds, each link once per round in the same order (A B C A B C ...),
so that what else loads the machine falls on all alike. Each link in each round gets a
fresh simulated device and bridge, a 1 MB warm-up, then TCP down (board to host) and up,
--mb each, between tests/interop/tcpxfer.py processes, both ends checking the byte count
and SHA-256 (the user link's through forwarded localhost ports). The frames link has no
TCP: its program (this process, in Python) sends ICMP echo requests of MTU size through
send_frame, 64 in flight, and checks every reply's SHA-256 from recv_frame. Per link:
MB/s, median and range over the rounds; the median of the round-by-round ratios to the
TAP link; and the CPU milliseconds per MB moved of the bridge's threads and of the
simulated device's (the bench's process holds both; per-thread schedstat). Markdown, or
--json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

# This checkout's eembridge, not an installed one (the script's own directory is bench/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eembridge import CODEC  # noqa: E402
from eembridge.bridge import Bridge, BridgeOptions  # noqa: E402
from eembridge.link.netns import (  # noqa: E402
    configure_link,
    create_netns,
    delete_netns,
    free_linklocal_subnet,
    run_in_netns,
    unique_name,
)
from eembridge.sim.link import SimLink  # noqa: E402


def cpu_seconds() -> float:
    """CPU of this process (bridge, simulated device) and of its waited-for children
    (the iperf3 ends)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# --user: the board's ports the transfers use, each reached through a forward.
USER_PORTS = {"tcp": 5301, "udp": 5303, "iperf": 5302}


def iperf_download(server_ns: str, server_ip: str, nbytes: int,
                   via: tuple[str, int] | None = None) -> float:
    """Seconds to stream nbytes from iperf3 in server_ns to iperf3 here (-R): the TCP
    ends are processes of their own, as on two real machines, not threads sharing the
    bridge's GIL."""
    port = str(USER_PORTS["iperf"] if via else 5201 + os.getpid() % 1000)
    target, target_port = (via[0], str(via[1])) if via else (server_ip, port)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip,
                               "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(50):
            client = subprocess.run(["iperf3", "-c", target, "-p", target_port, "-R", "-n",
                                     str(nbytes), "-J"], capture_output=True, text=True)
            try:
                report = json.loads(client.stdout)
            except ValueError:
                report = {"error": client.stderr.strip() or "no output"}
            result = report.get("end", {}).get("sum_received")
            if result and not report.get("error"):
                break
            # Not listening yet: refused directly; through a forward, slirp accepts and the
            # board's reset then ends the control connection.
            if not any(word in str(report.get("error")) for word in ("connect", "reset",
                                                                    "receive", "closed")):
                raise RuntimeError(f"iperf3: {report.get('error') or 'no result'}")
            time.sleep(0.1)  # the server is not listening yet
        else:
            raise RuntimeError(f"iperf3: {report.get('error')}")
        return float(result["seconds"]) * nbytes / float(result["bytes"])
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tcp_download(server_ns: str, server_ip: str, nbytes: int,
                 via: tuple[str, int] | None = None) -> float:
    """Seconds to stream nbytes from a server in server_ns to a client here; what came
    must have the SHA-256 of what was sent."""
    data = memoryview(random.Random(1).randbytes(nbytes))
    listener = run_in_netns(server_ns, socket.create_server,
                            (server_ip, USER_PORTS["tcp"] if via else 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(data)

    thread = threading.Thread(target=serve)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(via or (server_ip, port), timeout=60) as client:
        buffer = bytearray(1 << 16)
        digest = hashlib.sha256()
        got = 0
        while got < nbytes:
            n = client.recv_into(buffer)
            if not n:
                break
            digest.update(buffer[:n])
            got += n
    elapsed = time.perf_counter() - start
    thread.join()
    listener.close()
    if got != nbytes:
        raise RuntimeError(f"short transfer: {got} of {nbytes}")
    if digest.digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"the {nbytes} bytes that came are not those sent (SHA-256)")
    return elapsed


_UDP_RECEIVER = """
import socket, sys
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind((sys.argv[1], int(sys.argv[2])))
r.settimeout(10)  # the sender's start-up (a Python process) may take a while on a busy machine
print(r.getsockname()[1], flush=True)
n = 0
while True:
    try:
        r.recv(64)
    except OSError:
        break
    n += 1
    r.settimeout(0.5)  # the flood has begun: a pause this long is its end
print(n, flush=True)
"""

_UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
address, payload = (sys.argv[1], int(sys.argv[2])), bytes(22)
end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    for _ in range(100):
        try:
            s.sendto(payload, address)
        except OSError:
            pass  # queue full: that is the point of a flood
"""


def udp_small_frames(server_ns: str, server_ip: str, seconds: float,
                     via: tuple[str, int] | None = None) -> float:
    """Frames per second delivered for 64-byte Ethernet frames (22-byte UDP payload).
    Sender and receiver are processes of their own, not threads sharing the GIL."""
    receiver = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", _UDP_RECEIVER,
                                 server_ip, str(USER_PORTS["udp"] if via else 0)],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    target, target_port = (via[0], str(via[1])) if via else (server_ip, port)
    subprocess.run([sys.executable, "-c", _UDP_SENDER, target, target_port, str(seconds)],
                   check=True)
    received = int(receiver.stdout.readline())
    receiver.wait()
    return received / seconds


def measure(namespace: str, server_ip: str, nbytes: int,
            forwards: dict[str, int] | None = None) -> dict[str, float]:
    """forwards (--user): the localhost port forwarded to each of USER_PORTS."""
    def via(kind: str) -> tuple[str, int] | None:
        return ("127.0.0.1", forwards[kind]) if forwards else None

    tcp_download(namespace, server_ip, 1 << 20, via("tcp"))  # warm up: ARP, slow start
    cpu = cpu_seconds()
    seconds = tcp_download(namespace, server_ip, nbytes, via("tcp"))
    cpu = cpu_seconds() - cpu
    iperf_cpu = cpu_seconds()
    iperf_seconds = iperf_download(namespace, server_ip, nbytes, via("iperf"))
    iperf_cpu = cpu_seconds() - iperf_cpu
    return {
        "mb_per_s": nbytes / seconds / 1e6,
        "cpu_s_per_gb": cpu / (nbytes / 1e9),
        "iperf_mb_per_s": nbytes / iperf_seconds / 1e6,
        "iperf_cpu_s_per_gb": iperf_cpu / (nbytes / 1e9),
        "small_frames_per_s": udp_small_frames(namespace, server_ip, 2.0, via("udp")),
    }


def run_veth(nbytes: int, mtu: int) -> dict[str, float]:
    namespace = create_netns("eembench-")
    near, far = unique_name("vb"), unique_name("vb")
    subnet = free_linklocal_subnet()
    try:
        subprocess.run(["ip", "link", "add", near, "mtu", str(mtu), "type", "veth", "peer", "name", far,
                        "mtu", str(mtu), "netns", namespace], check=True)
        for name, ns in ((near, None), (far, namespace)):
            prefix = [] if ns is None else ["ip", "netns", "exec", ns]
            subprocess.run(prefix + ["ethtool", "-K", name, "tso", "off", "gso", "off", "gro", "off",
                                     "tx", "off", "rx", "off"], check=True, capture_output=True)
        configure_link(None, near, [f"{subnet[2]}/24"])
        configure_link(namespace, far, [f"{subnet[1]}/24"])
        return measure(namespace, str(subnet[1]), nbytes)
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True)
        delete_netns(namespace)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_bridge(nbytes: int, mtu: int, max_packet: int, link: str = "tap",
               offload: bool | None = None, batch: bool = True) -> dict[str, float]:
    subnet = free_linklocal_subnet()
    forwards = ({kind: free_port(socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
                 for kind in USER_PORTS} if link == "user" else None)
    with SimLink(f"{subnet[1]}/24", max_packet=max_packet, mtu=mtu, batch=batch) as sim:
        options = BridgeOptions(
            tap=unique_name("eembench"), addresses=[f"{subnet[2]}/24"], peer=str(subnet[1]),
            peer_mac=sim.mac, mtu=mtu, stats_socket=None, link=link, offload=offload,
            forwards=[f"{'udp' if kind == 'udp' else 'tcp'}:{port}:{USER_PORTS[kind]}"
                      for kind, port in (forwards or {}).items()])
        with Bridge(sim.connect, options) as bridge:
            if not bridge.connected.wait(10):
                raise RuntimeError("bridge did not connect")
            return measure(sim.namespace, str(subnet[1]), nbytes, forwards)


# --- --links: every link against the TAP link, interleaved, in one run -------------------

LINKS = {  # name: (BridgeOptions.link, BridgeOptions.offload, the row's label)
    "tap": ("tap", None, "TAP (offload, the default)"),
    "tap-no-offload": ("tap", False, "TAP `--no-offload`"),
    "tun": ("tun", None, "`--link tun`"),
    "user": ("user", None, "`--link user` (libslirp)"),
    "frames": ("frames", None, "frames link (Python, ICMP echo)"),
}
REFERENCE = "tap"  # every ratio is to this link, round by round
# The board's TCP ports in its namespace (fresh for each link and round); on the user link
# each is reached through a forward from a free localhost port.
BOARD_PORTS = {"down": 5311, "up": 5312}
TCPXFER = Path(__file__).resolve().parent.parent / "tests" / "interop" / "tcpxfer.py"
SIM_THREADS = ("sim-in", "sim-out", "sim-tap")  # the simulated device's; the rest, the bridge's
ECHO_WINDOW = 64  # echo requests in flight: within the frames link's ~100-frame queues


class BenchError(RuntimeError):
    """A measurement that could not be made, or moved wrong data: one line for the user."""


def parse_links(text: str) -> list[str]:
    """--links: "all" or names from LINKS, comma-separated; the reference (TAP) always
    comes first, since every ratio is to it."""
    names = list(LINKS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LINKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown link {', '.join(map(repr, unknown)) or repr(text)}: expected 'all' or some "
            f"of {', '.join(LINKS)}, comma-separated")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a link named twice in {text!r}")
    return [REFERENCE] + [n for n in names if n != REFERENCE]


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads: the simulated device's, and the
    bridge's (every other thread but the caller's, which only waits, or on the frames
    link is the program). schedstat counts nanoseconds, where rusage ticks at 10 ms."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    me = threading.get_native_id()
    total = {"bridge": 0.0, "device": 0.0}
    for task in os.listdir("/proc/self/task"):
        if int(task) == me:
            continue
        try:
            ns = int(Path(f"/proc/self/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        total["device" if names.get(int(task)) in SIM_THREADS else "bridge"] += ns / 1e9
    return total


def expected_sha256(nbytes: int) -> str:
    """What tcpxfer.py's sender sends (seed 1), hashed."""
    return hashlib.sha256(random.Random(1).randbytes(nbytes)).hexdigest()


def tcp_transfer(namespace: str, board_ip: str, direction: str, nbytes: int, sha256: str,
                 via: tuple[str, int] | None = None) -> float:
    """Seconds to move nbytes over TCP from the board to the host ("down") or back ("up"):
    tests/interop/tcpxfer.py at both ends, processes of their own (not threads sharing the
    bridge's GIL), the board's in its namespace. Both ends' byte count and SHA-256 must be
    the payload's. The time is the sender's, from the connection to the receiver's close."""
    port = BOARD_PORTS[direction]
    board_role, host_role = ((["--send", str(nbytes)], ["--recv"]) if direction == "down"
                             else (["--recv"], ["--send", str(nbytes)]))
    server = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, str(TCPXFER), "serve", "--ready",
         "--bind", board_ip, "--port", str(port), *board_role],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stderr is not None
    try:
        if not server.stdout.readline():  # {"listening": PORT}; EOF: it failed to start
            raise BenchError(f"{direction}: the board's end did not start: "
                             f"{_last_line(server.stderr.read())}")
        host, host_port = via or (board_ip, port)
        try:
            client = subprocess.run(
                [sys.executable, str(TCPXFER), "connect", host, str(host_port), *host_role],
                capture_output=True, text=True, timeout=120 + nbytes / 1e6)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{direction}: no end after {exc.timeout:.0f} s") from None
        if client.returncode != 0:
            raise BenchError(f"{direction}: the host's end failed: {_last_line(client.stderr)}")
        try:
            out, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{direction}: the board's end did not finish") from None
        if server.returncode != 0:
            raise BenchError(f"{direction}: the board's end failed: {_last_line(err)}")
        ends = {"host": json.loads(client.stdout), "board": json.loads(out.splitlines()[-1])}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    for end, result in ends.items():
        if result["bytes"] != nbytes or result["sha256"] != sha256:
            raise BenchError(f"{direction}: the {end}'s end saw {result['bytes']} bytes, "
                             f"SHA-256 {result['sha256'][:16]}..., not {nbytes} and {sha256[:16]}...")
    return float(ends["board" if direction == "down" else "host"]["seconds"])


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


class Echo:
    """ICMP echo requests as whole Ethernet frames, built and checked in Python: the
    frames link's program. Each request's payload carries its number and the SHA-256 of
    the rest; the board's kernel sends the payload back, and each reply is checked."""

    def __init__(self, host_mac: str, host_ip: str, board_mac: str, board_ip: str,
                 mtu: int) -> None:
        self.size = mtu - 28  # the payload: an IPv4 packet of exactly the MTU
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, mtu, 0, 0x4000, 64, 1, 0,
                                   socket.inet_aton(host_ip), socket.inet_aton(board_ip)))
        ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
        self.header = (bytes.fromhex(board_mac.replace(":", ""))
                       + bytes.fromhex(host_mac.replace(":", "")) + b"\x08\x00" + bytes(ip))
        self.ident = os.getpid() & 0xFFFF
        self.block = random.Random(2).randbytes(4096 + self.size)

    def request(self, seq: int) -> bytes:
        number = seq.to_bytes(8, "big")
        body = self.block[seq % 4096: seq % 4096 + self.size - 40]
        payload = number + hashlib.sha256(number + body).digest() + body
        icmp = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq & 0xFFFF) + payload
        return self.header + icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]

    def reply(self, frame: bytes) -> int | None:
        """The number of the request a good echo reply answers; None for any other frame.
        A reply whose payload is not what was sent is a BenchError."""
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
            return None
        icmp = frame[14 + (frame[14] & 0xF) * 4:]
        if icmp[0] != 0 or int.from_bytes(icmp[4:6], "big") != self.ident:
            return None
        payload = icmp[8:]
        if len(payload) != self.size or \
                hashlib.sha256(payload[:8] + payload[40:]).digest() != payload[8:40]:
            raise BenchError("frames: an echo reply's payload does not match its SHA-256")
        return int.from_bytes(payload[:8], "big")


def _checksum(data: bytes) -> int:
    """The Internet checksum: the one's complement sum of 16-bit words is the number
    modulo 0xFFFF (2**16 = 1 modulo 0xFFFF), so one big-integer remainder gives it."""
    if len(data) % 2:
        data += b"\0"
    return 0xFFFF - int.from_bytes(data, "big") % 0xFFFF


def echo_frames(bridge: Bridge, echo: Echo, count: int) -> dict[str, float]:
    """count echo requests through the frames link, ECHO_WINDOW in flight; each reply
    checked. A request unanswered for 2 s is counted lost."""
    pending: set[int] = set()
    sent = answered = lost = 0
    start = time.perf_counter()
    while answered + lost < count:
        while sent < count and len(pending) < ECHO_WINDOW:
            if not bridge.send_frame(echo.request(sent), timeout=5):
                raise BenchError("frames: the link took no frame for 5 s")
            pending.add(sent)
            sent += 1
        frame = bridge.recv_frame(timeout=2)
        if frame is None:
            lost += len(pending)
            pending.clear()
            continue
        seq = echo.reply(frame)
        if seq in pending:
            pending.remove(seq)
            answered += 1
    seconds = time.perf_counter() - start
    return {"frames_per_s": answered / seconds, "mb_per_s": answered * echo.size / seconds / 1e6,
            "answered": answered, "lost": lost}


def measure_link(link: str, nbytes: int, mtu: int, max_packet: int,
                 sha256: dict[int, str]) -> dict[str, float]:
    """One round of one link on a fresh simulated device and bridge: TCP down then up
    (frames link: echo), MB/s and the CPU per MB of the bridge's and the device's threads."""
    kind, offload, _ = LINKS[link]
    subnet = free_linklocal_subnet()
    board_ip, host_ip = str(subnet[1]), str(subnet[2])
    forwards = {d: free_port(socket.SOCK_STREAM) for d in BOARD_PORTS} if kind == "user" else {}
    with SimLink(f"{board_ip}/24", max_packet=max_packet, mtu=mtu, batch=True) as sim:
        options = BridgeOptions(
            tap=unique_name("eembench"), link=kind, offload=offload, mtu=mtu, stats_socket=None,
            addresses=[] if kind == "frames" else [f"{host_ip}/24"],
            peer=None if kind == "frames" else board_ip, peer_mac=sim.mac,
            mac="02:ee:b0:00:00:01" if kind == "frames" else None,
            forwards=[f"tcp:{forwards[d]}:{BOARD_PORTS[d]}" for d in forwards])
        with Bridge(sim.connect, options) as bridge:
            if not bridge.connected.wait(10):
                raise BenchError(f"{link}: the bridge did not connect to the simulated device")
            if kind == "frames":
                assert options.mac is not None
                # The board's kernel answers the echoes: it must know where the host is.
                subprocess.run(["ip", "-n", sim.namespace, "neigh", "replace", host_ip, "lladdr",
                                options.mac, "dev", sim.network.name, "nud", "permanent"],
                               check=True, capture_output=True)
                echo = Echo(options.mac, host_ip, sim.mac, board_ip, mtu)
                return measure_echo(bridge, echo, max(1000, nbytes // echo.size))
            via = {d: ("127.0.0.1", port) for d, port in forwards.items()}
            return measure_tcp(sim.namespace, board_ip, nbytes, sha256, via)


def measure_tcp(namespace: str, board_ip: str, nbytes: int, sha256: dict[int, str],
                via: dict[str, tuple[str, int]]) -> dict[str, float]:
    """A 1 MB warm-up, then nbytes down and nbytes up."""
    warm = 1 << 20
    tcp_transfer(namespace, board_ip, "down", warm, sha256[warm], via.get("down"))
    row: dict[str, float] = {}
    spent = {"bridge": 0.0, "device": 0.0}
    for direction in ("down", "up"):
        cpu = thread_cpu()
        seconds = tcp_transfer(namespace, board_ip, direction, nbytes, sha256[nbytes],
                               via.get(direction))
        for k, v in thread_cpu().items():
            spent[k] += v - cpu[k]
        row[f"{direction}_mb_s"] = nbytes / seconds / 1e6
    return {**row, **_cpu_per_mb(spent, 2 * nbytes)}


def measure_echo(bridge: Bridge, echo: Echo, count: int) -> dict[str, float]:
    """200 echoes of warm-up, then count: the same MB/s each way."""
    echo_frames(bridge, echo, 200)
    cpu = thread_cpu()
    result = echo_frames(bridge, echo, count)
    spent = {k: v - cpu[k] for k, v in thread_cpu().items()}
    return {"down_mb_s": result["mb_per_s"], "up_mb_s": result["mb_per_s"],
            "frames_per_s": result["frames_per_s"], "lost": result["lost"],
            **_cpu_per_mb(spent, 2 * int(result["answered"]) * echo.size)}


def _cpu_per_mb(spent: dict[str, float], nbytes: int) -> dict[str, float]:
    return {f"{whose}_cpu_ms_per_mb": 1000 * seconds / (nbytes / 1e6)
            for whose, seconds in spent.items()}


def run_links(links: list[str], rounds: int, nbytes: int, mtu: int,
              max_packet: int) -> dict[str, list[dict[str, float]]]:
    """rounds x every link, in the same order each round (A B C A B C ...), so that what
    else loads the machine falls on every link alike. Progress on stderr."""
    sha256 = {n: expected_sha256(n) for n in (1 << 20, nbytes)}
    results: dict[str, list[dict[str, float]]] = {link: [] for link in links}
    for round_ in range(1, rounds + 1):
        for link in links:
            try:
                row = measure_link(link, nbytes, mtu, max_packet, sha256)
            except BenchError as exc:
                raise BenchError(f"round {round_}, link {link}: {exc}") from None
            results[link].append(row)
            print(f"round {round_}/{rounds} {link}: down {row['down_mb_s']:.1f} MB/s, "
                  f"up {row['up_mb_s']:.1f} MB/s, bridge CPU {row['bridge_cpu_ms_per_mb']:.1f} "
                  "ms/MB", file=sys.stderr, flush=True)
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, object]]:
    """Per link and figure: median, min, max over the rounds; and the median of the
    round-by-round ratios to the reference (each round's link against the same round's
    TAP link, so a slow spell of the machine cancels out)."""
    reference = results[REFERENCE]
    summary: dict[str, dict[str, object]] = {}
    for link, rows in results.items():
        figures: dict[str, object] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            figures[key] = {"median": statistics.median(values), "min": min(values),
                            "max": max(values)}
        for key in ("down_mb_s", "up_mb_s"):
            figures[f"{key}_ratio"] = statistics.median(
                row[key] / ref[key] for row, ref in zip(rows, reference, strict=True))
        summary[link] = {"label": LINKS[link][2], "rounds": rows, **figures}
    return summary


def print_links(summary: dict[str, dict[str, object]], header: str) -> None:
    """Markdown, ready to paste."""
    print(header)
    print()
    print("| link | down MB/s, median (range) | up MB/s, median (range) | down / TAP | up / TAP "
          "| bridge CPU ms/MB | device CPU ms/MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def span(figure: object, digits: int = 1) -> str:
        f = cast(dict, figure)
        return f"{f['median']:.{digits}f} ({f['min']:.{digits}f}-{f['max']:.{digits}f})"

    for link, s in summary.items():
        mark = " *" if link == "frames" else ""
        print(f"| {s['label']}{mark} | {span(s['down_mb_s'])} | {span(s['up_mb_s'])} "
              f"| {cast(float, s['down_mb_s_ratio']):.2f} | {cast(float, s['up_mb_s_ratio']):.2f} "
              f"| {cast(dict, s['bridge_cpu_ms_per_mb'])['median']:.1f} "
              f"| {cast(dict, s['device_cpu_ms_per_mb'])['median']:.1f} |")
    if "frames" in summary:
        f = summary["frames"]
        print(f"\n\\* frames link: ICMP echo of MTU-sized packets, {ECHO_WINDOW} in flight, built "
              "and checked by Python through send_frame/recv_frame; the same MB/s each way, "
              f"{span(f['frames_per_s'], 0)} echoes/s, {cast(dict, f['lost'])['max']:.0f} lost at most.")


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=positive(float), default=None,
                        help="MB per TCP transfer (default 64; 32 with --links)")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--max-packet", type=int, default=512, choices=(64, 512, 1024))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tun", action="store_true", help="also the TUN link (--link tun)")
    parser.add_argument("--user", action="store_true",
                        help="also the user link (--link user, through libslirp)")
    parser.add_argument("--links", type=parse_links, metavar="all|" + ",".join(LINKS),
                        help="instead: these links against the TAP link, in interleaved rounds, "
                             "TCP both ways checked by SHA-256")
    parser.add_argument("--rounds", type=positive(int), default=3,
                        help="with --links: rounds of every link (default 3)")
    args = parser.parse_args()
    if args.links and (args.tun or args.user):
        parser.error("--links measures the links it names: leave out --tun and --user")
    if not 576 <= args.mtu <= 9000:
        parser.error(f"--mtu {args.mtu}: expected 576-9000")
    if os.geteuid() != 0:
        parser.error("run as root: the bench makes namespaces and TAPs")
    for tool in ("ip", "iperf3", "ethtool") if not args.links else ("ip",):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.links:
            links_main(args)
        else:
            legacy_main(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; its namespaces and TAPs are removed", file=sys.stderr)
        sys.exit(130)
    except (BenchError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        sys.exit(1)


def links_main(args: argparse.Namespace) -> None:
    mb = 32.0 if args.mb is None else args.mb
    nbytes = int(mb * 1e6)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    results = run_links(args.links, args.rounds, nbytes, args.mtu, args.max_packet)
    summary = summarize(results)
    commit = _commit()
    if args.json:
        print(json.dumps({"date": started, "commit": commit, "codec": CODEC, "mb": mb,
                          "mtu": args.mtu, "max_packet": args.max_packet, "rounds": args.rounds,
                          "load_before": load, "load_after": os.getloadavg()[0],
                          "links": summary}, indent=2))
        return
    print_links(summary, f"{started}, commit {commit}, codec {CODEC}, TCP {mb:g} MB each way x "
                         f"{args.rounds} rounds, MTU {args.mtu}, device max packet "
                         f"{args.max_packet} (batching), load {load:.1f} -> "
                         f"{os.getloadavg()[0]:.1f}")


def _commit() -> str:
    """The checkout's commit, and "+changes" when its tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: the context managers' exits


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def positive(kind: type) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0")
        return value
    return check


def legacy_main(args: argparse.Namespace) -> None:
    nbytes = int((64.0 if args.mb is None else args.mb) * 1e6)
    veth = run_veth(nbytes, args.mtu)
    bridge = run_bridge(nbytes, args.mtu, args.max_packet)
    rows = {"veth (kernel ceiling)": veth, f"eembridge + sim (codec {CODEC})": bridge}
    tun = run_bridge(nbytes, args.mtu, args.max_packet, link="tun") if args.tun else None
    user = run_bridge(nbytes, args.mtu, args.max_packet, link="user") if args.user else None
    if tun is not None:
        # The TUN link has no offload: the TAP without it is the like-for-like row.
        rows["  the same, TAP --no-offload"] = run_bridge(nbytes, args.mtu, args.max_packet,
                                                          offload=False)
        rows["  the same, --link tun"] = tun
    if user is not None:
        if "  the same, TAP --no-offload" not in rows:
            rows["  the same, TAP --no-offload"] = run_bridge(nbytes, args.mtu, args.max_packet,
                                                              offload=False)
        rows["  the same, --link user (libslirp)"] = user
    ratio = bridge["mb_per_s"] / veth["mb_per_s"]
    ratio_iperf = bridge["iperf_mb_per_s"] / veth["iperf_mb_per_s"]
    ratio_small = bridge["small_frames_per_s"] / veth["small_frames_per_s"]
    if args.json:
        print(json.dumps({"rows": rows, "ratio_tcp": ratio, "ratio_tcp_iperf3": ratio_iperf,
                          "ratio_64b_frames": ratio_small,
                          **({"tun_over_tap": _ratios(tun, bridge),
                              "tun_over_tap_no_offload":
                                  _ratios(tun, rows["  the same, TAP --no-offload"])}
                             if tun else {}),
                          **({"user_over_tap_no_offload":
                                  _ratios(user, rows["  the same, TAP --no-offload"])}
                             if user else {})}, indent=2))
        return
    import eembridge

    print(f"eembridge from {Path(eembridge.__file__).parent}")
    print(f"TCP {nbytes / 1e6:g} MB, MTU {args.mtu}, device max packet {args.max_packet}, batch device")
    print("TCP in-process: Python TCP ends as threads of the bridge's process; iperf3: TCP ends"
          " in processes of their own")
    print(f"{'link':<34}{'TCP MB/s':>10}{'CPU s/GB':>10}{'iperf3 MB/s':>12}{'CPU s/GB':>10}"
          f"{'64B frames/s':>14}")
    for name, row in rows.items():
        print(f"{name:<34}{row['mb_per_s']:>10.1f}{row['cpu_s_per_gb']:>10.1f}"
              f"{row['iperf_mb_per_s']:>12.1f}{row['iperf_cpu_s_per_gb']:>10.1f}"
              f"{row['small_frames_per_s']:>14.0f}")
    print(f"ratio eembridge/veth: TCP in-process {ratio:.3f}, TCP iperf3 {ratio_iperf:.3f}, "
          f"64-byte frames {ratio_small:.3f}")
    if tun is not None:
        print("ratio tun/tap: " + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(tun, bridge).items()))
        plain = rows["  the same, TAP --no-offload"]
        print("ratio tun/tap --no-offload: "
              + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(tun, plain).items()))
    if user is not None:
        plain = rows["  the same, TAP --no-offload"]
        print("ratio user/tap --no-offload: "
              + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(user, plain).items()))


def _ratios(tun: dict[str, float], tap: dict[str, float]) -> dict[str, float]:
    return {"TCP in-process": tun["mb_per_s"] / tap["mb_per_s"],
            "TCP iperf3": tun["iperf_mb_per_s"] / tap["iperf_mb_per_s"],
            "64-byte frames": tun["small_frames_per_s"] / tap["small_frames_per_s"]}


if __name__ == "__main__":
    main()
