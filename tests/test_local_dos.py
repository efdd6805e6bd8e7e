"""No local denial of service and no data loss through what a running bridge serves to
other local processes: the control socket (`--stats-socket`, `eembridge stats|echo`) and
the Prometheus endpoint (`--metrics`).

The servers are attacked in this process against a stand-in bridge (fast, exact
counters), then a real bridge on the simulated device is attacked while it keeps
answering pings: idle and half-sent connections by the hundred, malformed requests, long
echoes whose clients vanish. Threads are counted in /proc/PID/task."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge.core.errors import UserError
from eembridge.link.netns import free_linklocal_subnet, unique_name

from netfixtures import ping, require_tun_and_root, wait_for

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def eembridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=ENV)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "eembridge: error:" in line]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_connect(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:  # the listen backlog is full until the server accepts
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.001)


def ask(path: str, raw: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes as a request; the JSON lines of the answer, until the server closes."""
    with unix_connect(path, timeout) as sock:
        sock.sendall(raw)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def stale_socket(path: str) -> None:
    """What a bridge killed with SIGKILL leaves: a bound socket nobody listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the other end closed (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class FakeBridge:
    """The two requests a bridge answers, without a device: stats, and Echoes that come
    back after `echo_delay` (or never, with None)."""

    def __init__(self, echo_delay: float | None = 0.01) -> None:
        self.echo_delay = echo_delay
        self.echoes_sent = 0
        self.stats_calls = 0
        self.observers: dict[str, Callable[[], dict[str, Any]]] = {}
        self.servers: dict[str, Callable[[], dict[str, Any]]] = {}

    def stats(self) -> dict[str, Any]:
        self.stats_calls += 1
        snapshot: dict[str, Any] = {"tap": "fake0", "connected": True, "device": {"serial": "F1"},
                                    "bridge": {"tx_frames": 7}}
        if self.servers:
            snapshot["servers"] = {name: get() for name, get in self.servers.items()}
        return snapshot

    def echo_async(self, data: bytes | None = None, timeout: float = 2.0) -> Future[float]:
        self.echoes_sent += 1
        future: Future[float] = Future()
        if self.echo_delay is not None:
            timer = threading.Timer(self.echo_delay, future.set_result, (self.echo_delay,))
            timer.daemon = True
            timer.start()
        return future

    def echo(self, data: bytes | None = None, timeout: float = 2.0) -> float:
        return self.echo_async(data, timeout).result(timeout + 1.0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eemdos") as name:
        yield Path(name)


@pytest.fixture
def control(short_dir: Path) -> Iterator[tuple[Any, FakeBridge, str]]:
    from eembridge.observe.control import ControlServer

    bridge = FakeBridge()
    path = str(short_dir / "c.sock")
    server = ControlServer(path, bridge, max_connections=16, request_timeout=0.5)
    bridge.servers["control"] = server.counters
    try:
        yield server, bridge, path
    finally:
        server.close()


# -- the socket's path: nothing of the user's removed ----------------------------------------

def test_control_socket_never_removes_what_is_not_its_own(short_dir: Path):
    from eembridge.observe.control import ControlServer

    precious = short_dir / "precious.txt"
    precious.write_text("keep me\n")
    for path, expected in (
        (precious, "not a socket"),
        (short_dir, "directory"),
        (short_dir / "missing" / "c.sock", "does not exist"),
    ):
        with pytest.raises(UserError, match=expected):
            ControlServer(str(path), FakeBridge())
    assert precious.read_text() == "keep me\n"
    assert not (short_dir / "missing").exists()
    link = short_dir / "link.sock"
    link.symlink_to(precious)
    with pytest.raises(UserError, match="not a socket"):
        ControlServer(str(link), FakeBridge())
    assert link.is_symlink() and precious.read_text() == "keep me\n"

    # A socket somebody answers on belongs to a running bridge: left alone.
    path = str(short_dir / "c.sock")
    first = ControlServer(path, FakeBridge())
    try:
        with pytest.raises(UserError, match="another bridge"):
            ControlServer(path, FakeBridge())
        assert ask(path, b'{"cmd": "stats"}\n')[0]["tap"] == "fake0"
    finally:
        first.close()
    assert not os.path.exists(path)  # ours, still the one we bound: removed

    # A socket nobody answers on is stale: replaced.
    stale_socket(path)
    second = ControlServer(path, FakeBridge())
    assert ask(path, b'{"cmd": "stats"}\n')[0]["tap"] == "fake0"
    # Replaced under us while we ran: what is there now is not ours to remove.
    os.rename(path, path + ".moved")
    Path(path).write_text("somebody else's\n")
    second.close()
    assert Path(path).read_text() == "somebody else's\n"


def test_stats_socket_flag_and_config_key_are_one_line_and_keep_the_file(short_dir: Path):
    require_tun_and_root()
    precious = short_dir / "precious.txt"
    precious.write_text("keep me\n")
    readonly = short_dir / "ro"
    readonly.mkdir(mode=0o555)
    config = short_dir / "eembridge.toml"
    config.write_text(f'[defaults]\nstats-socket = "{precious}"\n')
    subnet = free_linklocal_subnet()
    base = ["--sim", "--tap", unique_name("eemdos"), "--ip", f"{subnet[2]}/24",
            "--sim-ip", f"{subnet[1]}/24"]
    for extra, expected in (
        (["--stats-socket", str(precious)], "not a socket"),
        (["--config", str(config)], "not a socket"),
        (["--stats-socket", str(short_dir)], "directory"),
        (["--stats-socket", str(short_dir / "missing" / "c.sock")], "does not exist"),
        (["--stats-socket", str(readonly / "c.sock")], "ermission denied"),
    ):
        one_line_error(eembridge(*base, *extra), *expected.split("|"))
        assert precious.read_text() == "keep me\n"
    assert not (short_dir / "missing").exists()


# -- the control socket: every request validated, bounded, timed out ------------------------

MALFORMED = (
    (b'{"cmd": "echo", "count": "abc"}\n', "count"),
    (b'{"cmd": "echo", "count": Infinity}\n', "Infinity"),
    (b'{"cmd": "echo", "count": 1e400}\n', "count"),
    (b'{"cmd": "echo", "count": true}\n', "count"),
    (b'{"cmd": "echo", "count": 0}\n', "count"),
    (b'{"cmd": "echo", "count": 10000000}\n', "count"),
    (b'{"cmd": "echo", "interval": "x"}\n', "interval"),
    (b'{"cmd": "echo", "interval": NaN}\n', "NaN"),
    (b'{"cmd": "echo", "interval": -1}\n', "interval"),
    (b'{"cmd": "echo", "timeout": 1e308}\n', "timeout"),
    (b'{"cmd": "echo", "timeout": 0}\n', "timeout"),
    (b'{"cmd": "echo", "timeout": null}\n', "timeout"),
    (b'{"cmd": "echo", "colour": 1}\n', "colour"),
    (b'{"cmd": 5}\n', "cmd"),
    (b'{"cmd": "reboot"}\n', "reboot"),
    (b"[" * 2000 + b"]" * 2000 + b"\n", "nested"),
    (b'{"a":' * 600 + b"1" + b"}" * 600 + b"\n", "nested"),
    (b"x" * 100_000 + b"\n", "longer than"),
    (b'{"cmd": "st\xffats"}\n', "UTF-8"),
    (b"[1, 2]\n", "JSON object"),
    (b'"stats"\n', "JSON object"),
    (b"{not json\n", "JSON"),
)


def test_control_socket_answers_every_malformed_request_and_lives_on(control):
    server, bridge, path = control
    for raw, expected in MALFORMED:
        replies = ask(path, raw)
        assert len(replies) == 1 and expected in replies[0].get("error", ""), (raw[:60], replies)
        assert "Traceback" not in replies[0]["error"]
    assert ask(path, b'{"cmd": "stats"}\n')[0]["tap"] == "fake0"
    assert ask(path, b"\n")[0]["tap"] == "fake0"  # an empty request is a stats request
    echo = ask(path, b'{"cmd": "echo", "count": 2, "interval": 0.01, "timeout": 1}\n')
    assert [r["seq"] for r in echo] == [0, 1] and all("rtt" in r for r in echo)
    snapshot = ask(path, b'{"cmd": "stats"}\n')[0]
    counters = snapshot["servers"]["control"]
    assert counters["bad_requests"] == len(MALFORMED)
    assert counters["echo_requests"] == 1 and counters["stats_requests"] == 3
    # Plain `eembridge stats` says so too.
    from rich.console import Console

    from eembridge.cli.stats import render

    console = Console(record=True, width=200)
    console.print(render("fake0", snapshot))
    assert f"control server: bad_requests {len(MALFORMED)}" in console.export_text()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["cmd", "count", "timeout", "interval", "x"]),
                    st.one_of(st.sampled_from(["stats", "echo"]), JSON_VALUES), max_size=5)
    .map(lambda d: json.dumps(d).encode()),
))
def test_every_request_line_is_parsed_or_refused_by_name(line):
    """The one invariant of the request parser: a valid request, or BadRequest."""
    from eembridge.observe.control import (
        MAX_ECHO_COUNT,
        MAX_ECHO_SECONDS,
        BadRequest,
        parse_request,
    )

    try:
        request = parse_request(line)
    except BadRequest as exc:
        assert str(exc)
        return
    assert request["cmd"] in ("stats", "echo")
    if request["cmd"] == "echo":
        assert 1 <= request["count"] <= MAX_ECHO_COUNT
        assert 0 < request["timeout"] <= MAX_ECHO_SECONDS
        assert 0 <= request["interval"] <= MAX_ECHO_SECONDS


def test_control_socket_bounds_connections_times_out_and_keeps_answering(control):
    server, bridge, path = control
    baseline = threading.active_count()
    attackers = []
    for i in range(300):
        sock = unix_connect(path)
        if i % 2:
            sock.sendall(b'{"cmd": "st')  # half a request
        attackers.append(sock)
        assert threading.active_count() <= baseline + 2
    # A real client still gets in, at once: the oldest unfinished connections made room.
    started = time.monotonic()
    assert ask(path, b'{"cmd": "stats"}\n', timeout=2)[0]["tap"] == "fake0"
    assert time.monotonic() - started < 1.0
    counters = wait_for(lambda: (c := server.counters())["connections"] == 301 and c, 5,
                          "every connection accepted")
    assert counters["open"] <= 16
    assert counters["evicted"] + counters["refused"] + counters["timeouts"] >= 300 - 16
    # Those left are timed out: a request has 0.5 s here to arrive whole.
    wait_for(lambda: server.counters()["open"] == 0, 5, "idle connections timed out")
    assert server.counters()["timeouts"] >= 1
    assert closed_by_peer(attackers[-1], 2.0)
    for sock in attackers:
        sock.close()
    wait_for(lambda: threading.active_count() <= baseline, 5, "threads back to baseline")


def test_echo_ends_when_its_client_goes_away(control):
    server, bridge, path = control
    baseline = threading.active_count()
    clients = []
    for _ in range(12):  # fewer than the 16 connections: none is dropped to make room
        sock = unix_connect(path)
        sock.sendall(b'{"cmd": "echo", "count": 100000, "interval": 0.05, "timeout": 1}\n')
        clients.append(sock)
    for sock in clients:
        reply = json.loads(sock.makefile("rb").readline())
        assert "rtt" in reply or "busy" in reply.get("error", ""), reply
    counters = server.counters()
    assert counters["echo_sessions"] == 8 and counters["busy"] == 12 - 8
    assert threading.active_count() <= baseline + 8  # Echo timers of the stand-in device
    for sock in clients:
        sock.close()
    wait_for(lambda: server.counters()["echo_sessions"] == 0, 2, "echo sessions ended")
    assert server.counters()["peer_gone"] >= 1
    sent = bridge.echoes_sent
    # No Echo is sent for a client that is gone: a stats round trip later, none more.
    assert ask(path, b"\n")[0]["tap"] == "fake0"
    assert bridge.echoes_sent == sent

    # A device that never answers: the client leaves in the middle of an Echo.
    bridge.echo_delay = None
    sock = unix_connect(path)
    sock.sendall(b'{"cmd": "echo", "count": 5, "interval": 0.05, "timeout": 30}\n')
    wait_for(lambda: server.counters()["echo_sessions"] == 1, 2, "echo session started")
    sock.close()
    wait_for(lambda: server.counters()["echo_sessions"] == 0, 2, "echo session ended")


def test_stats_skips_stale_sockets_and_shows_the_live_ones(short_dir: Path):
    from eembridge.observe.control import ControlServer

    stale_socket(str(short_dir / "dead0.sock"))
    stale_socket(str(short_dir / "dead1.sock"))
    (short_dir / "notes.sock").write_text("not a socket at all\n")
    server = ControlServer(str(short_dir / "fake0.sock"), FakeBridge())
    try:
        plain = eembridge("stats", "--run-dir", str(short_dir), "--json")
        assert plain.returncode == 0, plain.stderr
        assert list(json.loads(plain.stdout)) == ["fake0"]
        assert len(plain.stderr.splitlines()) == 1, plain.stderr
        assert "dead0.sock" in plain.stderr and "dead1.sock" in plain.stderr
        assert "stale" in plain.stderr

        watch = eembridge("stats", "--run-dir", str(short_dir), "--watch", "--json", "--count", "1")
        assert watch.returncode == 0, watch.stderr
        refresh = json.loads(watch.stdout)
        assert [b["tap"] for b in refresh["bridges"]] == ["fake0"]
        assert refresh["not_answering"] == []
        assert sorted(Path(p).name for p in refresh["stale"]) == ["dead0.sock", "dead1.sock"]
        assert len(watch.stderr.splitlines()) == 1 and "dead0.sock" in watch.stderr

        echo = eembridge("echo", "--socket", str(short_dir / "dead0.sock"), "-c", "1")
        one_line_error(echo, "dead0.sock", "stale")
    finally:
        server.close()
    only_stale = eembridge("stats", "--run-dir", str(short_dir))
    one_line_error(only_stale, "no running bridge")
    assert (short_dir / "dead0.sock").exists()  # a client never removes anything


def test_echo_command_checks_its_numbers_before_asking():
    for args, expected in (
        (["--count", "0"], "--count"),
        (["--interval", "nan"], "--interval"),
        (["--timeout", "inf"], "--timeout"),
        (["--timeout", "1e308"], "--timeout"),
    ):
        one_line_error(eembridge("echo", "--socket", "/nonexistent.sock", *args), expected)


# -- the metrics endpoint ---------------------------------------------------------------------

@pytest.fixture
def metrics() -> Iterator[tuple[Any, FakeBridge, int]]:
    from eembridge.observe.metrics import MetricsServer

    bridge = FakeBridge()
    port = free_port()
    server = MetricsServer(f"127.0.0.1:{port}", bridge.stats, max_connections=16,
                           request_timeout=0.5)
    bridge.servers["metrics"] = server.counters
    try:
        yield server, bridge, port
    finally:
        server.close()


def scrape(port: int, timeout: float = 5.0, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def http_raw(port: int, raw: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_metrics_endpoint_answers_bad_requests_at_once(metrics):
    server, bridge, port = metrics
    assert "eembridge_bridge_tx_frames_total" in scrape(port)
    openmetrics = scrape(port, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.rstrip().endswith("# EOF")
    for raw, status in (
        (b"GET /\r\n", b"400"),             # no HTTP version
        (b"GET /\r\n\r\n", b"400"),
        (b"GET / HTTP/9.9\r\n\r\n", b"505"),
        (b"\xff\xfe garbage\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n", b"431"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    ):
        started = time.monotonic()
        answer = http_raw(port, raw)
        assert answer.startswith(b"HTTP/1.1 " + status), (raw[:40], answer[:100])
        assert time.monotonic() - started < 1.0
    counters = server.counters()
    assert counters["bad_requests"] == 6 and counters["scrapes"] >= 2


def test_metrics_endpoint_answers_random_bytes_with_a_status_or_a_close(metrics):
    """Byte-mutated requests: an HTTP status line or a plain close, never a hang, never a
    server error; the endpoint serves on."""
    import random

    server, bridge, port = metrics
    good = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n"
    rng = random.Random(18)
    for _ in range(150):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(raw))
            choice = rng.random()
            if choice < 0.4:
                raw[at] = rng.randrange(256)
            elif choice < 0.7:
                del raw[at]
            else:
                raw[at:at] = bytes([rng.randrange(256)]) * rng.randint(1, 50)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(bytes(raw))
            sock.shutdown(socket.SHUT_WR)  # a request cut short is answered by a close
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
        assert data == b"" or re.match(rb"HTTP/1\.1 (200|400|405|414|431|505) ", data), (raw, data[:80])
    assert server.counters()["errors"] == 0
    assert "eembridge_connected" in scrape(port)


def test_metrics_endpoint_bounds_connections_and_times_them_out(metrics):
    server, bridge, port = metrics
    baseline = threading.active_count()
    attackers = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        attackers.append(sock)
    started = time.monotonic()
    assert "eembridge_connected" in scrape(port, timeout=2)
    assert time.monotonic() - started < 1.0
    assert threading.active_count() <= baseline + 2
    counters = wait_for(lambda: (c := server.counters())["connections"] == 301 and c, 5,
                          "every connection accepted")
    assert counters["open"] <= 16
    assert counters["evicted"] + counters["refused"] + counters["timeouts"] >= 300 - 16
    wait_for(lambda: server.counters()["open"] == 0, 5, "half-sent requests timed out")
    assert server.counters()["timeouts"] >= 1
    for sock in attackers:
        sock.close()
    wait_for(lambda: threading.active_count() <= baseline, 5, "threads back to baseline")


def test_scrapes_share_a_recent_snapshot(metrics):
    """Everybody may scrape: a scrape storm costs the bridge at most a few snapshots a
    second, never one per request."""
    server, bridge, port = metrics
    before = bridge.stats_calls
    started = time.monotonic()
    for _ in range(50):
        scrape(port)
    elapsed = time.monotonic() - started
    assert bridge.stats_calls - before <= 1 + elapsed / 0.2


# -- a real bridge, attacked while it carries pings ------------------------------------------

class Bridge:
    """The main job on --sim with --metrics, as a user runs it."""

    def __init__(self, sock: str, port: int) -> None:
        require_tun_and_root()
        subnet = free_linklocal_subnet()
        self.host_ip, self.sim_ip = str(subnet[2]), str(subnet[1])
        self.sock, self.port = sock, port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eembridge", "--sim", "--tap", unique_name("eemdos"),
             "--ip", f"{self.host_ip}/24", "--sim-ip", f"{self.sim_ip}/24",
             "--stats-socket", sock, "--metrics", f"127.0.0.1:{port}"],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

        def up() -> bool:
            assert self.proc.poll() is None, "".join(self.log)
            if not any("Prometheus metrics on" in line for line in self.log):
                return False
            with contextlib.suppress(OSError), unix_connect(sock, 1):
                return True
            return False

        wait_for(up, 30, "the bridge's control socket and metrics endpoint")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        assert self.proc.returncode == 0, "".join(self.log)
        assert not any("Traceback" in line for line in self.log), "".join(self.log)


class Pinger:
    """Pings the simulated peer through the bridge every 0.2 s until stopped."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.answered = 0
        self.lost: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ping(self.address, count=1, timeout=2.0)
                self.answered += 1
            except AssertionError as exc:
                self.lost.append(str(exc))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_bridge_keeps_forwarding_and_answering_under_local_attack(short_dir: Path):
    sock = str(short_dir / "bridge.sock")
    job = Bridge(sock, free_port())
    attackers: list[socket.socket] = []
    pinger = None
    try:
        # Every lazily started thread exists once a stats, an echo and a scrape were served.
        assert eembridge("echo", "--socket", sock, "-c", "1", "--json").returncode == 0
        scrape(job.port)
        wait_for(lambda: json.loads(eembridge("stats", "--socket", sock, "--json").stdout),
                   10, "stats")
        baseline = job.threads()
        pinger = Pinger(job.sim_ip)
        wait_for(lambda: pinger.answered >= 2, 10, "pings through the bridge")

        for i in range(300):
            control = unix_connect(sock)
            web = socket.create_connection(("127.0.0.1", job.port))
            if i % 2:
                control.sendall(b'{"cmd": "echo", "cou')
                web.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            attackers += [control, web]
        for raw, expected in MALFORMED:
            assert expected in ask(sock, raw)[0]["error"]
        assert http_raw(job.port, b"GET /\r\n").startswith(b"HTTP/1.1 400")
        for _ in range(50):  # long echoes whose clients vanish after the first answer
            echo = unix_connect(sock)
            echo.sendall(b'{"cmd": "echo", "count": 100000, "interval": 0.05, "timeout": 5}\n')
            echo.recv(1)
            echo.close()
        for _ in range(100):  # and more idle ones, to keep the limit full
            attackers.append(unix_connect(sock))
            attackers.append(socket.create_connection(("127.0.0.1", job.port)))

        # Under attack: a user's `eembridge stats` and a scrape answer in time, the thread
        # count stays bounded, and the pings go on.
        started = time.monotonic()
        stats = eembridge("stats", "--socket", sock, "--json", timeout=15)
        assert stats.returncode == 0, stats.stderr
        assert time.monotonic() - started < 10
        started = time.monotonic()
        assert "eembridge_connected" in scrape(job.port, timeout=5)
        assert time.monotonic() - started < 5
        assert job.threads() <= baseline + 6, (job.threads(), baseline)

        snapshot = next(iter(json.loads(stats.stdout).values()))
        control_counters = snapshot["servers"]["control"]
        assert control_counters["bad_requests"] >= len(MALFORMED)
        assert control_counters["evicted"] + control_counters["refused"] > 0
        assert control_counters["open"] <= 64

        for attacker in attackers:
            attacker.close()
        wait_for(lambda: job.threads() <= baseline, 15, "threads back to baseline")

        def servers() -> dict[str, Any]:
            result = eembridge("stats", "--socket", sock, "--json")
            assert result.returncode == 0, result.stderr
            return next(iter(json.loads(result.stdout).values()))["servers"]

        counters = wait_for(lambda: (s := servers())["control"]["echo_sessions"] == 0 and s,
                              15, "echo sessions of vanished clients ended")
        assert counters["control"]["peer_gone"] >= 1, json.dumps(counters)
        assert counters["metrics"]["bad_requests"] >= 1
        assert counters["metrics"]["evicted"] + counters["metrics"]["refused"] > 0
        metrics_text = scrape(job.port)
        assert re.search(r"eembridge_server_control_bad_requests_total\{[^}]*\} [1-9]", metrics_text)
        answered = pinger.answered
        wait_for(lambda: pinger.answered >= answered + 2, 10, "pings after the attack")
        pinger.stop()
        assert pinger.lost == [], pinger.lost
    finally:
        if pinger is not None:
            pinger.stop()
        for attacker in attackers:
            attacker.close()
        job.stop()
    assert not os.path.exists(sock)
