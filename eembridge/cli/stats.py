"""`eembridge stats`: counters of running bridges, EEM level and link level side by side.

`--watch` is a live view of every bridge on the host (rich Live): rates computed from
successive snapshots, losses, resyncs, echo RTT, queue depths and the link state. The
sockets are looked up again on every refresh, so bridges that start or stop come and go.

A socket nobody listens on (a bridge killed with SIGKILL leaves one) is skipped, named
in one line on stderr; the live bridges are shown. Nothing is removed: a client never
deletes a file (the next bridge on that TAP replaces its stale socket).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..core.errors import UserError
from ..observe.control import RUN_DIR, StaleSocket, query, running_bridges, socket_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tap", help="only the bridge of this TAP interface")
    parser.add_argument("--socket", help="control socket path (overrides --tap)")
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"where bridges put their sockets ({RUN_DIR})")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object keyed by TAP name (with --watch: one line of rates per refresh)")
    parser.add_argument("-w", "--watch", action="store_true", help="live view, refreshed every --interval")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")


def _paths(args: argparse.Namespace) -> list[str]:
    if args.socket:
        return [args.socket]
    if args.tap:
        return [socket_path(args.tap, args.run_dir)]
    paths = running_bridges(args.run_dir)
    if not paths:
        raise UserError(f"no running bridge: no control socket in {args.run_dir}")
    return paths


def _skipped(stale: list[str]) -> str:
    return (f"eembridge: skipped {len(stale)} stale control socket(s), no bridge listening "
            f"(left by a bridge that was killed): {', '.join(stale)}")


def run(args: argparse.Namespace) -> int:
    if args.watch:
        return watch(args)
    snapshots, stale = {}, []
    for path in _paths(args):
        try:
            snapshot = query(path)
        except StaleSocket:
            if args.socket or args.tap:
                raise  # the one asked for: that is the answer
            stale.append(path)
            continue
        snapshots[snapshot.get("tap", path)] = snapshot
    if not snapshots:
        raise UserError(f"no running bridge: the control sockets in {args.run_dir} are stale, "
                        f"no bridge listening: {', '.join(stale)}")
    if stale:
        print(_skipped(stale), file=sys.stderr)
    if args.json:
        print(json.dumps(snapshots, indent=2, sort_keys=True))
        return 0
    from rich.console import Console

    console = Console()
    for tap, snapshot in snapshots.items():
        console.print(render(tap, snapshot))
    return 0


def render(tap: str, s: dict[str, Any]) -> Any:
    from rich.table import Table

    device = s.get("device") or {}
    title = f"{tap}: " + (device.get("description", "?") if s.get("connected") else "device not connected")
    caps = s.get("capabilities")
    caption = None
    if caps is not None:
        caption = ("capabilities held: " + (", ".join(caps.get("effective") or []) or "none")
                   + ("; no_new_privs" if caps.get("no_new_privs") else ""))
    for name, c in (s.get("servers") or {}).items():
        # What was turned away or cut off: a local client misbehaving, or an attack.
        turned_away = {k: c.get(k, 0) for k in ("refused", "evicted", "timeouts", "bad_requests", "busy")}
        if any(turned_away.values()):
            line = f"{name} server: " + ", ".join(f"{k} {v}" for k, v in turned_away.items() if v)
            caption = line if caption is None else f"{caption}\n{line}"
    table = Table(title=title, caption=caption)
    for column in ("EEM receive", "", "EEM transmit", "", "link (kernel)", ""):
        table.add_column(column, justify="right" if column == "" else "left")
    rx = [(k, v) for k, v in s.get("rx", {}).items()]
    tx = [(k, v) for k, v in s.get("bridge", {}).items()] + [
        (f"dropped:{k}", v) for k, v in s.get("drop_reasons", {}).items()
    ]
    link = [(k, v) for k, v in (s.get("link") or {}).items()]
    link += [(f"l3:{k}", v) for k, v in (s.get("l3") or {}).items() if v or k.startswith("dropped")]
    link += [(f"user:{k}", v) for k, v in (s.get("user") or {}).items()
             if v or k.startswith("refused")]
    # --dhcp: the state and lease always, counters once they are not zero.
    link += [(f"dhcp:{k}", "-" if v is None else ", ".join(v) if isinstance(v, list) else v)
             for k, v in (s.get("dhcp") or {}).items() if v or k in ("state", "address", "expires_in")]
    for i in range(max(len(rx), len(tx), len(link))):
        row: list[str] = []
        for cells in (rx, tx, link):
            name, value = cells[i] if i < len(cells) else ("", "")
            row += [name, f"{value:,}" if isinstance(value, int) else str(value)]
        table.add_row(*row)
    return table


# -- the live view ---------------------------------------------------------------------

# Deframer counters of packets thrown away on the way in (see protocol.DEFRAMER_COUNTERS).
# "spliced" packets passed their sentinel but were refused (codec.py, "Trust"): drops.
# "implausible" and "unchecked" count scan candidates refused in garbage, not frames.
IN_DROP_COUNTERS = ("crc_errors", "sentinel_errors", "oversize", "runts", "truncated", "spliced")


def _get(s: dict[str, Any], section: str, name: str) -> int:
    return int((s.get(section) or {}).get(name, 0) or 0)


def _totals(s: dict[str, Any]) -> dict[str, int]:
    """The monotonic totals the live view turns into rates or shows as they are."""
    return {
        "in_frames": _get(s, "rx", "frames"),
        "in_bytes": _get(s, "rx", "bytes"),
        "out_frames": _get(s, "bridge", "tx_frames"),
        "out_bytes": _get(s, "bridge", "tx_bytes"),
        "in_dropped": sum(_get(s, "rx", k) for k in IN_DROP_COUNTERS)
        + sum((s.get("in_errors") or {}).values()),
        "out_dropped": _get(s, "bridge", "tx_dropped") + _get(s, "link", "tx_dropped"),
        "resyncs": _get(s, "rx", "resyncs"),
        "capture_drops": _get(s.get("capture") or {}, "pcap", "drops"),
    }


def bridge_row(previous: dict[str, Any] | None, current: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One bridge's line of the live view, from two snapshots `seconds` apart (rates are
    None until there are two; a counter that went down means the bridge restarted)."""
    now = _totals(current)
    before = _totals(previous) if previous is not None else None
    row: dict[str, Any] = {
        "tap": current.get("tap", "?"),
        "serial": (current.get("device") or {}).get("serial"),
        "connected": bool(current.get("connected")),  # the TAP's carrier follows it
        **now,
        "echo_rtt_ms": current["echo_rtt_last"] * 1000 if current.get("echo_rtt_last") is not None else None,
        "in_transfers_in_flight": int(current.get("in_transfers_in_flight", 0) or 0),
        "out_transfers_queued": int(current.get("out_transfers_queued", 0) or 0),
        "out_bytes_queued": int(current.get("tx_bytes_in_flight", 0) or 0),
        "drop_reasons": dict(current.get("drop_reasons") or {}),
    }
    for name in ("in_frames", "in_bytes", "out_frames", "out_bytes"):
        ok = before is not None and seconds > 0 and now[name] >= before[name]
        row[f"{name}_per_s"] = (now[name] - before[name]) / seconds if ok and before else None
    return row


