#!/usr/bin/env bash
# `--link user` against the kernel's f_eem gadget, run INSIDE the real-peer guest after
# tun_checks.sh in the same boot (the gadget is up, cdc_eem holds it again): results as
# files under $RW, read by test_guest_eembridge.py.
#
#   RW=DIR GADGET_ENV=FILE user_checks.sh     FILE: the env.txt gadget.sh up wrote
#
# The bridge runs as nobody with no capability at all (as test_badinput_cli.nobody_argv
# starts it on the host), reaching the device through the node's group as the udev rule
# of privs_checks.sh gives it. The board keeps its address ($PEER_IP); the bridge's side
# (libslirp's gateway) is $HOST_IP, and each of two forwarded localhost ports reaches the
# board's TCP server, one per direction, by SHA-256 at both ends. Then SIGTERM, and
# nothing of the bridge is left: no process, no interface, no listener.
SOCK_DIR=/tmp/eembridge-user  # guest tmpfs, owned by nobody: its stats socket
SOCK=$SOCK_DIR/stats.sock
PORT_H2P=5021
PORT_P2H=5022
XFER_MB=3

set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
# shellcheck disable=SC1090
. "${GADGET_ENV:?the env.txt of gadget.sh up}"
stamp user_start

interfaces() { ip -o link show | awk -F': ' '{print $2}' | sort; }
listeners() { ss -Hltn | awk '{print $4}' | sort; }

# The device node now (tun_checks.sh replugged the gadget: a new device number).
NODE=$(node_to_nogroup)
ls -l "$NODE" > "$RW/node.txt" 2>&1
mkdir -p "$SOCK_DIR" && chown nobody:nogroup "$SOCK_DIR"

# The board learns the gateway (libslirp's MAC, not the TUN's) by ARP, as a board would.
ip -n "$PEER_NS" neigh flush dev "$PEER_IF"
ip addr flush dev "$HOST_IF" 2>/dev/null  # cdc_eem's netdev: its address is the gateway's now
interfaces > "$RW/interfaces_before.txt"
listeners > "$RW/listeners_before.txt"

# nobody, no capability (lib.sh's nobody_start).
nobody_start "$RW/bridge.log" \
    python3 -m eembridge --link user --ip "$HOST_IP/24" --peer "$PEER_IP" --serial "$SERIAL" \
    --forward "tcp:$PORT_H2P:$PORT_H2P" --forward "tcp:$PORT_P2H:$PORT_P2H" \
    --stats-socket "$SOCK" -v
BRIDGE=$NOBODY_PID
echo "$BRIDGE" > "$RW/bridge.pid"
wait_until 120 bridge_connected
echo $? > "$RW/user_up.rc"
stamp user_up
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' \
    "/proc/$BRIDGE/status" > "$RW/proc_status.txt" 2>&1
interfaces > "$RW/interfaces_running.txt"
listeners > "$RW/listeners_running.txt"

# TCP both ways through 127.0.0.1, the board's server in its namespace.
xfer user_h2p h2p "$PEER_NS" 127.0.0.1 $PORT_H2P $XFER_MB
xfer user_p2h p2h "$PEER_NS" 127.0.0.1 $PORT_P2H $XFER_MB
stats stats_tcp
ip -n "$PEER_NS" neigh show dev "$PEER_IF" > "$RW/peer_neigh.txt" 2>&1
stamp user_tcp_done

# SIGTERM; then nothing left behind, and cdc_eem has the device again.
kill -TERM "$BRIDGE" 2>/dev/null
bridge_exit "$BRIDGE" user_exit
pgrep -u nobody -a > "$RW/nobody_processes.txt"
listeners > "$RW/listeners_after.txt"
wait_until 20 test -e "$USB_PATH/$EEM_INTF/driver"
driver_of "$USB_PATH/$EEM_INTF" > "$RW/driver_after.txt"
# cdc_eem's netdev is back, under the first free usbN (maybe not its old name).
wait_until 20 test -d "$USB_PATH/$EEM_INTF/net"
ls "$USB_PATH/$EEM_INTF/net" > "$RW/cdc_eem_netdev.txt" 2>&1
interfaces > "$RW/interfaces_after.txt"
echo "PORT_H2P=$PORT_H2P PORT_P2H=$PORT_P2H NODE=$NODE" > "$RW/user_env.txt"
stamp user_done
true
