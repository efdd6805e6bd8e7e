#!/usr/bin/env bash
# Inside the guest, with the gadget up (gadget.sh up): capture a short exchange over
# cdc_eem twice at once, as USB traffic (usbmon0: every bus, URB-level with data) and
# as Ethernet on the host-side netdev. Writes OUTDIR/usbmon.pcap and OUTDIR/eth.pcap.
#   capture.sh OUTDIR HOST_IF PEER_IP [BYTES]
# The exchange: 3 pings, then BYTES (default 16384) of TCP each way (tcpxfer.py).
set -euo pipefail
out=$1 host_if=$2 peer_ip=$3 nbytes=${4:-16384}
here=$(dirname "$(readlink -f "$0")")
mkdir -p "$out"
modprobe usbmon
# -Z root: Debian's tcpdump drops to user tcpdump, who may not write to the rwdir.
# -s 0: whole URBs/frames; --immediate-mode: nothing stuck in a buffer at SIGINT.
tcpdump -Z root -i usbmon0 -s 0 --immediate-mode -w "$out/usbmon.pcap" 2>"$out/usbmon.tcpdump.log" &
p1=$!
tcpdump -Z root -i "$host_if" -s 0 --immediate-mode -w "$out/eth.pcap" 2>"$out/eth.tcpdump.log" &
p2=$!
# Start traffic only once both are listening.
for _ in $(seq 100); do
    grep -q listening "$out/usbmon.tcpdump.log" && grep -q listening "$out/eth.tcpdump.log" && break
    sleep 0.1
done
ping -c 3 -i 0.2 "$peer_ip" >"$out/ping.txt"
ip netns exec peer python3 "$here/tcpxfer.py" serve --port 5101 --recv >"$out/xfer_peer_recv.json" &
python3 "$here/tcpxfer.py" connect "$peer_ip" 5101 --send "$nbytes" >"$out/xfer_host_send.json"
wait $!
ip netns exec peer python3 "$here/tcpxfer.py" serve --port 5102 --send "$nbytes" --seed 2 >"$out/xfer_peer_send.json" &
python3 "$here/tcpxfer.py" connect "$peer_ip" 5102 --recv >"$out/xfer_host_recv.json"
wait $!
sleep 0.5  # let the last ACKs and URB completions land
kill -INT "$p1" "$p2"
wait "$p1" "$p2" || true
cat "$out/usbmon.tcpdump.log" "$out/eth.tcpdump.log"
