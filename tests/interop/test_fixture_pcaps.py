"""The committed cdc_eem captures are what make_fixture.py promises (no guest needed).

tests/fixtures/cdc_eem_usbmon.pcap and cdc_eem_eth.pcap were taken at the same time
in the real-peer guest; other tests use them as real-world input, so pin what they
show about Linux's two EEM ends.
"""

from __future__ import annotations

from make_fixture import ETH_PCAP, USBMON_PCAP, check_fixture, read_pcap


def test_usbmon_and_ethernet_captures_agree_frame_for_frame() -> None:
    story = check_fixture()  # asserts sizes, link types, checks and frame equality
    assert len(story.out_frames) >= 20 and len(story.in_frames) >= 20


def test_linux_ends_frame_as_documented() -> None:
    story = check_fixture()
    # cdc_eem (host) sends real CRCs, f_eem (gadget) sends sentinels, one packet per transfer.
    assert story.out_crc == len(story.out_frames) and story.out_sentinel == 0
    assert story.in_sentinel == len(story.in_frames) and story.in_crc == 0
    assert story.packets_per_transfer == {1}
    assert story.commands == 0


def test_exchange_starts_with_arp_then_ping_then_tcp() -> None:
    _, frames = read_pcap(ETH_PCAP)
    ethertypes = [f[12:14] for f in frames]
    assert ethertypes[:2] == [b"\x08\x06", b"\x08\x06"]
    assert frames[2][23] == 1  # IPv4 protocol ICMP
    assert any(f[12:14] == b"\x08\x00" and f[23] == 6 for f in frames)  # TCP
    assert USBMON_PCAP.stat().st_size < 500_000
