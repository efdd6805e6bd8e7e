"""Configuration files: one TOML section per device, flags on the command line win.

Files: `--config FILE` (repeatable), or else every /etc/eembridge/*.toml in name order.
Each table is one device, picked by exactly one selector; `[defaults]` applies to all:

    [defaults]
    keepalive = 5

    [bench-a]                      # any name; used in messages only
    serial = "E66138528361BD2F"    # or: port = "1-2.3"   or: device = "1d6b:0104"
    tap = "eem-a"
    addresses = ["169.254.10.2/24"]
    peer = "169.254.10.1"
    peer-mac = "02:00:00:00:0a:01"
    mtu = 1500
    tx = "crc"                     # or "sentinel"

Keys are the main job's long options without the dashes (`addresses` for `--ip`,
`tx` for `--tx-crc/--tx-sentinel`). The device is matched by serial first, then by
port path, then by VID:PID; [defaults] and the matching section are merged, and any
option given on the command line overrides both.

Every mistake is a ConfigError naming file, line and key. tomllib reports no positions
for values, so `_locate` finds them in the source text: a table header opens a
section, and `key =` inside it is that key's line.
"""

from __future__ import annotations

import difflib
import glob
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .transport import MAX_BUSY_POLLS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 gets the same parser from PyPI
    import tomli as tomllib

CONFIG_DIR = "/etc/eembridge"
DEFAULTS = "defaults"
SYSFS_USB = "/sys/bus/usb/devices"

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
PORT_RE = re.compile(r"^\d+-\d+(\.\d+)*$")  # bus-port.port...: what sysfs and --port use
VIDPID_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")


class ConfigError(UserError):
    """A configuration mistake; the message starts with FILE:LINE."""


class _Invalid(ValueError):
    """A value that is wrong; the caller adds file, line and key."""


# --- value checks: each takes the TOML value and returns what goes into argparse -------

def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type(value)}")
    if not value:
        raise _Invalid("must not be empty")
    return value


def _out_chunk(value: Any) -> str:
    if value == "f_eem" or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)  # options.parse_out_chunk checks the number as for the flag
    raise _Invalid(f'expected a number of bytes or "f_eem", got {_type(value)}')


def _max_transfer(value: Any) -> str:
    if value == "frame" or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)  # options.parse_max_transfer checks the number as for the flag
    raise _Invalid(f'expected a number of bytes or "frame", got {_type(value)}')


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # TOML true is not 1
            raise _Invalid(f"expected an integer, got {_type(value)}")
        if value < low or (high is not None and value > high):
            raise _Invalid(f"{value} out of range ({low}..{high if high is not None else ''})")
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected a number of seconds, got {_type(value)}")
    if not value > 0:
        raise _Invalid(f"{value} must be more than 0 seconds")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type(value)}")
    return value


def _ifname(value: Any) -> str:
    from .tap import validate_ifname

    name = _string(value)
    try:
        return validate_ifname(name)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _addresses(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of ADDR/PREFIX strings, got {_type(value)}")
    for item in value:
        if not isinstance(item, str) or "/" not in item:
            raise _Invalid(f"{item!r} is not ADDR/PREFIX (e.g. \"169.254.7.2/24\")")
        try:
            ipaddress.ip_interface(item)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return list(value)


def _ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(_string(value)))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _mac(value: Any) -> str:
    if not MAC_RE.match(_string(value)):
        raise _Invalid(f"{value!r} is not a MAC address like 02:00:00:00:00:01")
    return str(value).lower()


def _tx(value: Any) -> bool:
    if value not in ("crc", "sentinel"):
        raise _Invalid(f"expected \"crc\" or \"sentinel\", got {value!r}")
    return value == "crc"


def _port(value: Any) -> str:
    if not PORT_RE.match(_string(value)):
        raise _Invalid(f"{value!r} is not a USB port path like \"1-2.3\"")
    return str(value)


def _vidpid(value: Any) -> str:
    if not VIDPID_RE.match(_string(value)):
        raise _Invalid(f"{value!r} is not VID:PID in hex like \"1d6b:0104\"")
    return str(value).lower()


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Key:
    dest: str  # the argparse dest the value goes to
    check: Callable[[Any], Any]


