"""The bridge end to end: simulated device <-> bridge <-> real TAP <-> kernel TCP.

Every test runs real TCP between the host namespace and the simulated device's own
namespace, checked by SHA-256 both ways, with the faults a bad USB link produces.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time

import pytest

from eembridge.bridge import Bridge, BridgeOptions
from eembridge.core.protocol import DEFAULT_MAX_TRANSFER
from eembridge.link.netns import free_linklocal_subnet, unique_name
from eembridge.sim.faults import Faults
from eembridge.sim.link import SimLink

from netfixtures import require_tun_and_root, tcp_transfer, wait_for


class Rig:
    def __init__(self, sim: SimLink, bridge: Bridge, device_ip: str, host_ip: str) -> None:
        self.sim, self.bridge = sim, bridge
        self.device_ip, self.host_ip = device_ip, host_ip

    def transfer(self, up: int, down: int, timeout: float = 60.0):
        result = tcp_transfer(self.device_ip, server_netns=self.sim.namespace,
                              upload_bytes=up, download_bytes=down, timeout=timeout)
        result.assert_intact()
        return result


@pytest.fixture
def rig_factory():
    require_tun_and_root()
    made = []

    def make(host_crc: bool = True, mtu: int = 1500, keepalive: float | None = None,
             in_transfer_size: int = 16384, offload: bool = False, out_chunk: int | str = 0,
             max_transfer: int | None = DEFAULT_MAX_TRANSFER, **sim_options) -> Rig:
        subnet = free_linklocal_subnet()
        device_ip, host_ip = str(subnet[1]), str(subnet[2])
        sim = SimLink(f"{device_ip}/24", mtu=mtu, **sim_options)
        made.append(sim)
        options = BridgeOptions(tap=unique_name("eemb"), addresses=[f"{host_ip}/24"],
                                peer=device_ip, peer_mac=sim.mac, tx_crc=host_crc, mtu=mtu, keepalive=keepalive,
                                in_transfer_size=in_transfer_size, offload=offload,
                                out_chunk=out_chunk, max_transfer=max_transfer, stats_socket=None)
        bridge = Bridge(sim.connect, options)
        bridge.start()
        made.append(bridge)
        assert bridge.connected.wait(10), "bridge did not connect to the simulated device"
        return Rig(sim, bridge, device_ip, host_ip)

    yield make
    for thing in reversed(made):
        if isinstance(thing, Bridge):
            thing.stop()
            assert thing.error is None, f"bridge thread died: {thing.error!r}"
        else:
            thing.close()


@pytest.mark.parametrize("max_packet", [64, 512, 1024])
@pytest.mark.parametrize("loss", [0.0, 0.01, 0.05])
@pytest.mark.parametrize("device_crc", [False, True])
def test_tcp_both_ways_intact(rig_factory, max_packet, loss, device_crc):
    # 5% loss of 64-byte packets destroys 71% of 1514-byte frames (24 packets each) and
    # TCP stalls on its retransmit timer; a link that bad wants small frames, as a user
    # would configure: MTU 296 keeps frames within 5 packets.
    worst = loss >= 0.05 and max_packet == 64
    rig = rig_factory(max_packet=max_packet, loss=loss, tx_crc=device_crc, seed=max_packet,
                      mtu=296 if worst else 1500)
    size = 200_000 if worst else 1_000_000
    rig.transfer(size, size)
    stats = rig.bridge.stats()
    faults = rig.sim.fault_counters()
    assert stats["rx"]["frames"] > 0 and stats["bridge"]["tx_frames"] > 0
    if loss:
        assert faults["in_packets_lost"] > 0
        rx = stats["rx"]
        damaged = rx["crc_errors"] + rx["sentinel_errors"] + rx["truncated"] + rx["oversize"] + rx["runts"]
        assert damaged > 0  # the loss was seen and counted, not silently absorbed
    else:
        assert stats["rx"]["bytes_skipped"] == 0
    assert stats["bridge"]["tx_dropped"] == 0
    assert stats["rx"]["crc_frames"] == (stats["rx"]["frames"] if device_crc else 0)


@pytest.mark.parametrize(("loss", "batch"), [(0.0, False), (0.01, True)])
def test_offload_cuts_the_kernels_64k_packets_and_merges_the_devices(rig_factory, loss, batch):
    # With --offload the kernel's TCP hands the TAP packets of up to 64 KB with the
    # checksum left to us; the device's own kernel (the simulated device's namespace)
    # checks every frame's checksums, so a wrong byte would stall the transfer. On the
    # way up, a batching device's consecutive segments go to the TAP merged.
    rig = rig_factory(max_packet=512, loss=loss, seed=11, offload=True, batch=batch)
    rig.transfer(3_000_000, 3_000_000)
    stats = rig.bridge.stats()
    rx_path, tx_path = stats["rx_path"], stats["tx_path"]
    if batch:
        assert rx_path["tap_gro_packets"] > 0, rx_path
        assert rx_path["tap_gro_frames"] > 2 * rx_path["tap_gro_packets"], rx_path
    assert rx_path["tap_frames_written"] == stats["rx"]["frames"], (rx_path, stats["rx"])
    assert tx_path["tap_gso_packets"] > 0, tx_path  # the kernel did send big packets ...
    assert tx_path["tap_gso_frames"] > 2 * tx_path["tap_gso_packets"], tx_path  # ... cut here
    assert tx_path["tap_checksums"] > 0, tx_path  # small ones came with a partial checksum
    assert tx_path["tap_offload_errors"] == 0 and tx_path["tx_oversize"] == 0, tx_path


def _udp_burst(rig: Rig, count: int = 300, size: int = 999) -> None:
    """Datagrams faster than one transfer each: the TAP queues them and they batch."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(bytes([i & 0xFF]) * (size + i % 7), (rig.device_ip, 9))


