"""`eembridge echo`: EEM-level ping (Echo / Echo Response) through a running bridge.

Below IP: a device that answers here but not to ping has a broken IP set-up; one that
does not answer here has a broken firmware or USB link.
"""

from __future__ import annotations

import argparse
import json

from ..core.errors import UserError
from ..observe.control import (
    RUN_DIR,
    BadRequest,
    echo_parameters,
    is_stale,
    request,
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
    payload = {"cmd": "echo", "count": args.count, "timeout": args.timeout, "interval": args.interval}
    rtts, replies = [], []
    for reply in request(path, payload, timeout=args.timeout + args.interval + 5):
        if "error" in reply and "seq" not in reply:
            raise UserError(f"bridge refused: {reply['error']}")
        replies.append(reply)
        if "rtt" in reply:
            rtts.append(reply["rtt"])
            if not args.json:
                print(f"echo seq={reply['seq']} rtt={reply['rtt'] * 1000:.3f} ms")
        elif not args.json:
            print(f"echo seq={reply['seq']} {reply['error']}")
    lost = len(replies) - len(rtts)
    summary = {
        "sent": len(replies),
        "received": len(rtts),
        "loss": lost / len(replies) if replies else 1.0,
        "rtt_min_ms": min(rtts) * 1000 if rtts else None,
        "rtt_avg_ms": sum(rtts) / len(rtts) * 1000 if rtts else None,
        "rtt_max_ms": max(rtts) * 1000 if rtts else None,
    }
    if args.json:
        print(json.dumps({"replies": replies, **summary}, indent=2))
    else:
        print(f"{summary['sent']} echoes sent, {summary['received']} answered, "
              f"{summary['loss']:.0%} loss"
              + (f", rtt min/avg/max {summary['rtt_min_ms']:.3f}/{summary['rtt_avg_ms']:.3f}/"
                 f"{summary['rtt_max_ms']:.3f} ms" if rtts else ""))
    return 0 if rtts else 1
