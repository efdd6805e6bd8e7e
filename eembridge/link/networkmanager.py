"""NetworkManager: keep its hands off the bridge's interface.

A two-node USB link has static addresses and a static neighbour. A NetworkManager left
to itself treats a new interface as its own (DHCP, IPv6 autoconfiguration, flushing
addresses it did not set), so the bridge tells it to leave the interface alone:

- Before the interface appears: a keyfile in NM's runtime conf.d (gone on reboot) lists
  it in ``unmanaged-devices``, and ``nmcli general reload conf`` makes a running NM read
  it. NM reads conf.d only when it starts and on a reload; a keyfile alone is ignored
  until then, and the interface is NM's from the moment it appears.
- Once the interface exists: ``nmcli device set NAME managed no``, for an NM that did not
  take the reload (older than 1.22, or nmcli refused).
- When the interface goes: the keyfile is removed and NM reloads again. The default
  name, usb0, is also what the kernel's own USB network drivers call their interfaces;
  NM must not keep ignoring one of those after the bridge has stopped.

Absent NM (no /run/NetworkManager) nothing is done. Failures are logged, never raised:
the bridge works without NM, and a warning says when NM may be managing the interface.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/NetworkManager")


def running(run_dir: Path = RUN_DIR) -> bool:
    """NetworkManager creates its run directory on start; that is our (cheap) sign."""
    return run_dir.is_dir()


def keyfile_path(ifname: str, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / "conf.d" / f"eembridge-{ifname}.conf"


def unmanage(ifname: str, run_dir: Path = RUN_DIR, nmcli: str | None = "auto") -> Unmanaged | None:
    """Before ``ifname`` is created: tell a running NM to leave it alone (None: no NM).

    Call ``after_create`` once the interface exists and ``forget`` when it is gone.
    """
    if not 0 < len(ifname) < 16 or not ifname.isprintable() or any(c in ifname for c in "/ :"):
        raise ValueError(f"{ifname!r} is not an interface name")  # a file name, and argv
    if not running(run_dir):
        log.debug("NetworkManager not running (no %s); leaving %s as it is", run_dir, ifname)
        return None
    nm = Unmanaged(ifname, run_dir, nmcli)
    nm.before_create()
    return nm


@dataclass
class Unmanaged:
    """NM told to leave ``ifname`` alone, for as long as the bridge has the interface."""

    ifname: str
    run_dir: Path = RUN_DIR
    nmcli: str | None = "auto"  # "auto": nmcli from PATH, if any; None: do not run it
    keyfile: Path | None = None
    reloaded: bool = False

    def __post_init__(self) -> None:
        if self.nmcli == "auto":
            self.nmcli = shutil.which("nmcli")

    def before_create(self) -> None:
        path = keyfile_path(self.ifname, self.run_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"[keyfile]\nunmanaged-devices=interface-name:{self.ifname}\n")
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)
            return
        self.keyfile = path
        self.reloaded = self._run("general", "reload", "conf")

    def after_create(self) -> None:
        if self._run("device", "set", self.ifname, "managed", "no") or self.reloaded:
            return
        log.warning(
            "NetworkManager is running and may manage %s (it may flush its addresses): "
            "neither a reload nor nmcli could tell it otherwise; run "
            "'nmcli device set %s managed no'", self.ifname, self.ifname)

    def forget(self) -> None:
        if self.keyfile is None:
            return
        try:
            self.keyfile.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("could not remove NetworkManager keyfile %s: %s", self.keyfile, exc)
            return
        self.keyfile = None
        if self.reloaded:
            self._run("general", "reload", "conf")

    def _run(self, *args: str) -> bool:
        if not self.nmcli:
            return False
        try:
            subprocess.run([self.nmcli, *args], check=True, capture_output=True, timeout=5)
        except subprocess.CalledProcessError as exc:
            log.debug("nmcli %s: exit %d: %s", " ".join(args), exc.returncode,
                      exc.stderr.decode(errors="replace").strip())
            return False
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("nmcli %s: %s", " ".join(args), exc)
            return False
        return True
