"""eembridge's native data path against a lossy EEM device on real USB, one guest boot.

tests/interop/lossy.sh runs, at full, high and SuperSpeed one after the other (dummy_hcd
reloaded in between), tests/interop/ffs_eem_device.py: eembridge.sim's device model
(EemFunction: its codec and fault injector) on FunctionFS endpoints of a configfs gadget
on dummy_hcd, its network side a TAP in netns `peer`. The bridge claims it as any EEM
device (libusb's event thread, the C data path) while the device loses 2% of its IN
packets (64, 512 or 1024 bytes), puts garbage that reads as an Echo Response of 2047
bytes in front of a packet every 200 frames (0.5%), sends an Echo of its own every 100 frames,
halts its OUT endpoint every OUT_STALL_EVERY reads and stops reading OUT for a while every
OUT_BUSY_EVERY reads. One bridge serves the three speeds (each reload is an unplug to it);
at high speed the gadget is also unbound from its UDC in the middle of a TCP transfer
and bound again. The tests read the files it left: TCP both ways by SHA-256, every
Echo that reached the bridge whole answered and no Echo Response nobody asked for, every
frame the bridge wrote to its TAP one the device sent (none a flip made that its framing
must refuse), and the bridge's counters consistent with what the device injected.

A machine that cannot boot the guest FAILS here naming what is missing
(tests/interop/setup_guest.sh installs it).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from bootresults import BootResults, boot_or_fail
from ffs_eem_device import digest, tcp_segment
from guest import GuestResult

from eembridge.capture.pcap import CaptureReader

pytestmark = pytest.mark.interop

SPEEDS = {"full": ("12", 64), "high": ("480", 512), "super": ("5000", 1024)}
ALL_SPEEDS = pytest.mark.parametrize("speed", list(SPEEDS), ids=[f"{s}-speed" for s in SPEEDS])
UNPLUG_SPEEDS = pytest.mark.parametrize("speed", ["high"], ids=["high-speed"])  # lossy.sh's
# The counters that refuse a data packet whose check fails, by the device's framing.
REFUSED = {"crc": ("crc_errors",), "sentinel": ("sentinel_errors", "spliced")}


class Boot(BootResults):
    def __init__(self, speed: str, result: GuestResult) -> None:
        # One bridge for the whole boot (its log one level up), one device per speed.
        super().__init__(result, subdir=speed, label=f"{speed} speed: ",
                         logs=("../bridge.log", "device.log"))
        self.speed = speed

    def device(self, name: str = "device") -> dict[str, Any]:
        """The device's state (device.json: at its exit; NAME.json: taken earlier)."""
        if name != "device":
            self.rc(name)  # the snapshot came (not a stale file after a timeout)
        state: dict[str, Any] = self.json(f"{name}.json")
        return state

    def tcp(self, stage: str) -> dict[str, int]:
        """The peer's Tcp: counters from /proc/net/snmp (peer_tcp_STAGE.txt)."""
        names, values = (line.split()[1:] for line in self.read(f"peer_tcp_{stage}.txt").splitlines()
                         if line.startswith("Tcp:"))
        return dict(zip(names, map(int, values), strict=True))

    def stats(self, name: str = "stats") -> dict[str, Any]:
        """The bridge's stats snapshot (the control socket's answer) NAME.json."""
        self.rc(name)
        stats: dict[str, Any] = self.json(f"{name}.json")
        return stats

    def counted(self, section: str, stage: tuple[str, str] = ("stats_before", "stats")) -> dict[str, int]:
        """What the bridge counted in `section` ("bridge", "rx", "drop_reasons") between
        the two snapshots of `stage` (by default this speed's checks): its counters run
        on across the speeds of the boot."""
        before, after = self.stats(stage[0])[section], self.stats(stage[1])[section]
        return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}

    def transfer_whole(self, name: str) -> None:
        """TCP transfer NAME (lossy_xfer) finished and both ends saw the same SHA-256."""
        self.rc(name)
        sent = self.read(f"{name}.sent")
        assert len(sent) == 64
        assert self.read(f"{name}.recv") == sent

    def delivered(self) -> list[bytes]:
        """The frames the bridge wrote to its TAP while the transfers ran (tap_in.pcap)."""
        self.rc("tap_capture_start")
        self.rc("tap_capture")
        with (self.dir / "tap_in.pcap").open("rb") as f:
            return [p.data for p in CaptureReader(f, "tap_in.pcap")]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    rwdir = tmp_path_factory.mktemp("eembridge-lossy")
    return boot_or_fail("bash $INTEROP/lossy.sh checks " + " ".join(SPEEDS), rwdir,
                        timeout=720, label="lossy-device boot")


