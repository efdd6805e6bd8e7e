"""Turns checked option values into what the main job runs: the bridge's options, the
USB connector, the simulated link. The facts of each option live in core.options; the
checks that relate two options, and the objects built from them, live here."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..core.errors import UserError
from ..core.options import max_transfer_and_batch, origin
from ..core.transport import Transport

if TYPE_CHECKING:
    from ..bridge import BridgeOptions


def _offload(args: argparse.Namespace) -> bool | None:
    """--offload as given; by default off with --pcap, whose capture on the TAP would
    otherwise hold the kernel's 64 KB packets instead of the frames the device gets."""
    offload = getattr(args, "offload", None)
    if offload is None and getattr(args, "pcap", None):
        return False
    return offload


def bridge_options(args: argparse.Namespace) -> BridgeOptions:
    """BridgeOptions from checked option values (cli.resolve), after the checks that
    relate two options; each refusal names where the value came from (origin)."""
    from ..bridge import BridgeOptions
    from ..observe.control import socket_path

    link = getattr(args, "link", "tap")
    # The user link needs no neighbour entry: libslirp learns the board's MAC by ARP.
    if bool(args.peer) != bool(args.peer_mac) and not (link == "user" and args.peer):
        given, missing = (("peer", "--peer-mac (the device's MAC)") if args.peer
                          else ("peer_mac", "--peer (the device's IP)"))
        if getattr(args, "origins", {}).get(given):
            raise UserError(f"{origin(args, given)}: a static neighbour entry needs both peer "
                            f"and peer-mac; missing {missing.split()[0].lstrip('-')}")
        raise UserError(f"--peer and --peer-mac go together: a static neighbour entry needs "
                        f"both; missing {missing}")
    if link != "tap" and getattr(args, "offload", None):
        where = getattr(args, "origins", {}).get("offload") or "--offload"
        raise UserError(f"{where}: TAP offload is for --link tap; the {link.upper()} link's "
                        "frames are not the kernel's (--no-offload, or --link tap)")
    for flag, dest in (("--forward", "forward"), ("--nat", "nat")):
        if getattr(args, dest, None) and link != "user":
            where = getattr(args, "origins", {}).get(dest) or flag
            raise UserError(f"{where} is for --link user (libslirp's ports and NAT); this bridge "
                            f"has --link {link}")
    if getattr(args, "dhcp", False):
        _check_dhcp(args)
    max_transfer, batch = max_transfer_and_batch(args.max_transfer)
    # Every option whose name is a BridgeOptions field goes across as it is (the option
    # table's dest names are the field names); these are the ones that change on the way.
    fields: dict[str, Any] = {f.name: getattr(args, f.name)
                              for f in dataclasses.fields(BridgeOptions) if hasattr(args, f.name)}
    fields.update(addresses=list(args.ip), forwards=list(getattr(args, "forward", [])),
                  max_transfer=max_transfer, batch=batch,
                  offload=_offload(args), stats_socket=args.stats_socket or socket_path(args.tap))
    options = BridgeOptions(**fields)
    if options.max_transfer is not None and options.max_transfer < options.max_length + 4:
        raise UserError(
            f"{origin(args, 'max_transfer')}: cannot hold one full frame of MTU "
            f"{options.mtu} (needs at least {options.max_length + 4})"
        )
    return options


def _check_dhcp(args: argparse.Namespace) -> None:
    """--dhcp needs the TUN link, and an IPv4 address from --ip would contend with the
    lease's (IPv6 ones may stay)."""
    from ..bridge import DHCP_NEEDS_TUN

    where = getattr(args, "origins", {}).get("dhcp") or "--dhcp"
    if getattr(args, "link", "tap") != "tun":
        raise UserError(f"{where} {DHCP_NEEDS_TUN}" if where == "--dhcp" else
                        f"{where}: {DHCP_NEEDS_TUN}")
    static = [a for a in args.ip if ipaddress.ip_interface(a).version == 4]
    if static:
        raise UserError(f"{where}: the IPv4 address comes from the board's DHCP server; "
                        f"drop --ip {static[0]} (or --dhcp)")


def usb_connector(args: argparse.Namespace) -> Callable[[], Transport]:
    try:
        from ..usb.device import connector
    except ImportError:
        raise UserError(
            "the libusb transport is not built in this version; use --sim for the simulated device"
        ) from None
    return connector(args)


def open_sim(args: argparse.Namespace, options: BridgeOptions):  # -> SimLink
    """The simulated device the main job bridges with --sim."""
    from ..sim.faults import Faults
    from ..sim.link import SimLink
    from ..sim.userns import UserNsSimLink

    try:
        faults = Faults(loss=args.sim_loss, flip=args.sim_flip,
                        garbage=getattr(args, "sim_garbage", 0.0), seed=args.sim_seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # The user link needs no root on the host's side: nor does the device's, then, in an
    # unprivileged user namespace (sim/userns.py).
    unprivileged = getattr(args, "link", "tap") == "user" and os.geteuid() != 0
    with needs_privileges("the simulated device (--sim; with --link user it runs without root)"):
        return (UserNsSimLink if unprivileged else SimLink)(
            address=args.sim_ip,
            max_packet=args.sim_max_packet,
            tx_crc=args.sim_tx == "crc",
            batch=args.sim_batch,
            mtu=options.mtu,
            faults=faults,
        )


@contextlib.contextmanager
def needs_privileges(what: str) -> Iterator[None]:
    """A PermissionError from creating namespaces and TAPs is one line saying what is needed."""
    try:
        yield
    except PermissionError as exc:
        raise UserError(f"{what} needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN, for its "
                        f"network namespace and TAP ({exc.strerror or exc})") from None
