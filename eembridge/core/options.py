"""The main job's options: every fact about each one, once; and from options to a bridge.

OPTIONS is the one table of option facts: flag, type and range (its Kind), default,
help, and config file key. The command line (cli.main_parser) and the config file
(config.KEYS) are both generated from it, so a value is refused by the same rule, in
the same words, whichever way it came: `--keepalive -1: ...` from a flag,
`rig.toml:14: [slot-3] keepalive: ...` from a file.

A Kind turns a flag's text (from_text) or a TOML value (from_toml) into the value the
bridge gets, or raises Invalid with the problem; the caller says where it came from.
Checks that relate two options (peer with peer-mac, max-transfer against the MTU) run
in bridge_options and name each value's origin the same way.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .transport import BUSY_POLLS, MAX_BUSY_POLLS

FORMATS = ("auto", "journal", "text", "json")  # --log-format; observe.logs renders them
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
PORT_RE = re.compile(r"^\d+-\d+(\.\d+)*$")  # bus-port.port...: what sysfs and --port use
VIDPID_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), with its terminating NUL
MAX_TEXT = 4096  # no option needs a longer value; PATH_MAX


IFNAMSIZ = 16  # including the trailing NUL: names are at most 15 characters
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")


def ifname_problem(name: str) -> str | None:
    """Why the kernel would refuse (or misread) ``name`` as an interface name, or None."""
    if not isinstance(name, str) or not name:
        return "interface name must be a non-empty string"
    if len(name) >= IFNAMSIZ:
        return f"interface name {name!r} is {len(name)} characters; the limit is {IFNAMSIZ - 1}"
    if name in (".", "..") or name.startswith("-") or not _NAME_CHARS.fullmatch(name):
        return (f"interface name {name!r} may use only letters, digits, '_', '.' and '-'"
                " (not starting with '-', not '.' or '..')")
    return None


def parse_instance(instance: str) -> tuple[str, str]:
    """("port", "1-2.3") or ("serial", "ABC") from a unit's instance name (%i)."""
    text = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance)
    if text.startswith("serial:") and len(text) > len("serial:"):
        return "serial", text[len("serial:"):]
    if text.startswith("port:"):
        text = text[len("port:"):]
    if PORT_RE.match(text):
        return "port", text
    raise UserError(f"instance {instance!r} is neither a USB port path like 1-2.3 "
                    "nor serial:SERIAL")



def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT -> (host, port); UserError naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise UserError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9850")
    try:
        port = int(port_text, 10)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise UserError(f"--metrics {text!r}: port {port_text!r} is not 1..65535") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise UserError(f"--metrics {text!r}: {host!r} is not an IP address") from None
    return host, port



