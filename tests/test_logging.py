"""Logs: journald priority prefixes, JSON lines that parse, events of a bridge's life, and
garbage summarised at most once per interval even under a flood of it."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eembridge.link.netns import free_linklocal_subnet, unique_name
from eembridge.observe.logs import (
    GARBAGE_COUNTERS,
    GarbageSummary,
    JournalFormatter,
    JsonFormatter,
    event,
    journal_connected,
    resolve_format,
)

from netfixtures import (
    _inet_checksum,
    require_tun_and_root,
    start_sim_bridge,
    wait_for,
    wait_for_control_socket,
)

ROOT = Path(__file__).resolve().parent.parent


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"eembridge.test.{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_journal_lines_carry_syslog_priorities_and_no_timestamp():
    logger, stream = capture(JournalFormatter())
    logger.error("bad")
    logger.warning("odd")
    logger.info("fine\nsecond line")
    logger.debug("detail")
    assert stream.getvalue().splitlines() == [
        f"<3>{logger.name}: bad", f"<4>{logger.name}: odd", f"<6>{logger.name}: fine",
        "<6>second line", f"<7>{logger.name}: detail"]


def test_auto_format_is_journal_only_when_journal_stream_names_stderr():
    with tempfile.TemporaryFile() as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_connected(env, stream.fileno())
        assert not journal_connected({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream.fileno())
        assert not journal_connected({"JOURNAL_STREAM": "junk"}, stream.fileno())
    assert resolve_format("auto", {}) == "text" and resolve_format("json", {}) == "json"


def test_json_lines_parse_and_carry_event_fields():
    logger, stream = capture(JsonFormatter())
    logger.info("claimed: %s", "dev", extra=event("claimed", tap="usb0", max_packet=512))
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "claimed" and first["tap"] == "usb0" and first["max_packet"] == 512
    assert first["msg"] == "claimed: dev" and first["level"] == "info" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_garbage_summary_is_one_line_per_interval():
    logger, stream = capture(JsonFormatter())
    summary = GarbageSummary(logger, interval=5.0)
    counters = dict.fromkeys((*GARBAGE_COUNTERS, "bytes_skipped", "resyncs"), 0)
    summary.update(0.0, counters)
    for tick in range(1, 121):  # 12 s, a check every 0.1 s, 3 garbage packets per check
        counters["sentinel_errors"] += 2
        counters["reserved_commands"] += 1
        counters["bytes_skipped"] += 100
        counters["resyncs"] += 3
        summary.update(tick / 10, counters)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == summary.lines == 2  # at 5 s and 10 s
    assert lines[0]["garbage_packets"] == 150 and lines[0]["bytes"] == 5000
    assert lines[0]["msg"].startswith("resync: 150 garbage packets, 5000 bytes in the last 5.0 s")
    assert lines[0]["sentinel_errors"] == 100 and lines[0]["reserved_commands"] == 50
    summary.update(20.0, counters)  # what came after 10 s is still told, once
    third = json.loads(stream.getvalue().splitlines()[-1])
    assert summary.lines == 3 and third["garbage_packets"] == 60
    summary.update(30.0, counters)  # quiet since 12 s: nothing to say, and nothing said
    summary.update(31.0, counters, final=True)
    assert summary.lines == 3


def test_garbage_summary_tells_garbage_counted_before_its_first_tick():
    logger, stream = capture(JsonFormatter())
    summary = GarbageSummary(logger, interval=1.0)
    counters = dict.fromkeys((*GARBAGE_COUNTERS, "bytes_skipped", "resyncs"), 0)
    counters["crc_errors"] = 1  # the deframer saw garbage before the bridge's timer first ran
    summary.update(0.5, counters)
    summary.update(1.6, counters)
    assert summary.lines == 1
    assert json.loads(stream.getvalue().splitlines()[0])["garbage_packets"] == 1


def flood_pings(destination: str, seconds: float, rate: int = 400) -> int:
    """Fire ICMP echo requests without waiting for replies; the replies are the traffic."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(rate // 20):
                payload = os.urandom(200)
                header = struct.pack("!BBHHH", 8, 0, 0, 0x4545, sent & 0xFFFF)
                checksum = _inet_checksum(header + payload)
                sock.sendto(struct.pack("!BBHHH", 8, 0, checksum, 0x4545, sent & 0xFFFF) + payload,
                            (destination, 0))
                sent += 1
            time.sleep(0.05)
    return sent


