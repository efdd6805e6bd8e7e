"""`eembridge echo`: EEM-level ping (Echo / Echo Response) through a running bridge.

Below IP: a device that answers here but not to ping has a broken IP set-up; one that
does not answer here has a broken firmware or USB link.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..core.errors import UserError
from ..observe.control import (
    RUN_DIR,
    BadRequest,
    echo,
    echo_parameters,
    is_stale,
    running_bridges,
    socket_path,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tap", help="the bridge of this TAP interface (default: the only one)")
    parser.add_argument("--socket", help="control socket path (overrides --tap)")
    parser.add_argument("-c", "--count", type=int, default=4)
    parser.add_argument("-i", "--interval", type=float, default=0.2, help="seconds between echoes")
    parser.add_argument("-W", "--timeout", type=float, default=1.0, help="seconds to wait for each")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:  # the bridge's own rule, checked before asking
        echo_parameters(args.count, args.timeout, args.interval)
    except BadRequest as exc:
        raise UserError(f"--{exc}") from None
    if args.socket:
        path = args.socket
    elif args.tap:
        path = socket_path(args.tap)
    else:
        paths = [p for p in running_bridges(RUN_DIR) if not is_stale(p)]
        if len(paths) != 1:
            raise UserError(f"{len(paths)} bridges running: name one with --tap")
        path = paths[0]
    replies, summary = echo(path, args.count, args.timeout, args.interval,
                            on_reply=None if args.json else _print_reply)
    if args.json:
        print(json.dumps({"replies": replies, **summary}, indent=2))
    else:
        print(f"{summary['sent']} echoes sent, {summary['received']} answered, "
              f"{summary['loss']:.0%} loss"
              + (f", rtt min/avg/max {summary['rtt_min_ms']:.3f}/{summary['rtt_avg_ms']:.3f}/"
                 f"{summary['rtt_max_ms']:.3f} ms" if summary["received"] else ""))
    return 0 if summary["received"] else 1


def _print_reply(reply: dict[str, Any]) -> None:
    if "rtt" in reply:
        print(f"echo seq={reply['seq']} rtt={reply['rtt'] * 1000:.3f} ms")
    else:
        print(f"echo seq={reply['seq']} {reply['error']}")