@pytest.fixture
def boot(result: GuestResult, speed: str) -> Boot:
    return Boot(speed, result)


@ALL_SPEEDS
def test_the_functionfs_device_enumerates_at_its_speed(boot: Boot, speed: str) -> None:
    boot.rc("device_up")
    boot.rc("usb")
    env = boot.env()
    assert env["USB_SPEED"] == SPEEDS[speed][0], env
    classes = [line.split()[1] for line in boot.read("interfaces.txt").splitlines()]
    assert classes == ["02/0c/07"], boot.read("interfaces.txt")


@ALL_SPEEDS
def test_the_bridge_claims_it_on_the_native_data_path(boot: Boot, speed: str) -> None:
    boot.rc("bridge_up")
    stats = boot.stats()
    assert stats["native"] and stats["connected"], {k: stats[k] for k in ("native", "connected")}
    assert stats["device"]["max_packet"] == SPEEDS[speed][1], stats["device"]
    assert stats["device"]["serial"] == boot.env()["SERIAL"]


@ALL_SPEEDS
def test_the_bridge_sees_the_device_go_between_speeds(boot: Boot, speed: str) -> None:
    boot.rc("carrier_off")  # dummy_hcd unloaded: carrier off, and back at the next speed


def test_the_bridge_stops_cleanly_after_every_speed(result: GuestResult) -> None:
    BootResults(result).rc("bridge_exit")  # SIGTERM: exit 0


@ALL_SPEEDS
@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_tcp_both_ways_arrives_whole(boot: Boot, speed: str, direction: str) -> None:
    boot.transfer_whole(direction)


@ALL_SPEEDS
def test_every_fault_was_injected(boot: Boot, speed: str) -> None:
    """Not a test of the bridge: that the device did what the other tests rely on."""
    state = boot.device("device_after_stats")
    faults, device = state["faults"], state["device"]
    assert device.get("thread_failures", 0) == 0, state["doing"]
    assert faults["in_packets_lost"] > 0, faults
    # 2% of the IN packets, give or take what chance allows on a few thousand.
    assert 0.01 < faults["in_packets_lost"] / faults["in_packets"] < 0.03, faults
    assert faults["injected_garbage"] > 0 and faults["injected_echo"] > 0, faults
    assert faults["out_stalls"] >= 2 and faults["out_busy_periods"] >= 1, faults
    assert state["ep0_events"].get("enable", 0) >= 1, state["ep0_events"]
    assert faults["in_bits_flipped"] > 0 and device.get("frames_flipped", 0) > 0, (faults, device)
    if float(boot.env()["IN_FLIP"]) >= 0.005:  # 1-1.5% of the frames: some reach it in sync
        assert device.get("frames_flipped_whole_detectable", 0) > 0, device


@ALL_SPEEDS
def test_every_whole_echo_is_answered_and_nothing_unasked(boot: Boot, speed: str) -> None:
    state = boot.device()
    echo = state["echo"]
    # An Echo the device sent whole (none of its packets lost, no garbage in front, the
    # transfer before it ended) reaches the bridge whole: its answer must come back,
    # unless the device halted OUT while the answer was due (the bridge drops a stalled
    # OUT transfer, the answer in it too).
    assert echo["whole"] > 0, echo
    assert echo["whole_unanswered"] == 0, echo
    assert echo["whole_unanswered_at_a_halt"] <= state["faults"]["out_stalls"], echo
    # A garbage header or a packet cut by loss must never become an Echo the bridge
    # answers: no Echo Response whose payload the device did not send (or a flip left:
    # commands carry no check, a flipped Echo is an Echo).
    assert echo["unasked"] == 0, echo
    # at exit: through the unplug stage too, if this speed had one
    last = "stats_unplug_after" if (boot.dir / "stats_unplug_after.json").exists() else "stats"
    counted = boot.counted("bridge", ("stats_before", last))
    assert counted["echo_answered"] >= echo["whole_answered"], counted


