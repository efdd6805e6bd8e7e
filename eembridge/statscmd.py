"""`eembridge stats`: counters of running bridges, EEM level and link level side by side."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import UserError
from .stats import RUN_DIR, query, running_bridges, socket_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tap", help="only the bridge of this TAP interface")
    parser.add_argument("--socket", help="control socket path (overrides --tap)")
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"where bridges put their sockets ({RUN_DIR})")
    parser.add_argument("--json", action="store_true", help="one JSON object keyed by TAP name")


def _paths(args: argparse.Namespace) -> list[str]:
    if args.socket:
        return [args.socket]
    if args.tap:
        return [socket_path(args.tap, args.run_dir)]
    paths = running_bridges(args.run_dir)
    if not paths:
        raise UserError(f"no running bridge: no control socket in {args.run_dir}")
    return paths


def run(args: argparse.Namespace) -> int:
    snapshots = {}
    for path in _paths(args):
        snapshot = query(path)
        snapshots[snapshot.get("tap", path)] = snapshot
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
    table = Table(title=title)
    for column in ("EEM receive", "", "EEM transmit", "", "link (kernel)", ""):
        table.add_column(column, justify="right" if column == "" else "left")
    rx = [(k, v) for k, v in s.get("rx", {}).items()]
    tx = [(k, v) for k, v in s.get("bridge", {}).items()] + [
        (f"dropped:{k}", v) for k, v in s.get("drop_reasons", {}).items()
    ]
    link = [(k, v) for k, v in (s.get("link") or {}).items()]
    for i in range(max(len(rx), len(tx), len(link))):
        row: list[str] = []
        for cells in (rx, tx, link):
            name, value = cells[i] if i < len(cells) else ("", "")
            row += [name, f"{value:,}" if isinstance(value, int) else str(value)]
        table.add_row(*row)
    return table
