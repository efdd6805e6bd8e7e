#!/usr/bin/env bash
# eembridge's native data path against a LOSSY EEM device on real USB, run INSIDE the
# real-peer guest: ffs_eem_device.py (eembridge.sim's device model on FunctionFS
# endpoints of a configfs gadget on dummy_hcd) injects the simulator's faults, the
# bridge runs as users run it, a TCP peer sits behind the device's TAP in netns `peer`.
#
#   lossy.sh checks [SPEED...]        every check of test_guest_lossy.py, per speed
#   lossy.sh soak N [SPEED...]        N runs in a row per speed, both directions, each
#                                     with a deadline: complete or not, counters at a stall
#
# SPEED: full high super (default: all three, one after the other in this boot:
# dummy_hcd is reloaded with other options between them). Results as files under
# $RW/SPEED/ (NAME.rc = exit status, .json/.txt what it printed), so one failing step
# does not hide the others; timings.txt = guest uptime at each stage.
#
# Faults (per speed, on its own packet size): 2% of the IN packets lost, one bit flipped
# in IN_FLIP of them (by speed below), garbage that reads as an Echo Response of 2047
# bytes in front of the next packet every 200 frames (0.5%), an Echo from the device
# every 100 frames, OUT halted every OUT_STALL_EVERY reads and not read for BUSY_SECONDS
# every OUT_BUSY_EVERY reads (defaults by speed below). The device frames with CRC-32 at
# full and high speed and with the sentinel (as f_eem) at SuperSpeed, so flips meet both
# checks (IN_FRAMING=crc|sentinel and IN_FLIP=P set every speed's). checks: at UNPLUG_SPEEDS (default high) the gadget is also unbound from its UDC
# in the middle of a TCP transfer and bound again.
set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
# Stages per speed: $D/timings.txt, guest uptime at each.
stamp() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> "${D:-$RW}/timings.txt"; }

MODE=${1:?checks or soak}
shift
if [ "$MODE" = soak ]; then RUNS=${1:?number of runs}; shift; fi
SPEEDS=${*:-full high super}
G=/sys/kernel/config/usb_gadget/ffseem
FFS=/dev/ffs-eem
SERIAL=eembridge-ffs-0001
TAP=eem0
NS=peer
PEER_TAP=ffstap
HOST_IP=169.254.77.1
PEER_IP=169.254.77.2
SOCK=/tmp/eembridge-$TAP.sock   # guest tmpfs: UNIX sockets do not work on the 9p rwdir
IN_LOSS=${IN_LOSS:-0.02}
GARBAGE_EVERY=${GARBAGE_EVERY:-200}
ECHO_EVERY=${ECHO_EVERY:-100}
# OUT reads between halts and between busy periods, by speed (a few of each per run
# at its payload: about 200 OUT reads at full speed, 1300 at high and SuperSpeed).
declare -A STALL_EVERY=([full]=${OUT_STALL_EVERY:-50} [high]=${OUT_STALL_EVERY:-150} [super]=${OUT_STALL_EVERY:-150})
declare -A BUSY_EVERY=([full]=${OUT_BUSY_EVERY:-90} [high]=${OUT_BUSY_EVERY:-400} [super]=${OUT_BUSY_EVERY:-400})
BUSY_SECONDS=${BUSY_SECONDS:-2}
# Flips per IN packet: at full speed a frame spans 24 packets (0.3% flips 7% of full
# frames, on top of the 38.6% the loss takes), at high and SuperSpeed 2-3 (0.5%: 1-1.5%).
declare -A FLIP=([full]=${IN_FLIP:-0.003} [high]=${IN_FLIP:-0.005} [super]=${IN_FLIP:-0.005})
declare -A FRAMING=([full]=${IN_FRAMING:-crc} [high]=${IN_FRAMING:-crc} [super]=${IN_FRAMING:-sentinel})
UNPLUG_SPEEDS=${UNPLUG_SPEEDS:-high}

# payload bytes each way and the deadline of one transfer, by speed
# At full speed 2% of the 64-byte packets lost is 38.6% of full-size frames lost: the
# peer's TCP spends long stretches in RTO backoff (each retransmission lost again with
# that chance), so small payloads and long deadlines there.
declare -A XFER_BYTES=([full]=${FULL_BYTES:-98304} [high]=1048576 [super]=1048576)
declare -A DEADLINE=([full]=${FULL_DEADLINE:-300} [high]=${DEADLINE_HS:-120} [super]=${DEADLINE_HS:-120})
declare -A HCD_OPTS=([full]="is_high_speed=0 is_super_speed=0"
                     [high]="is_high_speed=1 is_super_speed=0"
                     [super]="is_high_speed=1 is_super_speed=1")
