"""labgrid resources for an EEM board: on its own host, and as a client sees it remotely.

`EEMBoard` is a USB device matched the way labgrid matches its other USB resources (a
`match` on udev properties or sysfs attributes: ID_PATH, ID_SERIAL_SHORT, serial,
sys_name ...), plus what its bridge makes of it: the TAP's name, addresses and the
board's address; or, with `link: user`, the board's TCP ports to forward. `RemoteEEMBoard` is what `eembridge-labgrid-exporter` publishes for
it: where it is (host, bus, port) and the same TAP settings. The coordinator carries
scalar parameters only, so addresses and forwards travel as comma-separated strings.
"""

from __future__ import annotations

from typing import Any

import attr
from labgrid.factory import target_factory
from labgrid.resource.remote import RemoteUSBResource
from labgrid.resource.udev import USBResource

from .bridgeproc import addresses_of, check_link, check_tap, forwarded_of, forwards_of

_opt_str = attr.validators.optional(attr.validators.instance_of(str))


def _args_of(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError("EEM board args must be a list of bridge options, not one string")
    return tuple(str(v) for v in value or ())


@target_factory.reg_resource
@attr.s(eq=False)
class EEMBoard(USBResource):
    """A CDC-EEM board on this host; its bridge is `eembridge --tap TAP --port PATH`."""

    tap: str = attr.ib(kw_only=True, converter=check_tap)
    addresses: tuple[str, ...] = attr.ib(default=(), kw_only=True, converter=addresses_of)
    peer: str | None = attr.ib(default=None, kw_only=True, validator=_opt_str)
    socket: str | None = attr.ib(default=None, kw_only=True, validator=_opt_str)
    args: tuple[str, ...] = attr.ib(default=(), kw_only=True, converter=_args_of)
    # `link: user`: the bridge ends in libslirp, no TAP; `forwards` are the board's TCP
    # ports reached through loopback ports of this host (a remote client's way in).
    link: str = attr.ib(default="tap", kw_only=True, converter=check_link)
    forwards: tuple[int, ...] = attr.ib(default=(), kw_only=True, converter=forwards_of)

    def filter_match(self, device: Any) -> bool:
        # The USB device itself, not one of its interfaces (they share SUBSYSTEM usb).
        return device.device_type == "usb_device" and super().filter_match(device)

    @property
    def serial(self) -> str | None:
        device = self._get_usb_device()
        if device is None:
            return None
        value = device.attributes.get("serial")
        return value.decode(errors="replace").strip() if value else None


@target_factory.reg_resource
@attr.s(eq=False)
class RemoteEEMBoard(RemoteUSBResource):
    """An EEMBoard on an exporter; its bridge runs there while the place is acquired."""

    serial: str | None = attr.ib(default=None, kw_only=True, validator=_opt_str)
    tap: str = attr.ib(kw_only=True, converter=check_tap)
    addresses: tuple[str, ...] = attr.ib(default=(), kw_only=True, converter=addresses_of)
    peer: str | None = attr.ib(default=None, kw_only=True, validator=_opt_str)
    socket: str | None = attr.ib(default=None, kw_only=True, validator=_opt_str)
    python: str = attr.ib(default="python3", kw_only=True, validator=attr.validators.instance_of(str))
    link: str = attr.ib(default="tap", kw_only=True, converter=check_link)
    # board TCP port -> the exporter's loopback port reaching it, while the bridge runs
    forwarded: dict[int, int] = attr.ib(factory=dict, kw_only=True, converter=forwarded_of)

    def __attrs_post_init__(self) -> None:
        self.timeout = 10.0
        super().__attrs_post_init__()
