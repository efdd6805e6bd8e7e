"""--link tun with its C fast path (eembridge._fast.tunlink) in the bridge: TCP both ways
intact, nearly every packet carried by C, whichever thread drives the data path."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_tun_link import tun_rig  # noqa: F401  (the fixture)

from eembridge.core import environment


@pytest.mark.parametrize("native", [True, False], ids=["engine", "bridge-loop"])
def test_tcp_takes_the_fast_path_both_ways(tun_rig, native, monkeypatch):  # noqa: F811
    monkeypatch.setattr(environment, "ENV", replace(environment.ENV, native=native))
    rig = tun_rig()
    rig.transfer(2_000_000, 2_000_000, server_on_board=True)
    rig.transfer(2_000_000, 2_000_000, server_on_board=False)
    l3 = rig.l3
    assert all(v == 0 for k, v in l3.items() if k.startswith("dropped_")), l3
    assert l3["fast_handoffs_lost"] == l3["fast_notes_lost"] == l3["tun_write_errors"] == 0, l3
    # The first packets (the board unknown) and one a second per neighbour (CONFIRM_EVERY)
    # take the pump; the rest C alone.
    assert l3["fast_to_host_packets"] > 0.95 * l3["to_host_packets"] > 1000, l3
    assert l3["fast_to_device_frames"] > 0.95 * l3["to_device_frames"] > 1000, l3
    assert rig.bridge.stats()["bridge"]["tx_dropped"] == 0


def test_a_pump_that_dies_stops_the_bridge_with_one_line(tun_rig):  # noqa: F811
    rig = tun_rig()
    rig.transfer(100_000, 100_000)

    def broken(now: float) -> list[bytes]:
        raise RuntimeError("translator broken")

    rig.bridge.tap.translator.tick = broken
    assert rig.bridge.wait(10), "the bridge did not stop"
    assert "is gone" in str(rig.bridge.error)
    rig.bridge.error = None  # expected here; the fixture checks for others
