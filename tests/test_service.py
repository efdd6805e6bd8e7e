"""The systemd unit and the udev rule, rendered as `eembridge install-service` writes them.

* The unit is checked by `systemd-analyze verify` (syntax, unknown keys, the ExecStart
  program exists) and `systemd-analyze security --offline` (the hardening score must
  not regress), and the bridge is run under the unit's capability bounding set.
* The rule is run by the real udev rule engine: `udevadm test` (systemd 252 has no
  `udevadm verify`) in a private mount namespace where a fake sysfs tree of a USB
  device with an EEM interface is bind-mounted over /sys (SYSTEMD_DEVICE_VERIFY_SYSFS=0
  lets udev read a tree that is not sysfs), the rules directories are replaced by ours
  and /run/udev by a tmpfs, so nothing of the host is read or written.
* Broken copies of both are rejected: the checks are shown to fail.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eembridge.cli.service import RULES_NAME, UNIT_NAME
from eembridge.core.errors import UserError
from eembridge.core.options import parse_instance

from netfixtures import require_tun_and_root

ROOT = Path(__file__).resolve().parent.parent
EXPOSURE_LIMIT = 5.0  # systemd-analyze security score the unit must stay under (lower: safer)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install systemd udev; see install.sh)")
    return path


def install(tmp_path: Path, *extra: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "eembridge", "install-service", "--root", str(tmp_path), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tmp_path


# --- the unit ---------------------------------------------------------------------------

def verify_unit(unit_dir: Path, instance: str = "1-2.3") -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of one instance; any diagnostic naming a file is a failure."""
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(unit_dir / f"eembridge@{instance}.service")],
        capture_output=True, text=True, timeout=60,
    )
    # systemd only warns about unknown keys and bad values ("..., ignoring"): count those.
    if result.returncode == 0 and result.stderr.strip():
        result.returncode = 1
    return result