class Invalid(ValueError):
    """A value that is wrong; the message is the problem, the caller says where."""


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def one_line(message: str) -> str:
    """A message as one line whatever it quotes (a file name or key with a newline)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def shown(text: str) -> str:
    """A value as an error message quotes it: on one line, and not a screenful."""
    if len(text) > 60:
        text = text[:57] + "..."
    if text and text.isprintable() and " " not in text:
        return text
    return repr(text)


class Kind:
    """What an option's value is: parsed from a flag's text or checked from TOML."""

    metavar = "VALUE"

    def from_text(self, text: str) -> Any:
        return self.check(_text(text))

    def from_toml(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise Invalid(f"expected {self.expected}, got {type_name(value)}")
        return self.check(_text(value))

    expected = "a string"

    def check(self, value: Any) -> Any:
        return value

    def accepted(self) -> str:
        """What the help says is accepted ("" when the help text says it)."""
        return ""


def _text(text: str) -> str:
    if not text:
        raise Invalid("must not be empty")
    if "\0" in text:
        raise Invalid("must not contain a NUL character")
    if len(text) > MAX_TEXT:
        raise Invalid(f"longer than {MAX_TEXT} characters")
    try:
        os.fsencode(text)  # what the command line decoded, a file name can encode again
    except UnicodeEncodeError:
        raise Invalid("not valid text (a lone surrogate)") from None
    return text


@dataclass(frozen=True)
class Integer(Kind):
    low: int
    high: int
    multiple_of: int = 1
    why: str = ""  # said after a multiple_of refusal

    metavar = "N"

    def from_text(self, text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise Invalid("expected an integer") from None
        return self.check(value)

    def from_toml(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # TOML true is not 1
            raise Invalid(f"expected an integer, got {type_name(value)}")
        return self.check(value)

    def check(self, value: int) -> int:
        if self.low <= value <= self.high and value % self.multiple_of == 0:
            return value
        raise Invalid(self.rule())

    def accepted(self) -> str:
        if self.multiple_of > 1:
            return f"a multiple of {self.multiple_of}, {self.low}..{self.high}"
        return f"{self.low}..{self.high}"

    def rule(self) -> str:
        if self.multiple_of > 1:
            return (f"expected a multiple of {self.multiple_of}{self.why} "
                    f"from {self.low} to {self.high}")
        return f"out of range ({self.low}..{self.high})"


@dataclass(frozen=True)
class Number(Kind):
    """A finite number in [low, high], or (low, high] with low_open."""

    low: float
    high: float
    low_open: bool = False
    unit: str = ""

    metavar = "SECONDS"

    def from_text(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Invalid("expected a number") from None
        return self.check(value)

    def from_toml(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"expected a number, got {type_name(value)}")
        return self.check(value)

    def check(self, value: float) -> float:
        # A TOML integer may be far past a float's range: compared as it is, not converted.
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"not a finite number (expected {self.span()})")
        low_ok = value > self.low if self.low_open else value >= self.low
        if not (low_ok and value <= self.high):
            raise Invalid(f"must be {self.span()}" if self.low_open
                          else f"out of range ({self.span()})")
        return float(value)

    def accepted(self) -> str:
        return self.span()

    def span(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.low_open:
            return f"more than {self.low:g} and at most {self.high:g}{unit}"
        return f"{self.low:g}..{self.high:g}{unit}"


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]
    values: tuple[Any, ...] = ()  # what each choice means; the choice itself if empty

    def check(self, value: str) -> Any:
        if value not in self.choices:
            raise Invalid("expected one of " + ", ".join(self.choices))
        return self.values[self.choices.index(value)] if self.values else value

    def from_toml(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # sim-max-packet = 512
        if not isinstance(value, str):
            raise Invalid(f"expected one of {', '.join(self.choices)}, got {type_name(value)}")
        return self.check(value)

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "{" + ",".join(self.choices) + "}"


@dataclass(frozen=True)
class SizeOrWord(Kind):
    """A number of bytes, or a word that means "decide by the device" (frame, f_eem)."""

    word: str
    size: Integer
    zero: bool = False  # 0 allowed besides the range

    def from_text(self, text: str) -> int | str:
        if text == self.word:
            return text
        try:
            value = int(text, 10)
        except ValueError:
            raise Invalid(f"expected a number of bytes or {self.word}") from None
        return self.check(value)

    def from_toml(self, value: Any) -> int | str:
        if value == self.word:
            return self.word
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f'expected a number of bytes or "{self.word}", got {type_name(value)}')
        return self.check(value)

    def check(self, value: int) -> int:
        if self.zero and value == 0:
            return 0
        try:
            return self.size.check(value)
        except Invalid:
            size = self.size
            zero = "0, " if self.zero else ""
            if size.multiple_of > 1:
                raise Invalid(f"expected {zero}{self.word}, or a multiple of {size.multiple_of} "
                              f"from {size.low} to {size.high}") from None
            raise Invalid(f"out of range ({size.low}..{size.high}, or {self.word})") from None

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return f"BYTES|{self.word}"

    def accepted(self) -> str:
        zero = "0, " if self.zero else ""
        return f"{zero}{self.size.accepted()}, or {self.word}"


class Text(Kind):
    """Any text: a serial number, a file name (not empty, no NUL, not absurdly long)."""

    def __init__(self, metavar: str = "TEXT") -> None:
        self.metavar = metavar


class SocketPath(Text):
    def check(self, value: str) -> str:
        if len(os.fsencode(value)) >= UNIX_PATH_MAX:
            raise Invalid(f"longer than a UNIX socket path can be ({UNIX_PATH_MAX - 1} bytes)")
        return value


class IfName(Text):
    def check(self, value: str) -> str:
        problem = ifname_problem(value)
        if problem:
            raise Invalid(problem)
        return value


def _no_scope(value: str) -> None:
    if "%" in value:  # ipaddress takes fe80::1%eth0; the TAP is the scope
        raise Invalid("a scope (%...) is not allowed here: the TAP is the link")


class InterfaceAddress(Text):
    """ADDR/PREFIX, IPv4 or IPv6."""

    def check(self, value: str) -> str:
        _no_scope(value)
        if "/" not in value:
            raise Invalid("not ADDR/PREFIX, e.g. 169.254.7.2/24")
        try:
            ipaddress.ip_interface(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return value


class Address(Text):
    def check(self, value: str) -> str:
        _no_scope(value)
        try:
            return str(ipaddress.ip_address(value))
        except ValueError as exc:
            raise Invalid(str(exc)) from None


class Mac(Text):
    def __init__(self, unicast: bool = False) -> None:
        super().__init__("MAC")
        self.unicast = unicast

    def check(self, value: str) -> str:
        if not MAC_RE.match(value):
            raise Invalid("not a MAC address like 02:00:00:00:00:01")
        octets = bytes.fromhex(value.replace(":", ""))
        if self.unicast and (octets[0] & 1 or not any(octets)):
            raise Invalid("an interface's own MAC must be unicast and not all zero")
        return value.lower()


@dataclass(frozen=True)
class Forward:
    """--forward PROTO:HOSTPORT:BOARDPORT (link/user.py: a localhost port to the board's)."""

    protocol: str  # "tcp" or "udp"
    host_port: int
    board_port: int

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_port}:{self.board_port}"


