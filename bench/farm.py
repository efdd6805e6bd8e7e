"""Many boards on one host: N f_eem gadgets on one dummy_hcd, eembridge vs cdc_eem, one boot.

In one guest boot (tests/interop/guest.py, TCG, 2 vCPUs unless --cpus): dummy_hcd with
one UDC per board, one configfs EEM gadget per UDC (same VID:PID, serials farm-board-I),
each peer netdev in its own namespace (169.254.(100+I).2/24). For each N in --counts,
first through cdc_eem, then through N eembridge bridges (one per board, by port):

- aggregate TCP throughput with all N boards transferring at once (one iperf3 per
  board, host -> board, then board -> host), and the guest's CPU per MB moved;
- for eembridge, memory per bridge (VmRSS and Pss of each process);
- the time from plug (all N gadgets bound to their UDCs at once, the host side already
  waiting: cdc_eem loaded, or the bridges running with --wait) to the first ping
  answered on each board (cdc_eem: the script adds the address once the netdev appears,
  as NetworkManager or a udev rule would).

Figures are emulation figures (TCG, dummy_hcd): only the ratios within one boot mean
something.

    python3 bench/farm.py [--counts 1,2,4,8] [--seconds 5] [--cpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))

from guest import GuestError, run_in_guest  # noqa: E402

USER_HZ = 100

# Runs inside the guest. Board I (0-based): UDC dummy_udc.I, namespace fpI, peer
# 169.254.(100+I).2, host side .1 (cdc_eem's netdev, or TAP feI).
SCRIPT = r"""
set +e
. "$INTEROP/lib.sh"
MAXN={maxn}
SECS={seconds}
COUNTS="{counts}"
G=/sys/kernel/config/usb_gadget
modprobe dummy_hcd num=$MAXN is_high_speed=1 is_super_speed=0
modprobe libcomposite; modprobe usb_f_eem; modprobe cdc_eem
[ -e /dev/net/tun ] || modprobe tun
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
for i in $(seq 0 $((MAXN - 1))); do
    d=$G/farm$i
    mkdir -p $d/strings/0x409 $d/configs/c.1/strings/0x409 $d/functions/eem.usb0
    echo 0x1d6b > $d/idVendor; echo 0x0104 > $d/idProduct; echo 0x0200 > $d/bcdUSB
    echo farm-board-$i > $d/strings/0x409/serialnumber
    echo EEM > $d/configs/c.1/strings/0x409/configuration
    printf '02:00:00:fa:%02x:02\n' $i > $d/functions/eem.usb0/dev_addr
    ln -s $d/functions/eem.usb0 $d/configs/c.1/
    echo dummy_udc.$i > $d/UDC
    ifn=$(cat $d/functions/eem.usb0/ifname)
    ip netns add fp$i
    ip link set $ifn netns fp$i
    ip -n fp$i link set lo up
    ip netns exec fp$i sysctl -qw net.ipv6.conf.$ifn.disable_ipv6=1
    ip -n fp$i addr add 169.254.$((100 + i)).2/24 dev $ifn
    ip -n fp$i link set $ifn up
    ip netns exec fp$i iperf3 -s -D -I /tmp/iperf3-$i.pid
