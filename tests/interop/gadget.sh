#!/usr/bin/env bash
# The kernel's own CDC-EEM gadget on dummy_hcd, run INSIDE the real-peer guest
# (tests/interop/guest.py boots it). Source it for the functions, or call it:
#
#   gadget.sh up [high|super|full] [acm]
#                                    load modules, create + bind the gadget, make the
#                                    peer netns, wait for cdc_eem; prints KEY=VALUE lines.
#                                    "acm": a composite gadget, an ACM serial function
#                                    (interfaces 0-1) before EEM (interface 2)
#   gadget.sh unplug | replug        write "" / the UDC name to the gadget's UDC file
#   gadget.sh down                   unbind, remove gadget and netns, unload dummy_hcd
#   gadget.sh host-setup IFNAME      address the (re)appeared cdc_eem netdev again
#   gadget.sh wait-host [SECONDS]    print the cdc_eem netdev's name once it exists
#
# Topology once up (all inside the guest):
#   root netns:  $HOST_IF (cdc_eem, the USB host side)  $HOST_IP/24
#   netns peer:  $PEER_IF (f_eem, the gadget side)      $PEER_IP/24
# Fixed MAC addresses keep captures reproducible.
set -euo pipefail

GADGET_NAME=${GADGET_NAME:-eemtest}
GADGET_DIR=/sys/kernel/config/usb_gadget/$GADGET_NAME
GADGET_UDC=${GADGET_UDC:-dummy_udc.0}
PEER_NS=${PEER_NS:-peer}
HOST_IP=${HOST_IP:-169.254.77.1}
PEER_IP=${PEER_IP:-169.254.77.2}
ID_VENDOR=${ID_VENDOR:-0x1d6b}    # Linux Foundation
ID_PRODUCT=${ID_PRODUCT:-0x0104}  # Multifunction Composite Gadget
DEV_MAC=${DEV_MAC:-02:00:00:ee:00:02}   # the gadget's own MAC (peer side)
HOST_MAC=${HOST_MAC:-02:00:00:ee:00:01} # the host side's MAC (set on the cdc_eem netdev)

gadget_log() { printf 'gadget: %s\n' "$*" >&2; }

# speed: high (default, 512-byte bulk), super (1024), full (64).
gadget_load() {
    local speed=${1:-high} opts
    case $speed in
        high) opts="is_high_speed=1 is_super_speed=0" ;;
        super) opts="is_high_speed=1 is_super_speed=1" ;;
        full) opts="is_high_speed=0 is_super_speed=0" ;;
        *) gadget_log "unknown speed $speed"; return 2 ;;
    esac
    # dummy_hcd keeps its options until unloaded, so reload it for another speed.
    if [ -d /sys/module/dummy_hcd ]; then modprobe -r dummy_hcd; fi
    # shellcheck disable=SC2086
    modprobe dummy_hcd $opts
    modprobe libcomposite
    modprobe usb_f_eem
    modprobe cdc_eem
    if [ "${2:-}" = acm ]; then modprobe usb_f_acm; modprobe cdc_acm; fi
    mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
}

gadget_create() {
    local composite=${1:-}
    mkdir -p "$GADGET_DIR"
    cd "$GADGET_DIR"
    echo "$ID_VENDOR" > idVendor
    echo "$ID_PRODUCT" > idProduct
    echo 0x0100 > bcdDevice
    echo 0x0200 > bcdUSB
    mkdir -p strings/0x409
    echo "eembridge-interop-0001" > strings/0x409/serialnumber
    echo "Linux f_eem" > strings/0x409/manufacturer
    echo "eembridge real peer" > strings/0x409/product
    mkdir -p configs/c.1/strings/0x409
    echo "EEM" > configs/c.1/strings/0x409/configuration
    echo 250 > configs/c.1/MaxPower
    if [ "$composite" = acm ]; then
        # ACM first, so the EEM interface is number 2: discovery must look at class
        # codes, not at interface 0. ACM uses an IAD: device class EF/02/01.
        echo 0xef > bDeviceClass
        echo 0x02 > bDeviceSubClass
        echo 0x01 > bDeviceProtocol
        mkdir -p functions/acm.GS0
        [ -e configs/c.1/acm.GS0 ] || ln -s functions/acm.GS0 configs/c.1/
    fi
    mkdir -p functions/eem.usb0
    echo "$DEV_MAC" > functions/eem.usb0/dev_addr
    # host_addr is not set: EEM has no MAC descriptor, cdc_eem picks a random
    # MAC of its own; host_setup overrides it with $HOST_MAC instead.
    [ -e configs/c.1/eem.usb0 ] || ln -s functions/eem.usb0 configs/c.1/
    cd - >/dev/null
}

# The gadget netdev is registered at the first bind and stays across unbinds;
# its name is in ifname.
gadget_ifname() { cat "$GADGET_DIR/functions/eem.usb0/ifname"; }