def parse_forward(text: str) -> Forward:
    """A Forward, or Invalid naming what is wrong."""
    parts = text.split(":")
    if len(parts) != 3:
        raise Invalid("not PROTO:HOSTPORT:BOARDPORT, e.g. tcp:8022:22")
    protocol, *ports = parts
    if protocol not in ("tcp", "udp"):
        raise Invalid(f"protocol {shown(protocol)} is not tcp or udp")
    numbers = []
    for what, port in zip(("host", "board"), ports, strict=True):
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise Invalid(f"{what} port {shown(port)} is not a number from 1 to 65535")
        numbers.append(int(port))
    return Forward(protocol, numbers[0], numbers[1])


class PortForward(Text):
    def check(self, value: str) -> str:
        return str(parse_forward(value))


class Port(Text):
    def check(self, value: str) -> str:
        if not PORT_RE.match(value):
            raise Invalid('not a USB port path like "1-2.3"')
        return value


class VidPid(Text):
    def check(self, value: str) -> str:
        if not VIDPID_RE.match(value):
            raise Invalid('not VID:PID in hex like "1d6b:0104"')
        return value.lower()


class DeviceSelector(Text):
    """--device: VID:PID (hex) or BUS:ADDR (decimal), as usbselect reads it."""

    def check(self, value: str) -> str:
        left, sep, right = value.partition(":")
        if sep and len(left) == 4 and len(right) == 4 and VIDPID_RE.match(value):
            return value
        if sep and left.isascii() and left.isdigit() and right.isascii() and right.isdigit() \
                and int(left) <= 255 and int(right) <= 255:
            return value
        raise Invalid("expected VID:PID (1d6b:0104) or BUS:ADDR (1:3)")


class Instance(Text):
    def check(self, value: str) -> str:
        try:
            parse_instance(value)
        except UserError:
            raise Invalid("expected a USB port path like 1-2.3 or serial:SERIAL") from None
        return value


class MetricsAddress(Text):
    def check(self, value: str) -> str:
        try:
            parse_address(value)
        except UserError as exc:  # it names the flag and value itself
            raise Invalid(str(exc).split(": ", 1)[-1]) from None
        return value


class Rotation(Text):
    """--pcap-rotate SIZE_MB[:COUNT]; checked here before tapcapture.parse_rotate sees it."""

    def check(self, value: str) -> str:
        size_text, _sep, count_text = value.partition(":")
        try:
            size_mb = float(size_text)
            count = int(count_text, 10) if count_text else 5
        except ValueError:
            raise Invalid("expected SIZE_MB[:COUNT], e.g. 100:5") from None
        if not (math.isfinite(size_mb) and 0 < size_mb <= 1_000_000 and 1 <= count <= 10_000):
            raise Invalid("SIZE_MB must be more than 0 and at most 1000000, "
                          "COUNT from 1 to 10000")
        return value


