"""N TCP runs in a row, both directions, per speed, against the lossy EEM device on real USB.

One guest boot (tests/interop/guest.py) runs `tests/interop/lossy.sh soak N SPEED...`:
per speed, tests/interop/ffs_eem_device.py (eembridge.sim's device model on FunctionFS on
dummy_hcd: 2% of the IN packets lost, 0.5% garbage reading as an Echo Response of 2047
bytes, an Echo every 100 frames, OUT stalls and busy periods) and one bridge for the
whole boot; each run sends random bytes host->peer, then peer->host, each transfer with
a deadline, checked by SHA-256. A transfer that misses its deadline leaves, before
anything is torn down, the bridge's counters (in flight, queued), the device's state
(what each of its threads is doing, and for how long) and both TCP ends (ss -tin, the
peer's /proc/net/snmp) as SPEED/runN_DIR.stall_*. This prints one line per transfer,
a summary per speed, and the stall captures of any that did not complete.

    python3 bench/lossy_runs.py [--runs 20] [--speeds full,high,super] [--rwdir DIR]
                                [--env IN_LOSS=0.02 ...] [--timeout SECONDS]
Exit status: 0 if every transfer completed intact, 1 if not, 2 if the guest failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))

from guest import GuestError, run_in_guest  # noqa: E402


def summarize(capture: Path) -> str:
    """What matters in one capture: both TCP ends (ss), the bridge's queues and
    counters, what the device is doing and its last IN transfers."""
    text = capture.read_text()
    if capture.name.endswith(("_tcp.txt", "_tcp_10s.txt")):
        lines = text.splitlines()
        keep = [ln for ln in lines if ln.startswith(("#", "ESTAB", "FIN", "\t"))]
        return "\n".join(ln for ln in keep if "/proc" not in ln)[:4000]
    if not capture.suffix == ".json" or not text.strip():
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        return text[-2000:]
    if "_stats" in capture.name:
        keys = ("connected", "in_transfers_in_flight", "out_transfers_queued",
                "tx_bytes_in_flight", "drop_reasons")
        rx = data.get("rx", {})
        return json.dumps({**{k: data.get(k) for k in keys},
                           "rx": {k: rx.get(k) for k in ("frames", "truncated", "resyncs", "bytes_skipped")},
                           "bridge": {k: v for k, v in data.get("bridge", {}).items() if v}})
    now = data.get("now", 0.0)
    rows = [f"  {row['t'] - now:+8.1f} s  {row['bytes']:5d} B  lost {row['lost']}  "
            f"{'whole' if row['whole'] else 'DAMAGED'}  {', '.join(row['held'])}"
            for row in data.get("last_in", [])]
    return (json.dumps({"doing": data.get("doing"), "owed": data.get("owed"), "echo": data.get("echo")})
            + "\n  last IN transfers (time before the capture):\n" + "\n".join(rows[-20:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--speeds", default="full,high,super")
    ap.add_argument("--rwdir", type=Path, default=None, help="keep the result files here")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="lossy.sh settings, e.g. IN_LOSS=0.05 or OUT_STALL_EVERY=0")
    ap.add_argument("--timeout", type=float, default=None,
                    help="for the whole boot (default: 8 minutes per run per speed, plus 10)")
    args = ap.parse_args()
    speeds = [s for s in args.speeds.split(",") if s]
    if args.runs < 1 or not speeds or not set(speeds) <= {"full", "high", "super"}:
        ap.error("--runs must be at least 1 and --speeds a list of full, high, super")
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0].isidentifier():
            ap.error(f"--env {item!r}: not VAR=VALUE")
    rwdir = args.rwdir or Path(tempfile.mkdtemp(prefix="eembridge-lossy-runs-"))
    timeout = args.timeout or 600 + 480 * args.runs * len(speeds)
    # A copy: bash reads a script as it goes, so editing the tree's lossy.sh during a
    # long soak would change what the running one executes next.
    rwdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tests" / "interop" / "lossy.sh", rwdir / "lossy.sh")
    script = " ".join(args.env + ["bash", "$RW/lossy.sh", "soak", str(args.runs), *speeds])
    started = time.monotonic()
    try:
        result = run_in_guest(script, rwdir, timeout=timeout)
    except GuestError as exc:
        print(f"lossy_runs: {exc}", file=sys.stderr)
        return 2
    print(f"# guest: {script} -> exit {result.returncode} after {time.monotonic() - started:.0f} s;"
          f" files in {rwdir}")
    results = rwdir / "results.txt"
    lines = results.read_text().splitlines() if results.exists() else []
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        print(line)
        speed, _run, _direction, outcome = line.split()[:4]
        tally[speed][outcome] += 1
    for speed in speeds:
        done = tally[speed]
        print(f"{speed}: {done['complete']} of {2 * args.runs} transfers complete, "
              f"{done['incomplete']} incomplete")
        for capture in sorted((rwdir / speed).glob("*.stall_*")) + sorted((rwdir / speed).glob("*.slow_*")):
            summary = summarize(capture)
            if summary:
                print(f"--- {speed}/{capture.name}\n{summary}")
    expected = 2 * args.runs * len(speeds)
    complete = sum(t["complete"] for t in tally.values())
    if result.returncode != 0:
        print(result.output[-3000:], file=sys.stderr)
    return 0 if complete == expected and result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