@pytest.mark.parametrize("max_packet", [512, 1024])
def test_out_chunk_carries_many_frames_per_transfer_to_a_device_taking_1536_byte_buffers(
        rig_factory, max_packet):
    # The simulated device unpacks each OUT buffer on its own, as Linux f_eem does (1536
    # bytes; 2048 at SuperSpeed): a packet across a buffer's end would fail the buffer.
    rig = rig_factory(max_packet=max_packet, rx_buffer=1536 if max_packet == 512 else 2048,
                      whole_requests=True, out_chunk="f_eem", max_transfer=16384)
    rig.transfer(3_000_000, 300_000)
    _udp_burst(rig)  # odd sizes: padded frames, fill before a packet that would cross
    wait_for(lambda: rig.bridge.stats()["tx"]["frames"] > 300, timeout=10)
    tx, device = rig.bridge.stats()["tx"], rig.sim.device.counters()
    assert device["rx_failed_requests"] == 0, device
    assert tx["frames"] > 2 * tx["transfers"], tx  # many frames a transfer ...
    assert tx["fill"] > 0 and tx["padded"] > 0, tx  # ... none across a buffer's end


def test_without_out_chunk_long_transfers_fail_such_a_device_and_it_is_seen(rig_factory):
    # The reason for the 1536-byte default: batched transfers longer than the device's
    # buffer lose whole buffers. The device model counts what f_eem would have dropped.
    rig = rig_factory(max_packet=512, rx_buffer=1536, whole_requests=True, max_transfer=16384)
    # The device takes nothing while the burst comes, so the bridge batches it however
    # fast it is (on a loaded machine it could otherwise send each datagram alone).
    rig.sim.device.busy_out_for(30)
    _udp_burst(rig)
    rig.sim.device.busy_out_for(0)
    wait_for(lambda: rig.sim.device.counters()["rx_failed_requests"] > 0, timeout=10)


@pytest.mark.parametrize("max_packet", [64, 512])
def test_a_device_not_known_to_take_batches_gets_one_frame_per_transfer(rig_factory, max_packet):
    # Firmware written against Linux's cdc_eem (Zephyr's EEM function, say) may take
    # only the first frame of a transfer. A device not known to take batches (not
    # Linux f_eem) gets what cdc_eem sends, whatever the TAP has queued.
    rig = rig_factory(max_packet=max_packet, one_frame_per_transfer=True, max_transfer=None,
                      out_chunk="f_eem", offload=True)
    rig.transfer(1_000_000, 300_000)
    _udp_burst(rig)  # queued faster than one transfer each: batching would have merged them
    wait_for(lambda: rig.bridge.stats()["tx"]["frames"] > 300, timeout=10)
    stats = rig.bridge.stats()
    tx, device = stats["tx"], rig.sim.device.counters()
    assert stats["out_layout"] == {"batch": False, "max_transfer": 1526, "chunk": 0}, stats
    assert device["rx_lost_batched_frames"] == 0, device
    assert tx["transfers"] == tx["frames"] + tx["echo"] + tx["echo_response"], tx
    assert tx["fill"] == 0 and tx["padded"] == 0, tx  # frames go as they came


