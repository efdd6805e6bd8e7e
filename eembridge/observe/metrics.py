"""Prometheus metrics of a running bridge, served over HTTP (`--metrics HOST:PORT`).

A custom Collector turns one `bridge.stats()` snapshot into metric families at scrape
time, so nothing is counted twice and the data path is never touched: the counters
already exist, the scrape only reads them. Counters are `eembridge_*_total`, state is
gauges; every sample is labelled with the device serial and the TAP name.

Every local user can reach the endpoint, so it is served by our own bounded server
(localserver.py: 64 connections, the oldest unfinished dropped to make room, 5 s to
send the request head, 10 s to take the answer, one thread at most) rather than
prometheus_client's start_http_server, a thread per connection with no timeout (0.26).
The answer is still prometheus_client's own (make_wsgi_app: content negotiation,
gzip, name[] filters), over one snapshot that scrapes share for SNAPSHOT_MAX_AGE: a
scrape storm costs the bridge's thread a few snapshots a second, never one each.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from ..core.errors import UserError
from ..core.options import parse_address
from .server import Connection, LocalServer, TooLong

PREFIX = "eembridge"
LABELS = ["serial", "tap"]

# Snapshot sections of plain counters: section -> (metric name part, help).
COUNTER_SECTIONS = {
    "bridge": ("bridge", "bridge event counter"),
    "rx": ("eem_rx", "EEM deframer counter (device to host)"),
    "tx": ("eem_tx", "EEM framer counter (host to device)"),
    "link": ("link", "kernel counter of the TAP interface"),
    "l3": ("l3", "--link tun: Ethernet translation counter (dropped_*: not carried, by reason)"),
    "user": ("user", "--link user: libslirp pump counter (refused_*: the board's own traffic out, "
                     "refused without --nat)"),
    "dhcp": ("dhcp", "--link tun --dhcp: DHCP client counter (lost: leases expired)"),
    "event_loop": ("event_loop", "counter of the thread moving frames in C (real USB)"),
}
# Gauges: snapshot key -> help.
GAUGES = {
    "in_transfers_in_flight": "bulk IN transfers submitted and not yet completed",
    "out_transfers_queued": "bulk OUT transfers submitted and not yet completed",
    "tx_bytes_in_flight": "bytes in bulk OUT transfers not yet completed",
}
# Keys of a server's counters (snapshot "servers") that are states, not totals.
SERVER_GAUGES = {"open", "threads", "echo_sessions"}

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_LINE = 8192  # the request line, and each header line
MAX_HEAD = 16384
MAX_HEADERS = 100
SNAPSHOT_MAX_AGE = 0.25


def snapshot_families(s: dict[str, Any]) -> Iterator[Metric]:
    """Metric families of one stats snapshot (pure: testable on any snapshot)."""
    device = s.get("device") or {}
    labels = [str(device.get("serial") or ""), str(s.get("tap", ""))]

    up = GaugeMetricFamily(f"{PREFIX}_connected", "1 while the EEM device is claimed", labels=LABELS)
    up.add_metric(labels, 1.0 if s.get("connected") else 0.0)
    yield up
    for section, (part, help_text) in COUNTER_SECTIONS.items():
        values = s.get(section) or {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue  # e.g. {"error": ...} when the kernel counters could not be read
            family = CounterMetricFamily(f"{PREFIX}_{part}_{name}", f"{help_text}: {name}",
                                         labels=LABELS)
            family.add_metric(labels, float(value))
            yield family
    for section, label, help_text in (
        ("drop_reasons", "reason", "frames from the TAP not sent to the device, by reason"),
        ("in_errors", "status", "bulk IN transfers that ended in an error, by status"),
    ):
        family = CounterMetricFamily(f"{PREFIX}_{section}", help_text, labels=[*LABELS, label])
        for key, value in (s.get(section) or {}).items():
            family.add_metric([*labels, str(key)], float(value))
        yield family
    for key, help_text in GAUGES.items():
        gauge = GaugeMetricFamily(f"{PREFIX}_{key}", help_text, labels=LABELS)
        gauge.add_metric(labels, float(s.get(key) or 0))
        yield gauge
    if s.get("echo_rtt_last") is not None:
        rtt = GaugeMetricFamily(f"{PREFIX}_echo_rtt_last_seconds",
                                "round-trip time of the last answered EEM Echo", labels=LABELS)
        rtt.add_metric(labels, float(s["echo_rtt_last"]))
        yield rtt
    for name, counters in (s.get("capture") or {}).items():
        for key, value in counters.items():
            if isinstance(value, int) and not isinstance(value, bool):
                family = CounterMetricFamily(f"{PREFIX}_capture_{name}_{key}",
                                             f"--{name.replace('_', '-')} capture counter: {key}",
                                             labels=LABELS)
                family.add_metric(labels, float(value))
                yield family


    for name, counters in (s.get("servers") or {}).items():
        for key, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if key in SERVER_GAUGES:
                gauge = GaugeMetricFamily(f"{PREFIX}_server_{name}_{key}",
                                          f"{name} server (local clients): {key}", labels=LABELS)
                gauge.add_metric(labels, float(value))
                yield gauge
            else:
                family = CounterMetricFamily(f"{PREFIX}_server_{name}_{key}",
                                             f"{name} server (local clients) counter: {key}",
                                             labels=LABELS)
                family.add_metric(labels, float(value))
                yield family


class SnapshotCollector(Collector):
    """The metric families of one snapshot already taken."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_families(self._snapshot)