KEYS: dict[str, Key] = {
    "tap": Key("tap", _ifname),
    "addresses": Key("ip", _addresses),
    "peer": Key("peer", _ip),
    "peer-mac": Key("peer_mac", _mac),
    "mtu": Key("mtu", _integer(576, 9000)),
    "mac": Key("mac", _mac),
    "txqueuelen": Key("txqueuelen", _integer(1, 100000)),
    "tx": Key("tx_crc", _tx),
    "keepalive": Key("keepalive", _seconds),
    "max-transfer": Key("max_transfer", _max_transfer),
    "in-flight": Key("in_flight", _integer(1, 64)),
    "in-transfer-size": Key("in_transfer_size", _integer(1024, 65536)),
    "out-in-flight": Key("out_in_flight", _integer(1, 256)),
    "out-chunk": Key("out_chunk", _out_chunk),
    "busy-poll": Key("busy_poll", _integer(0, MAX_BUSY_POLLS)),
    "interface": Key("interface", _integer(0, 255)),  # a device with several EEM functions
    "persist": Key("persist", _boolean),
    "offload": Key("offload", _boolean),
    "stats-socket": Key("stats_socket", _string),
    "garbage-log-interval": Key("garbage_log_interval", _seconds),
    "wait-timeout": Key("wait_timeout", _seconds),
}
SELECTORS: dict[str, Callable[[Any], str]] = {"serial": _string, "port": _port, "device": _vidpid}
MATCH_ORDER = ("serial", "port", "device")


# --- where things are in the source text -----------------------------------------------

_HEADER_RE = re.compile(r"""^\s*\[(?!\[)\s*(?P<name>"[^"]*"|'[^']*'|[^\]]+?)\s*\]""")
_KEY_RE = re.compile(r"""^\s*(?P<key>"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def _locate(text: str) -> dict[tuple[str | None, str | None], int]:
    """(section, key) -> line number; (section, None) is the section's header line."""
    lines: dict[tuple[str | None, str | None], int] = {}
    section: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER_RE.match(line)
        if header:
            section = header.group("name").strip("\"'")
            lines.setdefault((section, None), number)
            continue
        key = _KEY_RE.match(line)
        if key:
            lines.setdefault((section, key.group("key").strip("\"'")), number)
    return lines


# --- the loaded configuration ------------------------------------------------------------

@dataclass
class Section:
    name: str
    path: str
    line: int
    selector: tuple[str, str] | None  # ("serial", "X"), ...; None for [defaults]
    values: dict[str, Any] = field(default_factory=dict)  # argparse dest -> value

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line} [{self.name}]"


@dataclass
class Config:
    defaults: list[Section] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def find(self, identity: DeviceIdentity) -> Section | None:
        """The section for this device: by serial, else port, else VID:PID."""
        for kind in MATCH_ORDER:
            wanted = getattr(identity, kind)
            if wanted is None:
                continue
            if kind == "device":
                wanted = wanted.lower()
            for section in self.sections:
                if section.selector == (kind, wanted):
                    return section
        return None

    def values_for(self, identity: DeviceIdentity) -> tuple[dict[str, Any], Section | None]:
        """Merged option values ([defaults] in file order, then the device's section)."""
        values: dict[str, Any] = {}
        for defaults in self.defaults:
            values.update(defaults.values)
        section = self.find(identity)
        if section is not None:
            values.update(section.values)
        return values, section


def config_files(explicit: Iterable[str] | None, directory: str = CONFIG_DIR) -> list[str]:
    """The files to read: the explicit ones, or every *.toml in `directory` by name."""
    explicit = list(explicit or [])
    if explicit:
        return explicit
    return sorted(glob.glob(os.path.join(glob.escape(directory), "*.toml")))


