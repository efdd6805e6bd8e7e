"""From command-line arguments to a bridge: options, the device to connect to."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .bridge import BridgeOptions
from .errors import UserError
from .stats import socket_path
from .transport import BUSY_POLLS, MAX_BUSY_POLLS, Transport


def parse_out_chunk(value: str) -> int | str:
    """--out-chunk: "f_eem", or a number of bytes (0: off) a device buffer holds."""
    if value == "f_eem":
        return value
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"--out-chunk {value}: expected a number of bytes or f_eem") from None
    if size and not (1024 < size <= 65536 and size % 64 == 0):
        raise UserError(f"--out-chunk {value}: expected 0, f_eem, or a multiple of 64 "
                        "from 1088 to 65536")
    return size


def parse_max_transfer(value: object) -> tuple[int | None, bool | None]:
    """--max-transfer: (max_transfer, batch). None: by the device; "frame": one frame
    per transfer; a number of bytes: batches of up to that."""
    if value is None:
        return None, None
    if value == "frame":
        return None, False
    try:
        size = int(str(value))
    except ValueError:
        raise UserError(f"--max-transfer {value}: expected a number of bytes or frame") from None
    if not 64 <= size <= 1 << 20:
        raise UserError(f"--max-transfer {value} out of range (64..{1 << 20}, or frame)")
    return size, True


def _offload(args: argparse.Namespace) -> bool | None:
    """--offload as given; by default off with --pcap, whose capture on the TAP would
    otherwise hold the kernel's 64 KB packets instead of the frames the device gets."""
    offload = getattr(args, "offload", None)
    if offload is None and getattr(args, "pcap", None):
        return False
    return offload


def bridge_options(args: argparse.Namespace) -> BridgeOptions:
    if not 576 <= args.mtu <= 9000:
        raise UserError(f"--mtu {args.mtu} out of range (576..9000)")
    if not 1 <= args.in_flight <= 64:
        raise UserError(f"--in-flight {args.in_flight} out of range (1..64)")
    if not (1024 <= args.in_transfer_size <= 65536 and args.in_transfer_size % 1024 == 0):
        raise UserError(f"--in-transfer-size {args.in_transfer_size}: expected a multiple of 1024 "
                        "(every max packet size divides it) from 1024 to 65536")
    if args.txqueuelen is not None and not 1 <= args.txqueuelen <= 100000:
        raise UserError(f"--txqueuelen {args.txqueuelen} out of range (1..100000)")
    if bool(args.peer) != bool(args.peer_mac):
        missing = "--peer-mac (the device's MAC)" if args.peer else "--peer (the device's IP)"
        raise UserError(f"--peer and --peer-mac go together: a static neighbour entry needs "
                        f"both; missing {missing}")
    out_chunk = parse_out_chunk(str(getattr(args, "out_chunk", "f_eem")))
    max_transfer, batch = parse_max_transfer(args.max_transfer)
    if args.out_in_flight is not None and args.out_in_flight < 1:
        raise UserError("--out-in-flight must be at least 1")
    options = BridgeOptions(
        tap=args.tap,
        addresses=list(args.ip),
        peer=args.peer,
        peer_mac=args.peer_mac,
        mtu=args.mtu,
        mac=args.mac,
        txqueuelen=args.txqueuelen,
        tx_crc=args.tx_crc,
        max_transfer=max_transfer,
        batch=batch,
        in_flight=args.in_flight,
        in_transfer_size=args.in_transfer_size,
        out_in_flight=args.out_in_flight,
        out_chunk=out_chunk,
        keepalive=args.keepalive,
        persist=args.persist,
        offload=_offload(args),
        stats_socket=args.stats_socket or socket_path(args.tap),
        garbage_log_interval=getattr(args, "garbage_log_interval", 5.0),
    )
    if options.garbage_log_interval <= 0:
        raise UserError("--garbage-log-interval must be more than 0 seconds")
    if options.max_transfer is not None and options.max_transfer < options.max_length + 4:
        raise UserError(
            f"--max-transfer {options.max_transfer} cannot hold one full frame of MTU "
            f"{options.mtu} (needs at least {options.max_length + 4})"
        )
    return options


def usb_connector(args: argparse.Namespace) -> Callable[[], Transport]:
    busy_poll = getattr(args, "busy_poll", BUSY_POLLS)
    if not 0 <= busy_poll <= MAX_BUSY_POLLS:
        raise UserError(f"--busy-poll {busy_poll} out of range (0..{MAX_BUSY_POLLS})")
    try:
        from .usb import connector
    except ImportError:
        raise UserError(
            "the libusb transport is not built in this version; use --sim for the simulated device"
        ) from None
    return connector(args)


def open_sim(args: argparse.Namespace, options: BridgeOptions):  # -> SimLink
    """The simulated device the main job bridges with --sim."""
    from .sim.faults import Faults
    from .sim.link import SimLink

    try:
        faults = Faults(loss=args.sim_loss, flip=args.sim_flip,
                        garbage=getattr(args, "sim_garbage", 0.0), seed=args.sim_seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return SimLink(
        address=args.sim_ip,
        max_packet=args.sim_max_packet,
        tx_crc=args.sim_tx == "crc",
        batch=args.sim_batch,
        mtu=options.mtu,
        faults=faults,
    )