class BridgeCollector(Collector):
    """Reads the bridge's snapshot when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_families(self._stats())


class MetricsServer:
    """The HTTP endpoint; close() stops it."""

    def __init__(self, address: str, stats: Callable[[], dict[str, Any]], *,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        host, port = parse_address(address)
        self._stats = stats
        self._snapshot: dict[str, Any] | None = None
        self._taken = 0.0
        self._fetching: asyncio.Future[dict[str, Any]] | None = None
        listener = _listen(host, port, address)
        self.port = listener.getsockname()[1]
        self._server = LocalServer(
            listener, "eembridge-metrics", self._serve, max_connections=max_connections,
            request_timeout=request_timeout, write_timeout=write_timeout, max_threads=1,
            limit=MAX_LINE, counters=("scrapes", "snapshots"))

    def counters(self) -> dict[str, int]:
        return self._server.counters()

    def close(self) -> None:
        self._server.close()

    async def _snapshot_for_scrape(self, server: LocalServer) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._snapshot is not None and loop.time() - self._taken < SNAPSHOT_MAX_AGE:
            return self._snapshot
        if self._fetching is None:  # else: share the one being taken
            server.count("snapshots")
            fetching = self._fetching = server.in_thread(self._stats)

            def taken(done: asyncio.Future[dict[str, Any]]) -> None:
                self._fetching = None
                if not done.cancelled() and done.exception() is None:
                    self._snapshot, self._taken = done.result(), loop.time()

            fetching.add_done_callback(taken)
        return await asyncio.shield(self._fetching)

    async def _serve(self, server: LocalServer, conn: Connection) -> None:
        try:
            line = await server.read_until(conn, b"\n")
        except TooLong:
            return await _refuse(server, conn, "414 URI Too Long", f"request line over {MAX_LINE} bytes")
        if not line.endswith(b"\n"):
            return  # gone before a whole request line: nobody to answer
        parts = line.decode("latin-1").split()
        if len(parts) == 2 or (len(parts) == 3 and not _VERSION.fullmatch(parts[2])):
            return await _refuse(server, conn, "400 Bad Request",
                                 "expected METHOD /PATH HTTP/1.1 (HTTP/0.9 is not served)")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith("/"):
            return await _refuse(server, conn, "400 Bad Request", "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return await _refuse(server, conn, "505 HTTP Version Not Supported", f"{version}")
        headers: dict[str, str] = {}
        size, count = 0, 0
        while True:
            try:
                header = await server.read_until(conn, b"\n")
            except TooLong:
                header = b"x" * (MAX_HEAD + 1)
            if not header.endswith(b"\n"):
                return
            size, count = size + len(header), count + 1
            if size > MAX_HEAD or count > MAX_HEADERS:
                return await _refuse(server, conn, "431 Request Header Fields Too Large",
                                     f"request head over {MAX_HEAD} bytes or {MAX_HEADERS} lines")
            if not header.strip():
                break
            name, colon, value = header.decode("latin-1").partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                return await _refuse(server, conn, "400 Bad Request", "malformed header line")
            headers[name.lower()] = value.strip()
        conn.serving = True
        path, _, query = target.partition("?")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path), "QUERY_STRING": query}
        for name in ("accept", "accept-encoding"):
            if name in headers:
                environ["HTTP_" + name.upper().replace("-", "_")] = headers[name]
        registry = CollectorRegistry(auto_describe=False)
        if method == "GET" and environ["PATH_INFO"] != "/favicon.ico":
            try:
                snapshot = await self._snapshot_for_scrape(server)
            except Exception as exc:  # the bridge could not say: the scraper sees it
                return await _refuse(server, conn, "500 Internal Server Error",
                                     f"no snapshot: {exc}", bad=False)
            registry.register(SnapshotCollector(snapshot))
            server.count("scrapes")
        answer: list[Any] = []

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> None:
            answer[:] = [status, response_headers]

        body = b"".join(make_wsgi_app(registry)(environ, start_response))
        await server.send(conn, _response(answer[0], answer[1], body))
        await server.linger(conn)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/[0-9]+(\.[0-9]+)?")


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


async def _refuse(server: LocalServer, conn: Connection, status: str, message: str,
                  bad: bool = True) -> None:
    if bad:
        server.count("bad_requests")
    body = f"{status}: {message}\n".encode()
    await server.send(conn, _response(status, [("Content-Type", "text/plain; charset=utf-8")], body))
    await server.linger(conn)


def _listen(host: str, port: int, address: str) -> socket.socket:
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    except OSError as exc:
        raise UserError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise UserError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
    return sock
