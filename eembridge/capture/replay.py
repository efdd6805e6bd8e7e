"""`eembridge replay CAPTURE`: what the bridge would have done with a recorded transfer stream.

For firmware authors: a usbmon capture (tcpdump -i usbmonN, or eembridge --usb-pcap)
is read exactly as `eembridge decode` reads it (same survey, pairing and codec), and
every transfer's outcome is reported as events, in capture order:

  IN  (device to host, what the bridge acts on)
    frame            delivered to the TAP: length, CRC or sentinel checked
    dropped          garbage the deframer threw away, with the counters that say why
    resync           the deframer found its way back to a packet boundary
    echo             the device's Echo: the bridge answers with an Echo Response
    echo_response    matched (answers an Echo seen in the OUT stream) or unsolicited
    hint             Suspend Hint, Response Hint, Response Complete Hint, Tickle
  OUT (host to device): the same, as the device's deframer would see it.

then the final counters per direction.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from ..core.events import Echo, EchoResponse, Event, Frame, Hint
from ..core.protocol import DEFAULT_MAX_LENGTH
from .decode import (
    CaptureInput,
    capture_summary,
    choose_device,
    max_length_arg,
    parse_device,
    run_decoder,
    survey_capture,
    write_stdout,
)
from .usbmon import UsbRecord

# Deframer counters that mean "bytes or packets were thrown away", for the dropped event.
DROP_COUNTERS = ("crc_errors", "sentinel_errors", "oversize", "runts", "truncated",
                 "reserved_commands", "unconfirmed_commands", "bytes_skipped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", help="usbmon capture (pcap or pcapng), e.g. from --usb-pcap; "
                        "a pipe such as /dev/stdin is copied to a temporary file in TMPDIR")
    parser.add_argument("--device", type=parse_device, metavar="BUS:ADDR",
                        help="the EEM device (needed when several devices carry bulk traffic)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line: every event, then the summary")
    parser.add_argument("--max-length", type=max_length_arg, default=DEFAULT_MAX_LENGTH, metavar="N",
                        help=f"longest EEM bmLength to accept (default {DEFAULT_MAX_LENGTH})")


class Replayer:
    """Turns each transfer's events and counter changes into report events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._before: dict[str, dict[str, int]] = {}
        self._echo_sent: dict[str, set[bytes]] = {"in": set(), "out": set()}
        self._transfers = {"in": 0, "out": 0}  # numbered per direction, from 1
        self.actions = {"echo_answered": 0, "echo_responses_matched": 0,
                        "echo_responses_unsolicited": 0}

    def on_transfer(self, direction: str, r: UsbRecord, short: bool, events: list[Event],
                    deframer: Any) -> None:
        other = "out" if direction == "in" else "in"
        self._transfers[direction] += 1
        base = {"t": r.timestamp_ns / 1e9, "dir": direction, "transfer": self._transfers[direction]}
        for event in events:
            if isinstance(event, Frame):
                self.events.append({**base, "event": "frame", "length": len(event.data),
                                    "check": "crc" if event.crc else "sentinel", "ok": True})
            elif isinstance(event, Echo):
                self._echo_sent[direction].add(event.data)
                self.actions["echo_answered"] += direction == "in"
                self.events.append({**base, "event": "echo", "length": len(event.data),
                                    "action": "answer with an Echo Response"})
            elif isinstance(event, EchoResponse):
                matched = event.data in self._echo_sent[other]
                self._echo_sent[other].discard(event.data)
                if direction == "in":
                    self.actions["echo_responses_matched" if matched else "echo_responses_unsolicited"] += 1
                self.events.append({**base, "event": "echo_response", "length": len(event.data),
                                    "matched": matched})
            elif isinstance(event, Hint):
                self.events.append({**base, "event": "hint", "name": event.name, "param": event.param})
        # Whatever the deframer threw away shows in its counters, not as events.
        counters = deframer.counters()
        before = self._before.get(direction, dict.fromkeys(counters, 0))
        self._before[direction] = counters
        dropped = {k: counters[k] - before[k] for k in DROP_COUNTERS if counters[k] != before[k]}
        if dropped:
            self.events.append({**base, "event": "dropped", "why": dropped,
                                "transfer_length": len(r.data), "short": short})
        if counters["resyncs"] != before["resyncs"]:
            self.events.append({**base, "event": "resync",
                                "count": counters["resyncs"] - before["resyncs"]})


def replay_capture(path: str, device: tuple[int, int] | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, Any]:
    with CaptureInput(path) as source:
        survey = survey_capture(path, source.first_pass())
        selection = choose_device(survey, device)
        replayer = Replayer()
        decoder, reader = run_decoder(path, survey, selection, lambda _data, _t: None, max_length,
                                      replayer.on_transfer, source.second_pass())
    return {
        "events": replayer.events,
        "summary": {**capture_summary(path, survey, selection, decoder, reader), **replayer.actions},
    }


def format_event(e: dict[str, Any]) -> str:
    head = f"{e['t']:.6f} {e['dir'].upper() + '#' + str(e['transfer']):<10} {e['event']:<13}"
    kind = e["event"]
    if kind == "frame":
        return f"{head} {e['length']} bytes, {e['check']} ok"
    if kind == "dropped":
        why = ", ".join(f"{k} +{v}" for k, v in e["why"].items())
        return f"{head} {why} (transfer of {e['transfer_length']} bytes{', short' if e['short'] else ''})"
    if kind == "resync":
        return f"{head} back in step ({e['count']})"
    if kind == "echo":
        return f"{head} {e['length']} bytes: {e['action']}" if e["dir"] == "in" else f"{head} {e['length']} bytes"
    if kind == "echo_response":
        return f"{head} {e['length']} bytes, {'matched' if e['matched'] else 'UNSOLICITED'}"
    return f"{head} {e['name']} param {e['param']}"


def run(args: argparse.Namespace) -> int:
    result = replay_capture(args.capture, args.device, args.max_length)
    return write_stdout(report_lines(result, args.json))


def report_lines(result: dict[str, Any], as_json: bool) -> Iterator[str]:
    summary = result["summary"]
    if as_json:
        for event in result["events"]:
            yield json.dumps(event) + "\n"
        yield json.dumps({"event": "summary", **summary}) + "\n"
        return
    for event in result["events"]:
        yield format_event(event) + "\n"
    yield "\n"
    yield (f"echo answered {summary['echo_answered']}, echo responses matched "
           f"{summary['echo_responses_matched']}, unsolicited {summary['echo_responses_unsolicited']}\n")
    names = list(summary["in"])
    width = max(map(len, names))
    yield f"{'':<{width}}  {'IN':>12}  {'OUT':>12}\n"
    for name in names:
        yield f"{name:<{width}}  {summary['in'][name]:>12}  {summary['out'][name]:>12}\n"
