#!/usr/bin/env bash
# Install what the real-peer guest needs (tests/interop/NOTES.md): a Debian kernel
# with the USB gadget modules, QEMU, virtme-ng and the tools the guest scripts run.
# Idempotent: installs only what is missing and says what it did. Run as root on
# Debian 12. Exits non-zero naming whatever is still missing afterwards.
set -euo pipefail

start=$(date +%s.%N)
say() { printf 'setup_guest: %s\n' "$*"; }
die() { printf 'setup_guest: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, modules, namespaces)"

# Debian packages, by the command or file each one provides:
#   linux-image-amd64  /boot/vmlinuz-*  dummy_hcd, libcomposite, usb_f_eem, cdc_eem, usbmon
#   qemu-system-x86    qemu-system-x86_64 (vng's hypervisor)
#   busybox-static     vng's initramfs (needed because the Debian kernel has 9p/virtio as modules)
#   kmod               modprobe/depmod inside the guest
#   iperf3, netcat-openbsd, tcpdump, iproute2, iputils-ping   the proof and the captures
#   python3 (host pyenv) runs guest.py, gadget.sh helpers and pyusb inside the guest
need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in linux-image-amd64 qemu-system-x86 busybox-static kmod iperf3 netcat-openbsd tcpdump iproute2 iputils-ping; do
    have_pkg "$p" || need_pkgs+=("$p")
done

if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "apt-get install ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be empty on a fresh machine; refresh them once.
    if ! apt-cache show linux-image-amd64 >/dev/null 2>&1 \
        || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        say "apt-get update"
        apt-get update -qq || die "apt-get update"
    fi
    # INITRD=No: vng builds its own initramfs, so skip Debian's update-initramfs
    # (saves ~20 s and a 30 MB file). --no-install-recommends: 51 packages, not 199.
    INITRD=No apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/tmp/setup_guest_apt.log 2>&1 \
        || { tail -20 /tmp/setup_guest_apt.log >&2; die "apt-get install ${need_pkgs[*]}"; }
else
    say "Debian packages already installed"
fi

# NetworkManager and dbus run only inside the guest (test_guest_networkmanager.py): on
# this machine they must not start, now or at the next boot. A policy-rc.d that says
# "no" keeps the package scripts from starting them (unless one is already in place),
# and a NetworkManager installed here is disabled for boot.
if ! have_pkg network-manager || ! have_pkg dbus; then
    say "apt-get install network-manager dbus (started only inside the guest)"
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy && own_policy=1
    fi
    nm_was_installed=0
    have_pkg network-manager && nm_was_installed=1
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        network-manager dbus >/tmp/setup_guest_nm.log 2>&1 || rc=$?
    [ $own_policy = 0 ] || rm -f $policy
    [ $rc = 0 ] || { tail -20 /tmp/setup_guest_nm.log >&2; die "apt-get install network-manager dbus"; }
    if [ $nm_was_installed = 0 ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable NetworkManager.service NetworkManager-wait-online.service \
            NetworkManager-dispatcher.service >/dev/null 2>&1 || true
    fi
fi

# virtme-ng from PyPI, into the same Python that runs the tests (the host's pyenv).
if ! command -v vng >/dev/null 2>&1; then
    say "pip install virtme-ng"
    python3 -m pip install -q virtme-ng || die "pip install virtme-ng"
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
else
    say "virtme-ng already installed ($(vng --version 2>/dev/null | head -1))"
fi

# Python packages the bridge and the guest checks import (normally in the image).
missing_py=$(python3 - <<'PY'
import importlib
mods = {"usb": "pyusb", "pytun": "python-pytun", "pyroute2": "pyroute2", "numpy": "numpy", "pytest": "pytest"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing_py" ]; then
    say "pip install $missing_py"
    # shellcheck disable=SC2086
    python3 -m pip install -q $missing_py || die "pip install $missing_py"
fi

# Verify the result: every facility by name.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=("qemu-system-x86_64 (qemu-system-x86)")
command -v vng >/dev/null || missing+=("vng (pip virtme-ng)")
command -v busybox >/dev/null || [ -x /bin/busybox ] || missing+=("busybox (busybox-static)")
for c in depmod modprobe iperf3 nc tcpdump ip ping; do command -v "$c" >/dev/null || missing+=("$c"); done
kver=$(ls /lib/modules 2>/dev/null | grep -E '^[0-9].*-amd64$' | sort -V | tail -1 || true)
if [ -z "$kver" ] || [ ! -f "/boot/vmlinuz-$kver" ]; then
    missing+=("/boot/vmlinuz-*-amd64 (linux-image-amd64)")
else
    for m in dummy_hcd libcomposite usb_f_eem cdc_eem usbmon; do
        modinfo -k "$kver" "$m" >/dev/null 2>&1 || missing+=("kernel module $m for $kver")
    done
fi
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}"

end=$(date +%s.%N)
say "ready: kernel /boot/vmlinuz-$kver, $(qemu-system-x86_64 --version | head -1), vng $(vng --version 2>/dev/null | head -1)"
say "took $(python3 -c "print(f\"{$end-$start:.1f}\")") s"
