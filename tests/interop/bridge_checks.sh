#!/usr/bin/env bash
# eembridge against the kernel's f_eem gadget, run INSIDE the real-peer guest: every
# check of one guest boot, results as files under $RW (read by test_guest_eembridge.py).
#
#   bridge_checks.sh SPEED [full|basic] [acm]
#
# basic: gadget up, cdc_eem bound, eembridge takes the device, `list`, ping, TCP
#        both ways by SHA-256, EEM Echo, SIGTERM gives the device back to cdc_eem.
# full:  also unplug + replug from the UDC in the middle of a TCP transfer.
# acm:   composite gadget (ACM before EEM, so EEM is interface 2).
#
# Every step records its exit code in NAME.rc so that one failure does not hide the
# others; the pytest side fails loudly on any missing or bad file. Python costs 4-10 s
# per start under TCG, so it runs only for eembridge itself and its subcommands.
SPEED=${1:?speed}
LEVEL=${2:-basic}
COMPOSITE=${3:-}
TAP=eem0
SOCK=/tmp/eembridge-$TAP.sock   # guest tmpfs: UNIX sockets do not work on the 9p rwdir
# Payload sizes: a few MB at 480/5000 (about 60 Mbit/s under TCG), less at 12.
case $SPEED in full) XFER_MB=2 ;; *) XFER_MB=4 ;; esac

set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
stamp script_start
gadget_up "$SPEED" $COMPOSITE

# "INTF CLASS/SUB/PROTO DRIVER" for every interface of the gadget's USB device.
interfaces() {
    local i
    for i in "$USB_PATH"/*:*; do
        echo "$(basename "$i") $(intf_class "$i") $(driver_of "$i")"
    done
}
eem_driver() { interfaces | awk '$2 == "02/0c/07" {print $3}'; }
eem_is_cdc_eem() { [ "$(eem_driver)" = cdc_eem ]; }

# 1. cdc_eem holds the gadget first.
interfaces > "$RW/interfaces_before.txt"

# 2. eembridge takes it over: it detaches cdc_eem itself. The cdc_eem netdev goes with
#    the unbind; drop its address first so the TAP can take the same one.
ip addr flush dev "$HOST_IF"
[ -e /dev/net/tun ] || modprobe tun  # a module in the guest's Debian kernel
python3 -m eembridge --tap "$TAP" --ip "$HOST_IP/24" --mac "$HOST_MAC" --serial "$SERIAL" \
    --stats-socket "$SOCK" -v > "$RW/bridge.log" 2>&1 &
BRIDGE=$!
# Up to 120 s for the TAP's carrier, giving up as soon as the bridge exits.
bridge_up $BRIDGE "$TAP" 120 > "$RW/bridge_up.txt"
echo $? > "$RW/bridge_up.rc"
BRIDGE_UP=$(cat "$RW/bridge_up.rc")
stamp bridge_up
interfaces > "$RW/interfaces_bridged.txt"
python3 -m eembridge list --json > "$RW/list.json" 2> "$RW/list.err"
echo $? > "$RW/list.rc"
stamp list_done

# 3. Traffic through the bridge.
ping -c 5 -i 0.2 -W 2 "$PEER_IP" > "$RW/ping.txt" 2>&1
echo $? > "$RW/ping.rc"
xfer h2p h2p "$PEER_NS" "$PEER_IP" 5001 "$XFER_MB"
xfer p2h p2h "$PEER_NS" "$PEER_IP" 5002 "$XFER_MB"
stamp tcp_done
# What the peer made of our OUT transfers (many frames each, by default): f_eem counts a
# request it could not unwrap, e.g. a packet crossing its receive buffers, as an rx
# error; the bridge's counters say how many frames went in how many transfers.
ip netns exec "$PEER_NS" sh -c "cat /sys/class/net/$PEER_IF/statistics/rx_errors" \
    > "$RW/peer_rx_errors.txt" 2>&1
echo $? > "$RW/peer_rx_errors.rc"
python3 -m eembridge stats --socket "$SOCK" --json > "$RW/stats.json" 2> "$RW/stats.err"
echo $? > "$RW/stats.rc"
python3 -m eembridge echo --socket "$SOCK" -c 3 --json > "$RW/echo.json" 2> "$RW/echo.err"
echo $? > "$RW/echo.rc"
stamp echo_done

# 4. Unplug + replug from the UDC while a TCP transfer is half-way: the first MB goes,
#    the sender pauses (the connection open, the rest pending), the gadget leaves the
#    bus, comes back (cdc_eem may grab it again; the bridge must take it back), and the
#    same TCP connection then delivers the rest, checked by SHA-256.
if [ "$LEVEL" = full ] && [ "$BRIDGE_UP" != 0 ]; then
    for f in replug_carrier_off replug_carrier_on replug replug_ping; do
        echo "not run: the bridge never came up" > "$RW/$f.rc"
    done
elif [ "$LEVEL" = full ]; then
    head -c $((4 * 1048576)) /dev/urandom > /tmp/replug.bin
    sha256sum < /tmp/replug.bin | cut -d' ' -f1 > "$RW/replug.sent"
    ip netns exec "$PEER_NS" sh -c "nc -d -l 5003 | sha256sum | cut -d' ' -f1 > $RW/replug.recv" &
    srv=$!
    wait_until 10 listening "$PEER_NS" 5003
    rm -f /tmp/half
    { dd if=/tmp/replug.bin bs=1M count=1 status=none; touch /tmp/half; sleep 4
      dd if=/tmp/replug.bin bs=1M skip=1 status=none; } | timeout 180 nc -N "$PEER_IP" 5003 &
    cli=$!
    wait_until 30 test -e /tmp/half
    stamp unplug
    bash "$INTEROP/gadget.sh" unplug
    wait_until 20 carrier_is "$TAP" 0
    echo $? > "$RW/replug_carrier_off.rc"
    stamp carrier_off
    sleep 0.5
    bash "$INTEROP/gadget.sh" replug
    wait_until 60 carrier_is "$TAP" 1
    echo $? > "$RW/replug_carrier_on.rc"
    stamp carrier_on
    # At once, while the new connection has done little: its counters add to the old.
    python3 -m eembridge stats --socket "$SOCK" --json > "$RW/stats_replugged.json" \
        2> "$RW/stats_replugged.err"
    echo $? > "$RW/stats_replugged.rc"
    wait $cli
    echo $? > "$RW/replug.rc"
    timeout 60 tail --pid=$srv -f /dev/null || kill $srv 2>/dev/null
    stamp replug_tcp_done
    interfaces > "$RW/interfaces_replugged.txt"
    ping -c 3 -i 0.2 -W 2 "$PEER_IP" > "$RW/replug_ping.txt" 2>&1
    echo $? > "$RW/replug_ping.rc"
fi

# 5. SIGTERM: a clean exit, and cdc_eem has the interface again.
kill -TERM $BRIDGE 2>/dev/null  # (already gone if it failed at start)
bridge_exit $BRIDGE bridge_exit
stamp bridge_exit
wait_until 20 eem_is_cdc_eem
interfaces > "$RW/interfaces_after.txt"
stamp done
true