def _rate(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def watch_table(rows: list[dict[str, Any]], gone: list[str] | None = None) -> Any:
    from rich.table import Table

    table = Table(title=f"eembridge: {len(rows)} bridge(s), {time.strftime('%H:%M:%S')}")
    for column in ("TAP", "device", "IN frames/s", "IN B/s", "OUT frames/s", "OUT B/s",
                   "IN dropped", "OUT dropped", "resyncs", "echo RTT", "IN in flight",
                   "OUT queued", "capture drops"):
        table.add_column(column, justify="left" if column in ("TAP", "device") else "right",
                         no_wrap=column == "TAP")
    for r in rows:
        state = f"connected {r['serial'] or ''}".strip() if r["connected"] else "[red]no device[/red]"
        reasons = ", ".join(f"{k} {v}" for k, v in r["drop_reasons"].items())
        table.add_row(
            r["tap"], state,
            _rate(r["in_frames_per_s"]), _rate(r["in_bytes_per_s"], "B"),
            _rate(r["out_frames_per_s"]), _rate(r["out_bytes_per_s"], "B"),
            f"{r['in_dropped']:,}", f"{r['out_dropped']:,}" + (f" ({reasons})" if reasons else ""),
            f"{r['resyncs']:,}",
            "-" if r["echo_rtt_ms"] is None else f"{r['echo_rtt_ms']:.2f} ms",
            str(r["in_transfers_in_flight"]),
            f"{r['out_transfers_queued']} / {r['out_bytes_queued']:,} B",
            f"{r['capture_drops']:,}",
        )
    for path in gone or []:
        table.add_row(path, "[yellow]not answering[/yellow]", *["-"] * 11)
    return table


def poll(args: argparse.Namespace, previous: dict[str, tuple[float, dict[str, Any]]]
         ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """One refresh: query every bridge, rows against the previous snapshots (updated in
    place); the sockets not answering, and the stale ones (nobody listening)."""
    try:
        paths = _paths(args)
    except UserError:
        paths = []  # none running right now: show an empty view, they may come
    rows, gone, stale = [], [], []
    for path in paths:
        try:
            snapshot = query(path, timeout=max(1.0, args.interval))
        except StaleSocket:
            stale.append(path)
            previous.pop(path, None)
            continue
        except UserError:
            gone.append(path)
            previous.pop(path, None)
            continue
        now = time.monotonic()
        before = previous.get(path)
        rows.append(bridge_row(before[1] if before else None, snapshot, now - before[0] if before else 0.0))
        previous[path] = (now, snapshot)
    for path in set(previous) - set(paths):
        del previous[path]  # that bridge went away
    return rows, gone, stale


def watch(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UserError("--interval must be positive")
    previous: dict[str, tuple[float, dict[str, Any]]] = {}
    reported: set[str] = set()

    def report(stale: list[str]) -> None:
        """Each stale socket named once, on stderr: the view shows the live bridges."""
        new = [path for path in stale if path not in reported]
        if new:
            print(_skipped(new), file=sys.stderr, flush=True)
            reported.update(new)

    refreshes = 0
    if args.json:
        while args.count is None or refreshes < args.count:
            rows, gone, stale = poll(args, previous)
            report(stale)
            print(json.dumps({"time": time.time(), "bridges": rows, "not_answering": gone,
                              "stale": stale}), flush=True)
            refreshes += 1
            if args.count is None or refreshes < args.count:
                time.sleep(args.interval)
        return 0
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with Live(watch_table([]), console=console, auto_refresh=False,
              screen=False, transient=False) as live:
        while args.count is None or refreshes < args.count:
            rows, gone, stale = poll(args, previous)
            report(stale)
            live.update(watch_table(rows, gone), refresh=True)
            refreshes += 1
            if args.count is None or refreshes < args.count:
                time.sleep(args.interval)
    sys.stdout.flush()
    return 0
