"""`eembridge list`: every CDC-EEM interface on the host and who holds it."""

from __future__ import annotations

import argparse
import json

from ..usb.discovery import find_eem_interfaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help='{"devices": [...]} with one object per EEM interface')


def run(args: argparse.Namespace) -> int:
    """Exit 0 with devices, 1 with none (so scripts can test for one)."""
    records = find_eem_interfaces()
    if args.json:
        print(json.dumps({"devices": [r.as_json() for r in records]}, indent=2))
        return 0 if records else 1
    if not records:
        print("no EEM devices found")
        return 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title="USB CDC-EEM interfaces")
    for column in ("bus:addr", "port", "VID:PID", "serial", "speed", "intf",
                   "IN/OUT", "max packet", "OUT frames", "held by"):
        table.add_column(column)
    for r in records:
        # What the bridge sends by default: batches only to a device known to take them.
        out = "batched (Linux f_eem)" if r.takes_batches else "one per transfer"
        table.add_row(f"{r.bus}:{r.address}", r.port, r.vid_pid, r.serial or "-", r.speed,
                      str(r.interface), f"0x{r.ep_in:02x}/0x{r.ep_out:02x}", str(r.max_packet),
                      out, r.held_by)
    Console().print(table)
    return 0
