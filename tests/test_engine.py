"""The engine (eembridge/_fast/engine.pxi) on the simulated device: what real USB runs, under faults.

The bridge drives the simulated device through the compiled engine (SimTransport.engine,
eembridge._fast.simlink), so every bridge test on the simulated device runs the data path of
the libusb transport. The differential test runs one seeded fault schedule through the
engine and through the bridge's Python loop (the readable specification) and requires
the same frames delivered and the same counters.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from test_bridge import rig_factory  # noqa: F401  (a fixture)

from eembridge.bridge import Bridge, BridgeOptions
from eembridge.core import environment
from eembridge.core.transport import Direction
from eembridge.sim.device import QueueNetworkSide, SimDevice
from eembridge.sim.faults import Faults

from netfixtures import wait_for


def test_the_simulated_device_runs_the_engine_through_every_fault(rig_factory):  # noqa: F811
    faults = Faults(loss=0.01, flip=0.005, in_stall=0.01, out_stall=0.01, in_timeout=0.01,
                    out_timeout=0.01, garbage=0.005, echo=0.005, hint=0.005, seed=19)
    rig = rig_factory(max_packet=512, faults=faults, tx_crc=True, in_transfer_size=4096)
    rig.transfer(2_000_000, 2_000_000)
    stats = rig.bridge.stats()
    loop, counters, injected = stats["event_loop"], stats["bridge"], rig.sim.fault_counters()
    assert stats["native"] is True, stats
    assert loop["usb_passes"] > 0 and loop["tap_passes"] > 0, loop
    # Every fault hit the engine, and it counted what the device did.
    for name in ("in_stalls", "out_stalls", "in_timeouts", "out_timeouts", "in_packets_lost",
                 "out_packets_lost", "in_bits_flipped", "injected_garbage", "injected_echo"):
        assert injected[name] > 0, (name, injected)
    assert counters["in_stalls"] >= injected["in_stalls"], (counters, injected)
    assert counters["out_stalls"] >= injected["out_stalls"], (counters, injected)
    assert stats["in_errors"].get("timed_out", 0) >= injected["in_timeouts"], stats["in_errors"]
    assert stats["drop_reasons"].get("timed_out", 0) > 0, stats["drop_reasons"]
    assert counters["echo_answered"] > 0 and counters["unsolicited_echo_responses"] == 0
    assert stats["rx"]["crc_errors"] > 0 and stats["rx"]["resyncs"] > 0, stats["rx"]


def test_unplug_and_replug_on_the_engine(rig_factory):  # noqa: F811
    rig = rig_factory(max_packet=512)
    rig.transfer(300_000, 300_000)
    rig.sim.device.unplug()
    wait_for(lambda: not rig.bridge.connected.is_set(), 5, "the bridge to see the unplug")
    rig.sim.device.replug()
    assert rig.bridge.connected.wait(5)
    rig.transfer(300_000, 300_000)
    stats = rig.bridge.stats()
    assert stats["native"] is True and stats["bridge"]["unplugs"] == 1, stats["bridge"]
    assert stats["bridge"]["connects"] == 2, stats["bridge"]


def test_a_burst_of_commands_waits_for_a_busy_bridge_thread(rig_factory):  # noqa: F811
    # The engine deframes while the bridge thread is busy elsewhere and keeps the
    # commands for it (rx_poll); 32 of them used to be all it kept, the rest dropped.
    rig = rig_factory(max_packet=512)
    gate = threading.Event()
    rig.bridge._requests.put(gate.wait)  # the bridge thread waits here, like a slow one
    rig.bridge._wake()
    try:
        for i in range(200):
            rig.sim.device.inject_echo_response(b"stray %d" % i)
        wait_for(lambda: rig.sim.device.counters()["tx_echo_response"] == 200, 10,
                 "the device to send all 200")
    finally:
        gate.set()
    stats = wait_for(lambda: (s := rig.bridge.stats())["bridge"]["unsolicited_echo_responses"]
                     == 200 and s, 10, "200 unsolicited Echo Responses counted")
    assert stats["bridge"]["rx_commands_dropped"] == 0, stats["bridge"]


def test_native_0_keeps_the_python_loop_on_the_simulated_device(rig_factory, monkeypatch):  # noqa: F811
    monkeypatch.setattr(environment, "ENV", replace(environment.ENV, native=False))
    rig = rig_factory(max_packet=512)
    rig.transfer(100_000, 100_000)
    stats = rig.bridge.stats()
    assert stats["native"] is False and "event_loop" not in stats, stats


def test_usb_recording_keeps_the_python_loop_on_the_simulated_device(tmp_path):
    # The recorder must see every transfer: wrapping the SimTransport hides its engine().
    from eembridge.observe.recording import UsbRecorder

    device = SimDevice(QueueNetworkSide(), max_packet=512)
    recorder = UsbRecorder(str(tmp_path / "usb.pcapng"))
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    bridge = Bridge(recorder.wrap(device.connect), BridgeOptions(tap="recorded"), tap=tap)
    try:
        bridge.start()
        assert bridge.connected.wait(10)
        assert bridge.stats()["native"] is False
    finally:
        bridge.stop()
        recorder.close()
        device.close()
        host.close()
        tap.close()


# -- the differential test -----------------------------------------------------------------

FRAMES = 160
MARKERS = 3


def _frames(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [b"\xff" * 6 + bytes([2, 0, 0, 0, 0, i % 256]) + b"\x88\xb5"
            + rng.randbytes(rng.randrange(46, 1500)) for i in range(count)]


def _markers(direction: int) -> list[bytes]:
    return [b"\xff" * 6 + bytes([2, 0, 0, 0, direction, i]) + b"\x88\xb5" + bytes(50)
            for i in range(MARKERS)]


def _run_schedule(native: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One seeded fault schedule, one frame at a time each way (then a fault hits the
    same packet and transfer whatever the timing): what arrived and every counter."""
    faults = Faults(loss=0.02, flip=0.02, in_stall=0.03, out_stall=0.03, in_timeout=0.03,
                    out_timeout=0.03, garbage=0.02, hint=0.02, seed=1919)
    network = QueueNetworkSide()
    device = SimDevice(network, max_packet=64, crc=True, faults=faults)
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # keeps frames whole
    tap.setblocking(False)  # as a TAP is: drained means EAGAIN
    host.settimeout(10)
    monkeypatch.setattr(environment, "ENV", replace(environment.ENV, native=native))
    # One transfer in flight each way: a stall then fails exactly one transfer, however
    # fast either loop resubmits.
    options = BridgeOptions(tap="differential", in_flight=1, out_in_flight=1,
                            in_transfer_size=512, max_transfer=4096, out_chunk=0)
    bridge = Bridge(device.connect, options, tap=tap)
    try:
        bridge.start()
        assert bridge.connected.wait(10)
        assert bridge.stats()["native"] is native
        # IN: the device sends every frame under faults, then markers without.
        network.send(*_frames(1, FRAMES))
        wait_for(lambda: network.unsent == 0 and device.in_idle
                 and device.counters()["tx_frames"] >= FRAMES, 30, "the device to send every frame")
        device.quiet(Direction.IN)
        markers = _markers(1)
        network.send(*markers)
        down: list[bytes] = []
        while not down or down[-1] != markers[-1]:
            down.append(host.recv(65536))
        # OUT: one frame at a time, each finished (sent or dropped) before the next,
        # then the markers without faults, the same way (or they might share a transfer).
        def send(frame: bytes, n: int) -> None:
            host.send(frame)
            wait_for(lambda: (s := bridge.stats())["tx_path"]["tap_frames_read"] == n
                     and s["out_transfers_queued"] == 0, 10, f"OUT frame {n} to finish")

        for sent, frame in enumerate(_frames(2, FRAMES), 1):
            send(frame, sent)
        device.quiet(Direction.OUT)
        markers = _markers(2)
        for sent, marker in enumerate(markers, FRAMES + 1):
            send(marker, sent)
        up: list[bytes] = []
        deadline = time.monotonic() + 10
        while not up or up[-1] != markers[-1]:
            assert time.monotonic() < deadline, "the OUT markers did not arrive"
            up += network.received(1, timeout=0.5)
        # The device passed the last marker on before its transfer's completion reached
        # the bridge: wait for that completion, or the last frame may not be counted yet.
        stats = wait_for(lambda: (s := bridge.stats())["out_transfers_queued"] == 0 and s, 10,
                         "the last OUT transfer's completion")
        return {"down": down, "up": up, "bridge": stats["bridge"],
                "drop_reasons": stats["drop_reasons"], "in_errors": stats["in_errors"],
                "rx": stats["rx"], "tx": stats["tx"], "rx_path": stats["rx_path"],
                "tx_path": stats["tx_path"], "device": device.counters(),
                "injected": device.fault_counters()}
    finally:
        bridge.stop()
        device.close()
        host.close()
        tap.close()


