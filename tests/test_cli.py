"""The command line as a user runs it: demo, the main job on --sim, stats, echo, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from eembridge.link.netns import link_names, unique_name

from netfixtures import require_tun_and_root, start_sim_bridge, wait_for_control_socket

ROOT = Path(__file__).resolve().parent.parent


def eembridge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_demo_streams_a_verified_trace_over_a_lossy_link():
    require_tun_and_root()
    result = eembridge("demo", "--size", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["bytes_received"] == 3_000_000
    assert summary["usb_faults"]["in_packets_lost"] > 0  # 1% of 64-byte packets by default
    assert summary["eem_rx"]["frames"] > 0
    # Echoes cross the same lossy link: some may be lost, and are reported as such.
    assert len(summary["echo_rtt_ms"]) + summary["echo_lost"] == 5 and summary["echo_rtt_ms"]


def test_main_job_on_sim_with_stats_echo_and_clean_stop(tmp_path):
    bridge = start_sim_bridge(tmp_path, "eemcli", "--sim-loss", "0.01")
    tap, sock = bridge.tap, bridge.sock
    try:
        assert bridge.wait_connected()["tap"] == tap
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        assert tap in link_names(None)
        echo = eembridge("echo", "--socket", sock, "-c", "3", "--json")
        assert echo.returncode == 0, echo.stderr
        result = json.loads(echo.stdout)
        # 1% of USB packets are lost, so an echo may be too; it is then reported as lost.
        assert result["sent"] == 3 and result["received"] >= 1
        assert result["loss"] == (3 - result["received"]) / 3
        table = bridge.eembridge("stats")
        assert table.returncode == 0 and "frames" in table.stdout
    finally:
        code, err = bridge.stop()
    assert code == 0, err
    assert tap not in link_names(None)  # not persistent: removed on exit
    assert not os.path.exists(sock)


def test_tap_deleted_under_the_bridge_stops_it_with_one_line(tmp_path):
    """Before, the loop kept polling a TAP whose interface was gone: 60% of a CPU, forever."""
    require_tun_and_root()
    from eembridge.link.netns import iproute, link_index

    tap = unique_name("eemdel")
    sock = str(tmp_path / "bridge.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eembridge", "--sim", "--tap", tap, "--stats-socket", sock],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_control_socket(proc, sock)
        with iproute() as ipr:
            ipr.link("del", index=link_index(ipr, tap))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == (
        f"eembridge: error: TAP {tap} is gone (deleted while the bridge ran?): stopping")
    assert "Traceback" not in err


def test_sigterm_during_start_up_still_stops_cleanly(tmp_path):
    """SIGTERM sent as soon as the simulated device is up (before the TAP and the
    control socket exist): the bridge finishes starting, then stops as on any SIGTERM,
    exit 0, its namespace and TAP gone. Before, the default action killed it there."""
    require_tun_and_root()
    from eembridge.link.netns import netns_exists

    tap = unique_name("eemsu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eembridge", "--sim", "--tap", tap,
         "--stats-socket", str(tmp_path / "bridge.sock")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        while not any("simulated device up" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"bridge ended before its simulated device was up: {lines}"
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.read().splitlines(keepends=True)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    namespace = next(line for line in lines if "simulated device up" in line).split()[-1]
    assert proc.returncode == 0, "".join(lines)
    assert any("stopping" in line for line in lines), "".join(lines)
    assert not netns_exists(namespace), namespace
    assert tap not in link_names()


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = eembridge("--sim", "--mtu", "100")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--mtu 100" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = eembridge("stats", "--socket", str(tmp_path / "none.sock"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no bridge control socket" in missing.stderr


def test_demo_on_the_pure_python_codec_and_data_path():
    """The fallback (EEMBRIDGE_PUREPYTHON=1) carries the same traffic end to end."""
    require_tun_and_root()
    result = subprocess.run(
        [sys.executable, "-m", "eembridge", "demo", "--size", "1", "--json", "--max-packet", "512"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "EEMBRIDGE_PUREPYTHON": "1"},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["codec"] == "python"
