"""Smoke test of the real-peer guest: the kernel's f_eem gadget and cdc_eem host.

One guest boot (module fixture) sets the gadget up at high speed and runs every
check as plain shell (Python start-up costs seconds under TCG); each test then reads
its result file from the rwdir. A machine without QEMU, vng or the Debian kernel
FAILS here, naming what is missing: run tests/interop/setup_guest.sh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guest import GuestError, GuestResult, missing_facilities, run_in_guest

pytestmark = pytest.mark.interop

# Runs inside the guest; every step after gadget setup records its exit code, so one
# failing check does not hide the others.
SCRIPT = r"""
bash $INTEROP/gadget.sh up high > $RW/env.txt
. $RW/env.txt
for i in $USB_PATH/*:*; do
    echo "$(basename $i) $(cat $i/bInterfaceClass)/$(cat $i/bInterfaceSubClass)/$(cat $i/bInterfaceProtocol)" \
         "$(basename "$(readlink -f $i/driver)")" >> $RW/interfaces.txt
done
basename "$(readlink -f /sys/class/net/$HOST_IF/device/driver)" > $RW/host_if_driver.txt
set +e
ping -c 3 -i 0.2 -W 2 $PEER_IP > $RW/ping.txt 2>&1; echo $? > $RW/ping.rc

# 1 MB of TCP each way with netcat (-d: ignore stdin, exit at the peer's EOF;
# -N: half-close after sending), each end hashing what it saw.
xfer() {  # xfer NAME PORT: $1.sent / $1.recv hold the two sha256 digests
    local name=$1 port=$2
    head -c 1048576 /dev/urandom > /tmp/$name.bin
    sha256sum < /tmp/$name.bin | cut -d' ' -f1 > $RW/$name.sent
    if [ $name = h2p ]; then
        ip netns exec $PEER_NS sh -c "nc -d -l $port | sha256sum | cut -d' ' -f1 > $RW/$name.recv" &
        srv=$!
        until ip netns exec $PEER_NS ss -Hltn "sport = :$port" | grep -q .; do sleep 0.05; done
        timeout 60 nc -N $PEER_IP $port < /tmp/$name.bin
    else
        ip netns exec $PEER_NS sh -c "nc -N -l $port < /tmp/$name.bin" &
        srv=$!
        until ip netns exec $PEER_NS ss -Hltn "sport = :$port" | grep -q .; do sleep 0.05; done
        timeout 60 nc -d $PEER_IP $port | sha256sum | cut -d' ' -f1 > $RW/$name.recv
    fi
    wait $srv
}
xfer h2p 5001
xfer p2h 5002
true
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    missing = missing_facilities()
    if missing:
        pytest.fail("real-peer guest cannot boot, missing: " + ", ".join(missing)
                    + " (run tests/interop/setup_guest.sh as root)", pytrace=False)
    rwdir = tmp_path_factory.mktemp("guest")
    try:
        return run_in_guest(SCRIPT, rwdir, timeout=240).check()
    except GuestError as exc:
        pytest.fail(str(exc), pytrace=False)


def read(guest: GuestResult, name: str) -> str:
    path: Path = guest.rwdir / name
    assert path.exists(), f"guest wrote no {name}; console tail:\n{guest.output[-3000:]}"
    return path.read_text().strip()


def test_gadget_enumerates_with_an_eem_interface(guest: GuestResult) -> None:
    env = dict(line.split("=", 1) for line in read(guest, "env.txt").splitlines())
    assert env["USB_SPEED"] == "480"
    triples = [line.split()[1] for line in read(guest, "interfaces.txt").splitlines()]
    assert "02/0c/07" in triples, f"no CDC-EEM interface among {triples}"


def test_cdc_eem_binds_and_makes_the_host_netdev(guest: GuestResult) -> None:
    drivers = {line.split()[1]: line.split()[2] for line in read(guest, "interfaces.txt").splitlines()}
    assert drivers.get("02/0c/07") == "cdc_eem"
    assert read(guest, "host_if_driver.txt") == "cdc_eem"


def test_ping_crosses_the_link(guest: GuestResult) -> None:
    assert read(guest, "ping.rc") == "0", read(guest, "ping.txt")
    assert " 0% packet loss" in read(guest, "ping.txt")


@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_1mb_tcp_transfer_matches_its_sha256(guest: GuestResult, direction: str) -> None:
    sent = read(guest, f"{direction}.sent")
    assert len(sent) == 64
    assert read(guest, f"{direction}.recv") == sent