def test_batches_sent_to_such_a_device_lose_frames_and_it_is_seen(rig_factory):
    # Why one frame per transfer is the default there: --max-transfer 12288 batches, and
    # the device model counts the frames such firmware would have lost.
    rig = rig_factory(max_packet=512, one_frame_per_transfer=True, max_transfer=12288,
                      out_chunk="f_eem")
    assert rig.bridge.stats()["out_layout"]["batch"] is True
    _udp_burst(rig)
    wait_for(lambda: rig.sim.device.counters()["rx_lost_batched_frames"] > 0, timeout=10)


def test_batched_device_spanning_transfers(rig_factory):
    rig = rig_factory(max_packet=512, batch=True, loss=0.01, seed=3)
    rig.transfer(2_000_000, 2_000_000)


def test_in_transfers_shorter_than_a_frame_carry_it_across_several(rig_factory):
    # --in-transfer-size 1024: every full-size frame and every batch of the device spans
    # several IN transfers (a ring that is not a whole number of them is refused).
    rig = rig_factory(max_packet=512, batch=True, in_transfer_size=1024)
    rig.transfer(1_000_000, 1_000_000)
    rx = rig.bridge.stats()["rx"]
    assert rx["bytes_skipped"] == 0 and rx["resyncs"] == 0
    # No transfer held more than 1024 bytes, yet the 1 MB download came in 1514-byte frames.
    assert rx["bytes_in"] <= 1024 * rx["transfers"] and rx["bytes"] > 1024 * rx["frames"] / 2


def test_sentinel_tx_mode(rig_factory):
    rig = rig_factory(host_crc=False, max_packet=512)
    rig.transfer(500_000, 500_000)
    assert rig.bridge.stats()["tx"]["frames"] > 0


def in_background(rig: Rig, up: int, down: int) -> tuple[threading.Thread, dict]:
    """Start a checked TCP transfer; return once it is under way."""
    result: dict = {}

    def run():
        result["t"] = rig.transfer(up, down, timeout=90)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive(), "the transfer ended before the fault could hit it mid-way"
    return worker, result


def test_busy_out_endpoint_applies_backpressure_without_loss(rig_factory):
    rig = rig_factory(max_packet=512)
    worker, result = in_background(rig, 30_000_000, 100_000)
    rig.sim.device.busy_out_for(2.0)  # OUT refuses everything for 2 s mid-transfer
    worker.join(90)
    assert "t" in result, "transfer did not finish"
    stats = rig.bridge.stats()
    assert stats["bridge"]["backpressure"] >= 1
    assert stats["bridge"]["tx_dropped"] == 0
    assert result["t"].seconds >= 2.0


def test_unplug_and_replug_mid_transfer(rig_factory):
    rig = rig_factory(max_packet=512)
    worker, result = in_background(rig, 10_000_000, 10_000_000)
    rig.sim.device.unplug()
    time.sleep(1.0)
    assert not rig.bridge.connected.is_set()
    assert rig.bridge.tap.carrier is False  # carrier off, TAP and address kept
    rig.sim.device.replug()
    assert rig.bridge.connected.wait(5)
    worker.join(90)
    assert "t" in result, "TCP did not resume after replug"
    stats = rig.bridge.stats()
    assert stats["bridge"]["unplugs"] >= 1 and stats["bridge"]["connects"] >= 2


def test_device_echo_is_answered_and_unsolicited_response_only_counted(rig_factory):
    rig = rig_factory(max_packet=64)
    rig.sim.device.send_echo(b"are you there")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"are you there" not in rig.sim.device.echo_responses():
        time.sleep(0.05)
    assert rig.bridge.stats()["bridge"]["echo_answered"] == 1
    rig.sim.device.inject_echo_response(b"nobody asked")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not rig.bridge.stats()["bridge"]["unsolicited_echo_responses"]:
        time.sleep(0.05)
    assert rig.bridge.stats()["bridge"]["unsolicited_echo_responses"] == 1
    assert rig.bridge.echo(timeout=2.0) < 1.0  # our own Echo comes back


