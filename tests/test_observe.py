"""Observability of the main job on the simulated device, run as a user runs it:
--metrics scraped over HTTP, --pcap against tcpdump on the same TAP, --usb-pcap decoded
back into the same frames, and `eembridge stats --watch` rendering real snapshots."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from eembridge.capture.pcap import CaptureReader
from eembridge.link.netns import free_linklocal_subnet, unique_name

from netfixtures import ping, require_tun_and_root, tcp_transfer

ROOT = Path(__file__).resolve().parent.parent


def eembridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_frames(path: Path) -> list[bytes]:
    with open(path, "rb") as stream:
        return [packet.data for packet in CaptureReader(stream, str(path))]


def is_subsequence(short: list[bytes], long: list[bytes]) -> bool:
    rest = iter(long)
    return all(any(item == other for other in rest) for item in short)


def stats_json(sock: str) -> dict:
    result = eembridge("stats", "--socket", sock, "--json")
    assert result.returncode == 0, result.stderr
    return next(iter(json.loads(result.stdout).values()))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


class MainJob:
    """The main job on --sim as a subprocess; its stderr is drained by a thread."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        require_tun_and_root()
        subnet = free_linklocal_subnet()
        self.host_ip, self.sim_ip = str(subnet[2]), str(subnet[1])
        self.tap = unique_name("eemobs")
        self.sock = str(tmp_path / "bridge.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eembridge", "--sim", "--tap", self.tap, "--ip", f"{self.host_ip}/24",
             "--sim-ip", f"{self.sim_ip}/24", "--stats-socket", self.sock, *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.sock) and self.namespace):
            assert self.proc.poll() is None, "".join(self.log)
            assert time.monotonic() < deadline, "control socket never appeared"
            time.sleep(0.05)

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def namespace(self) -> str | None:
        for line in self.log:
            found = re.search(r"in namespace (\S+)", line)
            if found:
                return found.group(1)
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        self._drain.join(5)
        assert self.proc.returncode == 0, "".join(self.log)


