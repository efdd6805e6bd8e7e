"""Bad input to the main command line and the config file: one line, never a traceback.

Option parsing and config loading run in-process (cli.resolve: argv and config in,
checked options out, nothing opened); a few subprocess runs check what the user sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eembridge.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def resolve(*argv: str):
    from eembridge.cli import resolve as cli_resolve

    return cli_resolve(list(argv))


@pytest.fixture
def empty_config(tmp_path: Path) -> str:
    """Given to every in-process parse, so /etc/eembridge on this machine plays no part."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


def refused(*argv: str) -> str:
    """The one-line message of a refused command line."""
    with pytest.raises(UserError) as caught:
        resolve(*argv)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# Found by hand in issue 18: each was a traceback or was accepted. (argv, start of the message)
FLAG_MISTAKES = [
    (["--ip", "300.1.1.1/24"], "--ip 300.1.1.1/24: "),
    (["--ip", "1.2.3.4/99"], "--ip 1.2.3.4/99: "),
    (["--sim-ip", "notanip"], "--sim-ip notanip: "),
    (["--peer", "1.2.3.4", "--peer-mac", "zz"], "--peer-mac zz: "),
    (["--keepalive", "-1"], "--keepalive -1: "),
    (["--keepalive", "0"], "--keepalive 0: "),
    (["--keepalive", "nan"], "--keepalive nan: "),
    (["--keepalive", "inf"], "--keepalive inf: "),
    (["--garbage-log-interval", "nan"], "--garbage-log-interval nan: "),
    (["--wait-timeout", "nan"], "--wait-timeout nan: "),
    (["--busy-poll", "-1"], "--busy-poll -1: "),
    (["--stats-socket", ""], "--stats-socket '': "),
    (["--instance", ""], "--instance '': "),
    (["--in-transfer-size", "1500"], "--in-transfer-size 1500: "),
    (["--mtu", "abc"], "--mtu abc: "),
    (["--sim-loss", "2"], "--sim-loss 2: "),
    (["--sim-seed", "x"], "--sim-seed x: "),
    (["--pcap-rotate", "nan"], "--pcap-rotate nan: "),
    (["--usb-pcap", "a\0b"], "--usb-pcap "),
    (["--mac", "01:00:00:00:00:01"], "--mac 01:00:00:00:00:01: "),
]


@pytest.mark.parametrize(("argv", "start"), FLAG_MISTAKES, ids=[" ".join(a) for a, _ in FLAG_MISTAKES])
def test_a_bad_flag_value_is_one_line_naming_flag_and_value(empty_config, argv, start):
    message = refused("--sim", "--config", empty_config, *argv)
    assert message.startswith(start), message


def test_good_values_still_parse(empty_config):
    args, options = resolve("--sim", "--config", empty_config, "--keepalive", "0.5",
                            "--ip", "169.254.7.2/24", "--ip", "fd00::2/64", "--busy-poll", "0",
                            "--wait-timeout", "2.5", "--in-transfer-size", "16384",
                            "--peer", "169.254.7.1", "--peer-mac", "02:00:00:00:00:01")
    assert options.keepalive == 0.5 and options.addresses == ["169.254.7.2/24", "fd00::2/64"]
    assert args.busy_poll == 0 and args.wait_timeout == 2.5 and options.in_transfer_size == 16384


def write(tmp_path: Path, text: str, name: str = "rig.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


RIG = '[defaults]\nmtu = 1500\n\n[slot-3]\nserial = "S3"\n{line}\n'
# A value the config file's own check let through, then refused later as if it were a
# flag; or accepted although wrong. (line in [slot-3], message after "[slot-3] KEY: ")
CONFIG_MISTAKES = [
    ("in-transfer-size = 1500", "in-transfer-size", "multiple of 1024"),
    ("keepalive = inf", "keepalive", ""),
    ("keepalive = nan", "keepalive", ""),
    ("wait-timeout = 1e308", "wait-timeout", ""),
    ("garbage-log-interval = -inf", "garbage-log-interval", ""),
    ("out-chunk = 1000", "out-chunk", ""),
    ("max-transfer = 10", "max-transfer", ""),
    ("stats-socket = \"\"", "stats-socket", "empty"),
    ("busy-poll = 18446744073709551616", "busy-poll", "out of range"),
    ("out-in-flight = 200", "out-in-flight", "out of range"),
    ("addresses = [\"fe80::1%eth0/64\"]", "addresses", ""),
]


@pytest.mark.parametrize(("line", "key", "problem"), CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_a_bad_config_value_is_named_by_file_line_and_key(tmp_path, line, key, problem):
    path = write(tmp_path, RIG.format(line=line))
    message = refused("--sim", "--config", path, "--instance", "serial:S3")
    assert message.startswith(f"{path}:6: [slot-3] {key}: "), message
    assert problem in message, message


def test_a_config_value_failing_a_check_across_options_names_its_line(tmp_path):
    """max-transfer alone is fine; with the MTU of [defaults] it cannot hold a frame."""
    path = write(tmp_path, RIG.format(line="max-transfer = 1024"))
    message = refused("--sim", "--config", path, "--instance", "serial:S3")
    assert message.startswith(f"{path}:6: [slot-3] max-transfer: cannot hold one full frame"), message
    # The same from the command line names the flag.
    message = refused("--sim", "--config", path, "--max-transfer", "1024")
    assert message.startswith("--max-transfer 1024: cannot hold one full frame"), message
    path = write(tmp_path, RIG.format(line='peer = "169.254.7.1"'), "peer.toml")
    message = refused("--sim", "--config", path, "--instance", "serial:S3")
    assert message.startswith(f"{path}:6: [slot-3] peer: ") and "peer-mac" in message, message


def test_a_flag_and_its_config_key_refuse_the_same_values(tmp_path, empty_config):
    """One set of option facts: every key's value is refused by the flag too, and the
    other way round, with the same words."""
    from eembridge.config import KEYS
    from eembridge.options import OPTIONS

    by_key = {o.key: o for o in OPTIONS if o.key}
    assert set(by_key) == set(KEYS)
    for key, text in (("in-transfer-size", "1500"), ("keepalive", "0"), ("mtu", "100"),
                      ("busy-poll", "-1"), ("out-chunk", "1000"), ("tap", "a" * 20)):
        flag = by_key[key].flag
        from_flag = refused("--sim", "--config", empty_config, f"{flag}={text}")
        toml_value = text if text.lstrip("-").isdigit() else f'"{text}"'
        path = write(tmp_path, RIG.format(line=f"{key} = {toml_value}"))
        from_file = refused("--sim", "--config", path, "--instance", "serial:S3")
        assert from_flag.split(": ", 1)[1] == from_file.split(f"[slot-3] {key}: ", 1)[1]


def eembridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eembridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("argv", [
    ["--keepalive", "-1"],
    ["--mtu", "abc"],
    ["--ip", "300.1.1.1/24"],
    ["--sim-max-packet", "100"],
    ["--log-format", "yaml"],
])
def test_a_value_error_is_exactly_one_line_without_usage(argv):
    result = eembridge("--tap", "eemtbad0", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "usage" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"eembridge: error: {argv[0]} {argv[1]}: "), result.stderr


def test_an_unknown_flag_is_one_line_pointing_at_help():
    result = eembridge("--bogus")
    assert result.returncode == 2
    assert result.stderr == ("eembridge: error: unrecognized arguments: --bogus "
                             "(eembridge --help lists the options)\n"), result.stderr
    result = eembridge("decode", "--bogus")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "eembridge decode --help" in result.stderr
