"""Shared network fixtures: namespaces, glued TAP pairs, ping and TCP-with-hash helpers.

Everything here creates its own uniquely named namespaces and interfaces, and checks at
teardown that they are gone. A missing facility (/dev/net/tun, root) fails loudly by
name; nothing is skipped.

Import the fixtures from conftest.py:
    from netfixtures import netns, tap_pair_factory  # noqa: F401
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from eembridge.link import netns as nsmod
from eembridge.link.netns import free_linklocal_subnet  # noqa: F401  (re-exported for tests)
from eembridge.link.tap import Tap

TAP_PREFIX = "eemt"  # test TAPs: eemt + 8 hex digits, well under IFNAMSIZ
NETNS_PREFIX = "eemt-"
FRAME_BUFFER = 65536  # bigger than any frame the kernel hands a TAP without offloads


def require_tun_and_root() -> None:
    """Fail (never skip) naming the facility a real-TAP test cannot run without."""
    if os.geteuid() != 0:
        pytest.fail("TAP/netns tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run as root")
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("TAP tests need /dev/net/tun: load the tun module (modprobe tun)")


def wait_for(predicate: Callable[[], Any], timeout: float = 3.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (link state changes reach netlink async)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# --- namespaces -------------------------------------------------------------------------

@contextlib.contextmanager
def checked_netns() -> Iterator[str]:
    """A fresh namespace; at exit it is deleted and its absence checked."""
    require_tun_and_root()
    name = nsmod.create_netns(NETNS_PREFIX)
    try:
        yield name
    finally:
        nsmod.delete_netns(name)
        assert not nsmod.netns_exists(name), f"netns {name} still exists after delete"


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace (loopback up), deleted with its contents afterwards."""
    with checked_netns() as name:
        yield name


# --- gluing two TAPs: a wire made of a Python thread ------------------------------------

