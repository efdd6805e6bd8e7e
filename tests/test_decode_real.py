"""`eembridge decode` on a real capture: the kernel's cdc_eem host and f_eem gadget.

tests/fixtures/cdc_eem_usbmon.pcap was taken with tcpdump on usbmon in the QEMU guest
while cdc_eem carried traffic, and cdc_eem_eth.pcap on the network interface at the
same time (tests/interop/make_fixture.py regenerates both). Decoding the USB capture
must give exactly the frames tcpdump saw on the interface.
"""

from __future__ import annotations

import json
from pathlib import Path

from eembridge.capture.pcap import CaptureReader
from eembridge.cli.main import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def frames(path: Path) -> list[bytes]:
    with path.open("rb") as stream:
        return [bytes(packet.data) for packet in CaptureReader(stream, str(path))]


def test_real_usbmon_capture_decodes_to_the_interface_capture(tmp_path, capsys):
    out = tmp_path / "decoded.pcap"
    assert main(["decode", str(FIXTURES / "cdc_eem_usbmon.pcap"), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    decoded, seen = frames(out), frames(FIXTURES / "cdc_eem_eth.pcap")
    assert len(decoded) == len(seen) > 40
    assert sorted(decoded) == sorted(seen)  # the two taps order both directions alike but for ties
    for direction in ("in", "out"):
        counters = report[direction]
        assert counters["bytes_skipped"] == 0 and counters["crc_errors"] == 0
        assert counters["sentinel_errors"] == 0 and counters["truncated"] == 0
