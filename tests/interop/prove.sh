#!/usr/bin/env bash
# Inside the guest: prove the real-peer plumbing with the kernel's own drivers
# (f_eem gadget <-> dummy_hcd <-> cdc_eem host) and record figures for NOTES.md.
# Run from the host:  python3 tests/interop/guest.py --rwdir build/interop/prove tests/interop/prove.sh
# Results: $RW/results.txt (KEY=VALUE), $RW/*.json, $RW/capture/*.pcap.
set -euo pipefail
: "${RW:?run through guest.py}" "${INTEROP:?}"
G=$INTEROP/gadget.sh
res=$RW/results.txt
up() { cut -d' ' -f1 /proc/uptime; }
rec() { echo "$1=$2" | tee -a "$res"; }
: >"$res"
rec boot_uptime_s "$(up)"
rec guest_python "$(command -v python3)"
rec guest_imports "$(python3 -c 'import usb, pytun, pyroute2, numpy; print("usb pytun pyroute2 numpy ok")')"

xfer() {  # xfer TAG PORT N DIRECTION(host->peer|peer->host): TCP N bytes, sha256 checked
    local tag=$1 port=$2 n=$3 dir=$4 want got_s got_r
    if [ "$dir" = "host->peer" ]; then
        ip netns exec peer python3 "$INTEROP/tcpxfer.py" serve --port "$port" --recv >"$RW/$tag.recv.json" &
        python3 "$INTEROP/tcpxfer.py" connect "$PEER_IP" "$port" --send "$n" >"$RW/$tag.send.json"
    else
        ip netns exec peer python3 "$INTEROP/tcpxfer.py" serve --port "$port" --send "$n" >"$RW/$tag.send.json" &
        python3 "$INTEROP/tcpxfer.py" connect "$PEER_IP" "$port" --recv >"$RW/$tag.recv.json"
    fi
    wait $!
    want=$(python3 "$INTEROP/tcpxfer.py" expect "$n")
    got_s=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$RW/$tag.send.json")
    got_r=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["sha256"], d["mbit_s"])' "$RW/$tag.recv.json")
    [ "$got_s" = "$want" ] && [ "${got_r% *}" = "$want" ] || { rec "${tag}_sha256" MISMATCH; return 1; }
    rec "${tag}_sha256_ok_mbit_s" "${got_r#* }"
}

iperf() {  # iperf TAG [-R]: 5 s of TCP, client on the host side; -R: peer sends
    local tag=$1
    shift
    ip netns exec peer iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
    sleep 0.5
    iperf3 -c "$PEER_IP" -p 5201 -t 5 -J "$@" >"$RW/$tag.json"
    wait $!
    rec "${tag}_mbit_s" "$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; print(round(e["sum_received"]["bits_per_second"]/1e6, 1))' "$RW/$tag.json")"
}

describe_usb() {  # speed, endpoint max packet sizes, interface triple, driver
    local s=$1 d=$USB_PATH i
    i=$(ls -d "$d"/*:1.0)
    rec "${s}_usb_speed" "$(cat "$d/speed")"
    rec "${s}_bus" "$(cat "$d/busnum") (root hub speed $(cat "/sys/bus/usb/devices/usb$(cat "$d/busnum")/speed"))"
    rec "${s}_ep0_maxpacket" "$((16#$(cat "$d/ep_00/wMaxPacketSize")))"
    for e in "$i"/ep_*; do
        rec "${s}_$(basename "$e")_$(cat "$e/type")_$(cat "$e/direction")_maxpacket" "$((16#$(cat "$e/wMaxPacketSize")))"
    done
    rec "${s}_interface_class" "$(cat "$i/bInterfaceClass")/$(cat "$i/bInterfaceSubClass")/$(cat "$i/bInterfaceProtocol")"
    rec "${s}_interface_driver" "$(basename "$(readlink -f "$i/driver")")"
}

for speed in full super high; do
    t=$(up)
    bash "$G" down
    bash "$G" up "$speed" >"$RW/env_$speed.txt"
    rec "${speed}_gadget_up_s" "$(python3 -c "print(round($(up) - $t, 2))")"
    # shellcheck disable=SC1090
    . "$RW/env_$speed.txt"
    describe_usb "$speed"
    ping -c 3 -i 0.2 -W 2 "$PEER_IP" >"$RW/ping_$speed.txt"
    rec "${speed}_ping" "$(tail -1 "$RW/ping_$speed.txt")"
    xfer "${speed}_1MB_h2p" 5001 1048576 "host->peer"
    xfer "${speed}_1MB_p2h" 5002 1048576 "peer->host"
    iperf "${speed}_iperf_h2p"
    iperf "${speed}_iperf_p2h" -R
done

# High speed stays up from here on: the main figures and checks.
t=$(up)
xfer high_8MB_h2p 5003 8388608 "host->peer"
xfer high_8MB_p2h 5004 8388608 "peer->host"
rec high_16MB_total_s "$(python3 -c "print(round($(up) - $t, 2))")"

# Captures of a short exchange (kept as the test fixture by make_fixture.py).
bash "$INTEROP/capture.sh" "$RW/capture" "$HOST_IF" "$PEER_IP"
rec capture_bytes "usbmon $(stat -c %s "$RW/capture/usbmon.pcap") eth $(stat -c %s "$RW/capture/eth.pcap")"

# pyusb/libusb: list, take the interface from cdc_eem via sysfs, talk EEM, give it back.
python3 -c "import usb.core; print(list(usb.core.find(find_all=True)))" >"$RW/pyusb_list.txt"
rec pyusb_devices "$(python3 -c "import usb.core; print(len(list(usb.core.find(find_all=True))))")"
python3 "$INTEROP/pyusb_probe.py" --detach sysfs >"$RW/pyusb_probe_sysfs.json" && rec pyusb_probe_sysfs ok || rec pyusb_probe_sysfs FAILED
HOST_IF=$(bash "$G" wait-host 20)
bash "$G" host-setup "$HOST_IF"
rec after_rebind_host_if "$HOST_IF"
ping -c 2 -i 0.2 -W 2 "$PEER_IP" >/dev/null && rec after_rebind_ping ok
python3 "$INTEROP/pyusb_probe.py" --detach libusb >"$RW/pyusb_probe_libusb.json" && rec pyusb_probe_libusb ok || rec pyusb_probe_libusb FAILED
HOST_IF=$(bash "$G" wait-host 20)
bash "$G" host-setup "$HOST_IF"

# Unplug / replug through the UDC file.
t=$(up)
bash "$G" unplug
for _ in $(seq 50); do [ -e "$USB_PATH" ] || break; sleep 0.1; done
rec unplug_device_gone "$([ -e "$USB_PATH" ] && echo no || echo yes)"
rec unplug_peer_if_still_in_ns "$(ip -n peer -br link show "$PEER_IF" >/dev/null 2>&1 && echo yes || echo no)"
bash "$G" replug
HOST_IF=$(bash "$G" wait-host 30)
bash "$G" host-setup "$HOST_IF"
ping -c 2 -i 0.2 -W 2 "$PEER_IP" >/dev/null && rec replug_ping ok
rec replug_cycle_s "$(python3 -c "print(round($(up) - $t, 2))")"
rec end_uptime_s "$(up)"
