"""`eembridge install-service`: the systemd unit and udev rule, rendered and installed.

The templates live in eembridge/data/ (package data) so that an installed package can
install its own service, whatever prefix or virtualenv it was installed into: the
rendered unit's ExecStart names this very interpreter (`python -m eembridge`), and
ProtectHome= is relaxed to read-only when that interpreter or the package lives under
/home or /root (pyenv, a venv in a home directory), which ProtectHome=yes would hide.

Instances: eembridge@PORT.service, PORT being the USB port path (1-2.3), which is what
the udev rule starts. A bridge can also be started by hand for a serial number:
`systemctl start "eembridge@$(systemd-escape serial:ABC-1).service"`. The unit passes
the instance with %i (raw) and `parse_instance` decodes the \\xNN escapes itself, so a
port's '-' stays a '-' (%I would turn it into '/').
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..core.errors import UserError

UNIT_NAME = "eembridge@.service"
RULES_NAME = "70-eembridge.rules"
UNIT_DIR = "/etc/systemd/system"
RULES_DIR = "/etc/udev/rules.d"


def template(name: str) -> str:
    return resources.files("eembridge").joinpath("data", name).read_text()


def default_exec_start() -> str:
    return f"{shlex.quote(sys.executable)} -m eembridge"


def protect_home(exec_start: str) -> str:
    """"yes" unless the program or the package lives under /home or /root."""
    paths = [*shlex.split(exec_start)[:1], str(Path(__file__).resolve().parent)]
    under_home = any(os.path.realpath(p).startswith(("/home/", "/root/")) for p in paths)
    return "read-only" if under_home else "yes"


def render(exec_start: str | None = None, systemctl: str | None = None) -> dict[str, str]:
    """File name -> rendered text of the unit and the rule."""
    exec_start = exec_start or default_exec_start()
    if not os.path.isabs(shlex.split(exec_start)[0]):
        raise UserError(f"ExecStart must start with an absolute path, not {exec_start!r}")
    systemctl = systemctl or shutil.which("systemctl") or "/usr/bin/systemctl"
    unit = (template(UNIT_NAME).replace("@EXEC_START@", exec_start)
            .replace("@PROTECT_HOME@", protect_home(exec_start)))
    rules = template(RULES_NAME).replace("@SYSTEMCTL@", systemctl)
    return {UNIT_NAME: unit, RULES_NAME: rules}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="/",
                        help="install below this directory instead of / (no reloads then)")
    parser.add_argument("--unit-dir", default=UNIT_DIR, help=f"unit directory ({UNIT_DIR})")
    parser.add_argument("--rules-dir", default=RULES_DIR, help=f"udev rules directory ({RULES_DIR})")
    parser.add_argument("--exec", dest="exec_start", metavar="COMMAND",
                        help="program the unit runs (default: this Python, -m eembridge)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files and commands, change nothing")


def _live_commands() -> list[list[str]]:
    return [
        ["systemctl", "daemon-reload"],
        ["udevadm", "control", "--reload"],
        # Devices already plugged in get their bridge now, not at the next replug.
        ["udevadm", "trigger", "--action=add", "--subsystem-match=usb",
         "--property-match=INTERFACE=2/12/7"],
    ]


def run(args: argparse.Namespace) -> int:
    files = render(args.exec_start)
    root = Path(args.root)
    targets = {
        UNIT_NAME: root / args.unit_dir.lstrip("/") / UNIT_NAME,
        RULES_NAME: root / args.rules_dir.lstrip("/") / RULES_NAME,
    }
    live = root.resolve() == Path("/")
    for name, path in targets.items():
        if args.dry_run:
            print(f"# would write {path}\n{files[name]}")
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[name])
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        print(f"wrote {path}")
    if not live:
        return 0
    systemd_running = os.path.isdir("/run/systemd/system")
    if args.dry_run:
        for command in _live_commands():
            print("would run: " + shlex.join(command))
        if not systemd_running:
            print("(systemd is not running here: these would be skipped)")
        return 0
    if not systemd_running:
        print("systemd is not running here: skipped daemon-reload and udev reload")
        return 0
    for command in _live_commands():
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"{shlex.join(command)} failed: {result.stderr.strip()}")
        print("ran: " + shlex.join(command))
    return 0