class FrameCopier:
    """Copies every frame read from one TAP into the other, both ways, in a thread.

    A stand-in for the bridge (or a cable) in tests: frames are counted per direction;
    refused writes are counted by the Tap itself (``write_errors``).
    """

    def __init__(self, a: Tap, b: Tap) -> None:
        self.a, self.b = a, b
        self.frames = {"a->b": 0, "b->a": 0}
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="frame-copier", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            buf = bytearray(FRAME_BUFFER)
            view = memoryview(buf)
            poller = select.poll()
            routes = {
                self.a.fileno(): (self.a, self.b, "a->b"),
                self.b.fileno(): (self.b, self.a, "b->a"),
            }
            for fd in routes:
                poller.register(fd, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            while True:
                for fd, _events in poller.poll():
                    if fd == self._stop_r:
                        return
                    src, dst, key = routes[fd]
                    for _ in range(64):  # drain a burst, then look at the other side
                        n = src.read_into(view)
                        if n == 0:
                            break
                        dst.write(view[:n])
                        self.frames[key] += 1
        except BaseException as exc:  # reported by stop(), never lost
            self.error = exc

    def start(self) -> FrameCopier:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FrameCopier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- TAP pairs ----------------------------------------------------------------------------

@dataclass
class TapPair:
    """``near`` in the root namespace, ``far`` moved into ``netns``; both up."""

    near: Tap
    far: Tap
    netns: str
    near_ip: ipaddress.IPv4Interface
    far_ip: ipaddress.IPv4Interface
    near_ll: ipaddress.IPv6Interface
    far_ll: ipaddress.IPv6Interface
    copier: FrameCopier | None = None
    names: tuple[str, str] = field(default=("", ""))

    def close(self) -> None:
        if self.copier is not None:
            self.copier.stop()
        self.near.close()
        self.far.close()


def make_tap_pair(netns: str, *, glue: bool = True, mtu: int | None = None) -> TapPair:
    """Two fresh TAPs, the far one created here and moved into ``netns``, addressed
    169.254.X.1/24 + fe80::1/64 (near) and 169.254.X.2/24 + fe80::2/64 (far), up, and
    (``glue``) joined by a FrameCopier."""
    require_tun_and_root()
    subnet = free_linklocal_subnet()
    near = Tap.create(nsmod.unique_name(TAP_PREFIX), mtu=mtu)
    try:
        far = Tap.create(nsmod.unique_name(TAP_PREFIX), mtu=mtu)
    except BaseException:
        near.close()
        raise
    pair = TapPair(
        near=near,
        far=far,
        netns=netns,
        near_ip=ipaddress.IPv4Interface(f"{subnet[1]}/{subnet.prefixlen}"),
        far_ip=ipaddress.IPv4Interface(f"{subnet[2]}/{subnet.prefixlen}"),
        near_ll=ipaddress.IPv6Interface("fe80::1/64"),
        far_ll=ipaddress.IPv6Interface("fe80::2/64"),
        names=(near.name, far.name),
    )
    try:
        far.move_to_netns(netns)
        for tap, v4, v6 in ((near, pair.near_ip, pair.near_ll), (far, pair.far_ip, pair.far_ll)):
            tap.add_address(v4)
            tap.add_address(v6, nodad=True)  # usable at once; nobody else is on this wire
            tap.up()
        if glue:
            pair.copier = FrameCopier(near, far).start()
    except BaseException:
        pair.close()
        raise
    return pair


@pytest.fixture
def tap_pair_factory(netns: str) -> Iterator[Callable[..., TapPair]]:
    """``make(glue=True, mtu=None, netns=<the netns fixture>) -> TapPair``.

    At teardown the copier stops, both TAPs close, and both interfaces are checked gone
    from the root namespace and from the pair's namespace.
    """
    pairs: list[TapPair] = []

    def make(*, glue: bool = True, mtu: int | None = None, netns_name: str | None = None) -> TapPair:
        pair = make_tap_pair(netns_name or netns, glue=glue, mtu=mtu)
        pairs.append(pair)
        return pair

    yield make
    errors: list[BaseException] = []
    for pair in pairs:
        try:
            pair.close()
        except BaseException as exc:  # close all before reporting
            errors.append(exc)
    for pair in pairs:
        left = set(pair.names) & set(nsmod.link_names())
        if nsmod.netns_exists(pair.netns):
            left |= set(pair.names) & set(nsmod.link_names(pair.netns))
        assert not left, f"interfaces {sorted(left)} still exist after close"
    if errors:
        raise errors[0]


# --- ICMP echo (no ping binary needed) ------------------------------------------------------

def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(destination: str, *, count: int = 3, timeout: float = 2.0) -> list[float]:
    """ICMP/ICMPv6 echo from the calling thread's namespace; round-trip times in s.

    ``destination`` may carry a scope (``fe80::2%tap0``). Raises AssertionError if a
    reply does not come within ``timeout``.
    """
    host, _, scope = destination.partition("%")
    version = ipaddress.ip_address(host).version
    if version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        request_type, reply_type = 8, 0
        target: tuple[Any, ...] = (host, 0)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        request_type, reply_type = 128, 129  # the kernel fills ICMPv6 checksums
        target = (host, 0, 0, socket.if_nametoindex(scope) if scope else 0)
    ident = int.from_bytes(os.urandom(2), "big")
    rtts: list[float] = []
    with sock:
        for seq in range(count):
            payload = os.urandom(32)
            header = struct.pack("!BBHHH", request_type, 0, 0, ident, seq)
            csum = _inet_checksum(header + payload) if version == 4 else 0
            packet = struct.pack("!BBHHH", request_type, 0, csum, ident, seq) + payload
            sent = time.monotonic()
            sock.sendto(packet, target)
            deadline = sent + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    raise AssertionError(f"no echo reply from {destination} (seq {seq})")
                data = sock.recv(2048)
                if version == 4:
                    data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the header
                rtype, _, _, rid, rseq = struct.unpack_from("!BBHHH", data)
                if (rtype, rid, rseq) == (reply_type, ident, seq) and data[8:] == payload:
                    rtts.append(time.monotonic() - sent)
                    break
    return rtts


def ping_in(netns: str | None, destination: str, **kwargs: Any) -> list[float]:
    return nsmod.run_in_netns(netns, ping, destination, **kwargs)


# --- TCP transfer with SHA-256 on both ends ---------------------------------------------

@dataclass(frozen=True)
class Transfer:
    """Digests of one TCP exchange: client -> server, then server -> client."""

    upload_bytes: int
    upload_sent_sha256: str
    upload_received_sha256: str
    upload_received_bytes: int
    download_bytes: int
    download_sent_sha256: str
    download_received_sha256: str
    download_received_bytes: int
    seconds: float

    def assert_intact(self) -> None:
        assert self.upload_received_bytes == self.upload_bytes
        assert self.upload_received_sha256 == self.upload_sent_sha256
        assert self.download_received_bytes == self.download_bytes
        assert self.download_received_sha256 == self.download_sent_sha256


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _receive_all(conn: socket.socket) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    buf = bytearray(256 * 1024)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return digest.hexdigest(), total
        digest.update(memoryview(buf)[:n])
        total += n


def _serve_once(
    address: str, ports: queue.Queue[int], download: bytes, timeout: float
) -> tuple[str, int]:
    with socket.socket(_family(address), socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # getaddrinfo turns "fe80::1%tap0" into a sockaddr with its scope id.
        server.bind(socket.getaddrinfo(address, 0, _family(address), socket.SOCK_STREAM)[0][4])
        server.listen(1)
        server.settimeout(timeout)
        ports.put(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            result = _receive_all(conn)  # the client half-closes after its upload
            conn.sendall(download)
            conn.shutdown(socket.SHUT_WR)
            return result


def _client(address: str, port: int, upload: bytes, timeout: float) -> tuple[str, int]:
    with socket.create_connection((address, port), timeout=timeout) as conn:
        conn.sendall(upload)
        conn.shutdown(socket.SHUT_WR)
        return _receive_all(conn)


def tcp_transfer(
    server_address: str,
    *,
    server_netns: str | None,
    client_netns: str | None = None,
    upload_bytes: int = 4 << 20,
    download_bytes: int = 1 << 20,
    connect_address: str | None = None,
    timeout: float = 10.0,
) -> Transfer:
    """Upload random bytes from a client to a one-shot server, then download some back.

    The server runs in a thread inside ``server_netns`` (None: ours) bound to
    ``server_address`` (``fe80::2%ifname`` works); the client in ``client_netns``
    connects to ``connect_address`` (default: the same; a link-local address needs the
    client side's interface as its scope).
    Both ends hash what they send and receive.
    """
    upload = os.urandom(upload_bytes)
    download = os.urandom(download_bytes)
    ports: queue.Queue[int] = queue.Queue()
    start = time.monotonic()
    with nsmod.NetnsThread(server_netns, _serve_once, server_address, ports, download, timeout) as th:
        port = _await_port(th, ports, timeout)
        received = _client_in(client_netns, connect_address or server_address, port, upload, timeout)
    up_sha, up_n = th.result
    down_sha, down_n = received
    return Transfer(
        upload_bytes=upload_bytes,
        upload_sent_sha256=hashlib.sha256(upload).hexdigest(),
        upload_received_sha256=up_sha,
        upload_received_bytes=up_n,
        download_bytes=download_bytes,
        download_sent_sha256=hashlib.sha256(download).hexdigest(),
        download_received_sha256=down_sha,
        download_received_bytes=down_n,
        seconds=time.monotonic() - start,
    )


def _await_port(server: nsmod.NetnsThread, ports: queue.Queue[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return ports.get(timeout=0.05)
        except queue.Empty:
            if not server.is_alive():
                server.join_and_raise()  # the server's own exception says why
    raise AssertionError(f"TCP server did not start listening within {timeout} s")


def _client_in(
    netns: str | None, address: str, port: int, upload: bytes, timeout: float
) -> tuple[str, int]:
    return nsmod.run_in_netns(netns, _client, address, port, upload, timeout)


def wait_for_control_socket(proc: Any, sock: str, timeout: float = 20.0) -> None:
    """Wait for a bridge process's `eembridge stats` socket; fail with its stderr if it
    exited first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "control socket never appeared"
        time.sleep(0.1)


@dataclass
class SimBridgeProcess:
    """`eembridge --sim` as a user starts it: the TAP at .2 of a free link-local /24, the
    simulated device at .1, a control socket in the test's directory."""

    proc: Any
    tap: str
    subnet: Any
    sock: str

    def eembridge(self, *args: str) -> Any:
        """`eembridge ARGS` against this bridge's control socket."""
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", "eembridge", *args, "--socket", self.sock],
                              capture_output=True, text=True, timeout=60)

    def snapshot(self) -> dict[str, Any]:
        """`eembridge stats --json` of this bridge."""
        import json

        stats = self.eembridge("stats", "--json")
        assert stats.returncode == 0, stats.stderr
        return dict(next(iter(json.loads(stats.stdout).values())))

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a service manager stops it: (exit status, what it wrote on stderr)."""
        import signal

        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, err

    def wait_connected(self, timeout: float = 20.0) -> dict[str, Any]:
        """Once its socket answers and the device is connected: the snapshot that said so."""
        wait_for_control_socket(self.proc, self.sock)

        def connected() -> dict[str, Any] | None:
            state = self.snapshot()
            return state if state["connected"] else None

        return dict(wait_for(connected, timeout, "connected"))


def start_sim_bridge(tmp_path: Any, prefix: str, *extra: str, **popen: Any) -> SimBridgeProcess:
    import subprocess
    import sys
    from pathlib import Path

    require_tun_and_root()
    subnet = free_linklocal_subnet()
    tap = nsmod.unique_name(prefix)
    sock = str(tmp_path / "bridge.sock")
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("text", True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "eembridge", "--sim", "--tap", tap, "--ip", f"{subnet[2]}/24",
         "--sim-ip", f"{subnet[1]}/24", "--stats-socket", sock, *extra],
        cwd=Path(__file__).resolve().parent.parent, **popen)
    return SimBridgeProcess(proc, tap, subnet, sock)


# --- bridges to the simulated device, in this process -------------------------------------

@dataclass
class SimRig:
    """A simulated device at .1 of a free link-local /24 and a bridge to it at .2."""

    sim: Any  # eembridge.sim.link.SimLink
    bridge: Any  # eembridge.bridge.Bridge
    device_ip: str
    host_ip: str

    def transfer(self, up: int, down: int, *, server_on_board: bool = True,
                 timeout: float = 60.0) -> Transfer:
        """TCP both ways by SHA-256, the server on the device's side (or the host's)."""
        if server_on_board:
            result = tcp_transfer(self.device_ip, server_netns=self.sim.namespace,
                                  upload_bytes=up, download_bytes=down, timeout=timeout)
        else:
            result = tcp_transfer(self.host_ip, server_netns=None,
                                  client_netns=self.sim.namespace,
                                  upload_bytes=up, download_bytes=down, timeout=timeout)
        result.assert_intact()
        return result


@contextlib.contextmanager
def sim_rigs() -> Iterator[Callable[..., SimRig]]:
    """``make(sim_options, static_neighbour=True, **bridge_options) -> SimRig``, each
    bridge connected; at exit every bridge stops (its thread must not have died) and
    every simulated device closes."""
    from eembridge.bridge import Bridge, BridgeOptions
    from eembridge.sim.link import SimLink

    require_tun_and_root()
    made: list[Any] = []

    def make(sim_options: dict[str, Any], static_neighbour: bool = True,
             before_bridge: Callable[[Any, Any], None] | None = None,
             **bridge_options: Any) -> SimRig:
        """before_bridge(sim, subnet): e.g. start a server on the device's side."""
        subnet = free_linklocal_subnet()
        device_ip, host_ip = str(subnet[1]), str(subnet[2])
        sim = SimLink(f"{device_ip}/24", **sim_options)
        made.append(sim)
        if before_bridge is not None:
            before_bridge(sim, subnet)
        if static_neighbour:
            bridge_options.update(peer=device_ip, peer_mac=sim.mac)
        bridge_options.setdefault("addresses", [f"{host_ip}/24"])
        options = BridgeOptions(tap=nsmod.unique_name("eemb"), stats_socket=None,
                                **bridge_options)
        bridge = Bridge(sim.connect, options)
        bridge.start()
        made.append(bridge)
        assert bridge.connected.wait(10), "bridge did not connect to the simulated device"
        return SimRig(sim, bridge, device_ip, host_ip)

    try:
        yield make
    finally:
        for thing in reversed(made):
            if isinstance(thing, Bridge):
                thing.stop()
                assert thing.error is None, f"bridge thread died: {thing.error!r}"
            else:
                thing.close()
