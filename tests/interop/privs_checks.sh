#!/usr/bin/env bash
# Privileges and SIGKILL recovery against the kernel's f_eem gadget, run INSIDE the guest
# (one boot; results as files under $RW, read by test_guest_privs.py).
#
# 1. An unprivileged user (nobody:nogroup, CAP_NET_ADMIN as an ambient capability, as
#    setpriv or systemd's AmbientCapabilities= give it) is refused the device node while
#    no udev rule gives it access: one line naming the node and the fix.
# 2. A udev rule (GROUP="nogroup", MODE="0660") and the same user: the bridge runs; ping
#    and TCP both ways by SHA-256; /proc/PID/status shows what it holds after start-up.
# 3. SIGKILL: the kernel drops the claim, cdc_eem stays unbound (the fact, recorded);
#    `eembridge release` (as the same user, through the node) binds it again, and the
#    gadget's link works through cdc_eem (ping).
TAP=eem0
SOCK=/tmp/eembridge-privs.sock
XFER_MB=2
set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
stamp script_start
gadget_up high
export HOST_IP HOST_MAC
NODE=$(printf '/dev/bus/usb/%03d/%03d' "$BUSNUM" "$DEVNUM")
echo "$NODE" > "$RW/node.txt"

eem_driver() { driver_of "$USB_PATH/$EEM_INTF"; }
eem_is_cdc_eem() { [ "$(eem_driver)" = cdc_eem ]; }

# The unprivileged user. /root is mode 0700 on the host, and the host's Python lives
# under it: give the guest a /root that nobody may traverse, holding only .pyenv.
mkdir -p /tmp/pyenv-real
mount --bind /root/.pyenv /tmp/pyenv-real
mount -t tmpfs -o mode=0755 tmpfs /root
mkdir /root/.pyenv
mount --bind /tmp/pyenv-real /root/.pyenv
[ -e /dev/net/tun ] || modprobe tun
ls -l /dev/net/tun > "$RW/tun.txt"
# What systemd's RuntimeDirectory= would give the service's user: /run/eembridge, where
# the bridge records its claim (that record is what `release` works from).
mkdir -p /run/eembridge
chown nobody:nogroup /run/eembridge
as_user() {
    HOME=/tmp setpriv --reuid=nobody --regid=nogroup --init-groups \
        --inh-caps +net_admin --ambient-caps +net_admin "$@"
}
# In the background, so that $! is the bridge itself (subshell -> setpriv -> python, one
# process by exec), which SIGKILL must hit.
as_user_exec() {
    HOME=/tmp exec setpriv --reuid=nobody --regid=nogroup --init-groups \
        --inh-caps +net_admin --ambient-caps +net_admin "$@"
}
bridge_cmd=(python3 -m eembridge --tap "$TAP" --ip "$HOST_IP/24" --mac "$HOST_MAC"
            --serial "$SERIAL" --stats-socket "$SOCK" -v)

# 1. No access to the node yet (Debian's default: root:root 0664).
ls -l "$NODE" > "$RW/node_before.txt"
ip addr flush dev "$HOST_IF"
as_user timeout 120 "${bridge_cmd[@]}" > "$RW/denied.log" 2>&1
echo $? > "$RW/denied.rc"
stamp denied_done

# 2. A udev rule gives the device to group nogroup. Through udevd when it runs here
#    (virtme-ng-init starts the host's systemd-udevd), else the same mode by hand.
cat > /etc/udev/rules.d/70-eembridge-test.rules <<'EOF'
SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ATTR{idVendor}=="1d6b", ATTR{idProduct}=="0104", MODE="0660", GROUP="nogroup"
EOF
if pgrep -x systemd-udevd > /dev/null; then
    udevadm control --reload
    udevadm trigger --action=add "$USB_PATH"
    udevadm settle -t 10
    echo udev > "$RW/access_method.txt"
else
    chgrp nogroup "$NODE"
    chmod 0660 "$NODE"
    echo "chmod (no udevd)" > "$RW/access_method.txt"
fi
ls -l "$NODE" > "$RW/node_after.txt"
stat -c '%G %a' "$NODE" >> "$RW/node_after.txt"
# The trigger may make cdc_eem's netdev come back with another address: none on it.
ip addr flush dev "$HOST_IF" 2>/dev/null
as_user_exec "${bridge_cmd[@]}" > "$RW/bridge.log" 2>&1 &
BRIDGE=$!
bridge_up $BRIDGE "$TAP" 120 > "$RW/bridge_up.txt"
echo $? > "$RW/bridge_up.rc"
stamp bridge_up
grep -E '^(Uid|Gid|Cap[A-Za-z]+|NoNewPrivs):' "/proc/$BRIDGE/status" > "$RW/bridge_status.txt"
for t in /proc/$BRIDGE/task/*; do
    echo "$(basename "$t") $(awk '$1 == "CapEff:" {print $2}' "$t/status")"
done > "$RW/bridge_threads.txt"
ping -c 5 -i 0.2 -W 2 "$PEER_IP" > "$RW/ping.txt" 2>&1
echo $? > "$RW/ping.rc"
xfer h2p h2p "$PEER_NS" "$PEER_IP" 5001 $XFER_MB
xfer p2h p2h "$PEER_NS" "$PEER_IP" 5002 $XFER_MB
stamp tcp_done

# 3. SIGKILL: no chance to give cdc_eem back.
echo "$(eem_driver)" > "$RW/driver_bridged.txt"
kill -KILL $BRIDGE
wait $BRIDGE 2>/dev/null
echo $? > "$RW/killed.rc"
sleep 3  # anything the kernel would do by itself has had time
echo "$(eem_driver)" > "$RW/driver_killed.txt"
cat /run/eembridge/claims/*.json > "$RW/claim_killed.json" 2>/dev/null
stamp killed
as_user python3 -m eembridge release --serial "$SERIAL" > "$RW/release.txt" 2>&1
echo $? > "$RW/release.rc"
stamp released
wait_until 20 eem_is_cdc_eem
echo "$(eem_driver)" > "$RW/driver_released.txt"
ls /run/eembridge/claims/ > "$RW/claims_after.txt" 2>&1
IF=$(bash "$INTEROP/gadget.sh" wait-host 30)
echo "$IF" > "$RW/cdc_eem_if.txt"
bash "$INTEROP/gadget.sh" host-setup "$IF"
lower_up() { ip -o link show "$IF" | grep -q LOWER_UP; }
wait_until 10 lower_up
ping -c 5 -i 0.2 -W 2 "$PEER_IP" > "$RW/cdc_eem_ping.txt" 2>&1
echo $? > "$RW/cdc_eem_ping.rc"
stamp done
true