@ALL_SPEEDS
def test_the_bridge_counted_the_garbage_and_the_loss(boot: Boot, speed: str) -> None:
    rx = boot.counted("rx")
    # The garbage (an Echo Response header of 2047 bytes in front of a packet of a
    # short transfer) is cut off by the transfer's end; a lost packet makes the
    # check fail and the deframer scan.
    assert rx["truncated"] > 0 and rx["bytes_skipped"] > 0, rx
    assert rx["crc_errors"] + rx["sentinel_errors"] + rx["resyncs"] > 0, rx
    # Nothing the device sent was taken for a command that got confirmed wrongly (but an
    # Echo whose command bits a flip turned into an Echo Response's is one).
    assert (boot.counted("bridge")["unsolicited_echo_responses"]
            <= boot.device("device_after_stats")["device"].get("echo_flipped_header", 0))


@ALL_SPEEDS
def test_every_frame_delivered_is_one_the_device_sent(boot: Boot, speed: str) -> None:
    """What the bridge wrote to its TAP, frame by frame: each one the device sent, as it
    sent it; none that a bit flip made and the framing must refuse (any, with CRC-32;
    with the sentinel, one whose IP header or TCP/UDP/ICMP checksum the flip broke:
    a flip in an Ethernet header passes the sentinel and goes to the host's stack, as
    it would from f_eem); no frame made of pieces (loss splicing two packets)."""
    frames = boot.device("device_after_stats")["frames"]
    sent, flipped = set(frames["sent"]), frames["flipped"]
    delivered = boot.delivered()
    assert len(delivered) > 0.5 * boot.counted("rx")["frames"], boot.read("tap_capture.txt")
    digests = [digest(frame) for frame in delivered]
    refused = [d for d in digests if flipped.get(d)]
    assert not refused, f"{len(refused)} frames with a flip their check must catch were delivered"
    unknown = [frame for frame, d in zip(delivered, digests, strict=True)
               if d not in sent and d not in flipped and not merged_from_sent(frame, frames["tcp"])]
    assert not unknown, (f"{len(unknown)} of {len(delivered)} frames delivered were never sent: "
                         + ", ".join(f"{len(f)} B {f[:54].hex()}" for f in unknown[:5]))


def merged_from_sent(frame: bytes, tcp: dict[str, list[str]]) -> bool:
    """Whether `frame` is TCP segments the device sent, merged by the bridge (--offload):
    its payload, piece by piece from its sequence number on, what a segment the device
    sent at that sequence number carried."""
    segment = tcp_segment(frame)
    if segment is None:
        return False
    flow, seq, payload = segment
    pos = 0
    while pos < len(payload):
        for sent in tcp.get(f"{flow}@{(seq + pos) & 0xFFFFFFFF}", []):
            length, sent_digest = sent.split()
            if 0 < int(length) <= len(payload) - pos and digest(payload[pos:pos + int(length)]) == sent_digest:
                pos += int(length)
                break
        else:
            return False
    return pos > 0


@ALL_SPEEDS
def test_the_bridge_refused_every_flipped_frame_and_counted_it(boot: Boot, speed: str) -> None:
    """A frame flipped in its payload or check and sent in sync (the transfer whole but
    for the flips) fails its check where it stands: counted as a CRC error (CRC-32), a
    sentinel error or a splice (sentinel: a flip in the IP or TCP header or payload
    breaks a checksum). Loss adds to these counters (a transfer that runs on into the
    next), never takes from them."""
    device = boot.device("device_after_stats")["device"]
    rx = boot.counted("rx")
    framing = boot.env()["FRAMING"]
    assert sum(rx[k] for k in REFUSED[framing]) >= device.get("frames_flipped_whole_detectable", 0), (rx, device)
    # The framing the device chose is the one the bridge checked.
    assert rx["crc_frames"] == (rx["frames"] if framing == "crc" else 0), rx


