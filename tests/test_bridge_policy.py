"""The bridge carrying out the link policy (eembridge.core.linkpolicy) on the simulated device:
what the policy decides, done for real, where the doing had its own ways to go wrong."""

from __future__ import annotations

import logging

from test_bridge import rig_factory  # noqa: F401  (the fixture)

from eembridge.core.transport import Direction, TransportGone
from eembridge.sim.link import SimLink

from netfixtures import wait_for


def test_two_echo_requests_with_the_same_data_are_both_answered(rig_factory):  # noqa: F811
    rig = rig_factory(max_packet=512)
    first = rig.bridge.echo_async(b"same data", timeout=5.0)
    second = rig.bridge.echo_async(b"same data", timeout=5.0)
    assert first.result(10) > 0 and second.result(10) > 0
    counters = rig.bridge.stats()["bridge"]
    assert counters["echo_matched"] == 2 and counters["unsolicited_echo_responses"] == 0


def _gone_while_clearing_the_halt(transport, device) -> None:
    """The device goes while its halt is being cleared: on the transport itself, so both
    the C engine (which clears halts through it) and the Python loop meet it."""

    def clear_halt(direction: Direction) -> None:
        device.unplug()
        device.replug()
        raise TransportGone("device gone while clearing the halt")

    transport.clear_halt = clear_halt


def test_device_gone_while_clearing_an_in_stall_is_an_unplug(rig_factory, monkeypatch):  # noqa: F811
    connects = []

    def connect(self):
        transport = self.device.connect()
        connects.append(transport)
        if len(connects) == 1:
            _gone_while_clearing_the_halt(transport, self.device)
        return transport

    monkeypatch.setattr(SimLink, "connect", connect)
    rig = rig_factory(max_packet=512)
    assert rig.sim.device.stall(Direction.IN)
    wait_for(lambda: rig.bridge.stats()["bridge"]["connects"] == 2, 10, "the bridge reconnected")
    assert rig.bridge.error is None
    counters = rig.bridge.stats()["bridge"]
    assert counters["unplugs"] == 1 and counters["in_stalls"] >= 1
    rig.transfer(up=200_000, down=200_000)


def test_keepalive_lost_and_back_are_counted_and_logged_once_each(rig_factory, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="eembridge.bridge")
    rig = rig_factory(max_packet=512, keepalive=0.2)
    wait_for(lambda: rig.bridge.stats()["bridge"]["echo_matched"] >= 2, 10, "keepalives answered")
    rig.sim.device.busy_out_for(2.5)  # takes nothing: keepalives go unanswered
    wait_for(lambda: rig.bridge.stats()["bridge"]["keepalives_lost"] == 1, 10, "keepalive lost")
    events = lambda: [r.event for r in caplog.records  # noqa: E731
                      if getattr(r, "event", "").startswith("keepalive_")]
    wait_for(lambda: events() == ["keepalive_lost", "keepalive_back"], 10, "keepalive back")
    assert rig.bridge.stats()["bridge"]["keepalives_lost"] == 1
