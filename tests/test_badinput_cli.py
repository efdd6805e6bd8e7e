"""Bad input to the main command line and the config file: one line, never a traceback.

Option parsing and config loading run in-process (cli.resolve: argv and config in,
checked options out, nothing opened); a few subprocess runs check what the user sees.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import GOOD

from eembridge.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def resolve(*argv: str):
    from eembridge.cli.main import resolve as cli_resolve

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
    from eembridge.core.config import KEYS
    from eembridge.core.options import OPTIONS

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


# --- no privileges ------------------------------------------------------------------------

def as_nobody(tmp_path: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m eembridge ARGV` as user nobody with no capabilities at all (nobody_argv)."""
    return subprocess.run(nobody_argv(tmp_path, *argv), capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def nobody_argv(tmp_path: Path, *argv: str) -> list[str]:
    """The command line running `python -m eembridge ARGV` as user nobody with no
    capabilities at all.

    This Python may live below a directory only root may enter (/root/.pyenv): in a
    private mount namespace that directory is covered by a world-readable tmpfs holding
    only the way to the interpreter, so nobody can run it and nothing changes outside."""
    if os.geteuid() != 0:
        pytest.fail("running a command as nobody needs root to start it")
    for tool in ("unshare", "setpriv", "mount"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (util-linux)")
    prefix = Path(sys.prefix).resolve()
    hidden = next((p for p in reversed(prefix.parents) if not os.stat(p).st_mode & stat.S_IXOTH),
                  None)
    script = ""
    if hidden is not None:
        child = hidden / prefix.relative_to(hidden).parts[0]
        stash = tmp_path / "stash"
        stash.mkdir()
        script = (f"mount --bind {child} {stash} && mount -t tmpfs -o mode=755,size=64k tmpfs "
                  f"{hidden} && mkdir {child} && mount --bind {stash} {child} && ")
    script += ("exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "
               "--bounding-set=-all --no-new-privs \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", "env",
            f"PYTHONPATH={ROOT}", sys.executable, "-m", "eembridge", *argv]


@pytest.mark.parametrize("argv", [["demo", "--link", "tap", "--size", "0.01"],
                                  ["--sim", "--tap", "eemtnobody0"]])
def test_without_privileges_sim_and_demo_say_what_they_need(tmp_path, argv):
    result = as_nobody(tmp_path, *argv)
    assert result.returncode == 2, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("eembridge: error: ") and "needs root" in errors[0], errors
    assert "CAP_NET_ADMIN" in errors[0], errors


# --- --usb-pcap on a full disk ------------------------------------------------------------

def test_usb_recording_on_a_full_device_warns_once_counts_and_closes_cleanly(caplog):
    from eembridge.capture.usbmon import ENDPOINT_IN, XFER_BULK
    from eembridge.observe.recording import UsbRecorder

    recorder = UsbRecorder("/dev/full")
    writer = recorder.writer
    with caplog.at_level("WARNING", logger="eembridge.observe.recording"):
        for n in range(2000):  # past one batch of records
            with recorder.lock:
                writer.record("C", XFER_BULK, writer.endpoint_in | ENDPOINT_IN, n, 100,
                              bytes(100), 1_700_000_000_000_000_000)
                recorder.recorded()
        recorder.flush()
        recorder.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    counters = recorder.counters()
    assert counters["write_errors"] == 1 and counters["records"] == 2000
    assert counters["records_lost"] == 2000  # /dev/full keeps nothing


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 64 KiB tmpfs, mounted for the test: a disk that really fills up."""
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("flag,key", [("--usb-pcap", "usb_pcap"), ("--pcap", "pcap")])
def test_a_bridge_whose_capture_fills_its_disk_goes_on_and_exits_cleanly(
        tmp_path, small_filesystem, flag, key):
    import json
    import re
    import signal

    from eembridge.link.netns import free_linklocal_subnet, unique_name

    from netfixtures import require_tun_and_root, tcp_transfer, wait_for

    require_tun_and_root()
    subnet = free_linklocal_subnet()
    sim_ip = str(subnet[1])
    sock, recording = str(tmp_path / "bridge.sock"), small_filesystem / "usb.pcap"
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eembridge", "--sim", "--tap", unique_name("eemfull"),
             "--ip", f"{subnet[2]}/24", "--sim-ip", f"{sim_ip}/24", "--stats-socket", sock,
             flag, str(recording)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        def namespace() -> str | None:
            assert proc.poll() is None, log.read_text()
            found = re.search(r"in namespace (\S+)", log.read_text())
            return found.group(1) if found and os.path.exists(sock) else None

        netns = wait_for(namespace, 30, "the bridge's control socket")
        # 1 MB each way: far more than 64 KiB of records; every byte must still arrive.
        tcp_transfer(sim_ip, server_netns=netns, upload_bytes=1 << 20,
                     download_bytes=1 << 20).assert_intact()
        stats = eembridge("stats", "--socket", sock, "--json")
        assert stats.returncode == 0, stats.stderr
        capture = next(iter(json.loads(stats.stdout).values()))["capture"][key]
        assert capture["write_errors"] == 1 and capture["records_lost"] > 0, capture
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text
    warnings = [line for line in text.splitlines() if f"{flag} " in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    # What the file holds is whole records: it decodes without complaint.
    if flag == "--usb-pcap":
        decoded = eembridge("decode", str(recording), "-o", str(tmp_path / "eth.pcap"), "--json")
        assert decoded.returncode == 0, decoded.stderr
        assert json.loads(decoded.stdout)["in"]["frames"] > 0, decoded.stdout
    else:  # an Ethernet pcap of whole records: every one read back, the last one whole
        from eembridge.capture.pcap import CaptureReader

        with open(recording, "rb") as f:
            frames = list(CaptureReader(f, str(recording)))
        assert frames and len(recording.read_bytes()) <= 64 * 1024, len(frames)


# --- mutation fuzzing: parse, or one line of UserError, never anything else ---------------

def parses_or_refuses_in_one_line(*argv: str) -> None:
    """The one invariant: resolve() returns, or raises UserError with a one-line message."""
    try:
        resolve(*argv)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)


def option_values():
    from hypothesis import strategies as st

    numbers = st.one_of(
        st.integers(-(1 << 70), 1 << 70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
        st.sampled_from(["nan", "-nan", "inf", "-inf", "Infinity", "1e308", "-1e308", "1e-320",
                         "-0", "0", "0x10", "1_000", " 5 ", "٣", "１２", "9" * 5000, "1e400",
                         "64", "512", "1024", "4096", "1500", "32", "0.5", "5"]))
    words = st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), max_size=200),  # any code point, surrogates too
        st.sampled_from(["", " ", "\0", "a\nb", "x" * 5000, "é" * 3000, "f_eem", "frame", "crc",
                         "sentinel", "169.254.7.2/24", "1.2.3.4/99", "300.1.1.1/24",
                         "fe80::1%eth0/64", "::/0", "02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff",
                         "zz", "1-2.3", "serial:X", "serial:", "port:1-1", "\\x41",
                         "1d6b:0104", "1:3", "99999:99999", "127.0.0.1:9850", "[::1]:0",
                         "localhost:99999", "100:5", "nan:5", "1e400:1", "/dev/null",
                         "/nonexistent/dir/x.sock", "a" * 200, "usb0", "-", "--"]))
    return st.one_of(numbers, words)


def test_fuzz_every_option_value(empty_config):
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from eembridge.core.options import BY_DEST, OPTIONS

    valued = [o for o in OPTIONS if o.action in ("store", "append") and o.flag != "--config"]

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(valued), option_values())
    @example(BY_DEST["max_transfer"], "--")  # found by this fuzz: argparse passed [] as the value
    @example(BY_DEST["ip"], "--")
    def check(option, value):
        parses_or_refuses_in_one_line("--sim", "--config", empty_config, f"{option.flag}={value}")

    check()


def test_fuzz_demo_options():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from eembridge.cli.demo import OPTIONS
    from eembridge.cli.main import _subcommand_parser

    parser, _module = _subcommand_parser("demo")

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from([o for o in OPTIONS if o.action == "store"]), option_values())
    def check(option, value):
        try:
            parser.parse_args([f"{option.flag}={value}"])
        except UserError as exc:
            assert "\n" not in str(exc), repr(str(exc))

    check()


def test_fuzz_many_options_at_once(empty_config):
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from eembridge.core.options import OPTIONS

    flags = [o.flag for o in OPTIONS if o.action in ("store", "append") and o.flag != "--config"]
    switches = ["--persist", "--offload", "--no-offload", "--tx-crc", "--tx-sentinel", "--wait",
                "--sim-batch", "-v", "-vv", "--", "--bogus", "-x"]
    arg = st.one_of(st.tuples(st.sampled_from(flags), option_values()).map(lambda fv: "=".join(fv)),
                    st.sampled_from(flags), st.sampled_from(switches), option_values())

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(arg, max_size=8), st.booleans())
    @example(["\r"], False)  # found by this fuzz: argparse quoted it raw, a second line
    def check(argv, sim):
        parses_or_refuses_in_one_line(*(["--sim"] if sim else []), "--config", empty_config,
                                      *argv)

    check()


def toml_text(value) -> str:
    """A TOML rendering of what the strategies below make (strings as JSON: valid TOML)."""
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_text(v)}" for k, v in value.items()) + "}"


def toml_values():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-(1 << 200), 1 << 200),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=30),
        st.sampled_from([0, 1, -1, 1500, 4096, 1e308, 1e-308, "", "f_eem", "frame", "crc",
                         "169.254.7.2/24", "02:00:00:00:00:01", "1-2.3", "x" * 3000]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=8)


def test_fuzz_config_files(tmp_path):
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from eembridge.core.config import KEYS, SELECTORS

    keys = st.one_of(st.sampled_from(sorted([*KEYS, *SELECTORS])), st.text(min_size=1, max_size=12))
    tables = st.dictionaries(keys, toml_values(), max_size=6)
    path = tmp_path / "fuzz.toml"

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(defaults=tables, section=tables, name=st.text(min_size=1, max_size=10))
    @example(defaults={}, section={"\n": []}, name="0")  # found by this fuzz: a key's newline
    def check(defaults, section, name):
        import json

        lines = ["[defaults]", *(f"{json.dumps(k)} = {toml_text(v)}" for k, v in defaults.items()),
                 f"[{json.dumps(name)}]", 'serial = "S1"',
                 *(f"{json.dumps(k)} = {toml_text(v)}" for k, v in section.items() if k != "serial")]
        path.write_text("\n".join(lines) + "\n", errors="surrogatepass")
        parses_or_refuses_in_one_line("--sim", "--config", str(path), "--instance", "serial:S1")

    check()


# test_config's rig, every section kept, with the keys that take sizes and words
# added to its defaults: what the mutations start from.
GOOD_RIG = GOOD.replace("[defaults]\n", """[defaults]
max-transfer = 4096
in-transfer-size = 16384
out-chunk = "f_eem"
wait-timeout = 2.5
""").encode()


def test_fuzz_mutated_config_bytes(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    path = tmp_path / "mutant.toml"
    mutation = st.tuples(st.sampled_from(["insert", "delete", "replace", "truncate", "repeat"]),
                         st.integers(0, len(GOOD_RIG)), st.binary(min_size=1, max_size=16))

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(mutation, min_size=1, max_size=5))
    def check(mutations):
        data = bytearray(GOOD_RIG)
        for kind, at, junk in mutations:
            at = min(at, len(data))
            if kind == "insert":
                data[at:at] = junk
            elif kind == "delete":
                del data[at:at + len(junk)]
            elif kind == "replace":
                data[at:at + len(junk)] = junk
            elif kind == "truncate":
                del data[at:]
            else:
                data[at:at] = bytes(data[at:at + len(junk)]) * 50
        path.write_bytes(bytes(data))
        parses_or_refuses_in_one_line("--sim", "--config", str(path), "--instance", "serial:AAA1")

    check()


def test_deep_nesting_and_huge_files_are_one_line(tmp_path):
    deep = write(tmp_path, "[a]\nserial = \"S1\"\nmtu = " + "[" * 5000 + "]" * 5000 + "\n", "deep.toml")
    assert "nested too deeply" in refused("--sim", "--config", deep, "--instance", "serial:S1")
    message = refused("--sim", "--config", "/dev/zero")
    assert "longer than" in message, message
    message = refused("--sim", "--config", str(tmp_path))
    assert message.startswith(f"{tmp_path}: cannot read"), message


def test_a_bad_config_is_one_line_from_the_command_line(tmp_path):
    path = write(tmp_path, RIG.format(line="keepalive = inf"))
    result = eembridge("--sim", "--config", path, "--instance", "serial:S3")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"eembridge: error: {path}:6: [slot-3] keepalive: not a finite "
                             "number (expected 0.01..86400 seconds)\n"), result.stderr