@ALL_SPEEDS
def test_the_bridge_cleared_the_out_stalls_and_counted_what_they_cost(boot: Boot, speed: str) -> None:
    """The OUT-failure policy (one for every transport): a stalled transfer is dropped,
    its frames counted under drop_reasons "stall", the halt cleared; nothing else is
    lost on OUT. The busy periods (the device not reading) only delay: no OUT timeout."""
    counted = boot.counted("bridge")
    faults = boot.device("device_after_stats")["faults"]
    assert faults["out_stalls"] > 0 and faults["out_busy_periods"] > 0, faults
    # Every halt stalls at least the next transfer; the ones in flight stall with it.
    assert counted["out_stalls"] >= faults["out_stalls"], (counted, faults)
    before, after = boot.stats("stats_before")["drop_reasons"], boot.stats()["drop_reasons"]
    dropped = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert sum(dropped.values()) == counted["tx_dropped"], (dropped, counted)
    assert set(dropped) <= {"stall"}, dropped


@ALL_SPEEDS
def test_no_frame_lost_beyond_the_faults(boot: Boot, speed: str) -> None:
    """IN: every frame the device sent whole (taken before the bridge's counters) was
    delivered by the bridge. OUT: every frame the bridge counts as sent reached the
    device (its state at exit, after the counters). What the faults cost, TCP resent."""
    before = boot.device("device_before_stats")
    rx, counted = boot.counted("rx"), boot.counted("bridge")
    assert rx["frames"] >= before["device"]["frames_whole"], (rx, before["device"])
    after = boot.device("device_after_stats")
    assert after["codec"]["rx_frames"] >= counted["tx_frames"], (after["codec"], counted)
    assert after["tap"]["write_drops"] == 0, after["tap"]
    resent = boot.tcp("after")["RetransSegs"] - boot.tcp("before")["RetransSegs"]
    assert resent > 0  # the peer's TCP: the faults cost it something


def test_no_traceback_in_the_bridge_log(result: GuestResult) -> None:
    log = BootResults(result).read("bridge.log")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


@UNPLUG_SPEEDS
def test_unplugged_in_the_middle_of_a_transfer_carrier_off_then_on(boot: Boot, speed: str) -> None:
    boot.rc("unplug_under_way")  # a third of the transfer through the bridge first
    boot.rc("unplug_carrier_off")
    boot.rc("replug_carrier_on")
    events = boot.device()["ep0_events"]  # the device itself saw the gadget go and come back
    assert events.get("unbind", 0) >= 1 and events.get("bind", 0) >= 2, events


@UNPLUG_SPEEDS
@pytest.mark.parametrize("direction", ["h2p", "p2h"])
def test_tcp_across_the_unplug_and_after_it_arrives_whole(boot: Boot, speed: str, direction: str) -> None:
    """h2p: the connection under way when the gadget went (TCP resends across the gap);
    p2h: a new one after."""
    boot.transfer_whole(f"unplug_{direction}")


@UNPLUG_SPEEDS
def test_the_bridge_counted_the_unplug_and_what_it_dropped(boot: Boot, speed: str) -> None:
    """One unplug, one reconnect; every OUT frame dropped counted under a reason: the
    stalls as before, and the frames in flight when the gadget went. Those end as
    "error" (dummy_hcd gives an URB whose endpoint has gone back with -EPROTO before
    the hub reports the disconnect), "submit_error" (a resubmission refused) or, once
    the bridge knows, "no_device": as many as its log line says."""
    stage = ("stats_unplug_before", "stats_unplug_after")
    counted = boot.counted("bridge", stage)
    assert counted["unplugs"] == 1 and counted["connects"] == 1, counted
    dropped = {k: v for k, v in boot.counted("drop_reasons", stage).items() if v}
    assert sum(dropped.values()) == counted["tx_dropped"], (dropped, counted)
    at_the_unplug = {"error", "submit_error", "no_device"}
    assert set(dropped) <= {"stall"} | at_the_unplug, dropped
    # How many were in flight varies (8, 20, 1 in three boots): no lower bound.
    first, last = map(int, boot.read("unplug_log.txt").split())
    lines = BootResults(boot.result).read("bridge.log").splitlines()[first:last]
    gone = [m for line in lines if (m := re.search(r"unplugged: device gone \(.*\), (\d+) frames dropped", line))]
    assert len(gone) == 1, lines
    assert dropped.get("no_device", 0) == int(gone[0][1]), (dropped, gone[0][0])
    assert boot.counted("bridge", stage)["unsolicited_echo_responses"] <= boot.device()["device"].get(
        "echo_flipped_header", 0)