done
port_of() {{  # the host-side USB device of board $1
    local d s
    for d in /sys/bus/usb/devices/*; do
        read -r s 2>/dev/null < $d/serial || continue
        [ "$s" = farm-board-$1 ] && {{ echo ${{d##*/}}; return 0; }}
    done
    return 1
}}
kernel_if() {{  # cdc_eem's netdev for board $1, if bound
    local p; p=$(port_of $1) || return 1
    ls /sys/bus/usb/devices/$p:1.0/net 2>/dev/null | head -1
}}
kernel_addr() {{  # the address on cdc_eem's netdev of board $1, once it exists
    local n; n=$(kernel_if $1); [ -n "$n" ] || return 1
    ip addr replace 169.254.$((100 + $1)).1/24 dev $n && ip link set $n up
}}
pings() {{ ping -c 1 -W 1 169.254.$((100 + $1)).2 > /dev/null 2>&1; }}
cpu() {{ local c rest; read -r c rest < /proc/stat; echo "$rest" > $1; }}
uptime_s() {{ local u rest; read -r u rest < /proc/uptime; echo $u; }}
wait_all() {{  # wait_all N SECONDS CMD: CMD I for every board, each until it succeeds
    local n=$1 s=$2 i; shift 2
    for i in $(seq 0 $((n - 1))); do wait_until $s "$@" $i || return 1; done
}}
transfer() {{  # TAG N: all N boards at once, each direction
    local tag=$1 n=$2 dir i pids
    for dir in h2p p2h; do
        pids=()
        cpu $RW/$tag-$dir.cpu0
        for i in $(seq 0 $((n - 1))); do
            iperf3 -c 169.254.$((100 + i)).2 -t $SECS -J $([ $dir = p2h ] && echo -R) \
                > $RW/$tag-$dir-$i.json 2>&1 & pids+=($!)
        done
        wait "${{pids[@]}}"
        cpu $RW/$tag-$dir.cpu1
    done
}}
replug() {{  # TAG N READY: unbind all N gadgets, bind them at once, time to first ping each
    local tag=$1 n=$2 ready=$3 i t0
    for i in $(seq 0 $((n - 1))); do echo "" > $G/farm$i/UDC; done
    sleep 2
    t0=$(uptime_s)
    for i in $(seq 0 $((n - 1))); do echo dummy_udc.$i > $G/farm$i/UDC; done
    : > $RW/$tag-plug.txt
    for i in $(seq 0 $((n - 1))); do
        wait_until 120 $ready $i && wait_until 60 pings $i
        echo "$i $(awk -v a=$(uptime_s) -v b=$t0 'BEGIN {{print a - b}}')" >> $RW/$tag-plug.txt
    done
}}
kernel_ready() {{ kernel_addr $1; }}
bridge_ready() {{ carrier_is fe$1 1; }}
for n in $COUNTS; do
    wait_all $MAXN 60 kernel_addr
    wait_all $n 30 pings
    transfer kernel-$n $n
    replug kernel-$n $n kernel_ready
    # The same boards through eembridge, one bridge each.
    BR=()
    t0=$(uptime_s)
    for i in $(seq 0 $((n - 1))); do
        python3 -m eembridge --tap fe$i --ip 169.254.$((100 + i)).1/24 --port $(port_of $i) \
            --stats-socket /tmp/fe$i.sock --wait > $RW/bridge-$n-$i.log 2>&1 & BR+=($!)
    done
    wait_all $n 300 bridge_ready
    echo "$(awk -v a=$(uptime_s) -v b=$t0 'BEGIN {{print a - b}}')" > $RW/eembridge-$n-start.txt
    wait_all $n 30 pings
    transfer eembridge-$n $n
    : > $RW/eembridge-$n-mem.txt
    for p in "${{BR[@]}}"; do
        echo "$(awk '/^VmRSS/ {{print $2}}' /proc/$p/status) $(awk '/^Pss:/ {{print $2}}' /proc/$p/smaps_rollup)" \
            >> $RW/eembridge-$n-mem.txt
    done
    replug eembridge-$n $n bridge_ready
    kill -TERM "${{BR[@]}}"
    for p in "${{BR[@]}}"; do timeout 30 tail --pid=$p -f /dev/null; done
