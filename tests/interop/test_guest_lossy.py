"""eembridge's native data path against a lossy EEM device on real USB, one guest boot.

tests/interop/lossy.sh runs, at full, high and SuperSpeed one after the other (dummy_hcd
reloaded in between), tests/interop/ffs_eem_device.py: eembridge.sim's device model
(EemFunction: its codec and fault injector) on FunctionFS endpoints of a configfs gadget
on dummy_hcd, its network side a TAP in netns `peer`. The bridge claims it as any EEM
device (libusb's event thread, the C data path) while the device loses 2% of its IN
packets (64, 512 or 1024 bytes), puts garbage that reads as an Echo Response of 2047
bytes in front of a packet every 200 frames (0.5%), sends an Echo of its own every 100 frames,
halts its OUT endpoint every OUT_STALL_EVERY reads and stops reading OUT for a while every
OUT_BUSY_EVERY reads. One bridge serves the three speeds (each reload is an unplug to it). The tests read the files it left: TCP both ways by SHA-256, every
Echo that reached the bridge whole answered and no Echo Response nobody asked for, and
the bridge's counters consistent with what the device injected.

A machine that cannot boot the guest FAILS here naming what is missing
(tests/interop/setup_guest.sh installs it).
"""

from __future__ import annotations

from typing import Any

import pytest
from bootresults import BootResults, boot_or_fail
from guest import GuestResult

pytestmark = pytest.mark.interop

SPEEDS = {"full": ("12", 64), "high": ("480", 512), "super": ("5000", 1024)}
ALL_SPEEDS = pytest.mark.parametrize("speed", list(SPEEDS), ids=[f"{s}-speed" for s in SPEEDS])


class Boot(BootResults):
    def __init__(self, speed: str, result: GuestResult) -> None:
        # One bridge for the whole boot (its log one level up), one device per speed.
        super().__init__(result, subdir=speed, label=f"{speed} speed: ",
                         logs=("../bridge.log", "device.log"))
        self.speed = speed

    def device(self, name: str = "device") -> dict[str, Any]:
        """The device's state (device.json: at its exit; NAME.json: taken earlier)."""
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

    def counted(self, section: str) -> dict[str, int]:
        """What the bridge counted in `section` ("bridge", "rx") during this speed's
        checks: its counters run on across the speeds of the boot."""
        before, after = self.stats("stats_before")[section], self.stats()[section]
        return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}


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
    boot.rc(direction)
    sent = boot.read(f"{direction}.sent")
    assert len(sent) == 64
    assert boot.read(f"{direction}.recv") == sent


@ALL_SPEEDS
def test_every_fault_was_injected(boot: Boot, speed: str) -> None:
    """Not a test of the bridge: that the device did what the other tests rely on."""
    state = boot.device()
    faults, device = state["faults"], state["device"]
    assert device.get("thread_failures", 0) == 0, state["doing"]
    assert faults["in_packets_lost"] > 0, faults
    # 2% of the IN packets, give or take what chance allows on a few thousand.
    assert 0.01 < faults["in_packets_lost"] / faults["in_packets"] < 0.03, faults
    assert faults["injected_garbage"] > 0 and faults["injected_echo"] > 0, faults
    assert faults["out_stalls"] >= 2 and faults["out_busy_periods"] >= 1, faults
    assert state["ep0_events"].get("enable", 0) >= 1, state["ep0_events"]


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
    # answers: no Echo Response whose payload the device did not send.
    assert echo["unasked"] == 0, echo
    counted = boot.counted("bridge")
    assert counted["echo_answered"] >= echo["whole_answered"], counted


@ALL_SPEEDS
def test_the_bridge_counted_the_garbage_and_the_loss(boot: Boot, speed: str) -> None:
    rx = boot.counted("rx")
    # The garbage (an Echo Response header of 2047 bytes in front of a packet of a
    # short transfer) is cut off by the transfer's end; a lost packet makes the
    # sentinel fail and the deframer scan.
    assert rx["truncated"] > 0 and rx["bytes_skipped"] > 0, rx
    assert rx["sentinel_errors"] + rx["resyncs"] > 0, rx
    # Nothing the device sent was taken for a command that got confirmed wrongly.
    assert boot.counted("bridge")["unsolicited_echo_responses"] == 0


@ALL_SPEEDS
def test_the_bridge_cleared_the_out_stalls_and_counted_what_they_cost(boot: Boot, speed: str) -> None:
    """The OUT-failure policy (one for every transport): a stalled transfer is dropped,
    its frames counted under drop_reasons "stall", the halt cleared; nothing else is
    lost on OUT. The busy periods (the device not reading) only delay: no OUT timeout."""
    counted = boot.counted("bridge")
    faults = boot.device()["faults"]
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
    after = boot.device()
    assert after["codec"]["rx_frames"] >= counted["tx_frames"], (after["codec"], counted)
    assert after["tap"]["write_drops"] == 0, after["tap"]
    resent = boot.tcp("after")["RetransSegs"] - boot.tcp("before")["RetransSegs"]
    assert resent > 0  # the peer's TCP: the faults cost it something