class Switch(Kind):
    """A flag without a value (store_true, --x/--no-x); true or false in a file."""

    def from_toml(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {type_name(value)}")
        return value


# --- the table ------------------------------------------------------------------------------

LINK = "link (the TAP interface)"
EEM = "EEM"
GENERAL = ""
DEVICE = "USB device (see `eembridge list`)"
SERVICE = "service and configuration"
SIM = "simulated device (--sim)"
OBSERVE = "observability"

SECONDS_A_DAY = 86400.0


@dataclass(frozen=True)
class Option:
    flag: str  # "--keepalive"
    kind: Kind
    help: str
    default: Any = None
    key: str | None = None  # its config file key; None: command line only
    group: str = GENERAL
    action: str = "store"  # store, append, store_true, bool (--x/--no-x), count, tx
    dest_name: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.dest_name or self.flag.lstrip("-").replace("-", "_")

    def parse_flag(self, text: str) -> Any:
        """argparse's type=: a bad value is a UserError, one line, never argparse's usage."""
        try:
            return self.kind.from_text(text)
        except Invalid as exc:
            raise UserError(f"{self.flag} {shown(text)}: {exc}") from None

    def from_toml(self, value: Any) -> Any:
        """The value a config file gives (Invalid naming the problem if wrong)."""
        if self.action == "append":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list):
                raise Invalid(f"expected a list of {self.metavar or self.kind.metavar} "
                              f"strings, got {type_name(value)}")
            return [self.kind.from_toml(item) for item in items]
        return self.kind.from_toml(value)


