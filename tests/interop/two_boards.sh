#!/usr/bin/env bash
# Two EEM boards on one machine, run INSIDE the real-peer guest (test_guest_two_boards.py
# boots it and reads the result files under $RW).
#
# dummy_hcd num=2 gives two UDCs (dummy_udc.0, dummy_udc.1) and two host buses, so two
# configfs EEM gadgets (same VID:PID, different serials: selection must go by serial or
# port) appear as two USB devices, 1-1 and 2-1, both bound to cdc_eem first. Each gadget
# netdev lives in its own peer namespace with its own address. One TOML config, two
# sections; two bridges started as the systemd unit starts them
# (`python -m eembridge --instance %i --wait`): board A by `serial:SERIAL` (systemd-escaped),
# board B by its port path. Then: TAPs as configured, ping, TCP both ways on both links at
# once (SHA-256), stats, stats --watch, list, unplug/replug of board B only, SIGTERM,
# and the udev rule against the real sysfs paths; then (labgrid_farm.sh) both boards as
# a labgrid board farm. Board B differs on purpose: one frame
# per OUT transfer (its config section), and usbfs refuses it mapped IN buffers.
#
# Every step writes NAME.rc (+ .txt/.json) so one failure does not hide the others.
set -uo pipefail
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
stamp script_start

BOARDS="a b"
# board -> gadget name, UDC, serial, namespace, peer netdev MAC, subnet, TAP, MTU, TAP MAC
declare -A UDC=([a]=dummy_udc.0 [b]=dummy_udc.1)
declare -A SERIAL=([a]=eembridge-board-A [b]=eembridge-board-B)
declare -A NS=([a]=peera [b]=peerb)
declare -A DEV_MAC=([a]=02:00:00:ee:0a:02 [b]=02:00:00:ee:0b:02)
declare -A TAP_MAC=([a]=02:00:00:ee:0a:01 [b]=02:00:00:ee:0b:01)
declare -A HOST_IP=([a]=169.254.81.1 [b]=169.254.82.1)
declare -A PEER_IP=([a]=169.254.81.2 [b]=169.254.82.2)
declare -A TAP=([a]=rigA [b]=rigB)
declare -A MTU=([a]=1400 [b]=1500)
G=/sys/kernel/config/usb_gadget
XFER_MB=2

