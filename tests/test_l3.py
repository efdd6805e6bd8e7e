"""eembridge.core.l3: the Ethernet translation of --link tun, on bytes alone.

Replies are checked field by field against the RFCs' layouts, and every ICMPv6
checksum by `independent_icmpv6_checksum` below, written from RFC 4443 2.3 and
RFC 1071 without the module's helpers.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge.core import l3
from eembridge.core.l3 import Translator

HOST_MAC = bytes.fromhex("02aabbccddee")
BOARD_MAC = bytes.fromhex("5254001234 56".replace(" ", ""))
HOST4, BOARD4 = "169.254.7.2", "169.254.7.1"
HOST_LL = str(l3.link_local(HOST_MAC))
BOARD_LL = "fe80::5054:ff:fe12:3456"


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def independent_icmpv6_checksum(source: bytes, destination: bytes, message: bytes) -> int:
    """RFC 4443 2.3: one's complement of the one's complement sum of the pseudo-header
    (RFC 8200 8.1) and the message with its checksum field as zero."""
    zeroed = message[:2] + b"\0\0" + message[4:]
    data = source + destination + len(message).to_bytes(4, "big") + b"\0\0\0\x3a" + zeroed
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] * 256 + data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def translator(**options) -> Translator:
    t = Translator(HOST_MAC, **options)
    t.set_host_addresses([f"{HOST4}/24", "2001:db8::2/64"])
    return t


def arp(op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str,
        destination: bytes = l3.BROADCAST) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sender_mac + ip(sender_ip) + \
        target_mac + ip(target_ip)
    return destination + sender_mac + b"\x08\x06" + body + bytes(18)  # padded to 60


def ipv4(source: str, destination: str, payload: bytes = b"x" * 8) -> bytes:
    return struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0) + \
        ip(source) + ip(destination) + payload


def ipv6(source: str, destination: str, payload: bytes = b"y" * 8, next_header: int = 17,
         hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + \
        ip(source) + ip(destination) + payload


def ns_frame(source: str, target: str, slla: bytes | None = BOARD_MAC,
             destination: str | None = None, break_checksum: bool = False) -> bytes:
    dst = destination or str(ipaddress.IPv6Address(l3.solicited_node(ip(target))))
    body = bytearray(struct.pack("!BBHI", 135, 0, 0, 0) + ip(target)
                     + (bytes((1, 1)) + slla if slla else b""))
    checksum = independent_icmpv6_checksum(ip(source), ip(dst), bytes(body))
    body[2:4] = struct.pack("!H", checksum ^ (1 if break_checksum else 0))
    packet = ipv6(source, dst, bytes(body), next_header=58, hop_limit=255)
    return b"\x33\x33" + ip(dst)[12:] + BOARD_MAC + b"\x86\xdd" + packet


def na_frame(target: str, tlla: bytes = BOARD_MAC) -> bytes:
    body = bytearray(struct.pack("!BBHI", 136, 0, 0, 0x60 << 24) + ip(target)
                     + bytes((2, 1)) + tlla)
    body[2:4] = struct.pack("!H", independent_icmpv6_checksum(ip(target), ip(HOST_LL), bytes(body)))
    packet = ipv6(target, HOST_LL, bytes(body), next_header=58, hop_limit=255)
    return HOST_MAC + BOARD_MAC + b"\x86\xdd" + packet


def check_na(frame: bytes, target: str, to: str, to_mac: bytes, solicited: bool) -> None:
    """A Neighbor Advertisement as RFC 4861 4.4 lays it out, from the host for `target`."""
    assert frame[0:6] == to_mac and frame[6:12] == HOST_MAC and frame[12:14] == b"\x86\xdd"
    packet = frame[14:]
    version, length, next_header, hop_limit = struct.unpack("!IHBB", packet[:8])
    assert version >> 28 == 6 and next_header == 58 and hop_limit == 255
    assert packet[8:24] == ip(target) and packet[24:40] == ip(to)
    message = packet[40:]
    assert len(message) == length == 32
    kind, code, checksum, flags = struct.unpack("!BBHI", message[:8])
    assert (kind, code) == (136, 0)
    assert flags >> 24 == (0x60 if solicited else 0x20)  # S|O or O; never R (not a router)
    assert checksum == independent_icmpv6_checksum(packet[8:24], packet[24:40], message)
    assert message[8:24] == ip(target)
    assert message[24:32] == b"\x02\x01" + HOST_MAC  # target link-layer address option


# --- names ---------------------------------------------------------------------------------

def test_stable_mac_is_locally_administered_unicast_and_depends_only_on_the_name():
    mac = l3.stable_mac("usb0")
    assert mac == l3.stable_mac("usb0") != l3.stable_mac("usb1")
    assert mac[0] & 0x02 and not mac[0] & 0x01


def test_link_local_is_the_modified_eui64_the_kernel_derives():
    assert str(l3.link_local(bytes.fromhex("525400123456"))) == "fe80::5054:ff:fe12:3456"
    assert str(l3.link_local(HOST_MAC)) == "fe80::aa:bbff:fecc:ddee"


def test_group_macs():
    assert l3.multicast_mac(ip("224.0.0.251")) == bytes.fromhex("01005e0000fb")
    assert l3.multicast_mac(ip("239.255.255.250")) == bytes.fromhex("01005e7ffffa")
    assert l3.multicast_mac(ip("ff02::fb")) == bytes.fromhex("3333000000fb")
    assert l3.multicast_mac(ip("ff02::1:ff12:3456")) == bytes.fromhex("3333ff123456")
    assert l3.solicited_node(ip(BOARD_LL)) == ip("ff02::1:ff12:3456")
    assert l3.multicast_mac(ip(BOARD4)) is None and l3.multicast_mac(ip(BOARD_LL)) is None


# --- ARP ---------------------------------------------------------------------------------

def test_arp_request_for_the_host_is_answered_with_the_host_mac():
    t = translator()
    packet, replies = t.from_device(arp(1, BOARD_MAC, BOARD4, bytes(6), HOST4), now=0)
    assert packet is None and len(replies) == 1
    reply = replies[0]
    assert reply[0:6] == BOARD_MAC and reply[6:12] == HOST_MAC and reply[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", reply[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert reply[22:28] == HOST_MAC and reply[28:32] == ip(HOST4)
    assert reply[32:38] == BOARD_MAC and reply[38:42] == ip(BOARD4)
    assert len(reply) == 42
    assert t.counters()["arp_answered"] == 1
    assert t.neighbours(0) == {BOARD4: BOARD_MAC.hex(":")}  # and the asker is learned


def test_arp_request_for_another_address_is_not_answered():
    t = translator()
    _, replies = t.from_device(arp(1, BOARD_MAC, BOARD4, bytes(6), "169.254.7.9"), now=0)
    assert replies == [] and t.counters()["arp_ignored"] == 1


def test_a_device_claiming_the_hosts_address_is_counted_not_learned():
    t = translator()
    t.from_device(arp(2, BOARD_MAC, HOST4, HOST_MAC, HOST4, HOST_MAC), now=0)
    assert t.counters()["address_conflicts"] == 1 and t.neighbours(0) == {}


def test_unknown_destination_is_resolved_by_arp_and_its_packets_released():
    t = translator(hold=2)
    packets = [ipv4(HOST4, BOARD4, bytes([i]) * 8) for i in range(3)]
    first = t.from_host(packets[0], now=0)
    assert len(first) == 1
    request = first[0]
    assert request[0:6] == l3.BROADCAST and request[12:14] == b"\x08\x06"
    assert struct.unpack("!H", request[20:22])[0] == 1
    assert request[22:28] == HOST_MAC and request[28:32] == ip(HOST4)
    assert request[32:38] == bytes(6) and request[38:42] == ip(BOARD4)
    assert t.from_host(packets[1], now=0.1) == []  # held, no second request
    assert t.from_host(packets[2], now=0.2) == []  # over the hold: dropped
    assert t.counters()["dropped_hold_full"] == 1
    _, released = t.from_device(arp(2, BOARD_MAC, BOARD4, HOST_MAC, HOST4, HOST_MAC), now=0.3)
    assert released == [BOARD_MAC + HOST_MAC + b"\x08\x00" + p for p in packets[:2]]
    # Known now: straight through.
    assert t.from_host(packets[2], now=0.4) == [BOARD_MAC + HOST_MAC + b"\x08\x00" + packets[2]]
    c = t.counters()
    assert (c["held"], c["released"], c["to_device_frames"], c["pending"]) == (2, 2, 3, 0)


def test_an_unanswered_destination_is_asked_again_then_given_up():
    t = translator(retries=3, retry_interval=1.0)
    assert len(t.from_host(ipv4(HOST4, BOARD4), now=0)) == 1
    assert t.next_deadline() == 1.0
    assert t.tick(0.5) == []
    assert len(t.tick(1.0)) == 1 and len(t.tick(2.0)) == 1
    assert t.tick(3.0) == []
    c = t.counters()
    assert c["arp_sent"] == 3 and c["dropped_unresolved"] == 1 and c["pending"] == 0
    assert t.next_deadline() is None


def test_too_many_destinations_at_once_are_dropped_counted():
    t = translator(max_pending=2)
    for n in range(3):
        t.from_host(ipv4(HOST4, f"169.254.7.{10 + n}"), now=0)
    assert t.counters()["dropped_pending_full"] == 1


def test_neighbours_age_and_the_table_is_bounded():
    t = translator(table_size=4, max_age=10.0)
    for n in range(10):
        t.from_device(arp(1, BOARD_MAC[:5] + bytes([n]), f"169.254.7.{20 + n}", bytes(6),
                          HOST4), now=n)
    assert len(t.neighbours(9)) == 4 and t.counters()["neighbours_evicted"] == 6
    assert set(t.neighbours(9)) == {f"169.254.7.{20 + n}" for n in range(6, 10)}
    assert t.neighbours(18.5) == {"169.254.7.29": (BOARD_MAC[:5] + b"\x09").hex(":")}
    # An aged entry is asked for again, not used.
    frames = t.from_host(ipv4(HOST4, "169.254.7.20"), now=30)
    assert frames[0][12:14] == b"\x08\x06"
    t.add_static("169.254.7.99", BOARD_MAC)
    assert t.from_host(ipv4(HOST4, "169.254.7.99"), now=1e9)[0][:6] == BOARD_MAC


def test_traffic_from_a_neighbour_confirms_it():
    t = translator(max_age=10.0)
    t.from_device(arp(1, BOARD_MAC, BOARD4, bytes(6), HOST4), now=0)
    frame = HOST_MAC + BOARD_MAC + b"\x08\x00" + ipv4(BOARD4, HOST4)
    t.from_device(frame, now=8)
    assert t.from_host(ipv4(HOST4, BOARD4), now=15)[0][:6] == BOARD_MAC


# --- device -> host ------------------------------------------------------------------

def test_ip_to_the_host_loses_its_ethernet_header_and_padding():
    t = translator()
    packet = ipv4(BOARD4, HOST4)
    out, replies = t.from_device(HOST_MAC + BOARD_MAC + b"\x08\x00" + packet + bytes(18), now=0)
    assert bytes(out) == packet and replies == []
    packet6 = ipv6(BOARD_LL, HOST_LL)
    out, _ = t.from_device(HOST_MAC + BOARD_MAC + b"\x86\xdd" + packet6, now=0)
    assert bytes(out) == packet6
    assert t.peer_mac == BOARD_MAC and t.counters()["to_host_packets"] == 2


def test_broadcast_and_multicast_that_ip_needs_are_carried():
    t = translator()
    dhcp = ipv4("0.0.0.0", "255.255.255.255")
    mdns = ipv4(BOARD4, "224.0.0.251")
    ra = ipv6(BOARD_LL, "ff02::1", next_header=58, hop_limit=255,
              payload=bytes((134, 0)) + bytes(14))
    for destination, packet, ethertype in ((l3.BROADCAST, dhcp, b"\x08\x00"),
                                           (bytes.fromhex("01005e0000fb"), mdns, b"\x08\x00"),
                                           (bytes.fromhex("333300000001"), ra, b"\x86\xdd")):
        out, _ = t.from_device(destination + BOARD_MAC + ethertype + packet, now=0)
        assert out is not None and bytes(out) == packet


def test_what_cannot_be_carried_is_dropped_by_reason():
    t = translator()
    packet = ipv4(BOARD4, HOST4)
    cases = {
        "runt": HOST_MAC + BOARD_MAC,
        "other_mac": bytes.fromhex("029999999999") + BOARD_MAC + b"\x08\x00" + packet,
        "vlan": HOST_MAC + BOARD_MAC + b"\x81\x00\x00\x07\x08\x00" + packet,
        "non_ip": HOST_MAC + BOARD_MAC + b"\x88\xcc" + bytes(46),
        "bad_ip": HOST_MAC + BOARD_MAC + b"\x08\x00" + packet[:-4],  # length past the frame
        "bad_arp": arp(3, BOARD_MAC, BOARD4, bytes(6), HOST4),
        "bad_ndp": ns_frame(BOARD_LL, HOST_LL, break_checksum=True),
    }
    for reason, frame in cases.items():
        assert t.from_device(frame, now=0) == (None, []), reason
    c = t.counters()
    assert all(c[f"dropped_{reason}"] == 1 for reason in cases), c
    assert c["to_host_packets"] == 0
    assert t.from_host(b"\x10" + bytes(40), now=0) == [] and t.counters()["dropped_not_ip"] == 1


# --- NDP -----------------------------------------------------------------------------

def test_neighbor_solicitation_for_the_link_local_is_answered():
    t = translator()
    packet, replies = t.from_device(ns_frame(BOARD_LL, HOST_LL), now=0)
    assert packet is None and len(replies) == 1
    check_na(replies[0], HOST_LL, BOARD_LL, BOARD_MAC, solicited=True)
    assert t.neighbours(0) == {BOARD_LL: BOARD_MAC.hex(":")}
    assert t.counters()["ns_answered"] == 1


def test_neighbor_solicitation_for_a_global_address_is_answered():
    t = translator()
    _, replies = t.from_device(ns_frame("2001:db8::1", "2001:db8::2"), now=0)
    check_na(replies[0], "2001:db8::2", "2001:db8::1", BOARD_MAC, solicited=True)


def test_duplicate_address_detection_is_answered_to_all_nodes():
    t = translator()
    _, replies = t.from_device(ns_frame("::", HOST_LL, slla=None), now=0)
    check_na(replies[0], HOST_LL, "ff02::1", bytes.fromhex("333300000001"), solicited=False)


def test_neighbor_solicitation_for_another_address_is_not_answered():
    t = translator()
    _, replies = t.from_device(ns_frame(BOARD_LL, "fe80::99"), now=0)
    assert replies == [] and t.counters()["ns_ignored"] == 1


def test_unknown_ipv6_neighbour_is_solicited_and_released_by_the_advertisement():
    t = translator()
    packet = ipv6(HOST_LL, BOARD_LL)
    (solicitation,) = t.from_host(packet, now=0)
    group = l3.solicited_node(ip(BOARD_LL))
    assert solicitation[0:6] == b"\x33\x33" + group[12:] and solicitation[6:12] == HOST_MAC
    body = solicitation[14:]
    assert body[6] == 58 and body[7] == 255
    assert body[8:24] == ip(HOST_LL) and body[24:40] == group
    message = body[40:]
    assert message[0:2] == b"\x87\x00" and message[8:24] == ip(BOARD_LL)
    assert message[24:32] == b"\x01\x01" + HOST_MAC  # source link-layer address option
    assert struct.unpack("!H", message[2:4])[0] == \
        independent_icmpv6_checksum(body[8:24], body[24:40], message)
    _, released = t.from_device(na_frame(BOARD_LL), now=0.1)
    assert released == [BOARD_MAC + HOST_MAC + b"\x86\xdd" + packet]


def test_host_to_device_destinations():
    t = translator(peer_mac=BOARD_MAC)
    cases = {
        "255.255.255.255": l3.BROADCAST,
        "169.254.7.255": l3.BROADCAST,  # the subnet's directed broadcast
        "224.0.0.251": bytes.fromhex("01005e0000fb"),
        "ff02::fb": bytes.fromhex("3333000000fb"),
        "8.8.8.8": BOARD_MAC,  # off-link: through the board
        "2606:4700::1111": BOARD_MAC,
    }
    for destination, mac in cases.items():
        source = HOST4 if ":" not in destination else "2001:db8::2"
        packet = (ipv4 if ":" not in destination else ipv6)(source, destination)
        (frame,) = t.from_host(packet, now=0)
        assert frame[0:6] == mac and frame[6:12] == HOST_MAC and frame[14:] == packet, destination


# --- any input -----------------------------------------------------------------------

def _check_reply(frame: bytes) -> None:
    """Whatever the translator sends back is a well-formed ARP reply or NA from the host."""
    assert frame[6:12] == HOST_MAC
    if frame[12:14] == b"\x08\x06":
        assert len(frame) == 42 and frame[14:22] == b"\x00\x01\x08\x00\x06\x04\x00\x02"
        assert frame[22:28] == HOST_MAC and frame[0:6] == frame[32:38]
    else:
        packet = frame[14:]
        assert frame[12:14] == b"\x86\xdd" and packet[6] == 58 and packet[7] == 255
        message = packet[40:]
        assert message[0] == 136 and struct.unpack("!H", message[2:4])[0] == \
            independent_icmpv6_checksum(packet[8:24], packet[24:40], message)


headers = st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00", b"\x88\xcc"])
macs = st.sampled_from([HOST_MAC, l3.BROADCAST, bytes.fromhex("3333ff000001"), BOARD_MAC])


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120) | st.tuples(macs, st.binary(min_size=6, max_size=6), headers,
                                          st.binary(max_size=120)).map(lambda t: b"".join(t)))
def test_any_frame_from_the_device_never_raises_and_replies_are_well_formed(frame):
    t = translator()
    packet, replies = t.from_device(frame, now=0)
    for reply in replies:
        _check_reply(reply)
    c = t.counters()
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_"))
    assert (packet is not None) + dropped <= 1


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=6, max_size=6).filter(lambda m: not m[0] & 1),
       st.ip_addresses(v=4, network="169.254.7.0/24"), st.booleans())
def test_any_arp_request_is_answered_exactly_when_it_asks_for_the_host(mac, asker, ours):
    t = translator()
    target = HOST4 if ours else str(asker)
    _, replies = t.from_device(arp(1, mac, str(asker), bytes(6), target), now=0)
    replies = [r for r in replies if r[12:14] == b"\x08\x06"]
    if ours and str(asker) != HOST4:
        (reply,) = replies
        _check_reply(reply)
        assert reply[0:6] == mac and reply[38:42] == asker.packed
    else:
        assert replies == []


@settings(max_examples=500, deadline=None)
@given(st.ip_addresses(v=6, network="fe80::/64"), st.binary(min_size=6, max_size=6))
def test_any_solicitation_for_the_host_gets_a_checksummed_advertisement(source, mac):
    mac = bytes((mac[0] & 0xFE,)) + mac[1:]
    t = translator()
    _, replies = t.from_device(ns_frame(str(source), HOST_LL, slla=mac), now=0)
    (reply,) = replies
    _check_reply(reply)
    assert reply[0:6] == mac


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_any_packet_from_the_host_never_raises(packet):
    t = translator()
    for frame in t.from_host(packet, now=0) + t.tick(5.0):
        assert frame[6:12] == HOST_MAC and len(frame) >= 14
