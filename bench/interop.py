"""eembridge vs the kernel's cdc_eem on the same real peer (f_eem on dummy_hcd, one boot).

In one guest boot (tests/interop/guest.py, TCG, 2 vCPUs unless --cpus): bring the
gadget up, measure TCP throughput each way with iperf3 (server in the peer netns) and
ping RTT through cdc_eem; then hand the device to eembridge (it detaches cdc_eem) and
measure the same on the same gadget. Prints both and the ratios eembridge / cdc_eem
(throughput: higher is better; RTT: lower is better), then what each megabyte cost the
guest's CPUs and how much of that was the bridge process. Figures are emulation figures
(TCG, dummy_hcd): only the ratios within one boot mean something.

    python3 bench/interop.py [--speed high|super|full] [--cpus 2] [--seconds 5] [--rounds 1]
                             [--variant 'LABEL:[ENV=VALUE,...] [OPTIONS]'] [--tun] [--user]
                             [--links tap,tun,user] [--kernel-only] [--json]

--tun adds a row for the TUN link (`--link tun`, the variant 'tun:--link tun'): the same
gadget through eembridge's layer-3 link, after the TAP link's row.
--user adds one for the user link (`--link user`, the variant 'user:--link user'), run as
tests/interop/user_checks.sh runs it: as nobody with no capability, the device node given
to its group; iperf3 reaches the board's server through a forwarded localhost port (so
no ping row: there is no route to the board).
--links names the links to measure (instead of the TAP link alone, and of --tun and
--user), in that order, in one boot: e.g. `--links tap,tun,user`.
Every eembridge run also moves 2 MB each way by nc through the same path, SHA-256
checked at both ends (lib.sh's xfer): a run that corrupts data fails the bench.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))

from guest import GuestError, run_in_guest  # noqa: E402

# Runs inside the guest. measure TAG: iperf3 both ways ROUNDS times, then ping.
SCRIPT = r"""
trap 'echo "run.sh line $LINENO failed: $BASH_COMMAND" >&2' ERR  # set -e ends it: say where
. $INTEROP/lib.sh
bash $INTEROP/gadget.sh up {speed} > $RW/env.txt
. $RW/env.txt
ip netns exec $PEER_NS iperf3 -s -D -I /tmp/iperf3.pid
sleep 1
cpu() {{  # the guest's CPU ticks so far (all CPUs): user nice system idle iowait irq softirq,
    # then the bridge's (all its threads): user system
    local c u n s i w q sq rest f ut=0 st=0
    read -r c u n s i w q sq rest < /proc/stat
    if [ -n "${{BRIDGE:-}}" ] && read -r -a f 2>/dev/null < /proc/$BRIDGE/stat; then
        ut=${{f[13]}} st=${{f[14]}}
    fi
    echo "$u $n $s $i $w $q $sq $ut $st" > $1
}}
measure() {{  # TAG [PORT]: iperf3 to $PEER_IP:5201, or (PORT) to a forward at 127.0.0.1:PORT
    local tag=$1 target=$PEER_IP port=5201 r
    [ $# = 1 ] || {{ target=127.0.0.1 port=$2; }}
    for r in $(seq {rounds}); do
        if [ $r = 1 ] && [ $# = 1 ]; then  # RTT under a bulk upload: what queues on the way adds to it
            ping -c $(({seconds} * 4)) -i 0.25 -q $PEER_IP > $RW/$tag-loaded-ping.txt &
            PING=$!
        fi
        cpu $RW/$tag-h2p-$r.cpu0
        iperf3 -c $target -p $port -t {seconds} -J > $RW/$tag-h2p-$r.json
        cpu $RW/$tag-h2p-$r.cpu1
        [ $r != 1 ] || [ $# != 1 ] || wait $PING  # only it: the bridge runs in the background too
        cpu $RW/$tag-p2h-$r.cpu0
        iperf3 -c $target -p $port -t {seconds} -R -J > $RW/$tag-p2h-$r.json
        cpu $RW/$tag-p2h-$r.cpu1
    done
    [ $# != 1 ] || ping -c {pings} -i 0.1 -q $PEER_IP > $RW/$tag-ping.txt
    # The same path carries data intact, both ways (xfer records; Python checks). Not
    # under set -e (called in a list): a failed step is recorded, not the script's end.
    xfer $tag-sha-h2p h2p $PEER_NS $target $SHA_PORT 2 || true
    xfer $tag-sha-p2h p2h $PEER_NS $target $SHA_PORT 2 || true
}}
SHA_PORT=5212  # the board's nc for the SHA-256 check; on the user link, forwarded as it is
measure kernel
bridge_run() {{  # TAG "ENV=VALUE ..." "OPTIONS": measure through eembridge started so
    local tag=$1 envs=$2 opts=$3
    ip addr flush dev $HOST_IF 2>/dev/null || true  # after a run, cdc_eem's netdev is a new one
    ip -n $PEER_NS neigh flush dev $PEER_IF  # after a user link run: libslirp's MAC
    [ -e /dev/net/tun ] || modprobe tun
    env $envs python3 -m eembridge --tap eem0 --ip $HOST_IP/24 --mac $HOST_MAC --serial $SERIAL \
        --stats-socket /tmp/eem0.sock {bridge_args} $opts > $RW/$tag.log 2>&1 &
    BRIDGE=$!
    end=$((SECONDS + 120)); c=
    until [ "$c" = 1 ]; do  # builtins only: forks are slow under TCG
        kill -0 $BRIDGE || {{ echo "eembridge exited before carrier"; exit 1; }}
        [ $SECONDS -lt $end ] || {{ echo "no carrier on eem0 after 120 s"; exit 1; }}
        sleep 0.1
        read -r c 2>/dev/null < /sys/class/net/eem0/carrier || c=
    done
    # ARP (both ends may have to ask: the board's cache was flushed) and warm-up, not measured
    wait_until 30 ping -c 1 -W 1 $PEER_IP > /dev/null || {{ echo "no ping reply through $tag in 30 s"; exit 1; }}
    if [ {profile} = 1 ]; then  # sample the bridge's threads while it is measured
        py-spy record --pid $BRIDGE --rate 100 --format raw --threads --nonblocking \
            --output $RW/$tag-profile.txt > $RW/$tag-py-spy.log 2>&1 &
        PROFILER=$!
    fi
    measure $tag
    [ {profile} = 0 ] || {{ kill -INT $PROFILER; wait $PROFILER; }}
    python3 -m eembridge stats --socket /tmp/eem0.sock --json > $RW/$tag-stats.json 2>&1 || true
    kill -TERM $BRIDGE
    wait $BRIDGE
    BRIDGE=  # gone: cpu() stops reading it
    sleep 1  # cdc_eem binds again; the next run detaches it
}}
user_run() {{  # TAG "ENV=VALUE ..." "OPTIONS": the same through eembridge --link user, as
    # user_checks.sh runs it: nobody, no capability, the node's group; iperf3 through a forward
    local tag=$1 envs=$2 opts=$3 end
    ip addr flush dev $HOST_IF 2>/dev/null || true  # cdc_eem's: its address is the gateway's now
    ip -n $PEER_NS neigh flush dev $PEER_IF  # the board learns libslirp's MAC by ARP
    node_to_nogroup > /dev/null
    mkdir -p /tmp/eembridge-user && chown nobody:nogroup /tmp/eembridge-user
    SOCK=/tmp/eembridge-user/stats.sock
    nobody_start $RW/$tag.log env $envs python3 -m eembridge --ip $HOST_IP/24 --peer $PEER_IP         --serial $SERIAL --forward tcp:5211:5201 --forward tcp:$SHA_PORT:$SHA_PORT         --stats-socket $SOCK {bridge_args} $opts
    BRIDGE=$NOBODY_PID
    end=$((SECONDS + 120))
    until bridge_connected; do
        kill -0 $BRIDGE || {{ echo "eembridge ($tag) exited before it had the device"; exit 1; }}
        [ $SECONDS -lt $end ] || {{ echo "eembridge ($tag) had no device after 120 s"; exit 1; }}
        sleep 0.5
    done
    # Now, not at the start: until setpriv has exec'd, the process is still root's unshare.
    grep -E '^(Uid|CapEff):' /proc/$BRIDGE/status > $RW/$tag-status.txt  # nobody, no capability
    measure $tag 5211
    stats $tag-stats
    kill -TERM $BRIDGE
    wait $BRIDGE
    BRIDGE=
    sleep 1
}}
if [ {kernel_only} = 0 ]; then
{runs}
fi
"""


def iperf_mbps(path: Path) -> float:
    data = json.loads(path.read_text())
    if "error" in data:
        raise GuestError(f"{path.name}: iperf3 error: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def ping_ms(path: Path) -> dict[str, float]:
    text = path.read_text()
    for line in text.splitlines():
        if line.startswith("rtt ") or line.startswith("round-trip"):
            mn, avg, mx, mdev = (float(x) for x in line.split("=")[1].split()[0].split("/"))
            return {"min": mn, "avg": avg, "max": mx, "mdev": mdev}
    raise GuestError(f"{path.name}: no rtt line in ping output:\n{text}")


def profile_summary(path: Path, top: int = 15) -> dict[str, object]:
    """py-spy's collapsed stacks -> samples per thread, and the frames most often on top."""
    if not path.exists():
        raise GuestError(f"{path.name}: py-spy wrote no profile (see py-spy.log)")
    threads: dict[str, int] = {}
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        threads[frames[0]] = threads.get(frames[0], 0) + n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for frame in set(frames[1:]):
            inclusive[frame] = inclusive.get(frame, 0) + n
    total = sum(threads.values()) or 1

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "threads_pct": ranked(threads), "self_pct": ranked(leaf),
            "inclusive_pct": ranked(inclusive)}


def print_profile(summary: dict[str, object]) -> None:
    print(f"\npy-spy: {summary['samples']} samples of the bridge (all threads, idle included)")
    for key in ("threads_pct", "self_pct", "inclusive_pct"):
        print(f"{key}:")
        for name, pct in summary[key]:  # type: ignore[attr-defined]
            print(f"  {pct:5.1f}%  {name}")


USER_HZ = 100  # /proc/stat counts in these ticks


def cpu_cost(rwdir: Path, name: str) -> dict[str, float]:
    """What one iperf3 run cost the whole guest: how busy its vCPUs were, and CPU
    milliseconds per MB moved (everything: both iperf3 ends, the TCP stacks, the gadget,
    dummy_hcd, and the driver under test). Cost per MB is far less noisy than Mbit/s on
    a shared machine, and it says whether a run was CPU-bound (busy near 100%)."""
    before, after = ([int(x) for x in (rwdir / f"{name}.cpu{i}").read_text().split()] for i in (0, 1))
    d = [b - a for a, b in zip(before, after, strict=True)]
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    total = busy + d[3] + d[4]
    data = json.loads((rwdir / f"{name}.json").read_text())
    mb = data["end"]["sum_received"]["bytes"] / 1e6
    per_mb = 1000 / USER_HZ / max(mb, 1e-9)
    return {"busy_pct": 100 * busy / max(total, 1), "cpu_ms_per_mb": busy * per_mb,
            "softirq_pct": 100 * d[6] / max(total, 1), "system_pct": 100 * d[2] / max(total, 1),
            # The bridge process alone: its own code, and the syscalls it makes (usbfs
            # ioctls; TAP writes, which run the kernel's TCP receive in that context).
            "bridge_user_ms_per_mb": d[7] * per_mb, "bridge_sys_ms_per_mb": d[8] * per_mb}


def check_sha256(rwdir: Path, name: str) -> None:
    """lib.sh's xfer NAME: the client finished, and both ends hashed the same bytes."""
    def read(suffix: str) -> str:
        path = rwdir / f"{name}.{suffix}"
        return path.read_text().strip() if path.exists() else f"(no {path.name})"

    if read("rc") != "0" or read("sent") != read("recv"):
        raise GuestError(f"{name}: the 2 MB SHA-256 check failed: exit {read('rc')}, "
                         f"sent {read('sent')[:16]}, received {read('recv')[:16]}")


def collect(rwdir: Path, tag: str, rounds: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for direction in ("h2p", "p2h"):
        # Best of the rounds: the machine is shared, noise only ever slows a round down.
        mbps, r = max((iperf_mbps(rwdir / f"{tag}-{direction}-{r}.json"), r) for r in range(1, rounds + 1))
        out[f"{direction}_mbps"] = mbps
        out[f"{direction}_cpu"] = cpu_cost(rwdir, f"{tag}-{direction}-{r}")
        check_sha256(rwdir, f"{tag}-sha-{direction}")
    # Through a forward (the user link) nothing routes a ping to the board: no RTT.
    pinged = (rwdir / f"{tag}-ping.txt").exists()
    out["ping_ms"] = ping_ms(rwdir / f"{tag}-ping.txt") if pinged else None
    out["loaded_ping_ms"] = ping_ms(rwdir / f"{tag}-loaded-ping.txt") if pinged else None
    return out


# --links: each link's variant (LABEL, ENV=VALUE list, options); "eembridge" is the TAP
# link's label since before there were others.
LINK_VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "tap": ("eembridge", [], []), "tun": ("tun", [], ["--link", "tun"]),
    "user": ("user", [], ["--link", "user"])}


def parse_links(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LINK_VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected some of {', '.join(LINK_VARIANTS)}, comma-separated, each once")
    return names


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", choices=("high", "super", "full"), default="high")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 run length")
    ap.add_argument("--rounds", type=int, default=1, help="iperf3 runs per direction (best kept)")
    ap.add_argument("--pings", type=int, default=30)
    ap.add_argument("--cpus", type=int, default=2, help="the guest's vCPUs (TCG: one host thread each)")
    ap.add_argument("--kernel-only", action="store_true", help="measure cdc_eem only")
    ap.add_argument("--bridge-args", default="", help="extra options for the bridge")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:[ENV=VALUE,...] [OPTIONS]",
                    help="also measure eembridge started with this environment and these extra "
                         "options, in the same boot (e.g. 'python-loop:EEMBRIDGE_NATIVE=0', "
                         "'in32:--in-flight 32')")
    ap.add_argument("--tun", action="store_true",
                    help="also the TUN link: the variant 'tun:--link tun'")
    ap.add_argument("--user", action="store_true",
                    help="also the user link, as nobody: the variant 'user:--link user'")
    ap.add_argument("--links", type=parse_links, metavar="tap,tun,user",
                    help="these links (instead of the TAP link and --tun/--user), in this order")
    ap.add_argument("--rwdir", type=Path, help="keep the guest's files here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="sample the bridge with py-spy while it is measured; print where it spends time")
    args = ap.parse_args()

    if args.links and (args.tun or args.user):
        ap.error("--links names every link to measure: leave out --tun and --user")
    links = args.links or ["tap"] + ["tun"] * args.tun + ["user"] * args.user
    variants: list[tuple[str, list[str], list[str]]] = [LINK_VARIANTS[n] for n in links]
    for spec in args.variant:
        label, _, rest = spec.partition(":")
        words = shlex.split(rest)
        envs = words.pop(0).split(",") if words and not words[0].startswith("-") else []
        if not label.replace("-", "").isalnum() or not (envs or words) \
                or not all("=" in e and " " not in e for e in envs) or any(" " in w for w in words):
            ap.error(f"--variant {spec!r}: expected LABEL:[ENV=VALUE,...] [OPTIONS] (no spaces in values)")
        variants.append((label, envs, words))
    labels = [label for label, _, _ in variants]
    if len(set(labels)) != len(labels) or "kernel" in labels:
        ap.error(f"labels {', '.join(labels)}: each run needs one of its own, not 'kernel'")
    rwdir = args.rwdir or Path(tempfile.mkdtemp(prefix="eembridge-bench-interop-"))
    runs = "\n".join(
        f"    {'user_run' if _on_user_link(words) else 'bridge_run'} {label} "
        f"{shlex.quote(' '.join(envs))} {shlex.quote(' '.join(words))}"
        for label, envs, words in variants)
    script = SCRIPT.format(speed=args.speed, rounds=args.rounds, seconds=args.seconds,
                           pings=args.pings, kernel_only=int(args.kernel_only),
                           profile=int(args.profile), runs=runs,
                           bridge_args=" ".join(shlex.quote(a) for a in shlex.split(args.bridge_args)))
    # Per run: iperf3 both ways, pings, the bridge's start (Python under TCG), 2 x 2 MB by nc.
    timeout = 120 + 2 * (1 + len(variants)) * (2 * args.rounds * (args.seconds + 4) + args.pings * 0.2 + 50)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tags = [] if args.kernel_only else labels
    try:
        res = run_in_guest(script, rwdir, timeout=timeout, cpus=args.cpus).check()
        out: dict[str, object] = {"date": started, "speed": args.speed, "cpus": args.cpus,
                                  "seconds": args.seconds, "rounds": args.rounds,
                                  "boot_wall_s": round(res.seconds, 1),
                                  "kernel": collect(rwdir, "kernel", args.rounds)}
        for tag in tags:
            out[tag] = collect(rwdir, tag, args.rounds)
            if args.profile:
                out[f"{tag}-profile"] = profile_summary(rwdir / f"{tag}-profile.txt")
    except GuestError as exc:
        logs = sorted(rwdir.glob("*.log"), key=lambda path: path.stat().st_mtime)
        tail = f"--- {logs[-1].name} (the last bridge's log):\n{logs[-1].read_text()[-3000:]}" if logs else ""
        print(f"bench/interop.py: {exc}\n{tail}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{started}, {args.speed} speed, {args.cpus} vCPUs, iperf3 {args.seconds} s x {args.rounds}, "
          f"guest wall {res.seconds:.0f} s")
    print("| path | TCP host→peer Mbit/s | TCP peer→host Mbit/s | ping avg ms | ping min ms "
          "| ping avg ms during host→peer |")
    print("|---|---|---|---|---|---|")
    rows = [("cdc_eem" if tag == "kernel" else tag, cast(dict, out[tag])) for tag in ["kernel", *tags]]
    for name, r in rows:
        pings = (f"{r['ping_ms']['avg']:.2f} | {r['ping_ms']['min']:.2f} | {r['loaded_ping_ms']['avg']:.1f}"
                 if r["ping_ms"] else "– | – | –")  # through a forward: nothing to ping
        print(f"| {name} | {r['h2p_mbps']:.1f} | {r['p2h_mbps']:.1f} | {pings} |")
    k = out["kernel"]
    assert isinstance(k, dict)
    for tag in tags:
        e = out[tag]
        assert isinstance(e, dict)
        pings = (f"{e['ping_ms']['avg'] / k['ping_ms']['avg']:.2f}x | "
                 f"{e['ping_ms']['min'] / k['ping_ms']['min']:.2f}x" if e["ping_ms"] else "– | –")
        print(f"| ratio {tag}/cdc_eem | {e['h2p_mbps'] / k['h2p_mbps']:.2f}x | "
              f"{e['p2h_mbps'] / k['p2h_mbps']:.2f}x | {pings} | |")
    tap = out.get("eembridge")
    for tag in tags if isinstance(tap, dict) else []:  # the other links against the TAP link
        e = out[tag]
        assert isinstance(e, dict) and isinstance(tap, dict)
        if tag != "eembridge":
            print(f"| ratio {tag}/eembridge (TAP) | {e['h2p_mbps'] / tap['h2p_mbps']:.2f}x | "
                  f"{e['p2h_mbps'] / tap['p2h_mbps']:.2f}x | | | |")
    print(f"\nGuest CPU during the best run of each direction ({args.cpus} vCPUs; busy % of all, CPU ms "
          "per MB moved, whole guest; ratio = cost per MB against cdc_eem's)")
    print("| path | host→peer busy % | host→peer CPU ms/MB | of it bridge user+sys "
          "| peer→host busy % | peer→host CPU ms/MB | of it bridge user+sys |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        cells = []
        for d in ("h2p", "p2h"):
            c, kc = r[f"{d}_cpu"], k[f"{d}_cpu"]
            kernel = r is k
            ratio = "" if kernel else f" ({c['cpu_ms_per_mb'] / kc['cpu_ms_per_mb']:.2f}x)"
            cells += [f"{c['busy_pct']:.0f}", f"{c['cpu_ms_per_mb']:.1f}{ratio}",
                      "" if kernel else f"{c['bridge_user_ms_per_mb']:.1f}+{c['bridge_sys_ms_per_mb']:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for tag in tags if args.profile else []:
        print(f"\n{tag}:", end="")
        print_profile(out[f"{tag}-profile"])  # type: ignore[arg-type]
    return 0


def _on_user_link(options: list[str]) -> bool:
    """The options run the user link: no TAP to wait for, run as nobody, measured through
    forwards."""
    pairs = zip(options, options[1:], strict=False)
    return "--link=user" in options or any(a == "--link" and b == "user" for a, b in pairs)


if __name__ == "__main__":
    sys.exit(main())
