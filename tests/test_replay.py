"""`eembridge replay`: a recorded transfer stream through the codec, event by event."""

from __future__ import annotations

import json
import random
from pathlib import Path

from eembridge.capture.usbmon import Transfer, UsbmonWriter
from eembridge.cli.main import main
from eembridge.core.protocol import CMD_ECHO, CMD_ECHO_RESPONSE, CMD_TICKLE

from eemstreams import command, data_packet, ethernet_frame

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "fixtures" / "cdc_eem_usbmon.pcap"


def replay_json(capture: Path, capsys) -> tuple[list[dict], dict]:
    assert main(["replay", str(capture), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[-1]["event"] == "summary"
    return lines[:-1], lines[-1]


def test_replay_of_the_real_capture_agrees_with_decode(tmp_path, capsys):
    events, summary = replay_json(REAL, capsys)
    assert main(["decode", str(REAL), "-o", str(tmp_path / "eth.pcap"), "--json"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    for direction in ("in", "out"):
        frames = [e for e in events if e["event"] == "frame" and e["dir"] == direction]
        assert len(frames) == decoded[direction]["frames_written"] == summary[direction]["frames"] > 0
        assert sum(e["length"] for e in frames) == decoded[direction]["bytes"]
    # The real f_eem device sends the sentinel; Linux cdc_eem sends a CRC.
    assert {e["check"] for e in events if e["dir"] == "in"} == {"sentinel"}
    assert not [e for e in events if e["event"] in ("dropped", "resync")]
    # The human-readable form names every frame too.
    assert main(["replay", str(REAL)]) == 0
    text = capsys.readouterr().out
    assert text.count("sentinel ok") == summary["in"]["frames"]


def test_replay_reports_garbage_resync_echo_and_hints(tmp_path, capsys):
    rng = random.Random(7)
    good = [ethernet_frame(rng, n) for n in (60, 200, 1000)]
    bad_crc = bytearray(data_packet(ethernet_frame(rng, 100), crc=True))
    bad_crc[-1] ^= 0xFF
    transfers = [
        Transfer("in", data_packet(good[0], crc=True)),
        Transfer("in", bytes(bad_crc)),  # CRC error: dropped
        Transfer("in", data_packet(good[1], crc=False)),
        Transfer("in", command(CMD_ECHO, 4, b"ping")),  # the bridge answers it
        Transfer("out", command(CMD_ECHO, 3, b"abc")),  # our own Echo ...
        Transfer("in", command(CMD_ECHO_RESPONSE, 3, b"abc")),  # ... answered
        Transfer("in", command(CMD_ECHO_RESPONSE, 3, b"xyz")),  # nobody asked
        Transfer("in", command(CMD_TICKLE, 0)),
        Transfer("in", b"\x00\x00" * 3 + rng.randbytes(40)),  # garbage (ZLPs then noise)
        Transfer("in", data_packet(good[2], crc=True)),
        # A packet cut short, noise, then a good packet: dropped, resync, delivered.
        Transfer("in", data_packet(good[0], crc=True)[:30] + rng.randbytes(30)
                 + data_packet(good[1], crc=True)),
    ]
    capture = tmp_path / "garbage.pcap"
    with open(capture, "wb") as stream:
        writer = UsbmonWriter(stream)
        writer.write_configuration()
        writer.write_all(transfers)
        writer.close()
    events, summary = replay_json(capture, capsys)
    kinds = [(e["dir"], e["event"]) for e in events]
    frames = [e for e in events if e["event"] == "frame" and e["dir"] == "in"]
    assert [e["length"] for e in frames] == [len(f) for f in (*good, good[1])]
    assert [e["check"] for e in frames] == ["crc", "sentinel", "crc", "crc"]
    assert 10 in [e["transfer"] for e in events if e["event"] == "resync"]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert any(e["transfer"] == 10 and e["why"].get("bytes_skipped") for e in dropped)
    assert dropped[0]["transfer"] == 2 and dropped[0]["why"]["crc_errors"] == 1
    assert any(e["transfer"] == 8 and e["why"].get("bytes_skipped") for e in dropped)
    assert ("in", "echo") in kinds and ("out", "echo") in kinds
    responses = [e for e in events if e["event"] == "echo_response"]
    assert [r["matched"] for r in responses] == [True, False]
    assert [e["name"] for e in events if e["event"] == "hint"] == ["tickle"]
    assert summary["echo_answered"] == 1
    assert summary["echo_responses_matched"] == 1 and summary["echo_responses_unsolicited"] == 1
    assert summary["in"]["frames"] == 4
    assert summary["in"]["crc_errors"] == sum(e["why"].get("crc_errors", 0) for e in dropped) >= 1
    # Every counter of the deframer that says something was thrown away shows as an event.
    assert sum(e["why"].get("bytes_skipped", 0) for e in dropped) == summary["in"]["bytes_skipped"]
    assert main(["replay", str(capture)]) == 0
    assert "UNSOLICITED" in capsys.readouterr().out


def test_replay_of_a_missing_capture_is_one_line(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "none.pcap")]) != 0
    err = capsys.readouterr().err
    assert "none.pcap" in err and len(err.strip().splitlines()) == 1
