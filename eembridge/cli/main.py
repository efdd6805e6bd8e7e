"""Command line: `eembridge [options]` runs the bridge; subcommands do the rest.

Errors the user can fix are reported as one line on stderr with a non-zero exit,
never as a traceback (eembridge.core.errors.UserError).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from .. import CODEC, __version__
from ..core.errors import UserError
from ..core.options import BY_DEST, add_arguments, one_line
from ..observe.logs import setup_logging
from ..observe.observers import observing

if TYPE_CHECKING:
    from ..bridge import BridgeOptions

# Subcommand name -> module with add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "decode": ("eembridge.capture.decode", "decode a usbmon capture of an EEM device into Ethernet pcap"),
    "demo": ("eembridge.cli.demo", "stream a trace over a lossy simulated device and verify it"),
    "stats": ("eembridge.cli.stats", "show the counters of running bridges"),
    "echo": ("eembridge.cli.echo", "EEM-level ping of the device through a running bridge"),
    "replay": ("eembridge.capture.replay", "run a usbmon capture through the codec, event by event"),
    "list": ("eembridge.cli.devices", "list USB CDC-EEM devices and who holds them"),
    "release": ("eembridge.cli.release",
                "give interfaces left detached by a killed bridge back to their kernel driver"),
    "install-service": ("eembridge.cli.service",
                        "install the systemd unit and udev rule: one bridge per EEM device"),
}

log = logging.getLogger("eembridge")


def version_text() -> str:
    return f"eembridge {__version__} (codec: {CODEC})"


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (UserError), not the usage block and a line.

    Values are checked by options.OPTIONS (their type= raises UserError naming flag and
    value); what reaches error() is a mistake of form: an unknown flag, a missing value."""

    def error(self, message: str) -> NoReturn:
        raise UserError(one_line(f"{message} ({self.prog} --help lists the options)"))


def _subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"eembridge {name}", description=help_text)
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser, module


