"""Device selection over discovery records, the libusb extension's argument checks,
and the CLI of `list` and the main job on a host with no EEM device."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from eembridge.core.errors import UserError
from eembridge.core.transport import DeviceInfo, Direction
from eembridge.usb import discovery
from eembridge.usb.discovery import EemInterface, holder
from eembridge.usb.selector import Selector, identity, select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(bus=1, address=3, port="1-1", vid=0x1D6B, pid=0x0104, serial="A", interface=0,
           held_by="kernel:cdc_eem", name=None) -> EemInterface:
    return EemInterface(bus=bus, address=address, port=port, vid=vid, pid=pid, serial=serial,
                        speed="high", configuration=1, interface=interface, alt_setting=0,
                        ep_in=0x81, ep_out=0x02, max_packet=512, driver="cdc_eem",
                        held_by=held_by, name=name)


def test_only_linux_f_eem_is_known_to_take_batches():
    # f_eem names its interface so in every kernel; anything else (Zephyr leaves
    # iInterface 0, other firmware names it as it likes) gets one frame per transfer.
    f_eem = record(name="CDC Ethernet Emulation Model (EEM)")
    assert f_eem.takes_batches and f_eem.as_json()["takes_batches"] is True
    for name in (None, "", "EEM", "CDC Ethernet Emulation Model"):
        assert not record(name=name).takes_batches


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"device": None, "serial": None, "port": None, **kw})


TWO = [record(), record(address=7, port="1-2.3", serial="B", interface=2)]


@pytest.mark.parametrize(("kw", "serial"), [
    ({"serial": "B"}, "B"),
    ({"port": "1-1"}, "A"),
    ({"device": "1:7"}, "B"),
    ({"device": "1d6b:0104", "serial": "A"}, "A"),
])
def test_selects_exactly_one(kw, serial):
    assert select(TWO, Selector.from_args(args(**kw))).serial == serial


def test_several_matches_lists_them():
    with pytest.raises(UserError) as error:
        select(TWO, Selector.from_args(args(device="1d6b:0104")))
    assert "2 EEM devices match" in str(error.value)
    assert "serial A" in str(error.value) and "serial B" in str(error.value)


def test_two_eem_functions_on_one_device_are_told_apart_by_interface():
    both = [record(interface=0), record(interface=2)]  # one device: same bus, address, serial
    with pytest.raises(UserError) as error:
        select(both, Selector.from_args(args(serial="A")))
    assert "2 EEM interfaces match serial A" in str(error.value) and "--interface N" in str(error.value)
    chosen = select(both, Selector.from_args(args(serial="A", interface=2)))
    assert chosen.interface == 2
    assert identity(chosen).matches(record(interface=2, address=9, port="2-4"))  # replugged
    assert not identity(chosen).matches(record(interface=0))
    with pytest.raises(UserError, match="--interface 300"):
        Selector.from_args(args(interface=300))


def test_no_match_names_what_is_there():
    with pytest.raises(UserError) as error:
        select(TWO, Selector.from_args(args(serial="nope")))
    assert "serial nope" in str(error.value) and "port 1-2.3" in str(error.value)


@pytest.mark.parametrize("bad", ["1d6b", "zz:0104", "1d6b:01", "a:b"])
def test_bad_device_argument(bad):
    with pytest.raises(UserError, match="--device"):
        Selector.from_args(args(device=bad))


def test_identity_follows_serial_then_port():
    moved = record(address=9, port="2-4")
    assert identity(record()).matches(moved)  # same serial, other port and address
    no_serial = record(serial=None)
    assert identity(no_serial).matches(record(serial=None, address=12))  # same port
    assert not identity(no_serial).matches(record(serial=None, port="1-2"))


def test_holder_and_claim_file(tmp_path):
    assert holder("cdc_eem", None) == "kernel:cdc_eem"
    assert holder(None, None) == "nobody"
    path = discovery.claim_path("1-1", 2, str(tmp_path))
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "tap": "eem0"}, f)
    claim = discovery.read_claim("1-1", 2, str(tmp_path))
    assert holder("usbfs", claim) == f"eembridge:eem0 (pid {os.getpid()})"
    with open(path, "w") as f:
        json.dump({"pid": 2**22 + 1, "tap": "eem0"}, f)  # above pid_max: a dead bridge
    assert discovery.read_claim("1-1", 2, str(tmp_path)) is None


def test_extension_rejects_bad_arguments():
    from eembridge._fast.usb import UsbError, UsbTransport

    info = DeviceInfo(max_packet=512, speed="high", description="test")
    with pytest.raises(ValueError, match="bad endpoints"):
        UsbTransport(-1, 0, 0x01, 0x02, info)
    with pytest.raises(ValueError, match="interface"):
        UsbTransport(-1, 300, 0x81, 0x02, info)
    with pytest.raises(TypeError):
        UsbTransport(-1, 0, 0x81, 0x02, "not info")
    with pytest.raises(ValueError, match="busy_polls"):
        UsbTransport(-1, 0, 0x81, 0x02, info, busy_polls=-1)
    with open(os.devnull, "rb") as f:  # not a usbfs node: libusb refuses it
        with pytest.raises(UsbError, match="libusb_wrap_sys_device"):
            UsbTransport(f.fileno(), 0, 0x81, 0x02, info)
    assert Direction.IN  # the module's Direction is the bridge's


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _no_usb_devices() -> None:
    found = discovery.find_eem_interfaces()
    assert not found, f"these CLI tests expect a host without EEM devices, found {found}"


def test_list_without_devices():
    _no_usb_devices()
    result = cli("list")
    assert (result.returncode, result.stdout.strip()) == (1, "no EEM devices found")
    result = cli("list", "--json")
    assert result.returncode == 1 and json.loads(result.stdout) == {"devices": []}


def test_main_job_without_devices_is_one_line():
    _no_usb_devices()
    result = cli("--tap", "eemtest0", "--serial", "X")
    assert result.returncode == 2
    assert result.stderr.strip() == "eembridge: error: no EEM devices found (use --wait to wait for one)"
    result = cli("--tap", "eemtest0", "--device", "nonsense")
    assert result.returncode == 2 and "--device nonsense" in result.stderr
    assert "Traceback" not in result.stderr