OPTIONS: tuple[Option, ...] = (
    # link
    Option("--tap", IfName("NAME"), "TAP interface name (default usb0)", "usb0", "tap", LINK),
    Option("--link", Choice(("tap", "tun", "user")),
           "tap: the host's side is a TAP, the kernel does ARP/NDP (default); tun: a layer-3 "
           "TUN, eembridge adds and strips Ethernet and answers ARP/NDP itself (no --offload; "
           "what it cannot carry is counted in `eembridge stats`, section l3); user: no "
           "interface and no root, the board's traffic ends in libslirp (QEMU's user-mode network "
           "stack) and reaches the host only through --forward ports (--ip is the gateway, "
           "default 10.0.2.2/24; --peer the board, default 10.0.2.15, also its DHCP lease)",
           "tap", "link", LINK),
    Option("--forward", PortForward("PROTO:HOSTPORT:BOARDPORT"),
           "with --link user: localhost's HOSTPORT reaches the board's BOARDPORT, e.g. "
           "tcp:8022:22 for `ssh -p 8022 localhost` (repeatable; tcp or udp)",
           [], "forward", LINK, action="append"),
    Option("--nat", Switch(),
           "with --link user: let the board's own connections out to the host and its networks "
           "through libslirp's NAT (default: refused and counted, section user)", False, "nat",
           LINK, action="store_true"),
    Option("--ip", InterfaceAddress(), "address for the TAP, e.g. 169.254.7.2/24 (repeatable)",
           [], "addresses", LINK, action="append", metavar="ADDR/PREFIX"),
    Option("--dhcp", Switch(),
           "with --link tun: take the IPv4 address, prefix and router from the board's DHCP "
           "server, renew it, drop it when it is lost (`eembridge stats`, section dhcp)",
           False, "dhcp", LINK, action="store_true"),
    Option("--peer", Address("ADDR"), "the device's IP, for a static neighbour entry",
           None, "peer", LINK),
    Option("--peer-mac", Mac(), "the device's MAC for the static neighbour", None, "peer-mac",
           LINK),
    Option("--mtu", Integer(576, 9000), "the TAP's MTU (default 1500)", 1500, "mtu", LINK),
    Option("--mac", Mac(unicast=True),
           "MAC address of the TAP (default: random, locally administered); with --link tun, "
           "the MAC eembridge answers ARP/NDP with (default: locally administered, derived "
           "from the interface name, so the board's caches stay right across restarts)",
           None, "mac", LINK),
    Option("--txqueuelen", Integer(1, 100000),
           "the TAP's transmit queue: packets waiting for the bridge (default 8 with --offload, "
           "64 without; the kernel's 500 adds ~100 ms under an upload); drops are counted",
           None, "txqueuelen", LINK, metavar="PACKETS"),
    Option("--persist", Switch(), "keep the TAP after exit", False, "persist", LINK,
           action="store_true"),
    Option("--offload", Switch(),
           "let the kernel hand the bridge TCP packets of up to 64 KB and checksums to fill in, "
           "and merge consecutive TCP segments on the way up (TAP TSO/checksum offload, cut and "
           "merged by the C data path; default: on when the C data path is there)",
           None, "offload", LINK, action="bool"),
    # EEM
    Option("--tx", Choice(("crc", "sentinel"), (True, False)),
           "--tx-crc: send frames with a real CRC-32 (default); --tx-sentinel: with the "
           "DE AD BE EF sentinel instead of a CRC", True, "tx", EEM, action="tx",
           dest_name="tx_crc"),
    Option("--max-transfer", SizeOrWord("frame", Integer(64, 1 << 20)),
           "largest bulk OUT transfer in bytes, batching frames into it (default, for Linux "
           "f_eem: 12288 at high speed, 1536 at full speed and SuperSpeed); frame: one frame "
           "per transfer, as Linux's cdc_eem sends (default for a device not known to take more)",
           None, "max-transfer", EEM),
    Option("--in-flight", Integer(1, 64), "bulk IN transfers kept queued (default 32)",
           32, "in-flight", EEM),
    Option("--in-transfer-size",
           Integer(1024, 65536, 1024, " (every max packet size divides it)"),
           "bytes per bulk IN transfer (default 4096); a device's longer "
           "transfer simply continues in the next one", 4096, "in-transfer-size", EEM,
           metavar="BYTES"),
    Option("--out-chunk", SizeOrWord("f_eem", Integer(1088, 65536, 64), zero=True),
           "the device receives OUT data into buffers of this size and takes each on its own: "
           "no EEM packet crosses one, so a transfer of up to --max-transfer carries many frames "
           "(default f_eem: Linux f_eem's size, 1536; 2048 at SuperSpeed; 0: packets may cross "
           "anywhere)", "f_eem", "out-chunk", EEM),
    Option("--out-in-flight", Integer(1, 32),
           "bulk OUT transfers of up to --max-transfer bytes in flight (default: 12 KB worth at "
           "full speed, 96 KB at high speed, 48 KB at SuperSpeed)",
           None, "out-in-flight", EEM),
    Option("--busy-poll", Integer(0, MAX_BUSY_POLLS),
           "USB: after work, the data path thread looks for more this many times before it "
           f"sleeps (default {BUSY_POLLS}; 0: sleep at once, least CPU; more: faster under load, "
           "at some CPU when idle)", BUSY_POLLS, "busy-poll", EEM),
    Option("--keepalive", Number(0.01, SECONDS_A_DAY, unit="seconds"),
           "send an EEM Echo this often and log a device that stops answering "
           "(default off)", None, "keepalive", EEM),
    # general
    Option("--stats-socket", SocketPath("PATH"),
           "UNIX socket for `eembridge stats` (default /run/eembridge/TAP.sock)",
           None, "stats-socket"),
    Option("--verbose", Kind(), "more log lines (-vv: every frame event)", 0, action="count"),
    Option("--log-format", Choice(FORMATS),
           "journal (<N> priority prefixes, no time), text, or json (one object per line); "
           "auto: journal under systemd, else text", "auto"),
    Option("--garbage-log-interval", Number(0.01, SECONDS_A_DAY, unit="seconds"),
           "at most one line per interval summarising dropped garbage (default 5)",
           5.0, "garbage-log-interval"),
    # device
    Option("--device", DeviceSelector("VID:PID|BUS:ADDR"),
           "the device by vendor:product id (hex) or bus:address (decimal)", group=DEVICE),
    Option("--serial", Text("S"), "the device with this serial number", group=DEVICE),
    Option("--port", Port("1-2.3"), "the device at this USB port path", group=DEVICE),
    Option("--interface", Integer(0, 255),
           "the EEM interface with this number, for a device that has several",
           None, "interface", DEVICE),
    Option("--wait", Switch(), "wait for the device to appear instead of failing", False,
           group=DEVICE, action="store_true"),
    Option("--wait-timeout", Number(0, 7 * SECONDS_A_DAY, low_open=True, unit="seconds"),
           "like --wait, but fail naming the device after SECONDS without it",
           None, "wait-timeout", DEVICE),
    # service
    Option("--config", Text("FILE"),
           "TOML configuration (repeatable; default /etc/eembridge/*.toml)", None, group=SERVICE,
           action="append"),
    Option("--instance", Instance("NAME"),
           "systemd instance: a port path (1-2.3) or serial:SERIAL (\\xNN escapes as "
           "systemd-escape writes them)", group=SERVICE),
    # simulated device
    Option("--sim", Switch(), "bridge a simulated EEM device instead of real hardware", False,
           action="store_true"),
    Option("--sim-loss", Number(0.0, 1.0), "probability that a USB packet is lost (each direction)",
           0.0, group=SIM, metavar="P"),
    Option("--sim-flip", Number(0.0, 1.0), "probability that a USB packet has one bit flipped",
           0.0, group=SIM, metavar="P"),
    Option("--sim-garbage", Number(0.0, 1.0),
           "probability that garbage (a reserved command) precedes a packet on IN", 0.0,
           group=SIM, metavar="P"),
    Option("--sim-max-packet", Choice(("64", "512", "1024"), (64, 512, 1024)),
           "the simulated device's bulk max packet size (default 512)", 512, group=SIM),
    Option("--sim-tx", Choice(("crc", "sentinel")),
           "how the simulated device checks its frames (default sentinel, as f_eem)", "sentinel",
           group=SIM),
    Option("--sim-batch", Switch(),
           "device batches EEM packets in transfers that span IN buffers", False, group=SIM,
           action="store_true"),
    Option("--sim-ip", InterfaceAddress("ADDR/PREFIX"),
           "the simulated device's own address, in its namespace", "169.254.7.1/24", group=SIM),
    Option("--sim-seed", Integer(0, (1 << 64) - 1), "seed for the fault generator", group=SIM),
    # observability (observe.py runs them)
    Option("--metrics", MetricsAddress("HOST:PORT"),
           "serve Prometheus metrics over HTTP, e.g. 127.0.0.1:9850 (default off)", group=OBSERVE),
    Option("--pcap", Text("FILE"),
           "capture the Ethernet frames crossing the TAP (both ways) to a pcap file",
           group=OBSERVE),
    Option("--pcap-rotate", Rotation("SIZE_MB[:COUNT]"),
           "with --pcap: start a new file past SIZE_MB, keep COUNT files (default 5)",
           group=OBSERVE),
    Option("--usb-pcap", Text("FILE"),
           "record the bulk transfers as a usbmon pcap (for eembridge decode/replay)",
           group=OBSERVE),
)
BY_DEST = {option.dest: option for option in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser, options: tuple[Option, ...] = OPTIONS) -> None:
    """The options as argparse arguments, in their groups; values are checked by the table."""
    groups: dict[str, Any] = {GENERAL: parser}
    for option in options:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        add_argument(groups[option.group], option)


