# The board farm stage of two_boards.sh (sourced at its end, after both bridges have
# stopped and both boards are back with cdc_eem): the two f_eem boards as labgrid sees
# them. A labgrid coordinator on loopback, `python -m eembridge.farm.export` (labgrid's
# exporter with EEMBoard) exporting board A (matched by udev's ID_SERIAL_SHORT) and
# board B (by its port, sys_name), and clients:
#   - labgrid-client creates place `farm-a`, matches board A, acquires it;
#   - farm_client.py (a test using EEMBridgeDriver through a RemotePlace) activates the
#     driver, runs TCP both ways over the TAP it names (SHA-256), stats(), echo();
#   - a second user's acquire of the locked place is refused;
#   - release: the exporter stops the bridge, the TAP is gone, cdc_eem is back;
#   - board B without the farm: an EEMBoard in the client's own environment, the driver
#     starts the bridge at activate and stops it at deactivate.
# Results under $RW/labgrid/ (test_guest_two_boards.py reads them).

LG=$RW/labgrid
mkdir -p "$LG"
export LG_COORDINATOR=127.0.0.1:20408 LG_USERNAME=farmer
declare -A FARM_TAP=([a]=farmA [b]=farmB)
stamp labgrid_start

lg() { labgrid-client "$@"; }
coordinator_up() { ss -Hltn 'sport = :20408' | grep -q .; }
tap_gone() { [ ! -e "/sys/class/net/$1" ]; }
# client_env FILE: a labgrid environment with EEMBridgeDriver; its resources from stdin.
client_env() {
    { printf 'targets:\n  main:\n    resources:\n'; cat
      printf '    drivers:\n      EEMBridgeDriver:\n        timeout: 240\nimports:\n  - eembridge.farm\n'
    } > "$1"
}
cdc_eem_has() { [ "$(driver_of "$(eem_intf "$1")")" = cdc_eem ]; }

(cd "$LG" && exec labgrid-coordinator -l 127.0.0.1:20408 > "$LG/coordinator.log" 2>&1) &
LG_COORD=$!
wait_until 120 coordinator_up
echo $? > "$LG/coordinator.rc"
stamp labgrid_coordinator_up

cat > "$LG/exporter.yaml" <<EOF
board-a:
  EEMBoard:
    match:
      ID_SERIAL_SHORT: ${SERIAL[a]}
    tap: ${FARM_TAP[a]}
    addresses: [${HOST_IP[a]}/24]
    peer: ${PEER_IP[a]}
board-b:
  EEMBoard:
    match:
      sys_name: ${PORT_b}
    tap: ${FARM_TAP[b]}
    addresses: [${HOST_IP[b]}/24]
    peer: ${PEER_IP[b]}
EOF
python3 -m eembridge.farm.export --name guest "$LG/exporter.yaml" > "$LG/exporter.log" 2>&1 &
LG_EXPORTER=$!
for b in a b; do udevadm info -q property "$(usb_path "$b")" > "$LG/udev_$b.txt" 2>&1; done

# Every labgrid command is a Python start-up of some 30 s in this guest: what does not
# depend on another runs alongside it. Board B on the client's own host, without the
# exporter (the driver owns its bridge), from now on:
client_env "$LG/local.yaml" <<EOF
      EEMBoard:
        match:
          ID_SERIAL_SHORT: ${SERIAL[b]}
        tap: farmLocal
        addresses: [${HOST_IP[b]}/24]
        peer: ${PEER_IP[b]}
EOF
python3 "$INTEROP/farm_client.py" "$LG/local.yaml" "$LG/client_b.json" -- \
    bash -c 'ping -c 3 -i 0.2 -W 2 -I "$TAP" "$PEER" > "$RW/lg_ping_b.txt" 2>&1' > "$LG/client_b.txt" 2>&1 &
LG_CLIENT_B=$!
# The place for board A, made while the exporter starts.
{ lg -p farm-a create && lg -p farm-a add-match "guest/board-a/RemoteEEMBoard"; } > "$LG/place.txt" 2>&1 &
LG_PLACE=$!
exporter_connected() { grep -q "connected to coordinator" "$LG/exporter.log"; }
wait_until 180 exporter_connected
echo $? > "$LG/exporter_up.rc"
wait $LG_PLACE
echo $? > "$LG/place.rc"
stamp labgrid_exporter_up

# Acquired as soon as the exporter has published board A as available.
acquire_a() { lg -p farm-a acquire >> "$LG/acquire.txt" 2>&1; }
wait_until 120 acquire_a
echo $? > "$LG/acquire.rc"
stamp labgrid_acquired

client_env "$LG/remote.yaml" <<EOF
      RemotePlace:
        name: farm-a
EOF
XFER='. "$INTEROP/lib.sh"; ping -c 3 -i 0.2 -W 2 -I "$TAP" "$PEER" > "$RW/lg_ping_a.txt" 2>&1 &&
      xfer lg_h2p_a h2p peera "$PEER" 5111 1 && xfer lg_p2h_a p2h peera "$PEER" 5112 1'
python3 "$INTEROP/farm_client.py" "$LG/remote.yaml" "$LG/client_a.json" -- bash -c "$XFER" \
    > "$LG/client_a.txt" 2>&1 &
LG_CLIENT_A=$!
# Meanwhile: another user cannot take the place while it is acquired, and what the
# coordinator lists as available (both boards, each matched by udev).
LG_USERNAME=intruder lg -p farm-a acquire > "$LG/intruder.txt" 2>&1
echo $? > "$LG/intruder.rc"
lg resources > "$LG/resources.txt" 2>&1
echo $? > "$LG/resources.rc"
wait $LG_CLIENT_A
echo $? > "$LG/client_a.rc"
stamp labgrid_client_done
ip -j link show dev "${FARM_TAP[a]}" > "$LG/held_link_a.json" 2>&1  # still up: still acquired

# Release: the exporter stops the bridge; its TAP goes, cdc_eem comes back.
lg -p farm-a release > "$LG/release.txt" 2>&1
echo $? > "$LG/release.rc"
wait_until 60 tap_gone "${FARM_TAP[a]}" && wait_until 30 cdc_eem_has a
echo $? > "$LG/released_gone.rc"
stamp labgrid_released

wait $LG_CLIENT_B
echo $? > "$LG/client_b.rc"
{ tap_gone farmLocal && cdc_eem_has b; }
echo $? > "$LG/local_gone.rc"
stamp labgrid_local_done

kill -TERM "$LG_EXPORTER" "$LG_COORD" 2>/dev/null
timeout 30 tail --pid="$LG_EXPORTER" -f /dev/null
timeout 30 tail --pid="$LG_COORD" -f /dev/null
stamp labgrid_done
