"""`eembridge release [selection]`: give back what a killed bridge left detached.

A bridge stopped by SIGTERM/SIGINT or an error re-attaches the kernel driver itself. One
killed by SIGKILL (or the OOM killer, or a crash in C) cannot: the kernel releases its
claim but leaves cdc_eem unbound, so the interface is nobody's until someone asks the
kernel to probe it again. This command does that for every interface whose claim record
names a bridge that is gone, or only for the selected device.

Why a command and not the next start of a bridge: a bridge starting for the same device
takes it over anyway (re-attaching first would make cdc_eem create a netdev for nothing),
and a bridge for one device should not rebind others, whose own bridges may be about to
start. A service manager can run it after a bridge of its dies:
`ExecStopPost=eembridge release --port %I`.
"""

from __future__ import annotations

import argparse

from ..usb.selector import Selector


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="VID:PID|BUS:ADDR", help="only this device")
    parser.add_argument("--serial", metavar="S", help="only the device with this serial")
    parser.add_argument("--port", metavar="1-2.3", help="only the device at this port path")
    parser.add_argument("--instance", metavar="NAME",
                        help="systemd instance name, as for the bridge (1-2.3 or serial:S)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 whether or not there was anything to give back (one line per interface)."""
    from ..usb.device import reattach_stale

    if args.instance:
        from ..core.options import parse_instance

        kind, value = parse_instance(args.instance)
        setattr(args, kind, value)
    lines = reattach_stale(Selector.from_args(args))
    for line in lines:
        print(line)
    if not lines:
        print("nothing to release: no interface left detached by a bridge that is gone")
    return 0
