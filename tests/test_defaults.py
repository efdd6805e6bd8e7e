"""The automatic choices behind the defaults: what a bare command line gets, what each
explicit flag keeps, and how they depend on the device's packet size and on --pcap."""

from __future__ import annotations

import pytest

from eembridge import datapath
from eembridge.bridge import BridgeOptions
from eembridge.cli.assemble import bridge_options
from eembridge.cli.main import main_parser
from eembridge.core.errors import UserError


def options(*argv: str) -> BridgeOptions:
    return bridge_options(main_parser().parse_args(["--tap", "t0", *argv])).resolved()


def test_bare_command_line_batches_for_f_eem_offloads_and_keeps_queues_short():
    opts = options()
    assert opts.offload is datapath.OFFLOAD
    assert opts.txqueuelen == (8 if opts.offload else 64)
    assert opts.out_chunk == "f_eem"
    # A device known to take batches (Linux f_eem): at high speed 12 KB transfers of
    # f_eem buffers, 96 KB in flight; full speed: one buffer per transfer, 12 KB in
    # flight; SuperSpeed: one buffer, 32 in flight.
    assert opts.out_transfers(512, True) == (12288, 8, True)
    assert opts.out_transfers(64, True) == (1536, 8, True)
    assert opts.out_transfers(1024, True) == (1536, 32, True)


def test_a_device_not_known_to_take_batches_gets_one_frame_per_transfer():
    # As Linux's cdc_eem sends: a transfer holds the longest packet (VLAN frame of the
    # MTU + check) and its ZLP header; in flight as many as the speed's byte budget.
    opts = options()
    assert opts.out_transfers(512, False) == (1526, 32, False)
    assert opts.out_transfers(64, False) == (1526, 8, False)
    assert options("--mtu", "3000").out_transfers(512, False) == (3026, 32, False)
    # --max-transfer frame asks for it whatever the device; a size asks for batches.
    assert options("--max-transfer", "frame").out_transfers(512, True) == (1526, 32, False)
    assert options("--max-transfer", "4096").out_transfers(512, False) == (4096, 24, True)


def test_explicit_flags_win():
    opts = options("--max-transfer", "4096", "--out-in-flight", "3", "--no-offload",
                   "--txqueuelen", "500", "--out-chunk", "0")
    assert opts.out_transfers(1024, True) == (4096, 3, True)
    assert (opts.offload, opts.txqueuelen, opts.out_chunk) == (False, 500, 0)
    assert options("--max-transfer", "49152").out_transfers(512, True) == (49152, 2, True)
    assert options("--max-transfer", "3072").out_transfers(64, True) == (3072, 4, True)  # 12 KB


def test_pcap_turns_offload_off_unless_asked_for(tmp_path):
    pcap = str(tmp_path / "x.pcap")
    assert options("--pcap", pcap).offload is False
    if datapath.OFFLOAD:
        assert options("--pcap", pcap, "--offload").offload is True


def test_bad_values_are_one_line_errors():
    with pytest.raises(UserError, match=r"--out-in-flight 0: out of range \(1\.\.32\)"):
        options("--out-in-flight", "0")
    with pytest.raises(UserError, match="--max-transfer 1000: cannot hold one full frame"):
        options("--max-transfer", "1000")
    with pytest.raises(UserError, match=r"--peer and --peer-mac go together: .* missing --peer-mac"):
        options("--peer", "169.254.7.1")
    with pytest.raises(UserError, match=r"go together: .* missing --peer \(the device's IP\)"):
        options("--peer-mac", "02:00:00:00:00:01")
    assert options("--peer", "169.254.7.1", "--peer-mac", "02:00:00:00:00:01").peer_mac
    with pytest.raises(UserError, match="--max-transfer one: expected a number of bytes or frame"):
        options("--max-transfer", "one")
    with pytest.raises(UserError, match=r"--max-transfer 2000000: out of range"):
        options("--max-transfer", "2000000")


def test_busy_poll_default_and_range():
    from eembridge.cli.assemble import usb_connector
    from eembridge.core.transport import BUSY_POLLS

    assert main_parser().parse_args(["--tap", "t0"]).busy_poll == BUSY_POLLS == 100
    assert main_parser().parse_args(["--tap", "t0", "--busy-poll", "0"]).busy_poll == 0
    with pytest.raises(UserError, match=r"--busy-poll -1: out of range \(0\.\.100000\)"):
        usb_connector(main_parser().parse_args(["--tap", "t0", "--busy-poll", "-1"]))