usb_path() {  # the host-side USB device of board $1, by serial
    local d
    for d in /sys/bus/usb/devices/*; do
        [ -f "$d/serial" ] && [ "$(cat "$d/serial")" = "${SERIAL[$1]}" ] && { echo "$d"; return 0; }
    done
    return 1
}
eem_intf() {  # the 02/0c/07 interface directory of board $1
    local i
    for i in "$(usb_path "$1")"/*:*; do
        [ "$(intf_class "$i")" = 02/0c/07 ] && { echo "$i"; return 0; }
    done
    return 1
}
drivers() {  # "board interface driver" for both boards
    local b i
    for b in $BOARDS; do
        i=$(eem_intf "$b") || { echo "$b none absent"; continue; }
        echo "$b $(basename "$i") $(driver_of "$i")"
    done
}
both_cdc_eem() { [ "$(drivers | awk '$3 == "cdc_eem"' | wc -l)" = 2 ]; }

# 1. Two UDCs, two gadgets, two peers.
modprobe dummy_hcd num=2 is_high_speed=1 is_super_speed=0
modprobe libcomposite; modprobe usb_f_eem; modprobe cdc_eem
[ -e /dev/net/tun ] || modprobe tun
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
ls /sys/class/udc > "$RW/udcs.txt"
for b in $BOARDS; do
    d=$G/board$b
    mkdir -p "$d/strings/0x409" "$d/configs/c.1/strings/0x409" "$d/functions/eem.usb0"
    echo 0x1d6b > "$d/idVendor"; echo 0x0104 > "$d/idProduct"   # the same for both
    echo 0x0200 > "$d/bcdUSB"
    echo "${SERIAL[$b]}" > "$d/strings/0x409/serialnumber"
    echo "Linux f_eem" > "$d/strings/0x409/manufacturer"
    echo "eembridge board $b" > "$d/strings/0x409/product"
    echo EEM > "$d/configs/c.1/strings/0x409/configuration"
    echo "${DEV_MAC[$b]}" > "$d/functions/eem.usb0/dev_addr"
    ln -s "$d/functions/eem.usb0" "$d/configs/c.1/"
    echo "${UDC[$b]}" > "$d/UDC"
    ifn=$(cat "$d/functions/eem.usb0/ifname")
    ip netns add "${NS[$b]}"
    ip link set "$ifn" netns "${NS[$b]}"
    ip -n "${NS[$b]}" link set lo up
    ip netns exec "${NS[$b]}" sysctl -qw "net.ipv6.conf.$ifn.disable_ipv6=1"
    ip -n "${NS[$b]}" addr add "${PEER_IP[$b]}/24" dev "$ifn"
    ip -n "${NS[$b]}" link set "$ifn" up
    echo "PEER_IF_$b=$ifn" >> "$RW/env.txt"
done
wait_until 30 both_cdc_eem
echo $? > "$RW/gadgets.rc"
for b in $BOARDS; do
    p=$(usb_path "$b")
    { echo "PORT_$b=$(basename "$p")"; echo "INTF_$b=$(basename "$(eem_intf "$b")")"
      echo "SPEED_$b=$(cat "$p/speed")"; echo "UDC_$b=${UDC[$b]}"
      echo "SERIAL_$b=${SERIAL[$b]}"; echo "TAP_$b=${TAP[$b]}"; echo "MTU_$b=${MTU[$b]}"
      echo "HOST_IP_$b=${HOST_IP[$b]}"; echo "PEER_IP_$b=${PEER_IP[$b]}"
      echo "DEV_MAC_$b=${DEV_MAC[$b]}"; echo "TAP_MAC_$b=${TAP_MAC[$b]}"; } >> "$RW/env.txt"
done
# shellcheck disable=SC1091
. "$RW/env.txt"
drivers > "$RW/drivers_before.txt"
# cdc_eem's own netdevs carry no address here: nothing to move off them.
stamp gadgets_up

# 2. The config: one section per board, both selected by serial.
mkdir -p /etc/eembridge /run/eembridge
{
    echo '[defaults]'
    echo 'keepalive = 5'
    for b in $BOARDS; do
        echo
        echo "[board-$b]"
        echo "serial = \"${SERIAL[$b]}\""
        echo "tap = \"${TAP[$b]}\""
        echo "addresses = [\"${HOST_IP[$b]}/24\"]"
        echo "mac = \"${TAP_MAC[$b]}\""
        echo "peer = \"${PEER_IP[$b]}\""
        echo "peer-mac = \"${DEV_MAC[$b]}\""
        echo "mtu = ${MTU[$b]}"
        # Board b as a device not known to take batches would be: one frame per transfer.
        if [ "$b" = b ]; then echo 'max-transfer = "frame"'; fi
    done
} > /etc/eembridge/rig.toml
cp /etc/eembridge/rig.toml "$RW/rig.toml"

# 3. Two bridges, as the unit's ExecStart runs them: --instance %i --wait.
INSTANCE_a=$(systemd-escape "serial:$SERIAL_a")
INSTANCE_b=$PORT_b
echo "INSTANCE_a=$INSTANCE_a" > "$RW/instances.txt"
echo "INSTANCE_b=$INSTANCE_b" >> "$RW/instances.txt"
python3 -m eembridge --instance "$INSTANCE_a" --wait > "$RW/bridge_a.log" 2>&1 &
PID_a=$!
# Board B's kernel refuses to map usbfs memory (refuse_usbfs_mmap.c, as past
# usbfs_memory_mb): its IN transfers land in the ring, the fallback.
LD_PRELOAD="$RW/refuse_usbfs_mmap.so" \
    python3 -m eembridge --instance "$INSTANCE_b" --wait > "$RW/bridge_b.log" 2>&1 &
PID_b=$!
declare -A PID=([a]=$PID_a [b]=$PID_b)
for b in $BOARDS; do
    bridge_up "${PID[$b]}" "${TAP[$b]}" 150 > "$RW/up_$b.txt"
    echo $? > "$RW/up_$b.rc"
done
stamp bridges_up
drivers > "$RW/drivers_bridged.txt"

# 4. The links as configured (ip -j: the test parses them).
for b in $BOARDS; do
    ip -j link show dev "${TAP[$b]}" > "$RW/link_$b.json" 2>&1
    ip -j -4 addr show dev "${TAP[$b]}" > "$RW/addr_$b.json" 2>&1
    ip -j neigh show dev "${TAP[$b]}" > "$RW/neigh_$b.json" 2>&1
done
for b in $BOARDS; do
    ping -c 3 -i 0.2 -W 2 -I "${TAP[$b]}" "${PEER_IP[$b]}" > "$RW/ping_$b.txt" 2>&1
    echo $? > "$RW/ping_$b.rc"
done

# TCP both ways on both links at the same time: four nc transfers run together.
# Each writes NAME.sent / NAME.recv (digests) and NAME.span (the test checks the overlap).
declare -A PORT=([h2p]=5101 [p2h]=5102)
stamp tcp_start
XPIDS=()
for b in $BOARDS; do
    for dir in h2p p2h; do
        xfer "${dir}_$b" "$dir" "${NS[$b]}" "${PEER_IP[$b]}" "${PORT[$dir]}" $XFER_MB & XPIDS+=($!)
    done
done
# While all four run: both bridges' counters, once and twice over (the live view).
sleep 1
python3 -m eembridge stats --watch --json --count 2 --interval 1 > "$RW/watch.jsonl" 2> "$RW/watch.err"
echo $? > "$RW/watch.rc"
wait "${XPIDS[@]}"
stamp tcp_done
python3 -m eembridge stats --json > "$RW/stats.json" 2> "$RW/stats.err"
echo $? > "$RW/stats.rc"
python3 -m eembridge list --json > "$RW/list.json" 2> "$RW/list.err"
echo $? > "$RW/list.rc"
stamp stats_done

# 5. Unplug board B from its UDC and plug it back: only bridge B notices; link A keeps
#    carrying traffic all along (a ping running across the whole unplug/replug).
ping -c 25 -i 0.2 -W 2 -I "${TAP[a]}" "${PEER_IP[a]}" > "$RW/replug_ping_a.txt" 2>&1 &
PING_A=$!
stamp unplug_b
echo "" > "$G/boardb/UDC"
wait_until 20 carrier_is "${TAP[b]}" 0
echo $? > "$RW/replug_off_b.rc"
sleep 0.5
echo "${UDC[b]}" > "$G/boardb/UDC"
wait_until 60 carrier_is "${TAP[b]}" 1
echo $? > "$RW/replug_on_b.rc"
stamp replugged_b
wait $PING_A
echo $? > "$RW/replug_ping_a.rc"
carrier_is "${TAP[a]}" 1; echo $? > "$RW/replug_carrier_a.rc"
ping -c 3 -i 0.2 -W 2 -I "${TAP[b]}" "${PEER_IP[b]}" > "$RW/replug_ping_b.txt" 2>&1
echo $? > "$RW/replug_ping_b.rc"
drivers > "$RW/drivers_replugged.txt"

# 6. The udev rule, rendered by install-service, run by udevadm test against the real
#    sysfs path of each board's EEM interface (prints the properties it ends with).
python3 -m eembridge install-service --root /tmp/svcroot > "$RW/install.txt" 2>&1
echo $? > "$RW/install.rc"
mkdir -p /run/udev/rules.d
cp /tmp/svcroot/etc/udev/rules.d/70-eembridge.rules /run/udev/rules.d/
for b in $BOARDS; do
    i=$(eem_intf "$b")
    echo "$i" > "$RW/udev_$b.syspath"
    udevadm test --action=add "$i" > "$RW/udev_$b.txt" 2>&1
    echo $? > "$RW/udev_$b.rc"
done
rm -f /run/udev/rules.d/70-eembridge.rules
stamp udev_done

# 7. SIGTERM board a's bridge; delete board b's TAP under its bridge (it must stop on
#    its own, exit 2). Either way cdc_eem is bound again on both boards.
kill -TERM "${PID[a]}" 2>/dev/null
ip link del "${TAP[b]}"
for b in $BOARDS; do bridge_exit "${PID[$b]}" "exit_$b"; done
wait_until 20 both_cdc_eem
drivers > "$RW/drivers_after.txt"
stamp done

# 8. The same two boards as a labgrid board farm (coordinator, exporter, clients).
# shellcheck source=labgrid_farm.sh
. "$INTEROP/labgrid_farm.sh"
true