def test_bridge_events_and_rate_limited_garbage_under_a_flood(tmp_path):
    bridge = start_sim_bridge(tmp_path, "eemlog", "--sim-garbage", "0.5", "--log-format", "json",
                              "--garbage-log-interval", "1")
    proc, subnet, sock = bridge.proc, bridge.subnet, bridge.sock
    try:
        wait_for_control_socket(proc, sock)
        flooded_at = time.monotonic()
        flood_pings(str(subnet[1]), 4.0)
        time.sleep(2.5)  # the last window gets reported
        elapsed = time.monotonic() - flooded_at
        stats = subprocess.run([sys.executable, "-m", "eembridge", "stats", "--socket", sock, "--json"],
                               capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert stats.returncode == 0, stats.stderr
        rx = next(iter(json.loads(stats.stdout).values()))["rx"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    names = [e.get("event") for e in events]
    assert names.index("started") < names.index("claimed") < names.index("stopped")
    resyncs = [e for e in events if e.get("event") == "resync"]
    garbage = sum(rx[name] for name in GARBAGE_COUNTERS)
    assert garbage > 200, rx  # a flood: hundreds of garbage packets ...
    assert 2 <= len(resyncs) <= elapsed / 1.0 + 2, resyncs  # ... in one line per second
    assert all(e["level"] == "warning" and e["garbage_packets"] > 0 for e in resyncs)
    # Every garbage packet the deframer counted is in exactly one summary line.
    assert sum(e["garbage_packets"] for e in resyncs) == garbage
    starts = [e["ts"] for e in resyncs]
    assert starts == sorted(starts)


def test_unplug_replug_and_silence_are_one_line_each():
    """In process, on the simulated device: the bridge's life as events, nothing repeated."""
    require_tun_and_root()
    from eembridge.bridge import Bridge, BridgeOptions
    from eembridge.sim.link import SimLink

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    bridge_log = logging.getLogger("eembridge.bridge")
    bridge_log.addHandler(handler)
    old_level = bridge_log.level
    bridge_log.setLevel(logging.INFO)
    subnet = free_linklocal_subnet()
    try:
        with SimLink(f"{subnet[1]}/24") as sim:
            options = BridgeOptions(tap=unique_name("eemev"), addresses=[f"{subnet[2]}/24"],
                                    keepalive=0.2, stats_socket=None)
            def names() -> list[str]:
                # (Echo Responses that come back after their request timed out are logged
                # as unsolicited: not part of this sequence.)
                return [e["event"] for e in map(json.loads, stream.getvalue().splitlines())
                        if e.get("event", "unsolicited_echo_response") != "unsolicited_echo_response"]

            with Bridge(sim.connect, options) as bridge:
                assert bridge.connected.wait(10)
                time.sleep(0.5)
                sim.device.busy_out_for(1.5)  # echoes go unanswered for a while ...
                wait_for(lambda: "keepalive_lost" in names(), 10, "keepalive_lost")
                wait_for(lambda: "keepalive_back" in names(), 10, "keepalive_back")  # ... then not
                sim.device.unplug()
                wait_for(lambda: "unplugged" in names(), 10, "unplugged")
                sim.device.replug()
                wait_for(lambda: "reconnected" in names(), 10, "reconnected")
    finally:
        bridge_log.removeHandler(handler)
        bridge_log.setLevel(old_level)
    seen = names()
    assert seen[:2] == ["started", "claimed"] and seen[-3:] == ["unplugged", "reconnected", "stopped"]
    # One line per change: lost and back alternate (a loaded machine may flap once more).
    middle = seen[2:-3]
    assert middle[:2] == ["keepalive_lost", "keepalive_back"] and len(middle) % 2 == 0, seen
    assert all(a != b for a, b in zip(middle, middle[1:], strict=False)), seen


def test_under_systemd_lines_have_priority_prefixes_and_no_timestamps(tmp_path):
    """JOURNAL_STREAM naming our stderr (as systemd sets it) selects the journal format."""
    require_tun_and_root()
    subnet = free_linklocal_subnet()
    sock = str(tmp_path / "bridge.sock")
    with open(tmp_path / "stderr", "w+") as stderr:
        st = os.fstat(stderr.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "eembridge", "--sim", "--tap", unique_name("eemjr"),
             "--ip", f"{subnet[2]}/24", "--sim-ip", f"{subnet[1]}/24", "--stats-socket", sock],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                assert proc.poll() is None and time.monotonic() < deadline, "bridge did not start"
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert proc.returncode == 0, lines
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>eembridge.bridge: claimed: ") for line in lines), lines
    assert not any(line[3:7].isdigit() for line in lines)  # no "2026-..." timestamps