def test_a_burst_of_unsolicited_echo_responses_is_counted_and_logged_in_summary(rig_factory, caplog):
    """A symptom, not an instruction: each one counted, the log not flooded."""
    caplog.set_level(logging.WARNING, logger="eembridge.bridge")
    rig = rig_factory(max_packet=512)
    for i in range(50):
        rig.sim.device.inject_echo_response(b"stray %d" % i)
    wait_for(lambda: rig.bridge.stats()["bridge"]["unsolicited_echo_responses"] == 50, 10,
             "50 unsolicited Echo Responses counted")
    lines = [r for r in caplog.records if getattr(r, "event", None) == "unsolicited_echo_response"]
    assert len(lines) == 1 and lines[0].fields["count"] == 1, [r.getMessage() for r in lines]  # the first
    rig.bridge.stop()  # the rest: one summary line at the latest when the bridge stops
    lines = [r for r in caplog.records if getattr(r, "event", None) == "unsolicited_echo_response"]
    assert len(lines) == 2 and sum(r.fields["count"] for r in lines) == 50, [r.getMessage() for r in lines]
    assert "49 more Echo Responses nobody asked for" in lines[1].getMessage()
    assert rig.sim.device.echo_responses() == []  # nothing was sent back for them


def test_immense_command_garbage_is_survived(rig_factory):
    garbage = (0x87FF).to_bytes(2, "little")  # Echo with the largest parameter
    faults = Faults(garbage=0.02, garbage_bytes=garbage, seed=5)
    rig = rig_factory(max_packet=64, faults=faults)
    rig.transfer(1_000_000, 1_000_000)
    stats = rig.bridge.stats()
    assert rig.sim.fault_counters()["injected_garbage"] > 0
    # Glued in front of a packet, the fake Echo runs past its short transfer: garbage,
    # dropped and counted, never answered.
    assert stats["rx"]["echo"] == 0 and stats["bridge"]["echo_answered"] == 0
    assert stats["rx"]["truncated"] + stats["rx"]["resyncs"] > 0


def test_memory_stays_flat_over_a_long_lossy_run(rig_factory):
    rig = rig_factory(max_packet=512, loss=0.02, flip=0.01, seed=9)
    rig.transfer(2_000_000, 2_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        rig.transfer(2_000_000, 2_000_000)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 20_000, f"max RSS grew by {after - before} KB"


def test_keepalive_echoes_the_device_and_counts_silence(rig_factory):
    rig = rig_factory(max_packet=512, keepalive=0.1)
    # Waited for, not slept on: on a loaded machine the echoes come later, not wrong.
    counters = wait_for(lambda: (c := rig.bridge.stats()["bridge"])["echo_matched"] >= 4 and c,
                        10, "4 keepalive echoes answered")
    assert counters["echo_timeouts"] == 0 and counters["unsolicited_echo_responses"] == 0
    rig.sim.device.busy_out_for(1.5)  # the device stops taking anything: echoes go unanswered
    wait_for(lambda: rig.bridge.stats()["bridge"]["echo_timeouts"] >= 1, 10, "an echo timeout")


def test_out_stalls_and_timeouts_drop_the_transfer_count_it_and_tcp_finishes(rig_factory):
    """The one OUT-failure policy (the C path's too): a stalled or timed-out OUT transfer
    is dropped and counted by reason, never resent; a stall's halt is cleared."""
    faults = Faults(out_stall=0.02, out_timeout=0.02, seed=11)
    rig = rig_factory(max_packet=512, faults=faults)
    rig.transfer(3_000_000, 1_000_000)
    injected = rig.sim.fault_counters()
    assert injected["out_stalls"] > 0 and injected["out_timeouts"] > 0, injected
    stats = rig.bridge.stats()
    counters, reasons = stats["bridge"], stats["drop_reasons"]
    assert "out_retries" not in counters  # nothing is resent
    assert reasons.get("stall", 0) > 0 and reasons.get("timed_out", 0) > 0, reasons
    assert counters["tx_dropped"] == sum(reasons.values()), (counters, reasons)
    # Each halt injected was a stalled transfer counted here (more when transfers queued
    # behind it stalled too), and each was cleared, or TCP could not have finished.
    assert counters["out_stalls"] >= injected["out_stalls"]
