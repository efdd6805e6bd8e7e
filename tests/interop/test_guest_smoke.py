"""Smoke test of the real-peer guest: the kernel's f_eem gadget and cdc_eem host.

One guest boot (module fixture) sets the gadget up at high speed and runs every
check as plain shell (Python start-up costs seconds under TCG); each test then reads
its result file from the rwdir. A machine without QEMU, vng or the Debian kernel
FAILS here, naming what is missing: run tests/interop/setup_guest.sh.
"""

from __future__ import annotations

import pytest
from bootresults import BootResults, boot_or_fail

pytestmark = pytest.mark.interop

# Runs inside the guest (helpers from lib.sh); every step after gadget setup records its
# exit code, so one failing check does not hide the others.
SCRIPT = r"""
. $INTEROP/lib.sh
gadget_up high
for i in $USB_PATH/*:*; do
    echo "$(basename $i) $(intf_class $i) $(driver_of $i)" >> $RW/interfaces.txt
done
basename "$(readlink -f /sys/class/net/$HOST_IF/device/driver)" > $RW/host_if_driver.txt
ping -c 3 -i 0.2 -W 2 $PEER_IP > $RW/ping.txt 2>&1; echo $? > $RW/ping.rc

# 1 MB of TCP each way with netcat (lib.sh's xfer), each end hashing what it saw:
# NAME.sent / NAME.recv hold the two sha256 digests.
xfer h2p h2p $PEER_NS $PEER_IP 5001 1
xfer p2h p2h $PEER_NS $PEER_IP 5002 1
true
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> BootResults:
    rwdir = tmp_path_factory.mktemp("guest")
    return BootResults(boot_or_fail(SCRIPT, rwdir, timeout=240, label="guest boot", check=True))


def test_gadget_enumerates_with_an_eem_interface(guest: BootResults) -> None:
    env = guest.env()
    assert env["USB_SPEED"] == "480"
    triples = [line.split()[1] for line in guest.read("interfaces.txt").splitlines()]
    assert "02/0c/07" in triples, f"no CDC-EEM interface among {triples}"


def test_cdc_eem_binds_and_makes_the_host_netdev(guest: BootResults) -> None:
    drivers = {line.split()[1]: line.split()[2] for line in guest.read("interfaces.txt").splitlines()}
    assert drivers.get("02/0c/07") == "cdc_eem"
    assert guest.read("host_if_driver.txt") == "cdc_eem"


def test_ping_crosses_the_link(guest: BootResults) -> None:
    guest.rc("ping")
    assert " 0% packet loss" in guest.read("ping.txt")


@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_1mb_tcp_transfer_matches_its_sha256(guest: BootResults, direction: str) -> None:
    sent = guest.read(f"{direction}.sent")
    assert len(sent) == 64
    assert guest.read(f"{direction}.recv") == sent
