"""A real NetworkManager leaves the bridge's TAP alone, and forgets it after (one boot).

tests/interop/networkmanager.sh runs NM inside the guest (it never runs on the host)
and leaves result files; each test reads its own. A machine that cannot boot the guest,
or has no NetworkManager installed for it (tests/interop/setup_guest.sh), FAILS naming
what is missing.
"""

from __future__ import annotations

import shutil

import pytest
from bootresults import BootResults, boot_or_fail
from guest import SETUP_HINT

pytestmark = pytest.mark.interop

SCRIPT = "bash $INTEROP/networkmanager.sh"
TAP = "nmb0"


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> BootResults:
    missing = [tool for tool in ("NetworkManager", "nmcli", "dbus-daemon") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"NetworkManager check: missing {', '.join(missing)} "
                    f"(network-manager, dbus; {SETUP_HINT})", pytrace=False)
    rwdir = tmp_path_factory.mktemp("eembridge-nm")
    result = boot_or_fail(SCRIPT, rwdir, timeout=400, label="guest boot")
    results = BootResults(result, logs=("bridge.log", "nm.log"))
    results.rc("dbus")
    results.rc("nm_up")
    return results


def test_control_an_external_tap_with_an_address_is_networkmanagers(boot: BootResults) -> None:
    """Without it the checks below could pass against an NM that ignores every TAP."""
    boot.rc("control")
    assert boot.read("control.txt").strip() == "connected (externally)"


def test_the_bridges_tap_stays_unmanaged_with_its_address(boot: BootResults) -> None:
    boot.rc("bridge_up")
    assert boot.read("bridge_state.txt").strip() == "unmanaged", boot.read("nm.log")[-3000:]
    assert " inet 169.254.8.1/24 " in boot.read("bridge_addr.txt")
    assert f"eembridge-{TAP}.conf" in boot.read("conf_during.txt").split()
    assert boot.read("keyfile.txt") == f"[keyfile]\nunmanaged-devices=interface-name:{TAP}"


def test_networkmanager_restarted_under_the_bridge_leaves_its_tap_alone(boot: BootResults) -> None:
    boot.rc("restarted")
    assert boot.read("restarted.txt") == "unmanaged", boot.read("nm.log")[-3000:]


def test_after_the_bridge_the_name_is_networkmanagers_again(boot: BootResults) -> None:
    """usb0, the default name, is also the kernel's usbnet drivers' name."""
    boot.rc("bridge_exit")
    assert f"eembridge-{TAP}.conf" not in boot.read("conf_after.txt").split()
    boot.rc("after")
    assert boot.read("after.txt").strip() == "connected (externally)"
