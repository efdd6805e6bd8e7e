# Helpers shared by the in-guest check scripts (bridge_checks.sh, privs_checks.sh,
# two_boards.sh), sourced as `. "$INTEROP/lib.sh"`. Functions only: nothing runs on
# sourcing. Results go to files under $RW, one step's exit code in NAME.rc, so that one
# failing step does not hide the others (the pytest side reads them through
# bootresults.py). Polling by the clock, not by a count, and with builtins where a loop
# runs often: every fork costs milliseconds under TCG.

# stamp LABEL: guest uptime at LABEL, appended to timings.txt.
stamp() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> "$RW/timings.txt"; }

# stats NAME: the bridge's snapshot from its control socket $SOCK (one JSON line) in
# NAME.json, through nc: no Python start-up, 4-10 s each under TCG.
stats() {
    printf '{"cmd": "stats"}\n' | timeout 20 nc -N -U "$SOCK" > "$RW/$1.json" 2> "$RW/$1.err"
    echo $? > "$RW/$1.rc"
}

# bridge_connected: the bridge at control socket $SOCK has the device (its stats say so).
bridge_connected() {
    printf '{"cmd": "stats"}\n' | timeout 5 nc -N -U "$SOCK" 2>/dev/null | grep -q '"connected": true'
}

# wait_until SECONDS CMD...: retry CMD until it succeeds (0) or SECONDS have passed (1).
wait_until() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt "$end" ] || return 1
        sleep 0.1
    done
}

# carrier_is TAP 0|1 (builtins only: this runs in polling loops).
carrier_is() {
    local c=
    read -r c 2>/dev/null < "/sys/class/net/$1/carrier"
    [ "$c" = "$2" ]
}

# listening NS PORT: a TCP socket listens on PORT in namespace NS.
listening() { ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q .; }

# intf_class DIR: "CLASS/SUB/PROTO" of the USB interface at sysfs DIR (02/0c/07 is EEM).
intf_class() { echo "$(cat "$1/bInterfaceClass")/$(cat "$1/bInterfaceSubClass")/$(cat "$1/bInterfaceProtocol")"; }

# driver_of DIR: the driver bound to the USB interface at sysfs DIR, or none.
driver_of() {
    if [ -e "$1/driver" ]; then basename "$(readlink -f "$1/driver")"; else echo none; fi
}

# gadget_up SPEED [acm]: the configfs EEM gadget (gadget.sh up), its facts in env.txt and
# in this shell's variables. No gadget, no checks: exits the script.
gadget_up() {
    bash "$INTEROP/gadget.sh" up "$@" > "$RW/env.txt" || exit 1
    # shellcheck disable=SC1091
    . "$RW/env.txt"
    stamp gadget_up
}

# bridge_up PID TAP SECONDS: carrier on TAP within SECONDS (Python + libusb start-up
# under TCG), giving up as soon as process PID (the bridge) exits. Says why it failed.
bridge_up() {
    local pid=$1 tap=$2 end=$((SECONDS + $3))
    while [ $SECONDS -lt $end ]; do
        carrier_is "$tap" 1 && return 0
        kill -0 "$pid" 2>/dev/null || { echo "eembridge on $tap exited before carrier"; return 1; }
        sleep 0.1
    done
    echo "no carrier on $tap after $3 s"
    return 1
}

# bridge_exit PID NAME: after SIGTERM, the bridge's exit status in NAME.rc, or a line
# saying it was still running 30 s later (then SIGKILL).
bridge_exit() {
    local pid=$1 name=$2
    if timeout 30 tail --pid="$pid" -f /dev/null; then
        wait "$pid"
        echo $? > "$RW/$name.rc"
    else
        kill -KILL "$pid"
        echo "still running 30 s after SIGTERM" > "$RW/$name.rc"
    fi
}

# xfer NAME h2p|p2h NS PEER_IP PORT MB: MB of random bytes over TCP (nc), host to the
# peer in namespace NS (h2p) or back (p2h), each end hashing what it saw. NAME.sent /
# NAME.recv hold the two digests, NAME.rc the client's exit status, NAME.span the wall
# clock at start and end, NAME.seconds the time it took.
xfer() {
    local name=$1 dir=$2 ns=$3 ip=$4 port=$5 mb=$6 srv t0 t1 rc
    head -c $((mb * 1048576)) /dev/urandom > "/tmp/$name.bin"
    sha256sum < "/tmp/$name.bin" | cut -d' ' -f1 > "$RW/$name.sent"
    t0=$(date +%s.%N)
    if [ "$dir" = h2p ]; then
        ip netns exec "$ns" sh -c "nc -d -l $port | sha256sum | cut -d' ' -f1 > $RW/$name.recv" &
        srv=$!
        wait_until 10 listening "$ns" "$port"
        timeout 120 nc -N "$ip" "$port" < "/tmp/$name.bin"
    else
        ip netns exec "$ns" sh -c "nc -N -l $port < /tmp/$name.bin" &
        srv=$!
        wait_until 10 listening "$ns" "$port"
        timeout 120 nc -d "$ip" "$port" | sha256sum | cut -d' ' -f1 > "$RW/$name.recv"
    fi
    rc=$?
    echo $rc > "$RW/$name.rc"
    # A failed client leaves the server waiting for ever: stop it at once.
    if [ $rc != 0 ]; then kill $srv 2>/dev/null; fi
    timeout 30 tail --pid=$srv -f /dev/null || kill $srv 2>/dev/null
    t1=$(date +%s.%N)
    echo "$t0 $t1" > "$RW/$name.span"
    awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.3f\n", a - b}' > "$RW/$name.seconds"
}

# nobody_start LOG CMD...: start CMD in the background as nobody:nogroup with no
# capability at all, its output in LOG, its pid in NOBODY_PID (CMD's own: unshare, sh and
# setpriv each exec the next). The host's Python lives under /root (mode 0700): in a
# private mount namespace a world-readable tmpfs covers /root, holding only .pyenv.
nobody_start() {
    local log=$1
    shift
    mkdir -p /tmp/pyenv-stash
    unshare --mount --propagation private sh -c '
        mount --bind /root/.pyenv /tmp/pyenv-stash && mount -t tmpfs -o mode=755 tmpfs /root &&
        mkdir /root/.pyenv && mount --bind /tmp/pyenv-stash /root/.pyenv &&
        HOME=/tmp exec setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
            --bounding-set=-all --no-new-privs "$@"' sh "$@" > "$log" 2>&1 &
    NOBODY_PID=$!
}

# node_to_nogroup: the gadget's device node now (a replug gives it a new number), given
# to group nogroup as a udev rule (GROUP="nogroup", MODE="0660") would; prints its path.
# Needs USB_PATH (gadget.sh's env.txt).
node_to_nogroup() {
    local node
    node=$(printf '/dev/bus/usb/%03d/%03d' "$(cat "$USB_PATH/busnum")" "$(cat "$USB_PATH/devnum")")
    chgrp nogroup "$node" && chmod 0660 "$node" && echo "$node"
}
