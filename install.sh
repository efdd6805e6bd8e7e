#!/bin/sh
# Install everything eembridge and its test suite need on a fresh Debian 12 machine:
# system packages (apt), then this checkout as an editable package with its test
# extras (pip), which compiles the Cython extensions in place.
# Run as root (or with sudo available). Idempotent.
set -eu
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "eembridge install: system packages"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    build-essential libusb-1.0-0-dev zlib1g-dev iproute2 tcpdump kmod usbutils \
    ethtool iperf3 systemd udev util-linux dnsmasq-base busybox libslirp-dev >/dev/null  # ethtool, iperf3: bench; systemd, udev: service tests; dnsmasq-base: the --dhcp tests; libslirp-dev: --link user (eembridge._fast.slirp); busybox: its udhcpc in test_user_link

if [ -x tests/interop/setup_guest.sh ] && [ "${EEMBRIDGE_NO_GUEST:-0}" != 1 ]; then
    echo "eembridge install: QEMU guest for the real-peer tests (EEMBRIDGE_NO_GUEST=1 skips)"
    $SUDO tests/interop/setup_guest.sh
fi

echo "eembridge install: Python package"
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[test,labgrid]'  # labgrid: the board farm plugin and its tests
python3 -m eembridge --version