done
echo done > $RW/done.txt
"""


def aggregate(rwdir: Path, tag: str, direction: str, n: int) -> dict[str, float]:
    mb = 0.0
    seconds = 0.0
    for i in range(n):
        data = json.loads((rwdir / f"{tag}-{direction}-{i}.json").read_text())
        mb += data["end"]["sum_received"]["bytes"] / 1e6
        seconds = max(seconds, data["end"]["sum_received"]["seconds"])
    before, after = ([int(x) for x in (rwdir / f"{tag}-{direction}.cpu{k}").read_text().split()] for k in (0, 1))
    d = [b - a for a, b in zip(before, after, strict=False)]
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    total = busy + d[3] + d[4]
    return {"mbps": mb * 8 / max(seconds, 1e-9), "mb": mb, "busy_pct": 100 * busy / max(total, 1),
            "cpu_ms_per_mb": busy * 1000 / USER_HZ / max(mb, 1e-9)}


def plug_times(rwdir: Path, tag: str) -> list[float]:
    return [float(line.split()[1]) for line in (rwdir / f"{tag}-plug.txt").read_text().splitlines()]


def collect(rwdir: Path, counts: list[int]) -> list[dict[str, object]]:
    rows = []
    for n in counts:
        row: dict[str, object] = {"boards": n}
        for mode in ("kernel", "eembridge"):
            tag = f"{mode}-{n}"
            for direction in ("h2p", "p2h"):
                row[f"{mode}_{direction}"] = aggregate(rwdir, tag, direction, n)
            row[f"{mode}_plug_s"] = plug_times(rwdir, tag)
        mem = [[int(x) for x in line.split()] for line in
               (rwdir / f"eembridge-{n}-mem.txt").read_text().splitlines()]
        row["rss_kb"] = statistics.mean(m[0] for m in mem)
        row["pss_kb"] = statistics.mean(m[1] for m in mem)
        row["bridges_start_s"] = float((rwdir / f"eembridge-{n}-start.txt").read_text())
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,4,8", help="board counts, comma-separated")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 time per direction")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rwdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--parse-only", action="store_true",
                    help="no boot: print the results already in --rwdir")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.counts.split(",")]
        if not counts or min(counts) < 1 or max(counts) > 16:
            raise ValueError
    except ValueError:
        print(f"farm.py: --counts {args.counts!r}: board counts from 1 to 16, comma-separated",
              file=sys.stderr)
        return 2
    if args.parse_only and args.rwdir is None:
        print("farm.py: --parse-only needs --rwdir", file=sys.stderr)
        return 2
    rwdir = args.rwdir or Path(tempfile.mkdtemp(prefix="eembridge-farm-"))
    script = SCRIPT.format(maxn=max(counts), seconds=args.seconds, counts=" ".join(map(str, counts)))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    guest_s = 0.0
    if not args.parse_only:
        try:
            res = run_in_guest(script, rwdir, timeout=3600, cpus=args.cpus).check()
        except GuestError as exc:
            print(f"farm.py: {exc}", file=sys.stderr)
            return 1
        guest_s = res.seconds
        if not (rwdir / "done.txt").exists():
            print(f"farm.py: the guest script stopped early; results so far in {rwdir}\n"
                  f"{res.output[-3000:]}", file=sys.stderr)
            return 1
    try:
        rows = collect(rwdir, counts)
    except (OSError, KeyError, ValueError) as exc:  # an iperf3 that failed, a step cut short
        print(f"farm.py: results incomplete ({type(exc).__name__}: {exc}); see {rwdir}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"date": started, "cpus": args.cpus, "seconds": args.seconds,
                          "guest_s": guest_s, "rows": rows}, indent=2))
        return 0
    print(f"{started}, {args.cpus} vCPUs (TCG), high speed, iperf3 {args.seconds} s per direction, "
          f"all boards at once; guest boot {guest_s:.0f} s; results in {rwdir}")
    print("| boards | dir | cdc_eem Mbit/s | eembridge Mbit/s | ratio | cdc_eem CPU ms/MB | "
          "eembridge CPU ms/MB | busy % k/e |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for d in ("h2p", "p2h"):
            k, e = row[f"kernel_{d}"], row[f"eembridge_{d}"]
            assert isinstance(k, dict) and isinstance(e, dict)
            print(f"| {row['boards']} | {d} | {k['mbps']:.1f} | {e['mbps']:.1f} | "
                  f"{e['mbps'] / max(k['mbps'], 1e-9):.2f} | {k['cpu_ms_per_mb']:.0f} | "
                  f"{e['cpu_ms_per_mb']:.0f} | {k['busy_pct']:.0f}/{e['busy_pct']:.0f} |")
    print("\n| boards | RSS per bridge MB | Pss per bridge MB | bridges started (s) | "
          "plug to first ping cdc_eem (s, max) | eembridge (s, max) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        kp, ep = row["kernel_plug_s"], row["eembridge_plug_s"]
        assert isinstance(kp, list) and isinstance(ep, list)
        print(f"| {row['boards']} | {float(row['rss_kb']) / 1024:.1f} | "  # type: ignore[arg-type]
              f"{float(row['pss_kb']) / 1024:.1f} | {row['bridges_start_s']:.0f} | "  # type: ignore[arg-type]
              f"{max(kp):.1f} | {max(ep):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