peer_setup() {
    local ifn
    ifn=$(gadget_ifname)
    ip netns list | grep -qw "$PEER_NS" || ip netns add "$PEER_NS"
    if ip link show "$ifn" >/dev/null 2>&1; then ip link set "$ifn" netns "$PEER_NS"; fi
    ip -n "$PEER_NS" link set lo up
    # IPv4 only: no IPv6 router solicitations or DAD in captures and measurements.
    ip netns exec "$PEER_NS" sysctl -qw "net.ipv6.conf.$ifn.disable_ipv6=1"
    ip -n "$PEER_NS" addr replace "$PEER_IP/24" dev "$ifn"
    ip -n "$PEER_NS" link set "$ifn" up
}

gadget_bind() { echo "$GADGET_UDC" > "$GADGET_DIR/UDC"; }
gadget_unplug() { echo "" > "$GADGET_DIR/UDC"; }
gadget_replug() { gadget_bind; }

# The USB device the host side sees: the one whose serial is ours.
gadget_usb_path() {
    local d
    for d in /sys/bus/usb/devices/*; do
        [ -f "$d/serial" ] && [ "$(cat "$d/serial")" = "eembridge-interop-0001" ] && { echo "$d"; return 0; }
    done
    return 1
}

# Wait (up to $1 s) for the host-side netdev bound to cdc_eem; print its name.
host_netdev_wait() {
    local limit=${1:-20} i n
    for ((i = 0; i < limit * 10; i++)); do
        for n in /sys/class/net/*; do
            if [ "$(basename "$(readlink -f "$n/device/driver" 2>/dev/null)")" = cdc_eem ]; then
                basename "$n"
                return 0
            fi
        done
        sleep 0.1
    done
    gadget_log "no cdc_eem netdev after ${limit}s"
    return 1
}

host_setup() {
    local ifn=$1
    ip link set "$ifn" address "$HOST_MAC"
    sysctl -qw "net.ipv6.conf.$ifn.disable_ipv6=1"
    ip addr replace "$HOST_IP/24" dev "$ifn"
    ip link set "$ifn" up
}

# The interface (e.g. 1-1:1.2) with class 02/0c/07 under the device $1.
eem_interface() {
    local i
    for i in "$1"/*:*; do
        if [ "$(cat "$i/bInterfaceClass")/$(cat "$i/bInterfaceSubClass")/$(cat "$i/bInterfaceProtocol")" = 02/0c/07 ]; then
            basename "$i"
            return 0
        fi
    done
    return 1
}

gadget_up() {
    local speed=${1:-high} composite=${2:-} host_if usb
    gadget_load "$speed" "$composite"
    gadget_create "$composite"
    # f_eem registers its netdev only when the gadget binds to a UDC (before that
    # ifname reads "(unnamed net_device)"), so bind first, then move it.
    gadget_bind
    peer_setup
    host_if=$(host_netdev_wait 30)
    host_setup "$host_if"
    usb=$(gadget_usb_path)
    # Let both ends finish link setup (carrier, DAD-free IPv4) before callers ping.
    ip -n "$PEER_NS" link show "$(gadget_ifname)" | grep -q LOWER_UP || sleep 1
    echo "SPEED=$speed"
    echo "HOST_IF=$host_if"
    echo "HOST_IP=$HOST_IP"
    echo "PEER_NS=$PEER_NS"
    echo "PEER_IF=$(gadget_ifname)"
    echo "PEER_IP=$PEER_IP"
    echo "USB_PATH=$usb"
    echo "USB_SPEED=$(cat "$usb/speed")"
    echo "BUSNUM=$(cat "$usb/busnum")"
    echo "DEVNUM=$(cat "$usb/devnum")"
    echo "EEM_INTF=$(eem_interface "$usb")"
    echo "COMPOSITE=${composite:-none}"
    echo "SERIAL=eembridge-interop-0001"
    echo "HOST_MAC=$HOST_MAC"
}

gadget_down() {
    if [ -d "$GADGET_DIR" ]; then
        [ -z "$(cat "$GADGET_DIR/UDC")" ] || gadget_unplug
        # Bring the netdev home first so that removing the function frees it.
        ip -n "$PEER_NS" link set "$(gadget_ifname)" netns 1 2>/dev/null || true
        rm -f "$GADGET_DIR/configs/c.1/eem.usb0" "$GADGET_DIR/configs/c.1/acm.GS0"
        [ ! -d "$GADGET_DIR/functions/acm.GS0" ] || rmdir "$GADGET_DIR/functions/acm.GS0"
        rmdir "$GADGET_DIR/configs/c.1/strings/0x409" "$GADGET_DIR/configs/c.1" \
            "$GADGET_DIR/functions/eem.usb0" "$GADGET_DIR/strings/0x409" "$GADGET_DIR"
    fi
    ip netns del "$PEER_NS" 2>/dev/null || true
    if [ -d /sys/module/dummy_hcd ]; then modprobe -r dummy_hcd; fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    cmd=${1:-}
    shift || true
    case $cmd in
        up) gadget_up "$@" ;;
        unplug) gadget_unplug ;;
        replug) gadget_replug ;;
        down) gadget_down ;;
        host-setup) host_setup "$1" ;;
        wait-host) host_netdev_wait "${1:-20}" ;;
        eem-interface) eem_interface "$(gadget_usb_path)" ;;
        *) echo "usage: $0 up [high|super|full] [acm] | unplug | replug | down | host-setup IF | wait-host [S]" >&2; exit 2 ;;
    esac
fi
