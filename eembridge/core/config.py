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
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .options import MAC_RE, OPTIONS, PORT_RE, VIDPID_RE, Invalid, Port, Text, VidPid, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 gets the same parser from PyPI
    import tomli as tomllib

__all__ = ["MAC_RE", "PORT_RE", "VIDPID_RE", "ConfigError", "Config", "KEYS", "load", "identify"]

CONFIG_DIR = "/etc/eembridge"
DEFAULTS = "defaults"
SYSFS_USB = "/sys/bus/usb/devices"
MAX_FILE = 1 << 20  # a config file is a few KB; this stops `--config /dev/zero`


class ConfigError(UserError):
    """A configuration mistake; the message starts with FILE:LINE, and is one line
    whatever the file's names and keys hold."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True)
class Key:
    dest: str  # the argparse dest the value goes to
    check: Callable[[Any], Any]  # the TOML value -> the option's value, or Invalid


# Generated from the one table of option facts (options.OPTIONS): a key refuses what its
# flag refuses, in the same words.
KEYS: dict[str, Key] = {option.key: Key(option.dest, option.from_toml)
                        for option in OPTIONS if option.key}
SELECTORS: dict[str, Callable[[Any], str]] = {"serial": Text().from_toml,
                                              "port": Port().from_toml,
                                              "device": VidPid().from_toml}
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
    # argparse dest -> "FILE:LINE: [section] key", how an error about the value starts
    origins: dict[str, str] = field(default_factory=dict)

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

    def origins_for(self, identity: DeviceIdentity) -> dict[str, str]:
        """Where each of values_for's values was set, for errors found later."""
        origins: dict[str, str] = {}
        for section in [*self.defaults, self.find(identity)]:
            if section is not None:
                origins.update(section.origins)
        return origins


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
                raw = stream.read(MAX_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:  # a NUL in the name
            raise ConfigError(f"{path!r}: cannot read: {exc}") from None
        if len(raw) > MAX_FILE:
            raise ConfigError(f"{path}: longer than {MAX_FILE} bytes: not a configuration file")
        text = raw.decode("utf-8", errors="replace")
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message names line and column
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses into nested arrays and inline tables
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
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

    def where(key: str) -> str:
        return f"{path}:{lines.get((name, key), header)}: [{name}] {key}"

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{where(key)}: {problem}")

    section = Section(name, path, header, selector=None)
    selectors = []
    for key, value in table.items():
        if key in SELECTORS:
            if name == DEFAULTS:
                raise fail(key, f"a selector cannot be in [{DEFAULTS}]")
            try:
                selectors.append((key, SELECTORS[key](value)))
            except Invalid as exc:
                raise fail(key, str(exc)) from None
            continue
        spec = KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, [*KEYS, *SELECTORS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(key, f"unknown key{hint}")
        try:
            section.values[spec.dest] = spec.check(value)
        except Invalid as exc:
            raise fail(key, str(exc)) from None
        section.origins[spec.dest] = where(key)
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