def test_metrics_pcap_and_usb_pcap_of_one_run(tmp_path):
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed (apt-get install tcpdump)"
    port = free_port()
    eth, usb, ref = tmp_path / "eth.pcap", tmp_path / "usb.pcap", tmp_path / "tcpdump.pcap"
    job = MainJob(tmp_path, "--metrics", f"127.0.0.1:{port}", "--pcap", str(eth), "--usb-pcap", str(usb))
    host_mac = bytes.fromhex(Path(f"/sys/class/net/{job.tap}/address").read_text().strip().replace(":", ""))
    # An independent capture of the same TAP, started once the bridge is up.
    dump = subprocess.Popen([tcpdump, "-i", job.tap, "-w", str(ref), "-U", "-s", "0", "--immediate-mode"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        assert "listening on" in dump.stderr.readline()
        tcp_transfer(job.sim_ip, server_netns=job.namespace, upload_bytes=1 << 20,
                     download_bytes=256 << 10).assert_intact()
        assert len(ping(job.sim_ip, count=5)) == 5
        echo = eembridge("echo", "--socket", job.sock, "--count", "3", "--interval", "0.05", "--json")
        assert echo.returncode == 0, echo.stderr
        assert json.loads(echo.stdout)["received"] == 3
        time.sleep(0.3)  # let stray frames (IPv6 housekeeping) settle before comparing

        before = stats_json(job.sock)
        samples = scrape(port)
        after = stats_json(job.sock)
        labels = (("serial", "SIM0001"), ("tap", job.tap))

        def metric(name: str) -> float:
            return samples[name, labels]

        # Every counter of the snapshot is there, between two snapshots taken around the scrape.
        for section, part in (("bridge", "bridge"), ("rx", "eem_rx"), ("tx", "eem_tx"), ("link", "link")):
            for name, value in after[section].items():
                assert before[section][name] <= metric(f"eembridge_{part}_{name}_total") <= value, name
        assert metric("eembridge_connected") == 1.0
        assert metric("eembridge_in_transfers_in_flight") == after["in_transfers_in_flight"] == 32
        assert metric("eembridge_eem_rx_frames_total") > 100
        assert metric("eembridge_bridge_echo_matched_total") >= 3
        assert metric("eembridge_echo_rtt_last_seconds") == after["echo_rtt_last"] > 0
        # The capture thread may still be reading the last frames, and frames the capture
        # saw may still wait in the TAP's queue for the bridge: wait for both to settle
        # (seconds on a loaded machine).
        deadline = time.monotonic() + 30
        while True:
            settled = stats_json(job.sock)
            capture, link = settled["capture"]["pcap"], settled["link"]
            caught_up = (capture["frames_out"] == link["tx_packets"] + link["tx_dropped"]
                         and capture["frames_in"] == link["rx_packets"])
            if caught_up or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        after = settled
        assert capture["drops"] == 0 and capture["errors"] == 0
        assert capture["frames_in"] == after["link"]["rx_packets"]  # what the bridge wrote
        # What the host sent: the packet socket sees it before the TAP's queue, which
        # drops what the bridge did not read in time (backpressure) as tx_dropped.
        assert capture["frames_out"] == after["link"]["tx_packets"] + after["link"]["tx_dropped"]
        tap_dropped = after["link"]["tx_dropped"]
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
        job.stop()

    ours, theirs = read_frames(eth), read_frames(ref)
    assert len(theirs) > 200

    def split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        return ([f for f in frames if f[6:12] != host_mac], [f for f in frames if f[6:12] == host_mac])

    # tcpdump started later, and on a loaded machine its own socket may drop frames (ours
    # counted none, asserted above): what it saw is in ours, in the same order, in each
    # direction (across directions two packet sockets may interleave differently).
    for mine, its in zip(split(ours), split(theirs), strict=True):
        assert len(its) > 50, "tcpdump saw almost nothing in one direction"
        assert is_subsequence(its, mine), (len(mine), len(its))
    check = subprocess.run([tcpdump, "-r", str(eth), "-nn"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and len(check.stdout.splitlines()) == len(ours), check.stderr

    # The usbmon recording of the same run decodes into the same frames, each direction in order.
    decoded_path = tmp_path / "decoded.pcap"
    decoded = eembridge("decode", str(usb), "-o", str(decoded_path), "--json")
    assert decoded.returncode == 0, decoded.stderr
    summary = json.loads(decoded.stdout)
    assert summary["in"]["frames"] > 100 and summary["in"]["bytes_skipped"] == 0
    from_usb = read_frames(decoded_path)

    usb_in, usb_out = split(from_usb)
    tap_in, tap_out = split(ours)
    assert usb_in == tap_in
    # Frames the TAP's queue dropped never reached the bridge: the rest is in order.
    assert is_subsequence(usb_out, tap_out) and len(tap_out) - len(usb_out) == tap_dropped
    replay = eembridge("replay", str(usb), "--json")
    assert replay.returncode == 0, replay.stderr
    events = [json.loads(line) for line in replay.stdout.splitlines()]
    assert sum(e["event"] == "frame" and e["dir"] == "in" for e in events) == len(tap_in)
    assert events[-1]["echo_responses_matched"] == 3  # our `eembridge echo`, answered


def test_bad_metrics_address_and_rotate_are_one_line(tmp_path):
    for args, expected in (
        (["--metrics", "localhost"], "HOST:PORT"),
        (["--metrics", "127.0.0.1:99999"], "port"),
        (["--metrics", "nohost.example:9850"], "not an IP address"),
        (["--pcap-rotate", "abc", "--pcap", str(tmp_path / "x.pcap")], "SIZE_MB"),
        (["--pcap-rotate", "1:3"], "needs --pcap"),
    ):
        bad = eembridge("--sim", *args)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
        assert expected in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_stats_watch_rates_and_rendering_on_real_snapshots(tmp_path):
    from rich.console import Console

    from eembridge.cli.stats import bridge_row, watch_table

    job = MainJob(tmp_path, "--pcap", str(tmp_path / "eth.pcap"))
    try:
        first, t0 = stats_json(job.sock), time.monotonic()
        tcp_transfer(job.sim_ip, server_netns=job.namespace, upload_bytes=512 << 10,
                     download_bytes=512 << 10).assert_intact()
        echo = eembridge("echo", "--socket", job.sock, "-c", "2", "--interval", "0.05")
        assert echo.returncode == 0, echo.stderr
        second, t1 = stats_json(job.sock), time.monotonic()
        row = bridge_row(first, second, t1 - t0)
        assert row["tap"] == job.tap and row["connected"] and row["serial"] == "SIM0001"
        moved_in = second["rx"]["bytes"] - first["rx"]["bytes"]
        moved_out = second["bridge"]["tx_bytes"] - first["bridge"]["tx_bytes"]
        assert moved_in > 512 << 10 and moved_out > 512 << 10  # both ways, headers included
        assert row["in_bytes_per_s"] == moved_in / (t1 - t0)
        assert row["out_frames_per_s"] == (second["bridge"]["tx_frames"] - first["bridge"]["tx_frames"]) / (t1 - t0)
        assert row["in_transfers_in_flight"] == 32 and row["echo_rtt_ms"] > 0
        assert row["in_dropped"] == 0 and row["resyncs"] == 0 and row["capture_drops"] == 0
        assert bridge_row(None, second, 0.0)["in_bytes_per_s"] is None  # no rate from one snapshot
        console = Console(record=True, width=250)
        console.print(watch_table([row], gone=["/run/eembridge/old.sock"]))
        text = console.export_text()
        assert job.tap in text and "connected SIM0001" in text and " ms" in text
        assert "old.sock" in text and "not answering" in text

        # The command itself, as scripts use it: JSON lines, one per refresh, rates from the 2nd.
        lines = eembridge("stats", "--socket", job.sock, "--watch", "--json", "--interval", "0.2",
                          "--count", "2")
        assert lines.returncode == 0, lines.stderr
        refreshes = [json.loads(line) for line in lines.stdout.splitlines()]
        assert [len(r["bridges"]) for r in refreshes] == [1, 1]
        assert refreshes[0]["bridges"][0]["in_frames_per_s"] is None
        assert refreshes[1]["bridges"][0]["in_frames_per_s"] is not None
        live = subprocess.run([sys.executable, "-m", "eembridge", "stats", "--socket", job.sock, "--watch",
                               "--interval", "0.1", "--count", "2"], capture_output=True, text=True,
                              cwd=ROOT, timeout=60, env={**os.environ, "COLUMNS": "250"})
        assert live.returncode == 0 and job.tap in live.stdout, live.stderr
    finally:
        job.stop()
    # Once the bridge is gone its socket is too, and --watch shows an empty view, no error.
    empty = eembridge("stats", "--run-dir", str(tmp_path), "--watch", "--json", "--count", "1")
    assert empty.returncode == 0 and json.loads(empty.stdout)["bridges"] == []


def test_pcap_rotation_keeps_count_files_of_the_newest_frames(tmp_path):
    from eembridge.observe.tapcapture import RotatingPcap, parse_rotate

    max_bytes, files = parse_rotate("0.01:3")  # 10 kB, three files
    assert (max_bytes, files) == (10_000, 3)
    path = tmp_path / "cap.pcap"
    out = RotatingPcap(str(path), max_bytes, files)
    frames = [bytes([i % 256]) * 1000 + i.to_bytes(4, "big") for i in range(100)]
    for i, frame in enumerate(frames):
        out.write(frame, 1_700_000_000_000_000_000 + i * 1000)
    out.close()
    assert out.rotations > 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cap.pcap", "cap.pcap.1", "cap.pcap.2"]
    # Oldest first: .2, .1, then the current file; together the newest frames, in order.
    kept = [f for name in ("cap.pcap.2", "cap.pcap.1", "cap.pcap") for f in read_frames(tmp_path / name)]
    assert kept == frames[len(frames) - len(kept):] and len(kept) > 10
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed (apt-get install tcpdump)"
    for name in names:
        check = subprocess.run([tcpdump, "-r", str(tmp_path / name)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_event_loop_counters_become_metrics():
    """With real USB the snapshot has the event thread's counters (tests/interop checks
    they move); each is an eembridge_event_loop_*_total counter like the others."""
    from eembridge.observe.metrics import snapshot_families

    snapshot = {"tap": "usb9", "connected": True, "device": {"serial": "B1"},
                "event_loop": {"sleeps": 7, "empty_polls": 300, "usb_passes": 41, "tap_passes": 12}}
    samples = {(s.name, s.labels["serial"], s.labels["tap"]): s.value
               for family in snapshot_families(snapshot) for s in family.samples}
    for name, value in snapshot["event_loop"].items():
        assert samples[f"eembridge_event_loop_{name}_total", "B1", "usb9"] == value, name