def main_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {help_text}" for name, (_m, help_text) in SUBCOMMANDS.items())
    parser = Parser(
        prog="eembridge",
        description="Userspace USB CDC-EEM host bridge: EEM device <-> TAP interface.",
        epilog=f"subcommands (eembridge SUBCOMMAND --help):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    add_arguments(parser)
    return parser


@functools.cache
def _parser_and_defaults() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The main parser with its defaults taken out, so what it returns is what was given."""
    parser = main_parser()
    defaults = {}
    for action in parser._actions:
        if action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    return parser, defaults


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """(options with defaults filled in, the dests given on the command line: they
    override the config file)."""
    parser, defaults = _parser_and_defaults()
    args = parser.parse_args(argv)
    explicit = set(vars(args))
    for dest in explicit & BY_DEST.keys():
        # argparse takes `--flag=--` as "--" removed, passing no value through type=.
        option, value = BY_DEST[dest], getattr(args, dest)
        if option.action in ("store", "append") and any(
                isinstance(v, list) for v in (value if option.action == "append" else [value])):
            raise UserError(f"{option.flag}: expected a value ({parser.prog} --help lists "
                            "the options)")
    for dest, value in defaults.items():
        if dest not in explicit:
            setattr(args, dest, copy.copy(value))
    return args, explicit


def apply_config(args: argparse.Namespace, explicit: set[str]) -> None:
    """Fill in options from the config file's section for this device; flags win.

    args.origins records the file, line and key of each value taken, so a check that
    relates two options (options.bridge_options) names the line, not a flag."""
    from ..core.config import SYSFS_USB, config_files, identify, load
    from ..core.options import parse_instance

    args.origins = {}
    if args.instance:
        kind, value = parse_instance(args.instance)
        if getattr(args, kind) not in (None, value):
            raise UserError(f"--instance {args.instance} contradicts --{kind} {getattr(args, kind)}")
        setattr(args, kind, value)
    paths = config_files(args.config)
    if not paths:
        return
    config = load(paths)
    identity = identify(args.serial, args.port, args.device, sysfs=None if args.sim else SYSFS_USB)
    values, section = config.values_for(identity)
    origins = config.origins_for(identity)
    for dest, value in values.items():
        if dest not in explicit:
            setattr(args, dest, value)
            args.origins[dest] = origins[dest]
    if section is None:
        log.info("config %s: no section for %s; [defaults] only", ", ".join(config.files),
                 identity.describe())
    else:
        log.info("config %s for %s", section.where, identity.describe())


def resolve(argv: list[str]) -> tuple[argparse.Namespace, BridgeOptions]:
    """The command line and the config file to checked options; opens nothing.

    Every value is checked here, before a namespace, TAP or file is made: bad input is
    one line (UserError) and leaves nothing behind."""
    from .assemble import bridge_options

    args, explicit = parse_command_line(argv)
    apply_config(args, explicit)
    return args, bridge_options(args)


def stop_on_signals() -> threading.Event:
    """From now on SIGINT/SIGTERM ask for a clean stop (the event); a second forces it.

    Installed before anything is opened: a signal during start-up (the simulated
    device's namespace, the TAP, the control socket) then waits for start-up to end
    and stops cleanly, instead of killing the process with the namespace left behind
    or the device's kernel driver still detached."""
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
    return stop


def run_until_signalled(bridge, stop: threading.Event) -> int:
    """Run the bridge until `stop` is set (stop_on_signals) or it ends by itself."""
    while not stop.is_set() and not bridge.wait(0.2):
        stop.wait(0.2)
    if isinstance(bridge.error, UserError):
        raise bridge.error
    if bridge.error is not None:
        raise UserError(f"bridge failed: {bridge.error}")
    return 0


def drop_privileges(args: argparse.Namespace) -> Callable[[], None]:
    """What the bridge calls once its TAP is ready: keep only what later steps need."""
    keep = []
    if args.pcap:
        keep.append("net_raw")  # the AF_PACKET capture opens when the device connects
    if getattr(args, "dhcp", False):
        keep.append("net_admin")  # each lease's address and route, added and removed later
    if args.metrics:
        from ..core.options import parse_address

        if parse_address(args.metrics)[1] < 1024:
            keep.append("net_bind_service")  # the metrics server binds after start-up

    def drop() -> None:
        from ..link import privileges

        try:
            report = privileges.drop(keep)
        except OSError as exc:
            log.warning("could not drop capabilities: %s (running with what we have)", exc)
            return
        log.info("%s", report.line())

    return drop


@contextlib.contextmanager
def sim_closed_by_an_early_thread(sim) -> Iterator[Any]:
    """Tear the simulated device down (its namespace and TAP: CAP_SYS_ADMIN, CAP_NET_ADMIN)
    from a thread started now, before the bridge drops its capabilities: that teardown is
    the simulated device's business, not the bridge's, and keeps the bridge's drop whole."""
    done = threading.Event()
    errors: list[BaseException] = []

    def close_when_done() -> None:
        done.wait()
        try:
            sim.close()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    closer = threading.Thread(target=close_when_done, name="sim-closer", daemon=True)
    closer.start()
    try:
        yield sim
    finally:
        done.set()
        closer.join()
        if errors:
            raise errors[0]


def sim_replug_on_sigusr1(sim) -> None:
    """--sim: SIGUSR1 unplugs the simulated device and plugs it back 1 s later."""

    def cycle() -> None:
        sim.device.unplug()
        time.sleep(1.0)
        sim.device.replug()

    def on_signal(_signum, _frame) -> None:
        log.info("SIGUSR1: unplugging the simulated device for 1 s")
        threading.Thread(target=cycle, name="sim-replug", daemon=True).start()

    signal.signal(signal.SIGUSR1, on_signal)


def run_bridge(args: argparse.Namespace, explicit: set[str]) -> int:
    from ..bridge import Bridge
    from .assemble import bridge_options, open_sim, usb_connector

    setup_logging(args.verbose, args.log_format)
    stop = stop_on_signals()
    apply_config(args, explicit)
    options = bridge_options(args)
    with observing(args) as observers:
        if args.sim:
            with sim_closed_by_an_early_thread(open_sim(args, options)) as sim:
                log.info("simulated device up: its network side is %s in namespace %s",
                         sim.address, sim.namespace)
                sim_replug_on_sigusr1(sim)
                with Bridge(observers.wrap(sim.connect, options.tap), options,
                            on_link_ready=drop_privileges(args)) as bridge:
                    observers.attach(bridge)
                    return run_until_signalled(bridge, stop)
        connect = usb_connector(args)
        with Bridge(observers.wrap(connect, options.tap), options,
                    on_link_ready=drop_privileges(args)) as bridge:
            observers.attach(bridge)
            return run_until_signalled(bridge, stop)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            parser, module = _subcommand_parser(argv[0])
            args = parser.parse_args(argv[1:])
            return int(module.run(args) or 0)  # type: ignore[attr-defined]
        args, explicit = parse_command_line(argv)
        try:
            return run_bridge(args, explicit)
        finally:
            # The stopped bridge's objects form cycles that hold memoryviews of its
            # buffers. Collected at interpreter exit instead, a bytearray can go before
            # its views and CPython prints "BufferError: memoryview has 1 exported
            # buffer" after our one line (seen when the TAP is deleted under the bridge).
            gc.collect()
    except UserError as exc:
        print(f"eembridge: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
