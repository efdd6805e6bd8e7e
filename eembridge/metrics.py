"""Prometheus metrics of a running bridge, served over HTTP (`--metrics HOST:PORT`).

A custom Collector turns one `bridge.stats()` snapshot into metric families at scrape
time, so nothing is counted twice and the data path is never touched: the counters
already exist, the scrape only reads them. Counters are `eembridge_*_total`, state is
gauges; every sample is labelled with the device serial and the TAP name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import UserError

PREFIX = "eembridge"
LABELS = ["serial", "tap"]

# Snapshot sections of plain counters: section -> (metric name part, help).
COUNTER_SECTIONS = {
    "bridge": ("bridge", "bridge event counter"),
    "rx": ("eem_rx", "EEM deframer counter (device to host)"),
    "tx": ("eem_tx", "EEM framer counter (host to device)"),
    "link": ("link", "kernel counter of the TAP interface"),
    "event_loop": ("event_loop", "counter of the thread moving frames in C (real USB)"),
}
# Gauges: snapshot key -> help.
GAUGES = {
    "in_transfers_in_flight": "bulk IN transfers submitted and not yet completed",
    "out_transfers_queued": "bulk OUT transfers submitted and not yet completed",
    "tx_bytes_in_flight": "bytes in bulk OUT transfers not yet completed",
}


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


class BridgeCollector(Collector):
    """Reads the bridge's snapshot when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_families(self._stats())


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT -> (host, port); UserError naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise UserError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9850")
    try:
        port = int(port_text, 10)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise UserError(f"--metrics {text!r}: port {port_text!r} is not 1..65535") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise UserError(f"--metrics {text!r}: {host!r} is not an IP address") from None
    return host, port


class MetricsServer:
    """The HTTP endpoint; close() stops it."""

    def __init__(self, address: str, stats: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BridgeCollector(stats))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UserError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
