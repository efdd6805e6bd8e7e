"""Command line: `eembridge [options]` runs the bridge; subcommands do the rest.

Errors the user can fix are reported as one line on stderr with a non-zero exit,
never as a traceback (eembridge.errors.UserError).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import CODEC, __version__, observe
from .errors import UserError
from .logsetup import FORMATS, setup_logging
from .transport import BUSY_POLLS

# Subcommand name -> module with add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "decode": ("eembridge.decode", "decode a usbmon capture of an EEM device into Ethernet pcap"),
    "demo": ("eembridge.demo", "stream a trace over a lossy simulated device and verify it"),
    "stats": ("eembridge.statscmd", "show the counters of running bridges"),
    "echo": ("eembridge.echocmd", "EEM-level ping of the device through a running bridge"),
    "replay": ("eembridge.replay", "run a usbmon capture through the codec, event by event"),
    "list": ("eembridge.listcmd", "list USB CDC-EEM devices and who holds them"),
    "release": ("eembridge.release",
                "give interfaces left detached by a killed bridge back to their kernel driver"),
    "install-service": ("eembridge.service",
                        "install the systemd unit and udev rule: one bridge per EEM device"),
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
    link.add_argument("--txqueuelen", type=int, default=None, metavar="PACKETS",
                      help="the TAP's transmit queue: packets waiting for the bridge (default 8 "
                           "with --offload, 64 without; the kernel's 500 adds ~100 ms under an "
                           "upload); drops are counted")
    link.add_argument("--persist", action="store_true", help="keep the TAP after exit")
    link.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                      help="let the kernel hand the bridge TCP packets of up to 64 KB and "
                           "checksums to fill in, and merge consecutive TCP segments on the way "
                           "up (TAP TSO/checksum offload, cut and merged by the C data path; "
                           "default: on when the C data path is there)")
    eem = parser.add_argument_group("EEM")
    mode = eem.add_mutually_exclusive_group()
    mode.add_argument("--tx-crc", dest="tx_crc", action="store_true", default=True,
                      help="send frames with a real CRC-32 (default)")
    mode.add_argument("--tx-sentinel", dest="tx_crc", action="store_false",
                      help="send frames with the DE AD BE EF sentinel instead of a CRC")
    eem.add_argument("--max-transfer", default=None, metavar="BYTES|frame",
                     help="largest bulk OUT transfer in bytes, batching frames into it "
                          "(default, for Linux f_eem: 12288 at high speed, 1536 at full "
                          "speed and SuperSpeed); frame: one frame per transfer, as Linux's "
                          "cdc_eem sends (default for a device not known to take more)")
    eem.add_argument("--in-flight", type=int, default=32,
                     help="bulk IN transfers kept queued (default 32, at most 64)")
    eem.add_argument("--in-transfer-size", type=int, default=4096, metavar="BYTES",
                     help="bytes per bulk IN transfer, a multiple of 1024 (default 4096); "
                          "a device's longer transfer simply continues in the next one")
    eem.add_argument("--out-chunk", default="f_eem", metavar="BYTES|f_eem",
                     help="the device receives OUT data into buffers of this size and takes "
                          "each on its own: no EEM packet crosses one, so a transfer of up to "
                          "--max-transfer carries many frames (default f_eem: Linux f_eem's "
                          "size, 1536; 2048 at SuperSpeed; 0: packets may cross anywhere)")
    eem.add_argument("--out-in-flight", type=int, default=None,
                     help="bulk OUT transfers of up to --max-transfer bytes in flight (default: "
                          "12 KB worth at full speed, 96 KB at high speed, 48 KB at "
                          "SuperSpeed; at most 32)")
    eem.add_argument("--busy-poll", type=int, default=BUSY_POLLS, metavar="N",
                     help="USB: after work, the data path thread looks for more this many "
                          f"times before it sleeps (default {BUSY_POLLS}; 0: sleep at once, "
                          "least CPU; more: faster under load, at some CPU when idle)")
    eem.add_argument("--keepalive", type=float, metavar="SECONDS",
                     help="send an EEM Echo this often and log a device that stops answering")
    parser.add_argument("--stats-socket", metavar="PATH",
                        help="UNIX socket for `eembridge stats` (default /run/eembridge/TAP.sock)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--log-format", choices=FORMATS, default="auto",
                        help="journal (<N> priority prefixes, no time), text, or json (one "
                             "object per line); auto: journal under systemd, else text")
    parser.add_argument("--garbage-log-interval", type=float, default=5.0, metavar="SECONDS",
                        help="at most one line per interval summarising dropped garbage (default 5)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Which real device to bridge (--sim ignores them, except to pick a config section)."""
    dev = parser.add_argument_group("USB device (see `eembridge list`)")
    dev.add_argument("--device", metavar="VID:PID|BUS:ADDR",
                     help="the device by vendor:product id (hex) or bus:address (decimal)")
    dev.add_argument("--serial", metavar="S", help="the device with this serial number")
    dev.add_argument("--port", metavar="1-2.3", help="the device at this USB port path")
    dev.add_argument("--interface", type=int, metavar="N",
                     help="the EEM interface with this number, for a device that has several")
    dev.add_argument("--wait", action="store_true",
                     help="wait for the device to appear instead of failing")
    dev.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                     help="like --wait, but fail naming the device after SECONDS without it")
    service = parser.add_argument_group("service and configuration")
    service.add_argument("--config", action="append", metavar="FILE",
                         help="TOML configuration (repeatable; default /etc/eembridge/*.toml)")
    service.add_argument("--instance", metavar="NAME",
                         help="systemd instance: a port path (1-2.3) or serial:SERIAL "
                              "(\\xNN escapes as systemd-escape writes them)")


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    sim = parser.add_argument_group("simulated device (--sim)")
    sim.add_argument("--sim-loss", type=float, default=0.0, metavar="P",
                     help="probability that a USB packet is lost (each direction)")
    sim.add_argument("--sim-flip", type=float, default=0.0, metavar="P",
                     help="probability that a USB packet has one bit flipped")
    sim.add_argument("--sim-garbage", type=float, default=0.0, metavar="P",
                     help="probability that garbage (a reserved command) precedes a packet on IN")
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


def explicit_dests(argv: list[str]) -> set[str]:
    """The options given on the command line (they override the config file)."""
    parser = main_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _rest = parser.parse_known_args(argv)
    return set(vars(given))


def apply_config(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill in options from the config file's section for this device; flags win."""
    from .config import SYSFS_USB, config_files, identify, load
    from .service import parse_instance

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
    explicit = explicit_dests(argv)
    for dest, value in values.items():
        if dest not in explicit:
            setattr(args, dest, value)
    if section is None:
        log.info("config %s: no section for %s; [defaults] only", ", ".join(config.files),
                 identity.describe())
    else:
        log.info("config %s for %s", section.where, identity.describe())


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
    if args.metrics:
        from .metrics import parse_address

        if parse_address(args.metrics)[1] < 1024:
            keep.append("net_bind_service")  # the metrics server binds after start-up

    def drop() -> None:
        from . import privileges

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


def run_bridge(args: argparse.Namespace, argv: list[str]) -> int:
    from .bridge import Bridge
    from .options import bridge_options, open_sim, usb_connector

    setup_logging(args.verbose, args.log_format)
    stop = stop_on_signals()
    apply_config(args, argv)
    options = bridge_options(args)
    with observe.observing(args) as observers:
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
        args = main_parser().parse_args(argv)
        return run_bridge(args, argv)
    except UserError as exc:
        print(f"eembridge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
