#!/usr/bin/env bash
# A real NetworkManager, run INSIDE the guest (never on the host), and the bridge's TAP
# (one boot; results as files under $RW, read by test_guest_networkmanager.py).
#
# 1. Control: a TAP made by someone else, up with an address, is NM's: "connected
#    (externally)". That is what the bridge's TAP would be without telling NM.
# 2. The bridge (simulated device: NM cares about the interface, not the USB side):
#    its TAP stays "unmanaged" with its address, and NM's runtime conf.d holds the
#    bridge's keyfile.
#    NM restarted while the bridge runs reads the keyfile and leaves the TAP alone too.
# 3. After the bridge: its keyfile is gone and NM has reloaded, so a new interface of
#    the same name is NM's again.
TAP=nmb0
CONTROL=nmc0
set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
stamp script_start
[ -e /dev/net/tun ] || modprobe tun

# nm_state DEV: DEV's state as NM reports it ("" if NM does not list it).
nm_state() { nmcli -t -f DEVICE,STATE device | sed -n "s/^$1://p"; }
# nm_state_is DEV STATE
nm_state_is() { [ "$(nm_state "$1")" = "$2" ]; }
# external_tap NAME ADDR: a TAP created with iproute2, up, with ADDR.
external_tap() { ip tuntap add dev "$1" mode tap && ip link set "$1" up && ip addr add "$2" dev "$1"; }

# NM needs the system bus; its state and configuration live under $RW.
mkdir -p /run/dbus "$RW/nm" /run/NetworkManager
dbus-daemon --system --fork > "$RW/dbus.log" 2>&1
echo $? > "$RW/dbus.rc"
printf '[main]\nplugins=keyfile\nno-auto-default=*\n' > "$RW/nm/NetworkManager.conf"
start_nm() {  # start_nm STEP: NetworkManager in the background ($NM), up within 30 s
    NetworkManager --no-daemon --config="$RW/nm/NetworkManager.conf" \
        --state-file="$RW/nm/NetworkManager.state" >> "$RW/nm.log" 2>&1 &
    NM=$!
    wait_until 30 nmcli -t general status > /dev/null 2>&1
    echo $? > "$RW/$1.rc"
}
start_nm nm_up
nmcli --version > "$RW/nm_version.txt" 2>&1
stamp nm_up

external_tap $CONTROL 169.254.9.1/24
wait_until 15 nm_state_is $CONTROL "connected (externally)"
echo $? > "$RW/control.rc"
nm_state $CONTROL > "$RW/control.txt"
ip tuntap del dev $CONTROL mode tap

python3 -m eembridge --sim --tap $TAP --ip 169.254.8.1/24 -v > "$RW/bridge.log" 2>&1 &
BRIDGE=$!
bridge_up $BRIDGE $TAP 120 > "$RW/bridge_up.txt"
echo $? > "$RW/bridge_up.rc"
stamp bridge_up
# Give NM what the control needed to take an interface (it took nmc0 within this).
sleep 5
nm_state $TAP > "$RW/bridge_state.txt"
ip -4 -o addr show dev $TAP > "$RW/bridge_addr.txt"
# NM restarted while the bridge runs: it reads the keyfile at start and leaves it alone.
kill -TERM $NM && wait $NM
start_nm nm2
wait_until 10 nm_state_is $TAP unmanaged  # NM lists it again once it has looked
echo $? > "$RW/restarted.rc"
sleep 3  # and does not take it afterwards
nm_state $TAP > "$RW/restarted.txt"
ls /run/NetworkManager/conf.d > "$RW/conf_during.txt" 2>&1
cat "/run/NetworkManager/conf.d/eembridge-$TAP.conf" > "$RW/keyfile.txt" 2>&1
kill -TERM $BRIDGE
bridge_exit $BRIDGE bridge_exit
ls /run/NetworkManager/conf.d > "$RW/conf_after.txt" 2>&1
stamp bridge_exit

external_tap $TAP 169.254.8.1/24
wait_until 15 nm_state_is $TAP "connected (externally)"
echo $? > "$RW/after.rc"
nm_state $TAP > "$RW/after.txt"
ip tuntap del dev $TAP mode tap
stamp script_end
