"""Boot the real-peer guest: the Debian kernel under virtme-ng, running one script.

The guest sees the host's file system read-only (so this tree, the host's pyenv
Python and its packages are all there as they are) and one writable folder, the
rwdir, through which results come back as files. Inside, tests/interop/gadget.sh
makes the kernel's f_eem gadget on dummy_hcd the peer and cdc_eem the host driver.

The exact invocation (see NOTES.md for why each flag):

    vng --run /boot/vmlinuz-<ver> --disable-kvm --cpus 2 --memory 2G \
        --rwdir DIR --exec "bash DIR/run.sh"

Use from Python::

    result = run_in_guest("bash $INTEROP/gadget.sh up high > $RW/env.txt", rwdir)
    result.check()            # raises GuestError with the console tail on failure
    (rwdir / "env.txt").read_text()

or from the shell: ``python3 tests/interop/guest.py [--rwdir DIR] SCRIPT_FILE``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

INTEROP_DIR = Path(__file__).resolve().parent
REPO_DIR = INTEROP_DIR.parent.parent
SETUP_HINT = "run tests/interop/setup_guest.sh as root"
# Modules the guest needs from the kernel image (all =m in Debian's linux-image-amd64).
GUEST_MODULES = ("dummy_hcd", "libcomposite", "usb_f_eem", "cdc_eem", "usbmon")


class GuestError(RuntimeError):
    """The guest could not be booted or its script failed."""


@dataclass
class GuestResult:
    returncode: int
    output: str  # guest console: the script's stdout and stderr interleaved
    seconds: float
    rwdir: Path
    command: list[str]

    def check(self) -> GuestResult:
        if self.returncode != 0:
            tail = "\n".join(self.output.splitlines()[-60:])
            raise GuestError(f"guest script exited {self.returncode}; console tail:\n{tail}")
        return self


def find_kernel() -> Path:
    """The newest Debian kernel image whose modules are installed."""
    candidates = []
    for img in Path("/boot").glob("vmlinuz-*"):
        ver = img.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / ver / "modules.dep").exists():
            candidates.append((_version_key(ver), img))
    if not candidates:
        raise GuestError(f"no /boot/vmlinuz-* with modules in /lib/modules: {SETUP_HINT}")
    return max(candidates)[1]


def _version_key(ver: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ver.replace("-", ".").split(".") if p.isdigit())


def missing_facilities() -> list[str]:
    """Names of what the guest needs and this machine lacks (empty when ready)."""
    missing = []
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("vng", "pip virtme-ng"),
                      ("busybox", "busybox-static"), ("depmod", "kmod")):
        if shutil.which(tool) is None and not (tool == "busybox" and Path("/bin/busybox").exists()):
            missing.append(f"{tool} ({pkg})")
    try:
        kernel = find_kernel()
    except GuestError:
        missing.append("/boot/vmlinuz-* (linux-image-amd64)")
    else:
        ver = kernel.name.removeprefix("vmlinuz-")
        dep = (Path("/lib/modules") / ver / "modules.dep").read_text()
        for mod in GUEST_MODULES:
            if f"/{mod}.ko" not in dep:
                missing.append(f"kernel module {mod} in {ver}")
    return missing


def use_kvm() -> bool:
    """KVM only when asked for (EEMBRIDGE_GUEST_KVM=1).

    On this machine kind /dev/kvm opens and KVM_CREATE_VM succeeds, yet QEMU with
    -cpu host aborts (MSR 0x10a) and other CPU models hang at kernel entry, so a
    probe would cost a failed boot every time: TCG is the default.
    """
    return os.environ.get("EEMBRIDGE_GUEST_KVM") == "1"


def vng_command(rwdir: Path, exec_cmd: str, *, cpus: int = 2, memory: str = "2G",
                kvm: bool | None = None) -> list[str]:
    cmd = [shutil.which("vng") or "vng", "--run", str(find_kernel())]
    if not (use_kvm() if kvm is None else kvm):
        cmd.append("--disable-kvm")
    cmd += ["--cpus", str(cpus), "--memory", memory, "--rwdir", str(rwdir), "--exec", exec_cmd]
    return cmd


def script_prelude(rwdir: Path) -> str:
    """Environment every guest script starts with.

    The guest's PATH has no pyenv shims, so put the host interpreter's bin first:
    `python3` inside is then this very interpreter with its site-packages.
    """
    pybin = Path(sys.executable).resolve().parent
    return (
        "set -euo pipefail\n"
        f"export PATH={pybin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"export RW={rwdir} INTEROP={INTEROP_DIR} REPO={REPO_DIR}\n"
        f"export PYTHONPATH={REPO_DIR}\n"
        "export PYTHONDONTWRITEBYTECODE=1\n"  # the host tree is read-only inside
        f"cd {rwdir}\n"
    )


def run_in_guest(script: str, rwdir: Path, *, timeout: float = 300.0, cpus: int = 2,
                 memory: str = "2G", kvm: bool | None = None) -> GuestResult:
    """Boot once, run `script` (bash) inside with $RW/$INTEROP/$REPO set, return.

    Files the script writes under $RW (== rwdir) are the results. Raises GuestError
    naming the missing facility if the machine cannot boot the guest, or on timeout.
    """
    missing = missing_facilities()
    if missing:
        raise GuestError(f"real-peer guest cannot boot, missing: {', '.join(missing)} ({SETUP_HINT})")
    rwdir = Path(rwdir).resolve()
    rwdir.mkdir(parents=True, exist_ok=True)
    run_sh = rwdir / "run.sh"
    run_sh.write_text(script_prelude(rwdir) + script + "\n")
    cmd = vng_command(rwdir, f"bash {run_sh}", cpus=cpus, memory=memory, kvm=kvm)
    start = time.monotonic()
    try:
        # stdin: vng wants a terminal or nothing; CI has no stdin at all.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout, cwd=rwdir)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        raise GuestError(f"guest timed out after {timeout:.0f} s: {' '.join(cmd)}\n{out[-4000:]}") from exc
    return GuestResult(proc.returncode, proc.stdout.decode(errors="replace"),
                       time.monotonic() - start, rwdir, cmd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("script", type=Path, help="bash script to run inside the guest")
    ap.add_argument("--rwdir", type=Path, default=Path("build/interop/rw"))
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    res = run_in_guest(args.script.read_text(), args.rwdir, timeout=args.timeout)
    sys.stdout.write(res.output)
    print(f"guest: exit {res.returncode} after {res.seconds:.1f} s; results in {res.rwdir}", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
