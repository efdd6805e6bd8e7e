"""Privileges on the host: the capability drop after start-up, --wait-timeout, and the
records `eembridge release` works from. The real device side (an unprivileged user, a
udev rule, cdc_eem after SIGKILL) is checked in the guest: tests/interop/test_guest_privs.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from eembridge.link import privileges
from eembridge.link.netns import link_names, unique_name
from eembridge.usb import discovery
from eembridge.usb.selector import Selector

from netfixtures import ping, require_tun_and_root, start_sim_bridge, wait_for

ROOT = Path(__file__).resolve().parent.parent


def eembridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def status_of(path: str) -> dict[str, int]:
    return privileges.read_status(path)


def stats_of(sock: str) -> dict:
    result = eembridge("stats", "--socket", sock, "--json")
    assert result.returncode == 0, result.stderr
    return next(iter(json.loads(result.stdout).values()))


def test_sim_bridge_holds_no_capability_after_start_and_still_recovers_from_a_replug(tmp_path):
    require_tun_and_root()
    assert status_of("/proc/self/status")["CapEff"] >> privileges.CAP_NUMBERS["net_admin"] & 1, \
        "this test starts the bridge with CAP_NET_ADMIN and needs it itself"
    err = open(tmp_path / "stderr", "w+")
    bridge = start_sim_bridge(tmp_path, "eempv", stdout=subprocess.DEVNULL, stderr=err, text=False)
    proc, subnet, tap, sock = bridge.proc, bridge.subnet, bridge.tap, bridge.sock
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 30, "control socket")
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        # The main thread (what /proc/PID/status shows) and the bridge's own threads.
        main = status_of(f"/proc/{proc.pid}/status")
        assert (main["CapEff"], main["CapPrm"], main["CapInh"], main["CapAmb"]) == (0, 0, 0, 0), main
        assert main["CapBnd"] == 0 and main["NoNewPrivs"] == 1, main
        # Visible: one log line, and `stats`.
        log = (tmp_path / "stderr").read_text()
        lines = [ln for ln in log.splitlines() if "dropped capabilities:" in ln]
        assert len(lines) == 1 and "net_admin" in lines[0] and "kept: none" in lines[0], log
        # Every thread but those the line names (the simulated device's, started before
        # the bridge) holds nothing: main, bridge loop, control socket at least.
        earlier = set(re.findall(r"\((\d+)\)", lines[0].partition("keep theirs:")[2]))
        # The socket exists before the bridge thread starts: count threads once the
        # socket answers and the bridge has connected (under load that takes a while).
        wait_for(lambda: stats_of(sock)["connected"], 10, "connected")
        threads = {tid: status_of(f"/proc/{proc.pid}/task/{tid}/status")
                   for tid in os.listdir(f"/proc/{proc.pid}/task")}
        bridge_threads = {tid: s for tid, s in threads.items() if tid not in earlier}
        assert len(bridge_threads) >= 3, (threads, lines[0])
        assert all(s["CapEff"] == 0 and s["CapBnd"] == 0 for s in bridge_threads.values()), \
            bridge_threads
        snapshot = stats_of(sock)
        assert snapshot["capabilities"]["effective"] == [], snapshot["capabilities"]
        assert snapshot["capabilities"]["no_new_privs"] is True
        table = eembridge("stats", "--socket", sock)
        assert "capabilities held: none; no_new_privs" in table.stdout, table.stdout
        # Still a working bridge: traffic, then an unplug/replug (carrier off and on
        # again through TUNSETCARRIER, without CAP_NET_ADMIN), then traffic again.
        wait_for(lambda: stats_of(sock)["connected"], 10, "connected")
        assert len(ping(str(subnet[1]), count=2, timeout=3)) == 2
        connects = snapshot["bridge"]["connects"]
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: stats_of(sock)["bridge"]["unplugs"] >= 1, 10, "unplug seen")
        after = wait_for(lambda: (s := stats_of(sock))["connected"]
                         and s["bridge"]["connects"] > connects and s, 10, "reconnected")
        assert after["link"]["tx_packets"] >= 0
        assert Path(f"/sys/class/net/{tap}/carrier").read_text().strip() == "1"
        assert len(ping(str(subnet[1]), count=2, timeout=3)) == 2
        log = (tmp_path / "stderr").read_text()
        assert "could not set carrier" not in log, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        err.close()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    assert tap not in link_names(None)  # the TAP went with its fd, no capability needed


def test_drop_keeps_only_what_it_is_asked_to_and_threads_born_unprivileged_hold_nothing():
    """In a child (the drop is for good): keep net_raw, lose net_admin; a carrier change on
    the TAP's fd still works without CAP_NET_ADMIN, an address change does not."""
    require_tun_and_root()
    tap = unique_name("eempd")
    script = textwrap.dedent(f"""
        import json, threading
        from eembridge.link import privileges
        from eembridge.link.tap import Tap
        t = Tap({tap!r})
        t.up()
        seen = {{}}
        def born():
            seen["born"] = privileges.read_status()["CapEff"]
        privileges.run_without_capabilities(lambda: threading.Thread(target=born).start())
        report = privileges.drop(["net_raw"])
        out = {{"line": report.line(), "status": privileges.read_status("/proc/self/status")}}
        t.set_carrier(False); t.set_carrier(True)
        out["carrier"] = open(f"/sys/class/net/{tap}/carrier").read().strip()
        try:
            t.add_address("169.254.250.1/24")
            out["address"] = "added"
        except Exception as exc:
            out["address"] = str(exc)
        out["born"] = seen["born"]
        t.close()
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    net_raw = 1 << privileges.CAP_NUMBERS["net_raw"]
    assert out["status"]["CapEff"] == net_raw and out["status"]["CapPrm"] == net_raw
    assert out["status"]["CapBnd"] == net_raw and out["status"]["NoNewPrivs"] == 1
    assert "kept: net_raw" in out["line"] and "net_admin" in out["line"].split("kept")[0]
    assert out["carrier"] == "1"
    assert "Operation not permitted" in out["address"], out
    assert out["born"] == 0


def test_wait_timeout_expires_with_one_line_naming_the_device(tmp_path):
    require_tun_and_root()
    tap = unique_name("eemwt")
    start = time.monotonic()
    result = eembridge("--wait-timeout", "1.5", "--serial", "no-such-board", "--tap", tap,
                       "--stats-socket", str(tmp_path / "bridge.sock"))
    took = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["eembridge: error: --wait-timeout 1.5 s expired: no EEM device "
                      "matching serial no-such-board appeared"], result.stderr
    assert "Traceback" not in result.stderr
    assert 1.5 <= took < 15, took  # Python start-up plus the timeout, not a hang
    assert tap not in link_names(None)
    bad = eembridge("--wait-timeout", "0", "--tap", tap)
    assert bad.returncode == 2 and "--wait-timeout 0: must be more than 0" in bad.stderr


def test_stale_claim_records(tmp_path):
    """A record whose pid is gone is stale; list says what to run; release removes
    records of devices that are not there any more (none on this host)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = discovery.claim_path("9-9", 2, str(tmp_path))
    Path(path).write_text(json.dumps({"pid": dead.pid, "tap": "eem0", "interface": "9-9:1.2",
                                      "detached": "cdc_eem"}))
    assert discovery.read_claim("9-9", 2, str(tmp_path)) is None
    stale = discovery.stale_claim("9-9", 2, str(tmp_path))
    assert stale is not None and stale["detached"] == "cdc_eem"
    assert "eembridge release" in discovery.holder(None, None, stale)
    alive = discovery.claim_path("9-8", 1, str(tmp_path))
    Path(alive).write_text(json.dumps({"pid": os.getpid(), "tap": "eem1"}))
    assert discovery.stale_claim("9-8", 1, str(tmp_path)) is None
    from eembridge.usb.device import reattach_stale

    lines = reattach_stale(Selector(), str(tmp_path))
    assert lines == [f"9-9:1.2: device gone; removed the record of eembridge pid {dead.pid}"]
    assert not os.path.exists(path) and os.path.exists(alive)  # a live bridge's stays
