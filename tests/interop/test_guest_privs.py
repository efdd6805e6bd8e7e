"""Privileges and SIGKILL recovery with the real peer (the kernel's f_eem gadget), one boot.

tests/interop/privs_checks.sh runs every step in the guest as shell and leaves result
files; each test reads its own. The bridge runs as nobody:nogroup with CAP_NET_ADMIN
only (ambient, as setpriv or systemd's AmbientCapabilities= give it):
- without access to the device node: one error line naming the node and the fix;
- with a udev rule giving the node to its group: ping and TCP both ways by SHA-256,
  and after start-up it holds no capability at all (no_new_privs set);
- killed by SIGKILL: cdc_eem stays unbound (a kernel fact); `eembridge release`, as the
  same user, binds it again and the gadget's link works through cdc_eem.
A machine that cannot boot the guest FAILS naming what is missing.
"""

from __future__ import annotations

import json

import pytest
from bootresults import BootResults, boot_or_fail

pytestmark = pytest.mark.interop

SCRIPT = "bash $INTEROP/privs_checks.sh"
CAP_NET_ADMIN = 1 << 12


class Boot(BootResults):
    def status(self) -> dict[str, str]:
        return dict(line.split(":\t", 1) for line in self.read("bridge_status.txt").splitlines())


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    rwdir = tmp_path_factory.mktemp("eembridge-privs")
    return Boot(boot_or_fail(SCRIPT, rwdir, timeout=500, label="guest boot"))


def test_without_access_to_the_node_one_line_names_it_and_the_fix(boot: Boot) -> None:
    node = boot.read("node.txt")
    assert boot.read("node_before.txt").startswith("crw-rw-r--"), boot.read("node_before.txt")
    assert boot.read("denied.rc") == "2", boot.read("denied.log")
    log = boot.read("denied.log")
    errors = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, log
    assert errors[0].startswith(f"eembridge: error: {node}: permission denied"), errors
    assert "udev rule" in errors[0] and 'ATTR{idVendor}=="1d6b"' in errors[0], errors
    assert "Traceback" not in log


def test_udev_rule_gives_the_node_to_the_group(boot: Boot) -> None:
    assert boot.read("node_after.txt").splitlines()[-1] == "nogroup 660", boot.read("node_after.txt")


def test_unprivileged_bridge_carries_ping_and_tcp_both_ways(boot: Boot) -> None:
    boot.rc("bridge_up")
    boot.rc("ping")
    assert " 0% packet loss" in boot.read("ping.txt")
    for direction in ("h2p", "p2h"):
        boot.rc(direction)
        sent = boot.read(f"{direction}.sent")
        assert len(sent) == 64 and boot.read(f"{direction}.recv") == sent, direction


def test_unprivileged_bridge_holds_nothing_after_start_up(boot: Boot) -> None:
    boot.rc("bridge_up")
    status = boot.status()
    assert status["Uid"].split()[0] == "65534", status  # nobody
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, status
    # A user with only CAP_NET_ADMIN cannot shrink the bounding set (that needs
    # CAP_SETPCAP); no_new_privs makes it moot: no execve can gain anything.
    assert status["NoNewPrivs"].strip() == "1", status
    assert int(status["CapBnd"], 16) & CAP_NET_ADMIN, status  # unchanged, as said
    threads = [line.split() for line in boot.read("bridge_threads.txt").splitlines()]
    assert len(threads) >= 3 and all(int(eff, 16) == 0 for _tid, eff in threads), threads
    log = boot.read("bridge.log")
    lines = [ln for ln in log.splitlines() if "dropped capabilities:" in ln]
    assert len(lines) == 1, log[-2000:]
    assert "dropped capabilities: net_admin; kept: none; bounding set kept (no cap_setpcap)" \
        in lines[0], lines[0]


def test_sigkill_leaves_cdc_eem_unbound(boot: Boot) -> None:
    """The kernel fact that `release` exists for (tests/interop/NOTES.md)."""
    assert boot.read("driver_bridged.txt") == "usbfs"
    assert boot.read("killed.rc") == "137"
    assert boot.read("driver_killed.txt") == "none"
    claim = json.loads(boot.read("claim_killed.json"))
    assert claim["detached"] == "cdc_eem" and claim["tap"] == "eem0", claim


def test_release_binds_cdc_eem_again_and_its_link_works(boot: Boot) -> None:
    boot.rc("release")
    env = boot.env()
    out = boot.read("release.txt")
    assert out.startswith(f"{env['EEM_INTF']}: re-attached cdc_eem (left detached by eembridge pid"), out
    assert boot.read("driver_released.txt") == "cdc_eem"
    assert boot.read("claims_after.txt") == ""  # the record went with it
    boot.rc("cdc_eem_ping")
    assert " 0% packet loss" in boot.read("cdc_eem_ping.txt")
