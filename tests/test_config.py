"""Configuration files: mistakes named by file, line and key; sections picked by device;
flags override the file, on a running bridge over the simulated device."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyroute2
import pytest

from eembridge.core.config import ConfigError, DeviceIdentity, config_files, identify, load
from eembridge.link.netns import free_linklocal_subnet, link_names, unique_name

from netfixtures import require_tun_and_root, wait_for_control_socket

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
[defaults]
keepalive = 5
mtu = 1400

[bench-a]
serial = "AAA1"
tap = "eem-a"
addresses = ["169.254.10.2/24"]
peer = "169.254.10.1"
peer-mac = "02:00:00:00:0A:01"
tx = "sentinel"

[bench-b]
port = "1-2.3"
tap = "eem-b"
mtu = 1500

[any-board]
device = "1D6B:0104"
tap = "eem-x"
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_sections_are_picked_by_serial_then_port_then_vidpid(tmp_path):
    config = load([write(tmp_path, "a.toml", GOOD)])
    values, section = config.values_for(DeviceIdentity(serial="AAA1", port="1-2.3", device="1d6b:0104"))
    assert section is not None and section.name == "bench-a"
    assert values == {"keepalive": 5.0, "mtu": 1400, "tap": "eem-a", "ip": ["169.254.10.2/24"],
                      "peer": "169.254.10.1", "peer_mac": "02:00:00:00:0a:01", "tx_crc": False}
    values, section = config.values_for(DeviceIdentity(serial="other", port="1-2.3"))
    assert section is not None and section.name == "bench-b" and values["mtu"] == 1500
    values, section = config.values_for(DeviceIdentity(device="1d6b:0104"))
    assert section is not None and section.name == "any-board"
    values, section = config.values_for(DeviceIdentity(serial="nobody"))
    assert section is None and values == {"keepalive": 5.0, "mtu": 1400}


def test_files_are_read_in_name_order(tmp_path):
    write(tmp_path, "20-late.toml", "[defaults]\nmtu = 1300\n")
    write(tmp_path, "10-early.toml", "[defaults]\nmtu = 1200\nkeepalive = 2\n")
    write(tmp_path, "notes.txt", "not a config")
    paths = config_files(None, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["10-early.toml", "20-late.toml"]
    values, _ = load(paths).values_for(DeviceIdentity())
    assert values == {"mtu": 1300, "keepalive": 2.0}
    assert config_files(["x.toml"], str(tmp_path)) == ["x.toml"]


def test_port_picks_a_section_by_serial_through_sysfs(tmp_path):
    sysfs = tmp_path / "devices"
    for entry, serial in (("1-2.3", "AAA1"), ("1-4", "BBB2"), ("1-2.3:1.0", None), ("usb1", None)):
        (sysfs / entry).mkdir(parents=True)
        if serial:
            (sysfs / entry / "serial").write_text(serial + "\n")
            (sysfs / entry / "idVendor").write_text("1d6b\n")
            (sysfs / entry / "idProduct").write_text("0104\n")
    assert identify(port="1-2.3", sysfs=str(sysfs)) == DeviceIdentity("AAA1", "1-2.3", "1d6b:0104")
    assert identify(serial="BBB2", sysfs=str(sysfs)) == DeviceIdentity("BBB2", "1-4", "1d6b:0104")
    # Two boards with the same VID:PID: nothing more is known than what was asked.
    assert identify(device="1d6b:0104", sysfs=str(sysfs)) == DeviceIdentity(device="1d6b:0104")
    assert identify(sysfs=str(sysfs)) == DeviceIdentity()


# Each mistake: (file text, line, key or section named, words of the problem).
MISTAKES = [
    ('[a]\nserial = "X"\nmtuu = 1500\n', 3, "mtuu", "unknown key (did you mean 'mtu'?)"),
    ('[a]\nserial = "X"\n\nmtu = "1500"\n', 4, "mtu", "expected an integer, got a string"),
    ('[a]\nserial = "X"\nmtu = 100\n', 3, "mtu", "out of range"),
    ('[a]\nserial = "X"\nmtu = true\n', 3, "mtu", "expected an integer, got a boolean"),
    ('[a]\nserial = "X"\ntx = "fast"\n', 3, "tx", "expected one of crc, sentinel"),
    ('[a]\nserial = "X"\naddresses = ["10.0.0.300/24"]\n', 3, "addresses", "10.0.0.300"),
    ('[a]\nserial = "X"\naddresses = ["10.0.0.1"]\n', 3, "addresses", "not ADDR/PREFIX"),
    ('[a]\nserial = "X"\npeer-mac = "02:00:00:00:00"\n', 3, "peer-mac", "not a MAC"),
    ('[a]\nserial = "X"\ntap = "a-name-far-too-long"\n', 3, "tap", "the limit is 15"),
    ('[a]\nserial = "X"\nkeepalive = 0\n', 3, "keepalive", "out of range (0.01..86400 seconds)"),
    ('[a]\nport = "usb1"\n', 2, "port", "not a USB port path"),
    ('[a]\ndevice = "1d6b"\n', 2, "device", "not VID:PID"),
    ('[a]\nserial = "X"\nport = "1-1"\n', 3, "port", "exactly one selector"),
    ('[a]\ntap = "x"\n', 1, "[a]", "has no selector"),
    ('[defaults]\nserial = "X"\n', 2, "serial", "selector cannot be in [defaults]"),
    ('mtu = 1500\n[a]\nserial = "X"\n', 1, "mtu", "outside any section"),
    ('[a]\nserial = "X"\n[b]\nserial = "X"\n', 4, "serial", "duplicate selector 'X'"),
    ('[a]\ndevice = "1d6b:0104"\n[b]\n"device" = "1D6B:0104"\n', 4, "device", "duplicate selector"),
    ('[a]\nserial = "X"\nmtu = \n', 3, "", "not valid TOML"),
    ('[a]\nserial = "X"\nmax-transfer = true\n', 3, "max-transfer",
     'expected a number of bytes or "frame", got a boolean'),
]


@pytest.mark.parametrize(("text", "line", "key", "problem"), MISTAKES)
def test_mistakes_are_named_by_file_line_and_key(tmp_path, text, line, key, problem):
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load([path])
    message = str(caught.value)
    if problem == "not valid TOML":  # tomllib's own message carries the position
        assert message.startswith(f"{path}: not valid TOML") and f"line {line}" in message
        return
    assert message.startswith(f"{path}:{line}: "), message
    assert key in message and problem in message, message


def test_duplicate_selector_across_files_names_both(tmp_path):
    first = write(tmp_path, "10-a.toml", '[a]\nserial = "X"\n')
    second = write(tmp_path, "20-b.toml", '# the other rig\n[b]\nserial = "X"\n')
    with pytest.raises(ConfigError, match=rf"^{second}:3: \[b\] serial: duplicate selector 'X', "
                                          rf"already used by {first}:1 \[a\]"):
        load([first, second])


def eembridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_a_config_mistake_is_one_line_from_the_command_line(tmp_path):
    path = write(tmp_path, "bad.toml", '[a]\nserial = "X"\nmtu = "big"\n')
    result = eembridge("--sim", "--config", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"eembridge: error: {path}:3: [a] mtu: expected an integer, got a string")


def test_config_and_flag_overrides_on_a_running_bridge(tmp_path):
    """--sim --config F --instance serial:S: TAP name, address and neighbour come from the section,
    the MTU from [defaults] is overridden by --mtu; checked on the live TAP."""
    require_tun_and_root()
    subnet = free_linklocal_subnet()
    tap = unique_name("eemcfg")
    sock = str(tmp_path / "bridge.sock")
    path = write(tmp_path, "rig.toml", f"""\
        [defaults]
        mtu = 1300
        keepalive = 1

        [sim-board]
        serial = "SIM-A"
        tap = "{tap}"
        addresses = ["{subnet[2]}/24"]
        peer = "{subnet[1]}"
        peer-mac = "02:00:00:00:0c:01"

        [other-board]
        serial = "SIM-B"
        tap = "wrong0"
        """)
    proc = subprocess.Popen(
        # As the unit passes it: the instance, escaped as `systemd-escape serial:SIM-A` does.
        [sys.executable, "-m", "eembridge", "--sim", "--config", path, "--instance", r"serial:SIM\x2dA",
         "--mtu", "1400", "--sim-ip", f"{subnet[1]}/24", "--stats-socket", sock,
         "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_control_socket(proc, sock)
        with pyroute2.IPRoute() as ip:
            index = ip.link_lookup(ifname=tap)
            assert index, f"TAP {tap} from the config section does not exist"
            link = ip.get_links(index[0])[0]
            assert link.get_attr("IFLA_MTU") == 1400  # --mtu beats [defaults] mtu = 1300
            addresses = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ip.get_addr(index=index[0])
                         if a["family"] == 2]
            assert addresses == [(str(subnet[2]), 24)]
            neighbours = {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR")
                          for n in ip.get_neighbours(ifindex=index[0])}
            assert neighbours.get(str(subnet[1])) == "02:00:00:00:0c:01"
        assert "wrong0" not in link_names(None)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines()]
    assert any(e["msg"].startswith(f"config {path}:5 [sim-board] for serial SIM-A") for e in events)
    started = next(e for e in events if e.get("event") == "started")
    assert started["tap"] == tap and started["mtu"] == 1400
    assert tap not in link_names(None)


def test_the_readme_example_is_a_valid_config(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load([write(tmp_path, "readme.toml", example)])
    values, section = config.values_for(DeviceIdentity(serial="E66138528361BD2F"))
    assert section is not None and values["tap"] == "otdr1" and values["keepalive"] == 5.0
    values, section = config.values_for(DeviceIdentity(port="1-2.3"))
    assert section is not None and values["tap"] == "slot3" and values["tx_crc"] is True


def test_every_config_key_sets_a_real_option_of_the_main_job():
    """A key whose dest the command line does not have would be silently ignored."""
    from eembridge.cli.main import main_parser
    from eembridge.core.config import KEYS

    dests = {action.dest for action in main_parser()._actions}
    assert {key: k.dest for key, k in KEYS.items() if k.dest not in dests} == {}
    # ... and every long option that tunes a bridge has its key (selection and
    # service options are sections and instance names, not keys).
    not_keys = {"help", "version", "sim", "device", "serial", "port", "wait", "config",
                "instance", "verbose", "log_format", "metrics", "pcap", "pcap_rotate",
                "usb_pcap", "tx_sentinel"}
    missing = {a.dest for a in main_parser()._actions
               if a.option_strings and a.option_strings[0].startswith("--")
               and not a.dest.startswith("sim") and a.dest not in not_keys
               and a.dest not in {k.dest for k in KEYS.values()}}
    assert missing == set()