def add_argument(group: Any, option: Option) -> None:
    if option.action == "tx":
        mode = group.add_mutually_exclusive_group()
        mode.add_argument("--tx-crc", dest=option.dest, action="store_true", default=True,
                          help="send frames with a real CRC-32 (default)")
        mode.add_argument("--tx-sentinel", dest=option.dest, action="store_false",
                          help="send frames with the DE AD BE EF sentinel instead of a CRC")
        return
    flags = [option.flag] if option.flag != "--verbose" else ["-v", "--verbose"]
    if option.action == "store_true":
        group.add_argument(*flags, action="store_true", default=option.default, help=option.help)
    elif option.action == "bool":
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=option.default,
                           help=option.help)
    elif option.action == "count":
        group.add_argument(*flags, action="count", default=option.default, help=option.help)
    else:
        accepted = option.kind.accepted()
        group.add_argument(*flags, action=option.action, type=option.parse_flag,
                           default=option.default,
                           help=f"{option.help} [{accepted}]" if accepted else option.help,
                           metavar=option.metavar or option.kind.metavar)


def origin(args: argparse.Namespace, dest: str) -> str:
    """Where a value came from, as an error message starts: the config file's line and key,
    else the flag and its value."""
    where = getattr(args, "origins", {}).get(dest)
    if where:
        return where
    return f"{BY_DEST[dest].flag} {shown(str(getattr(args, dest)))}"


def max_transfer_and_batch(value: int | str | None) -> tuple[int | None, bool | None]:
    """--max-transfer (checked by its Kind) as (max_transfer, batch). None: by the device;
    "frame": one frame per transfer; a number of bytes: batches of up to that."""
    if value is None:
        return None, None
    if value == "frame":
        return None, False
    return int(value), True
