"""bench/bridge.py --links and bench/interop.py --links: the parts that decide what is
measured and whether the data came intact, and one short real run on the simulated
device (root, namespaces, TAPs, as the bench itself)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bridge_bench = load("bridge")


def rfc1071(data: bytes) -> int:
    """The Internet checksum the long way: 16-bit words, carries folded back."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def folds_to_all_ones(data: bytes, checksum: int) -> bool:
    """What a receiver checks: the data with its checksum sums to 0xFFFF."""
    return rfc1071(data + checksum.to_bytes(2, "big")) == 0


@given(st.binary(min_size=1, max_size=1600))
def test_checksum_is_the_internet_checksum(data: bytes) -> None:
    mine = bridge_bench._checksum(data)
    # Equal, or the other zero of one's complement (0 and 0xFFFF): both verify.
    assert mine == rfc1071(data) or {mine, rfc1071(data)} == {0, 0xFFFF}
    if len(data) % 2 == 0:
        assert folds_to_all_ones(data, mine)


def echo_reply(request: bytes) -> bytes:
    """The board's kernel's answer to `request`, as far as Echo.reply reads it."""
    reply = bytearray(request)
    reply[14 + 20] = 0  # ICMP type: echo reply
    return bytes(reply)


def test_echo_reply_gives_the_request_number_and_refuses_a_changed_payload() -> None:
    echo = bridge_bench.Echo("02:00:00:00:00:01", "169.254.9.2", "02:00:00:00:00:02",
                             "169.254.9.1", 1500)
    request = echo.request(123456)
    assert len(request) == 1514
    assert rfc1071(request[34:]) == 0  # the ICMP checksum verifies
    assert echo.reply(echo_reply(request)) == 123456
    assert echo.reply(request) is None  # a request is not a reply
    flipped = bytearray(echo_reply(request))
    flipped[-1] ^= 0x01
    with pytest.raises(bridge_bench.BenchError, match="SHA-256"):
        echo.reply(bytes(flipped))


def test_links_put_the_tap_link_first_and_refuse_unknown_names() -> None:
    assert bridge_bench.parse_links("all") == list(bridge_bench.LINKS)
    assert bridge_bench.parse_links("user,tun") == ["tap", "user", "tun"]
    for bad in ("tap,bogus", "", "tun,tun"):
        with pytest.raises(argparse.ArgumentTypeError):
            bridge_bench.parse_links(bad)


@pytest.mark.parametrize("script, argv", [
    ("bridge.py", ["--links", "tap,bogus"]),
    ("bridge.py", ["--links", "all", "--rounds", "0"]),
    ("bridge.py", ["--links", "all", "--tun"]),
    ("bridge.py", ["--mb", "lots"]),
    ("interop.py", ["--links", "tap,bogus"]),
    ("interop.py", ["--links", "tap", "--user"]),
    ("interop.py", ["--tun", "--variant", "tun:--link tun"]),
])
def test_bad_input_is_one_line(script: str, argv: list[str]) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_one_round_of_every_link_moves_intact_data() -> None:
    """The bench end to end, small: every link measured, TCP both ways by SHA-256 (a
    mismatch would exit 1), the frames link's echoes all answered."""
    result = subprocess.run([sys.executable, str(BENCH / "bridge.py"), "--links", "all",
                             "--rounds", "1", "--mb", "2", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    links = json.loads(result.stdout)["links"]
    assert list(links) == list(bridge_bench.LINKS)
    for name, summary in links.items():
        for key in ("down_mb_s", "up_mb_s", "bridge_cpu_ms_per_mb"):
            assert summary[key]["median"] > 0, (name, key, summary)
    assert links["tap"]["down_mb_s_ratio"] == 1.0
    assert links["frames"]["lost"]["max"] == 0, links["frames"]