def test_install_service_writes_unit_and_rule_with_this_python(tmp_path):
    root = install(tmp_path)
    unit = (root / "etc/systemd/system" / UNIT_NAME).read_text()
    rules = (root / "etc/udev/rules.d" / RULES_NAME).read_text()
    assert f"ExecStart={sys.executable} -m eembridge --instance %i --wait" in unit
    assert "@" + "EXEC_START@" not in unit and "@SYSTEMCTL@" not in rules
    assert "RuntimeDirectory=eembridge" in unit and "CapabilityBoundingSet=CAP_NET_ADMIN\n" in unit
    dry = subprocess.run([sys.executable, "-m", "eembridge", "install-service", "--root",
                          str(tmp_path / "dry"), "--dry-run"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert dry.returncode == 0 and "would write" in dry.stdout
    assert not (tmp_path / "dry").exists()


def test_unit_passes_systemd_analyze_verify_and_security(tmp_path):
    unit_dir = install(tmp_path) / "etc/systemd/system"
    result = verify_unit(unit_dir)
    assert result.returncode == 0, result.stderr
    security = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", f"--threshold={EXPOSURE_LIMIT * 10:.0f}",
         str(unit_dir / "eembridge@1-2.3.service")],
        capture_output=True, text=True, timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert security.returncode == 0 and score, security.stdout + security.stderr
    assert float(score.group(1)) < EXPOSURE_LIMIT


def test_unit_starts_after_networkmanager_and_may_write_its_runtime_conf(tmp_path):
    """A bridge started before NM finds no NM to tell, and NM then takes the TAP."""
    unit = (install(tmp_path) / "etc/systemd/system/eembridge@.service").read_text()
    after = [ln for ln in unit.splitlines() if ln.startswith("After=")]
    assert len(after) == 1 and "NetworkManager.service" in after[0].split(), after
    assert not any(ln.startswith(("Wants=", "Requires=")) and "NetworkManager" in ln
                   for ln in unit.splitlines())  # ordering only: NM is optional
    assert "ReadWritePaths=-/run/NetworkManager/conf.d" in unit.splitlines()


@pytest.mark.parametrize("breakage", [
    ("ExecStart=", "ExecStrat="),  # misspelt key: no ExecStart left
    ("Restart=on-failure", "Restart=sometimes"),  # bad value: systemd ignores it, we do not
    (f"ExecStart={sys.executable}", "ExecStart=/nonexistent/python3"),  # program missing
    ("[Service]", "[Servce]"),
])
def test_a_broken_unit_is_rejected(tmp_path, breakage):
    unit_dir = install(tmp_path) / "etc/systemd/system"
    path = unit_dir / UNIT_NAME
    old, new = breakage
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    assert verify_unit(unit_dir).returncode != 0


def test_weakened_hardening_fails_the_security_check(tmp_path):
    unit_dir = install(tmp_path) / "etc/systemd/system"
    path = unit_dir / UNIT_NAME
    text = path.read_text()
    for line in ("CapabilityBoundingSet=", "ProtectSystem=", "DevicePolicy=", "NoNewPrivileges=",
                 "RestrictAddressFamilies=", "ProtectHome=", "PrivateTmp=", "RestrictNamespaces="):
        text = re.sub(rf"^{line}.*\n", "", text, flags=re.M)
    path.write_text(text)
    security = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", str(unit_dir / "eembridge@x.service")],
        capture_output=True, text=True, timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert score and float(score.group(1)) >= EXPOSURE_LIMIT, security.stdout


def test_bridge_link_setup_works_with_only_the_units_capabilities(tmp_path):
    """Under CapabilityBoundingSet=CAP_NET_ADMIN + NoNewPrivileges (as the unit runs it),
    the bridge creates its TAP, sets MTU, address and neighbour, carrier, and its control
    socket, and stops cleanly; without CAP_NET_ADMIN it fails with a one-line error."""
    require_tun_and_root()
    from eembridge.link.netns import link_names, unique_name

    tap = unique_name("eemcap")
    sock = tmp_path / "run" / f"{tap}.sock"
    sock.parent.mkdir()  # as the unit's RuntimeDirectory= makes /run/eembridge
    script = f"""
import json, pyroute2
from eembridge.bridge import Bridge, BridgeOptions
from eembridge.core.transport import TransportGone
def absent():
    raise TransportGone("no device yet")
options = BridgeOptions(tap={tap!r}, mtu=1400, addresses=["169.254.250.2/24"],
                        peer="169.254.250.1", peer_mac="02:00:00:00:fa:01",
                        stats_socket={str(sock)!r})
with Bridge(absent, options) as bridge:
    with pyroute2.IPRoute() as ip:
        link = ip.link_lookup(ifname={tap!r})[0]
        mtu = ip.get_links(link)[0].get_attr("IFLA_MTU")
        addrs = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=link)]
        neigh = [n.get_attr("NDA_LLADDR") for n in ip.get_neighbours(ifindex=link)]
    print(json.dumps({{"mtu": mtu, "addrs": addrs, "neigh": neigh, "stats": bridge.stats()["tap"]}}))
"""
    setpriv = [tool("setpriv"), "--no-new-privs", "--inh-caps=-all"]
    ok = subprocess.run([*setpriv, "--bounding-set=-all,+net_admin", sys.executable, "-c", script],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ok.returncode == 0, ok.stderr
    import json

    seen = json.loads(ok.stdout.strip().splitlines()[-1])
    assert seen == {"mtu": 1400, "addrs": ["169.254.250.2"], "neigh": ["02:00:00:00:fa:01"],
                    "stats": tap}
    assert tap not in link_names(None)
    denied = subprocess.run([*setpriv, "--bounding-set=-all", sys.executable, "-c", script],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert denied.returncode != 0 and tap not in link_names(None)


def test_instance_names():
    assert parse_instance("1-2.3") == ("port", "1-2.3")
    assert parse_instance("port:3-1") == ("port", "3-1")
    assert parse_instance("serial:AB12") == ("serial", "AB12")
    # What `systemd-escape serial:AB-1 x` writes: '-' as \x2d, ' ' as \x20.
    escaped = subprocess.run([tool("systemd-escape"), "serial:AB-1 x"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert parse_instance(escaped) == ("serial", "AB-1 x")
    with pytest.raises(UserError, match="neither a USB port path"):
        parse_instance("usb0")


# --- the udev rule ----------------------------------------------------------------------

def fake_usb_device(sys_root: Path, port: str, interface: str, serial: str = "ABC123") -> str:
    """A USB device at `port` with interface 0 of class `interface` ("2/12/7"), as sysfs
    shows it; returns the interface's syspath (under /sys once mounted)."""
    bus = port.split("-")[0]
    device = Path("devices/pci0000:00/0000:00:14.0") / f"usb{bus}" / port.rsplit(".", 1)[0] / port
    if "." not in port:
        device = Path("devices/pci0000:00/0000:00:14.0") / f"usb{bus}" / port
    (sys_root / "bus/usb").mkdir(parents=True, exist_ok=True)
    intf = device / f"{port}:1.0"
    (sys_root / intf).mkdir(parents=True)
    for node in (device, intf):
        depth = len(node.parts)
        (sys_root / node / "subsystem").symlink_to("../" * depth + "bus/usb")
    cls, sub, proto = (int(x) for x in interface.split("/"))
    files = {
        device / "uevent": f"DEVTYPE=usb_device\nPRODUCT=1d6b/104/100\nTYPE=239/2/1\nBUSNUM=00{bus}\n",
        device / "idVendor": "1d6b\n", device / "idProduct": "0104\n", device / "serial": serial + "\n",
        intf / "uevent": f"DEVTYPE=usb_interface\nPRODUCT=1d6b/104/100\nINTERFACE={interface}\n",
        intf / "bInterfaceClass": f"{cls:02x}\n", intf / "bInterfaceSubClass": f"{sub:02x}\n",
        intf / "bInterfaceProtocol": f"{proto:02x}\n",
    }
    for path, text in files.items():
        (sys_root / path).write_text(text)
    return "/sys/" + str(intf)


def udev_events(tmp_path: Path, rules_dir: Path, events: list[tuple[str, str]]) -> list[dict]:
    """Run `udevadm test` for each (action, syspath) in one private mount namespace.

    Returns per event: the device properties udev ended with, the RUN commands, and the
    rule parse errors (lines that start with the rules file's path)."""
    tool("unshare"), tool("udevadm")
    if os.geteuid() != 0:
        pytest.fail("udev rule tests need root (mount namespace, bind mounts)")
    # A fresh /run (udev's database, and our rules as the only ones), other rule
    # directories hidden; all of it only in this mount namespace.
    lines = ["set -e", f"mount --bind {shlex.quote(str(tmp_path / 'sys'))} /sys",
             "for d in /etc/udev/rules.d /usr/lib/udev/rules.d /usr/local/lib/udev/rules.d \\",
             "         /lib/udev/rules.d; do",
             "  if [ -d $d ]; then mount -t tmpfs none $d; fi; done",
             "mount -t tmpfs none /run", "mkdir -p /run/udev/rules.d",
             f"mount --bind {shlex.quote(str(rules_dir))} /run/udev/rules.d",
             "export SYSTEMD_DEVICE_VERIFY_SYSFS=0"]
    for action, syspath in events:
        if action == "remove":  # the device is gone: its attributes with it
            lines.append(f"rm -f {shlex.quote(syspath)}/bInterfaceClass "
                         f"{shlex.quote(os.path.dirname(syspath))}/idVendor")
        lines += [f"echo '@@eembridge-event {action}'",
                  f"udevadm test --action={action} {shlex.quote(syspath)} 2>&1"]
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             "\n".join(lines)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = []
    for block in result.stdout.split("@@eembridge-event ")[1:]:
        properties, runs, errors = {}, [], []
        in_properties = False
        for line in block.splitlines()[1:]:
            if line.startswith("/run/udev/rules.d/"):
                errors.append(line)
            elif line.startswith("run: "):
                runs.append(line[5:].strip("'"))
            elif line.startswith("DEVPATH="):
                in_properties = True
            if in_properties and "=" in line and not line.startswith("run:"):
                key, _, value = line.partition("=")
                properties[key] = value
        out.append({"properties": properties, "runs": sorted(set(runs)), "errors": errors})
    return out


def check_rule(tmp_path: Path, rules_dir: Path) -> tuple[list[dict], list[dict]]:
    eem = fake_usb_device(tmp_path / "sys", "1-2.3", "2/12/7")
    ecm = fake_usb_device(tmp_path / "sys", "1-4", "2/6/0")  # CDC ECM: not ours
    events = udev_events(tmp_path, rules_dir, [("add", eem), ("add", ecm), ("remove", eem)])
    return events, [e for e in events if e["errors"]]


def test_udev_rule_starts_one_bridge_per_eem_interface_and_stops_it_on_unplug(tmp_path):
    rules_dir = install(tmp_path / "root") / "etc/udev/rules.d"
    (add, other, remove), errors = check_rule(tmp_path, rules_dir)
    assert not errors, errors
    assert add["properties"]["SYSTEMD_WANTS"] == "eembridge@1-2.3.service"
    assert ":systemd:" in add["properties"]["TAGS"]
    assert "SYSTEMD_WANTS" not in other["properties"] and not other["runs"]
    systemctl = shutil.which("systemctl") or "/usr/bin/systemctl"
    assert remove["runs"] == [f"{systemctl} --no-block stop eembridge@1-2.3.service"]


@pytest.mark.parametrize("breakage", [
    ('SUBSYSTEM!="usb"', 'SUBSYTEM!="usb"'),  # unknown key: a parse error
    ('ENV{INTERFACE}!="2/12/7", GOTO', 'ENV{INTERFACE}!="2/12/7, GOTO'),  # lost quote
    ('ENV{INTERFACE}!="2/12/7"', 'ENV{INTERFACE}!="2/0c/07"'),  # hex where udev has decimal
    ('ENV{SYSTEMD_WANTS}+=', 'ENV{SYSTEMD_WANT}+='),  # parses, but starts nothing
    ('ENV{EEMBRIDGE_PORT}=="?*", RUN', 'ENV{EEMBRIDGE_PORT}=="", RUN'),  # never stops it
])
def test_a_broken_rule_is_rejected(tmp_path, breakage):
    rules_dir = install(tmp_path / "root") / "etc/udev/rules.d"
    path = rules_dir / RULES_NAME
    old, new = breakage
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    (add, _other, remove), errors = check_rule(tmp_path, rules_dir)
    works = (not errors and add["properties"].get("SYSTEMD_WANTS") == "eembridge@1-2.3.service"
             and any("stop eembridge@1-2.3.service" in run for run in remove["runs"]))
    assert not works, (add, remove, errors)
