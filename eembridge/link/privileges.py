"""Drop the capabilities a running bridge no longer needs.

Theory of operation
-------------------
Capabilities belong to each thread, not to the process: capset(2) changes only the
calling thread, and a new thread copies its creator's sets. So the drop runs in the
main thread after the TAP is created and configured and BEFORE the bridge starts any
thread of its own (bridge loop, libusb events, control socket, metrics): every thread
that touches the device or the network then runs with the reduced sets. drop() reports
threads started earlier that still hold more (the simulated device's threads, which
are the "device", not the bridge).

What a running bridge still does, and what that needs (Linux 6.1, checked on a --sim
bridge and in the real-peer guest, see tests/test_privileges.py and
tests/interop/privs_checks.sh):
* carrier on/off at unplug/replug: TUNSETCARRIER on the TAP fd we hold. The kernel checks
  nothing beyond holding the attached fd: no capability.
* reopen /dev/bus/usb/BBB/DDD after a replug and detach cdc_eem from it
  (USBDEVFS_DISCONNECT), claim, re-attach on exit (USBDEVFS_CONNECT): plain file access
  to the node (root owns it; a udev rule gives it to the user's group). No capability.
* the TAP's addresses and neighbour stay across carrier changes (the kernel keeps them);
  the bridge adds them once at start-up, before the drop. No capability later.
* closing the TAP fd deletes a non-persistent TAP: no capability.
So nothing is kept by default: effective, permitted, inheritable and ambient sets are
emptied, the bounding set too where we may (CAP_SETPCAP; a non-root user started with
only CAP_NET_ADMIN cannot shrink it, and no_new_privs makes it moot: no execve can gain
anything). Kept only on request of an option that needs it later: CAP_NET_RAW for
--pcap (its AF_PACKET socket opens when the device first connects), CAP_NET_ADMIN for
--dhcp (the lease's address and route come and go while the bridge runs).

Plain prctl(2)/capset(2) through ctypes: the two calls need no library (python-prctl
would need libcap headers and a compiler on every machine, for two system calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger("eembridge.link.privileges")
T = TypeVar("T")

# <linux/capability.h>, in number order.
CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)
CAP_NUMBERS = {name: number for number, name in enumerate(CAP_NAMES)}

# <linux/prctl.h>
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "i686": 185, "armv7l": 185,
              "ppc64le": 184, "s390x": 185}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def names(mask: int) -> list[str]:
    return [CAP_NAMES[n] if n < len(CAP_NAMES) else f"cap_{n}"
            for n in range(64) if mask >> n & 1]


def mask_of(caps: Iterable[str]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << CAP_NUMBERS[cap.lower().removeprefix("cap_")]
    return mask


def read_status(path: str = "/proc/thread-self/status") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb as masks and NoNewPrivs, of one thread."""
    values = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                values[key] = int(value, 16)
            elif key == "NoNewPrivs":
                values[key] = int(value)
    return values


def held(path: str = "/proc/thread-self/status") -> dict[str, object]:
    """What this thread holds, by name (for `stats`)."""
    status = read_status(path)
    return {"effective": names(status["CapEff"]), "permitted": names(status["CapPrm"]),
            "bounding": names(status["CapBnd"]), "ambient": names(status["CapAmb"]),
            "no_new_privs": bool(status.get("NoNewPrivs"))}


@dataclass
class DropReport:
    dropped: list[str]  # effective/permitted capabilities given up
    kept: list[str]
    bounding_dropped: int  # how many left the bounding set
    bounding_kept: str  # "" or why the bounding set could not be shrunk
    other_threads: list[str] = field(default_factory=list)  # started before, hold more

    def line(self) -> str:
        dropped = ", ".join(self.dropped) or "nothing"
        kept = ", ".join(self.kept) or "none"
        bounding = (f"bounding set -{self.bounding_dropped}" if not self.bounding_kept
                    else f"bounding set kept ({self.bounding_kept})")
        extra = (f"; threads started before keep theirs: {', '.join(self.other_threads)}"
                 if self.other_threads else "")
        return f"dropped capabilities: {dropped}; kept: {kept}; {bounding}; no_new_privs set{extra}"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop(keep: Iterable[str] = ()) -> DropReport:
    """Keep only `keep` (names such as "net_raw") in this thread; set no_new_privs.

    Call before starting threads (see the module comment). A capability in `keep` that
    the thread does not hold is not gained, of course.
    """
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    before = read_status()
    keep_mask = mask_of(keep)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT)")
    # The bounding set first: dropping from it needs CAP_SETPCAP in the effective set.
    bounding_dropped, bounding_kept = 0, ""
    if before["CapEff"] >> CAP_NUMBERS["setpcap"] & 1:
        for number in range(64):
            if before["CapBnd"] >> number & 1 and not keep_mask >> number & 1:
                _check(libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")
                bounding_dropped += 1
    elif before["CapBnd"] & ~keep_mask:
        bounding_kept = "no cap_setpcap"
    permitted = before["CapPrm"] & keep_mask
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        part = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    machine = os.uname().machine
    if machine not in SYS_CAPSET:
        raise OSError(0, f"capset: system call number unknown on {machine}")
    _check(libc.syscall(SYS_CAPSET[machine], ctypes.byref(header), data), "capset")
    after = read_status()
    mine = after["CapEff"]
    others = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == threading.get_native_id():
            continue
        try:
            if read_status(f"/proc/self/task/{tid}/status")["CapEff"] & ~mine:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    others.append(f"{f.read().strip()} ({tid})")
        except OSError:
            continue  # ended meanwhile
    return DropReport(dropped=names(before["CapPrm"] & ~after["CapPrm"]),
                      kept=names(after["CapEff"]), bounding_dropped=bounding_dropped,
                      bounding_kept=bounding_kept, other_threads=others)


def run_without_capabilities(fn: Callable[[], T]) -> T:
    """fn() in a helper thread that holds nothing: threads a library starts inside fn
    (libusb's hotplug monitor `libusb_event`, started by pyusb's first call) are born
    without capabilities, instead of keeping the full set after the bridge drops its own."""
    result: list[T] = []
    error: list[BaseException] = []

    def helper() -> None:
        try:
            drop(())
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=helper, name="eembridge-unprivileged")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