def load(paths: Iterable[str]) -> Config:
    config = Config()
    seen: dict[tuple[str, str], Section] = {}
    names: dict[str, Section] = {}
    for path in paths:
        try:
            with open(path, "rb") as stream:
                raw = stream.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message names line and column
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        config.files.append(path)
        lines = _locate(text)
        for name, table in document.items():
            if not isinstance(table, dict):
                line = lines.get((None, name), 1)
                raise ConfigError(f"{path}:{line}: key {name!r} is outside any section "
                                  f"(put it under [{DEFAULTS}] or a device's section)")
            section = _section(path, name, table, lines)
            if section.selector is None:
                config.defaults.append(section)
                continue
            if name in names:
                raise ConfigError(f"{section.where}: section name already used at "
                                  f"{names[name].where}")
            names[name] = section
            first = seen.get(section.selector)
            if first is not None:
                kind, value = section.selector
                line = lines.get((name, kind), section.line)
                raise ConfigError(f"{path}:{line}: [{name}] {kind}: duplicate selector "
                                  f"{value!r}, already used by {first.where}")
            seen[section.selector] = section
            config.sections.append(section)
    return config


def _section(path: str, name: str, table: dict[str, Any],
             lines: dict[tuple[str | None, str | None], int]) -> Section:
    header = lines.get((name, None), 1)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}:{lines.get((name, key), header)}: [{name}] {key}: {problem}")

    section = Section(name, path, header, selector=None)
    selectors = []
    for key, value in table.items():
        if key in SELECTORS:
            if name == DEFAULTS:
                raise fail(key, f"a selector cannot be in [{DEFAULTS}]")
            try:
                selectors.append((key, SELECTORS[key](value)))
            except _Invalid as exc:
                raise fail(key, str(exc)) from None
            continue
        spec = KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, [*KEYS, *SELECTORS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(key, f"unknown key{hint}")
        try:
            section.values[spec.dest] = spec.check(value)
        except _Invalid as exc:
            raise fail(key, str(exc)) from None
    if name != DEFAULTS:
        if not selectors:
            raise ConfigError(f"{path}:{header}: [{name}] has no selector: give one of "
                              f"serial, port or device (VID:PID)")
        if len(selectors) > 1:
            raise fail(selectors[1][0], "give exactly one selector per section "
                                        f"(also has {selectors[0][0]})")
        section.selector = selectors[0]
    return section


# --- which device are we? ----------------------------------------------------------------

@dataclass
class DeviceIdentity:
    serial: str | None = None
    port: str | None = None
    device: str | None = None  # VID:PID, lower case

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("serial", self.serial), ("port", self.port),
                                         ("device", self.device)) if v]
        return ", ".join(parts) or "no selector"


def _read(path: str) -> str | None:
    try:
        with open(path) as stream:
            return stream.read().strip() or None
    except OSError:
        return None


def identify(serial: str | None = None, port: str | None = None, device: str | None = None,
             sysfs: str | None = SYSFS_USB) -> DeviceIdentity:
    """What we know of the device from the selection flags, completed from sysfs.

    With --port the serial and VID:PID of the device there are read from sysfs (so a
    section by serial applies to a bridge started for a port); with --serial or a
    VID:PID the device is looked up the same way. `device` may be BUS:ADDR (decimal),
    which selects but never matches a section. sysfs=None uses the flags only (--sim).
    """
    identity = DeviceIdentity(serial, port, device.lower() if device and VIDPID_RE.match(device)
                              else None)
    if sysfs is None or not os.path.isdir(sysfs) or not (serial or port or identity.device):
        return identity
    found = []
    for entry in sorted(os.listdir(sysfs)):
        if not PORT_RE.match(entry):
            continue  # interfaces (1-2:1.0) and root hubs (usb1)
        base = os.path.join(sysfs, entry)
        vid, pid = _read(os.path.join(base, "idVendor")), _read(os.path.join(base, "idProduct"))
        candidate = DeviceIdentity(_read(os.path.join(base, "serial")), entry,
                                   f"{vid}:{pid}".lower() if vid and pid else None)
        if ((port is None or candidate.port == port)
                and (serial is None or candidate.serial == serial)
                and (identity.device is None or candidate.device == identity.device)):
            found.append(candidate)
    if len(found) == 1:
        return found[0]
    return identity