def test_the_engine_and_the_python_loop_agree_on_one_fault_schedule(monkeypatch):
    engine = _run_schedule(True, monkeypatch)
    python = _run_schedule(False, monkeypatch)
    injected = engine["injected"]
    for name in ("in_stalls", "out_stalls", "in_timeouts", "out_timeouts", "in_packets_lost",
                 "out_packets_lost", "in_bits_flipped", "out_bits_flipped", "injected_garbage",
                 "injected_hints"):
        assert injected[name] > 0, (name, injected)  # the schedule exercises every fault
    assert engine["down"] == python["down"]
    assert engine["up"] == python["up"]
    # Backpressure episodes (OUT filled up while the TAP was being read) are counted the
    # same way by both, but whether the TAP still held a frame at that instant is timing.
    engine["bridge"].pop("backpressure")
    python["bridge"].pop("backpressure")
    for section in ("injected", "device", "bridge", "drop_reasons", "in_errors", "rx", "tx",
                    "rx_path", "tx_path"):
        assert engine[section] == python[section], (section, engine[section], python[section])


@pytest.mark.parametrize("native", [True, False], ids=["engine", "python-loop"])
def test_out_frames_lost_at_an_unplug_are_counted_as_no_device(native, monkeypatch, caplog):
    """OUT transfers the device holds (busy) when it goes end NO_DEVICE, and under
    backpressure a refill is refused because it went: all their frames are no_device,
    as many as the unplug's log line says, never an error or a submit_error."""
    monkeypatch.setattr(environment, "ENV", replace(environment.ENV, native=native))
    device = SimDevice(QueueNetworkSide(), max_packet=512)
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    options = BridgeOptions(tap="unplugged", out_in_flight=2, max_transfer=2048, out_chunk=0)
    bridge = Bridge(device.connect, options, tap=tap)
    try:
        bridge.start()
        assert bridge.connected.wait(10)
        assert bridge.stats()["native"] is native
        device.busy_out_for(60)
        for i in range(12):  # more than two transfers hold: the rest wait in the TAP
            host.send(b"\xff" * 6 + bytes([2, 0, 0, 0, 0, i]) + b"\x88\xb5" + bytes(1000))
        wait_for(lambda: (s := bridge.stats())["out_transfers_queued"] >= 2
                 and s["bridge"]["backpressure"] >= 1, 10, "OUT to fill up")
        with caplog.at_level("WARNING", logger="eembridge"):
            device.unplug()
            wait_for(lambda: not bridge.connected.is_set(), 10, "the bridge to see the unplug")
        stats = bridge.stats()
    finally:
        bridge.stop()
        device.close()
        host.close()
        tap.close()
    counters, dropped = stats["bridge"], {k: v for k, v in stats["drop_reasons"].items() if v}
    logged = [int(m[1]) for r in caplog.records
              if (m := re.search(r"unplugged: device gone .*, (\d+) frames dropped", r.getMessage()))]
    assert set(dropped) == {"no_device"}, dropped
    assert dropped["no_device"] >= 2 and counters["tx_dropped"] == dropped["no_device"], stats
    assert counters["out_errors"] == 0, counters
    assert logged == [dropped["no_device"]], (logged, dropped)