declare -A SYSFS_SPEED=([full]=12 [high]=480 [super]=5000)

DEVICE=""
BRIDGE=""
CAPTURE=""

usb_path() {  # the host side of our gadget, by serial
    local d
    for d in /sys/bus/usb/devices/*; do
        [ -f "$d/serial" ] && [ "$(cat "$d/serial")" = "$SERIAL" ] && { echo "$d"; return 0; }
    done
    return 1
}

# ffs_up SPEED: dummy_hcd at SPEED, the configfs gadget with one FunctionFS function,
# the device program on it (it writes the descriptors), then bind: env.txt in $D.
ffs_up() {
    local speed=$1 p
    [ ! -d /sys/module/dummy_hcd ] || modprobe -r dummy_hcd
    # shellcheck disable=SC2086
    modprobe dummy_hcd ${HCD_OPTS[$speed]}
    mkdir -p "$G/strings/0x409" "$G/configs/c.1/strings/0x409" "$G/functions/ffs.eem"
    echo 0x1d6b > "$G/idVendor"; echo 0x0104 > "$G/idProduct"
    echo 0x0200 > "$G/bcdUSB"; echo 0x0100 > "$G/bcdDevice"
    echo "$SERIAL" > "$G/strings/0x409/serialnumber"
    echo "eembridge" > "$G/strings/0x409/manufacturer"
    echo "lossy EEM device (FunctionFS)" > "$G/strings/0x409/product"
    echo EEM > "$G/configs/c.1/strings/0x409/configuration"
    [ -e "$G/configs/c.1/ffs.eem" ] || ln -s "$G/functions/ffs.eem" "$G/configs/c.1/"
    mkdir -p "$FFS"
    mountpoint -q "$FFS" || mount -t functionfs eem "$FFS"
    rm -f "$D/device.ready"
    local crc=()
    [ "${FRAMING[$speed]}" = sentinel ] || crc=(--crc)
    python3 "$INTEROP/ffs_eem_device.py" --ffs "$FFS" --speed "$speed" --tap "$PEER_TAP" \
        --ready "$D/device.ready" --state "$D/device.json" "${crc[@]}" \
        --seed "${SEED:-1}" --in-loss "$IN_LOSS" --in-flip "${FLIP[$speed]}" --garbage-every "$GARBAGE_EVERY" \
        --echo-every "$ECHO_EVERY" \
        --out-stall-every "${STALL_EVERY[$speed]}" --out-busy-every "${BUSY_EVERY[$speed]}" \
        --out-busy-seconds "$BUSY_SECONDS" > "$D/device.log" 2>&1 &
    DEVICE=$!
    # Python's start-up under TCG on a loaded host: minutes, not seconds.
    wait_until 300 test -e "$D/device.ready"
    echo $? > "$D/device_up.rc"
    ip link set "$PEER_TAP" netns "$NS"
    ip netns exec "$NS" sysctl -qw "net.ipv6.conf.$PEER_TAP.disable_ipv6=1"
    ip -n "$NS" addr add "$PEER_IP/24" dev "$PEER_TAP"
    ip -n "$NS" link set "$PEER_TAP" up
    stamp device_up
    echo dummy_udc.0 > "$G/UDC"
    wait_until 30 usb_path > /dev/null
    echo $? > "$D/usb.rc"
    p=$(usb_path)
    { echo "SPEED=$speed"; echo "USB_PATH=$p"; echo "USB_SPEED=$(cat "$p/speed" 2>/dev/null)"
      echo "PEER_TAP=$PEER_TAP"; echo "SERIAL=$SERIAL"
      echo "IN_LOSS=$IN_LOSS"; echo "IN_FLIP=${FLIP[$speed]}"; echo "FRAMING=${FRAMING[$speed]}"; echo "GARBAGE_EVERY=$GARBAGE_EVERY"; echo "ECHO_EVERY=$ECHO_EVERY"
      echo "OUT_STALL_EVERY=${STALL_EVERY[$speed]}"; echo "OUT_BUSY_EVERY=${BUSY_EVERY[$speed]}"
      echo "BUSY_SECONDS=$BUSY_SECONDS"; echo "XFER_BYTES=${XFER_BYTES[$speed]}"; } > "$D/env.txt"
    for p in "$p"/*:*; do echo "$(basename "$p") $(intf_class "$p") $(driver_of "$p")"; done \
        > "$D/interfaces.txt"
    stamp usb_up
}

ffs_down() {
    if [ -n "$DEVICE" ]; then
        kill -TERM "$DEVICE" 2>/dev/null
        timeout 30 tail --pid="$DEVICE" -f /dev/null || kill -KILL "$DEVICE" 2>/dev/null
        wait "$DEVICE" 2>/dev/null
        echo $? > "$D/device_exit.rc"
    fi
    DEVICE=""
    [ -z "$(cat "$G/UDC" 2>/dev/null)" ] || echo "" > "$G/UDC"
    ! mountpoint -q "$FFS" || umount "$FFS"
    rm -f "$G/configs/c.1/ffs.eem"
    rmdir "$G/configs/c.1/strings/0x409" "$G/configs/c.1" "$G/functions/ffs.eem" \
        "$G/strings/0x409" "$G" 2>/dev/null
    [ ! -d /sys/module/dummy_hcd ] || modprobe -r dummy_hcd
}

# The bridge runs once for every speed of the boot: dummy_hcd's reload between speeds is
# an unplug to it, and it takes the device back when the next speed's gadget binds
# (Python's start-up under TCG costs more than a transfer).
bridge_start() {
    python3 -m eembridge --tap "$TAP" --ip "$HOST_IP/24" --serial "$SERIAL" \
        --stats-socket "$SOCK" -v > "$RW/bridge.log" 2>&1 &
    BRIDGE=$!
}

bridge_connected() {  # carrier on the TAP within 150 s (the first start-up) as $D/bridge_up.rc
    bridge_up "$BRIDGE" "$TAP" 150 > "$D/bridge_up.txt"
    echo $? > "$D/bridge_up.rc"
    stamp bridge_up
}

bridge_stop() {
    [ -n "$BRIDGE" ] || return 0
    kill -TERM "$BRIDGE" 2>/dev/null
    D=$RW bridge_exit "$BRIDGE" bridge_exit
    BRIDGE=""
}

# stats NAME: the bridge's counters (the control socket's one JSON line) in $D/NAME.json.
# nc rather than `eembridge stats --socket`: the same request and answer without a
# Python start-up in the guest.
stats() {
    printf '{"cmd": "stats"}\n' | timeout 20 nc -N -U "$SOCK" > "$D/$1.json" 2> "$D/$1.err"
    echo $? > "$D/$1.rc"
}

state_written_since() {  # state_written_since MTIME: device.json replaced since then
    [ "$(stat -c %.9Y "$D/device.json" 2>/dev/null)" != "$1" ]
}

device_state() {  # device_state NAME: the device's state now, in $D/NAME.json
    local before
    # mtime in ns (seconds alone, or a `test` whose $(...) is expanded once when
    # wait_until is called, waited the whole 20 s at every snapshot)
    before=$(stat -c %.9Y "$D/device.json" 2>/dev/null)
    kill -USR1 "$DEVICE" 2>/dev/null || return 1
    wait_until 20 state_written_since "$before"
    echo $? > "$D/$1.rc"
    cp "$D/device.json" "$D/$1.json"
}

# lossy_xfer NAME h2p|p2h BYTES SECONDS: random bytes over TCP (nc) from the host to the
# peer (h2p) or back (p2h), each end hashing what it saw, the client given SECONDS.
# NAME.sent/.recv digests, NAME.rc the client's status (124: deadline missed),
# NAME.seconds. At a missed deadline, while the connection is still stuck and before
# anything is torn down: the bridge's counters, the device's state, both TCP ends and
# the interfaces' queues as NAME.stall_*; the same as NAME.slow_* (once, the transfer
# goes on) when it is still running after SNAPSHOT_AFTER seconds, if that is set.
lossy_xfer() {
    local name=$1 dir=$2 bytes=$3 limit=$4 port=$((5000 + RANDOM % 2000)) srv cli rc t0 end
    head -c "$bytes" /dev/urandom > "/tmp/$name.bin"
    sha256sum < "/tmp/$name.bin" | cut -d' ' -f1 > "$D/$name.sent"
    rm -f "$D/$name.recv"
    t0=$SECONDS
    if [ "$dir" = h2p ]; then
        ip netns exec "$NS" sh -c "nc -d -l $port | sha256sum | cut -d' ' -f1 > $D/$name.recv" &
        srv=$!
        wait_until 10 listening "$NS" "$port"
        nc -N "$PEER_IP" "$port" < "/tmp/$name.bin" &
    else
        ip netns exec "$NS" sh -c "nc -N -l $port < /tmp/$name.bin" &
        srv=$!
        wait_until 10 listening "$NS" "$port"
        nc -d "$PEER_IP" "$port" > "/tmp/$name.got" &
    fi
    cli=$!
    end=$((t0 + limit))
    while kill -0 $cli 2>/dev/null && [ $SECONDS -lt $end ]; do
        # Slow but not over: what it looks like (once), and let it go on.
        if [ -n "${SNAPSHOT_AFTER:-}" ] && [ $SECONDS -ge $((t0 + SNAPSHOT_AFTER)) ] \
                && [ ! -e "$D/$name.slow_tcp.txt" ]; then
            stall_capture "$name" slow
        fi
        sleep 0.2
    done
    if kill -0 $cli 2>/dev/null; then
        stall_capture "$name" stall
        kill $cli 2>/dev/null
        wait $cli
        rc=124
    else
        wait $cli
        rc=$?
    fi
    [ "$dir" = h2p ] || sha256sum < "/tmp/$name.got" | cut -d' ' -f1 > "$D/$name.recv"
    echo $rc > "$D/$name.rc"
    echo $((SECONDS - t0)) > "$D/$name.seconds"
    [ $rc = 0 ] || kill "$srv" 2>/dev/null
    timeout 30 tail --pid=$srv -f /dev/null || kill $srv 2>/dev/null
    rm -f "/tmp/$name.bin" "/tmp/$name.got"
    [ $rc = 0 ] && [ "$(cat "$D/$name.recv" 2>/dev/null)" = "$(cat "$D/$name.sent")" ]
}

stall_capture() {  # stall_capture NAME KIND: everything that says where a transfer is stuck
    local name=$1 kind=$2
    stats "$name.${kind}_stats"
    device_state "$name.${kind}_device"
    {
        echo "# host (root netns): ss -tinmoe"; ss -tinmoe
        echo "# peer (netns $NS): ss -tinmoe"; ip netns exec "$NS" ss -tinmoe
        echo "# host /proc/net/snmp"; cat /proc/net/snmp
        echo "# host /proc/net/netstat"; cat /proc/net/netstat
        echo "# peer /proc/net/snmp"; ip netns exec "$NS" cat /proc/net/snmp
        echo "# peer /proc/net/netstat"; ip netns exec "$NS" cat /proc/net/netstat
        echo "# host $TAP"; ip -s link show "$TAP"; tc -s qdisc show dev "$TAP"
        echo "# peer $PEER_TAP"; ip netns exec "$NS" ip -s link show "$PEER_TAP"
        ip netns exec "$NS" tc -s qdisc show dev "$PEER_TAP"
    } > "$D/$name.${kind}_tcp.txt" 2>&1
    # and once more 10 s later: what moved meanwhile
    sleep 10
    stats "$name.${kind}_stats_10s"
    device_state "$name.${kind}_device_10s"
    { echo "# host"; ss -tinmoe; echo "# peer"; ip netns exec "$NS" ss -tinmoe; } > "$D/$name.${kind}_tcp_10s.txt" 2>&1
}

# tap_capture_start / tap_capture_stop: every frame the bridge writes to its TAP (what it
# delivered) in $D/tap_in.pcap, for the test to compare with what the device sent.
tap_capture_start() {
    rm -f /tmp/tap_in.pcap
    tcpdump -i "$TAP" -Q in -n -s 0 -B 8192 -w /tmp/tap_in.pcap > /dev/null 2> "$D/tap_capture.txt" &
    CAPTURE=$!
    wait_until 30 grep -q "listening on" "$D/tap_capture.txt"
    echo $? > "$D/tap_capture_start.rc"
}

tap_capture_stop() {
    kill -INT "$CAPTURE"
    wait "$CAPTURE"
    echo $? > "$D/tap_capture.rc"
    cp /tmp/tap_in.pcap "$D/tap_in.pcap"
}

tap_sent_since() {  # tap_sent_since BASE N: the TAP has given the bridge N bytes since BASE
    local now
    read -r now < "/sys/class/net/$TAP/statistics/tx_bytes"
    [ $((now - $1)) -ge "$2" ]
}

log_lines() { wc -l < "$RW/bridge.log"; }

# The gadget unbound from its UDC in the middle of a TCP transfer host -> peer (a third
# of it through), bound again as soon as the bridge has seen it go; the transfer must
# finish over the same connection (TCP resends across the gap) and a new one after.
# Its stats in stats_unplug_{before,after}, the bridge's log lines of the stage between
# the line numbers in unplug_log.txt.
one_speed_unplug() {
    local speed=$1 bytes=2097152 base xfer
    stats stats_unplug_before
    log_lines > "$D/unplug_log.txt"
    read -r base < "/sys/class/net/$TAP/statistics/tx_bytes"
    lossy_xfer unplug_h2p h2p "$bytes" "${DEADLINE[$speed]}" &
    xfer=$!
    wait_until 60 tap_sent_since "$base" $((bytes / 3))
    echo $? > "$D/unplug_under_way.rc"
    stamp unplug
    echo "" > "$G/UDC"
    wait_until 30 carrier_is "$TAP" 0
    echo $? > "$D/unplug_carrier_off.rc"
    stamp unplugged
    echo dummy_udc.0 > "$G/UDC"
    wait_until 60 carrier_is "$TAP" 1
    echo $? > "$D/replug_carrier_on.rc"
    stamp replugged
    wait "$xfer"
    stamp unplug_h2p_done
    lossy_xfer unplug_p2h p2h "${XFER_BYTES[$speed]}" "${DEADLINE[$speed]}"
    stamp unplug_p2h_done
    stats stats_unplug_after
    log_lines >> "$D/unplug_log.txt"
}

peer_tcp() {  # the peer's TCP counters (RetransSegs: what TCP resent) in $D/NAME.txt
    ip netns exec "$NS" cat /proc/net/snmp > "$D/$1.txt"
}

one_speed_checks() {
    local speed=$1
    ffs_up "$speed"
    [ -n "$BRIDGE" ] || bridge_start
    bridge_connected
    stats stats_before
    tap_capture_start
    ping -c 5 -i 0.2 -W 2 "$PEER_IP" > "$D/ping.txt" 2>&1
    echo $? > "$D/ping.rc"
    peer_tcp peer_tcp_before
    lossy_xfer h2p h2p "${XFER_BYTES[$speed]}" "${DEADLINE[$speed]}"
    stamp h2p_done
    lossy_xfer p2h p2h "${XFER_BYTES[$speed]}" "${DEADLINE[$speed]}"
    stamp p2h_done
    tap_capture_stop
    peer_tcp peer_tcp_after
    device_state device_before_stats
    stats stats
    device_state device_after_stats
    case " $UNPLUG_SPEEDS " in *" $speed "*) one_speed_unplug "$speed" ;; esac
    ffs_down  # the device's final state (device.json), then the gadget goes
    wait_until 30 carrier_is "$TAP" 0
    echo $? > "$D/carrier_off.rc"
    stamp down
}

# soak: N runs in a row at this speed with one device and one bridge, alternating
# direction within each run; results.txt has one line per transfer.
one_speed_soak() {
    local speed=$1 i dir ok
    ffs_up "$speed"
    [ -n "$BRIDGE" ] || bridge_start
    bridge_connected
    stats stats_before
    ping -c 3 -i 0.2 -W 2 "$PEER_IP" > "$D/ping.txt" 2>&1
    for ((i = 1; i <= RUNS; i++)); do
        for dir in h2p p2h; do
            if lossy_xfer "run${i}_$dir" "$dir" "${XFER_BYTES[$speed]}" "${DEADLINE[$speed]}"; then
                ok=complete
            else
                ok=incomplete
            fi
            echo "$speed $i $dir $ok rc=$(cat "$D/run${i}_$dir.rc") seconds=$(cat "$D/run${i}_$dir.seconds")" \
                | tee -a "$RW/results.txt"
        done
    done
    device_state device_before_stats
    stats stats
    ffs_down
    wait_until 30 carrier_is "$TAP" 0
    stamp down
}

modprobe libcomposite
modprobe usb_f_fs
[ -e /dev/net/tun ] || modprobe tun
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
ip netns add "$NS"
ip -n "$NS" link set lo up
for speed in $SPEEDS; do
    D=$RW/$speed
    mkdir -p "$D"
    stamp "${speed}_start"
    "one_speed_$MODE" "$speed"
done
D=$RW
bridge_stop
stamp done
true
