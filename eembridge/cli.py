"""Command line: `eembridge [options]` runs the bridge; subcommands do the rest.

Errors the user can fix are reported as one line on stderr with a non-zero exit,
never as a traceback (eembridge.errors.UserError).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from . import CODEC, __version__, observe
from .errors import UserError

# Subcommand name -> module with add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "decode": ("eembridge.decode", "decode a usbmon capture of an EEM device into Ethernet pcap"),
    "demo": ("eembridge.demo", "stream a trace over a lossy simulated device and verify it"),
    "stats": ("eembridge.statscmd", "show the counters of running bridges"),
    "echo": ("eembridge.echocmd", "EEM-level ping of the device through a running bridge"),
    "replay": ("eembridge.replay", "run a usbmon capture through the codec, event by event"),
    "list": ("eembridge.listcmd", "list USB CDC-EEM devices and who holds them"),
}

log = logging.getLogger("eembridge")


def version_text() -> str:
    return f"eembridge {__version__} (codec: {CODEC})"


def _subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"eembridge {name}", description=help_text)
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser, module


def add_bridge_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the main job, shared with `demo`."""
    link = parser.add_argument_group("link (the TAP interface)")
    link.add_argument("--tap", default="usb0", help="TAP interface name (default usb0)")
    link.add_argument("--ip", action="append", default=[], metavar="ADDR/PREFIX",
                      help="address for the TAP, e.g. 169.254.7.2/24 (repeatable)")
    link.add_argument("--peer", metavar="ADDR", help="the device's IP, for a static neighbour entry")
    link.add_argument("--peer-mac", metavar="MAC", help="the device's MAC for the static neighbour")
    link.add_argument("--mtu", type=int, default=1500)
    link.add_argument("--mac", help="MAC address of the TAP (default: random, locally administered)")
    link.add_argument("--persist", action="store_true", help="keep the TAP after exit")
    eem = parser.add_argument_group("EEM")
    mode = eem.add_mutually_exclusive_group()
    mode.add_argument("--tx-crc", dest="tx_crc", action="store_true", default=True,
                      help="send frames with a real CRC-32 (default)")
    mode.add_argument("--tx-sentinel", dest="tx_crc", action="store_false",
                      help="send frames with the DE AD BE EF sentinel instead of a CRC")
    eem.add_argument("--max-transfer", type=int, default=1536,
                     help="largest bulk OUT transfer in bytes (default 1536, what Linux f_eem takes)")
    eem.add_argument("--in-flight", type=int, default=8, help="bulk IN transfers kept queued")
    eem.add_argument("--keepalive", type=float, metavar="SECONDS",
                     help="send an EEM Echo this often and log a device that stops answering")
    parser.add_argument("--stats-socket", metavar="PATH",
                        help="UNIX socket for `eembridge stats` (default /run/eembridge/TAP.sock)")
    parser.add_argument("-v", "--verbose", action="count", default=0)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    usb = parser.add_argument_group("USB device (see `eembridge list`)")
    usb.add_argument("--device", metavar="VID:PID|BUS:ADDR",
                     help="the EEM device by vendor:product (hex) or bus:address (decimal)")
    usb.add_argument("--serial", metavar="S", help="the EEM device with this serial number")
    usb.add_argument("--port", metavar="PORT", help="the EEM device on this port path, e.g. 1-2.3")
    usb.add_argument("--wait", action="store_true",
                     help="wait for the device if it is not plugged in yet")


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    sim = parser.add_argument_group("simulated device (--sim)")
    sim.add_argument("--sim-loss", type=float, default=0.0, metavar="P",
                     help="probability that a USB packet is lost (each direction)")
    sim.add_argument("--sim-flip", type=float, default=0.0, metavar="P",
                     help="probability that a USB packet has one bit flipped")
    sim.add_argument("--sim-max-packet", type=int, choices=(64, 512, 1024), default=512)
    sim.add_argument("--sim-tx", choices=("crc", "sentinel"), default="sentinel",
                     help="how the simulated device checks its frames (default sentinel, as f_eem)")
    sim.add_argument("--sim-batch", action="store_true",
                     help="device batches EEM packets in transfers that span IN buffers")
    sim.add_argument("--sim-ip", default="169.254.7.1/24",
                     help="the simulated device's own address, in its namespace")
    sim.add_argument("--sim-seed", type=int, help="seed for the fault generator")


def main_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {help_text}" for name, (_m, help_text) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="eembridge",
        description="Userspace USB CDC-EEM host bridge: EEM device <-> TAP interface.",
        epilog=f"subcommands (eembridge SUBCOMMAND --help):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--sim", action="store_true",
                        help="bridge a simulated EEM device instead of real hardware")
    add_bridge_arguments(parser)
    add_device_arguments(parser)
    add_sim_arguments(parser)
    observe.add_arguments(parser)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_until_signalled(bridge) -> int:
    """Run the bridge until SIGINT/SIGTERM; a second signal forces the exit."""
    stop = threading.Event()
    hits = []

    def on_signal(signum, _frame):
        hits.append(signum)
        if len(hits) > 1:
            log.error("second signal: exiting without a clean stop")
            raise SystemExit(128 + signum)
        log.info("signal %d: stopping (again to force)", signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    while not stop.is_set() and not bridge.wait(0.2):
        stop.wait(0.2)
    if bridge.error is not None:
        raise UserError(f"bridge failed: {bridge.error}")
    return 0


def run_bridge(args: argparse.Namespace) -> int:
    from .bridge import Bridge
    from .options import bridge_options, open_sim, usb_connector

    setup_logging(args.verbose)
    options = bridge_options(args)
    with observe.observing(args) as observers:
        if args.sim:
            with open_sim(args, options) as sim:
                log.info("simulated device up: its network side is %s in namespace %s",
                         sim.address, sim.namespace)
                with Bridge(observers.wrap(sim.connect, options.tap), options) as bridge:
                    observers.attach(bridge)
                    return run_until_signalled(bridge)
        connect = usb_connector(args)
        with Bridge(observers.wrap(connect, options.tap), options) as bridge:
            observers.attach(bridge)
            return run_until_signalled(bridge)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            parser, module = _subcommand_parser(argv[0])
            args = parser.parse_args(argv[1:])
            return int(module.run(args) or 0)  # type: ignore[attr-defined]
        args = main_parser().parse_args(argv)
        return run_bridge(args)
    except UserError as exc:
        print(f"eembridge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
