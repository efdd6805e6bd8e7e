"""eembridge.core.dhcp: the DHCP client of --link tun --dhcp, on bytes and times alone.

The client's frames are read back here with struct, field by field (RFC 2131 2, RFC 791,
RFC 768), checksums included; the server's replies are built with pyroute2's dhcp4msg,
as a board's server would send them.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.dhcp.dhcp4msg import dhcp4msg
from pyroute2.dhcp.fsm import State

from eembridge.core import dhcp
from eembridge.core.dhcp import Changed, Configure, Deconfigure, DhcpClient, Send

MAC = bytes.fromhex("02aabbccddee")
SERVER_MAC = bytes.fromhex("525400123456")
SERVER = "192.168.7.1"
OFFERED, OTHER = "192.168.7.50", "10.9.0.7"


def checksum(data: bytes) -> int:
    """RFC 1071, written out: the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@dataclass
class Sent:
    eth_dst: bytes
    ip_src: str
    ip_dst: str
    msg: dhcp4msg

    @property
    def kind(self) -> str:
        return self.msg["options"]["message_type"].name


def parse(frame: bytes) -> Sent:
    """A client frame, every header checked."""
    assert frame[6:12] == MAC and frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    version_ihl, _, total, _, frag, ttl, proto, _, src, dst = struct.unpack_from("!BBHHHBBH4s4s", ip)
    assert version_ihl == 0x45 and total == len(ip) and frag == 0 and ttl > 0 and proto == 17
    assert checksum(ip[:20]) == 0xFFFF
    sport, dport, length, udp_sum = struct.unpack_from("!HHHH", ip, 20)
    assert (sport, dport, length) == (68, 67, total - 20) and udp_sum != 0
    pseudo = src + dst + struct.pack("!xBH", 17, length)
    assert checksum(pseudo + ip[20:]) == 0xFFFF
    payload = ip[28:]
    assert payload[0] == 1 and payload[1:3] == b"\x01\x06" and payload[28:34] == MAC
    assert payload[236:240] == b"\x63\x82\x53\x63"
    return Sent(frame[:6], str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)),
                dhcp4msg(buf=payload).decode())


def reply(to: Sent, kind: int, yiaddr: str = OFFERED, *, lease: int = 120, t1: int | None = None,
          t2: int | None = None, router: str | None = SERVER, xid: int | None = None,
          chaddr: bytes = MAC, classless: bytes | None = None, dns: list[str] | None = None,
          domain: str | None = None) -> bytes:
    """The server's answer to `to` as an IPv4 packet (UDP 67 -> 68). classless: the
    value of option 121, written raw (pyroute2 cannot encode it)."""
    options: dict = {"message_type": kind, "server_id": SERVER, "lease_time": lease,
                     "subnet_mask": "255.255.255.0"}
    if router:
        options["router"] = [router]
    if dns:
        options["name_server"] = dns
    if domain:
        options["domain_name"] = domain
    if t1 is not None:
        options["renewal_time"] = t1
    if t2 is not None:
        options["rebinding_time"] = t2
    if kind == 6:  # NAK: no address, no lease
        options = {"message_type": 6, "server_id": SERVER}
        yiaddr = "0.0.0.0"
    msg = dhcp4msg({"op": 2, "xid": to.msg["xid"] if xid is None else xid, "yiaddr": yiaddr,
                    "chaddr": chaddr.hex(":"), "options": options})
    payload = msg.encode().buf
    if classless is not None and kind != 6:
        assert payload[-1] == 255  # END: option 121 goes before it
        payload = payload[:-1] + bytes([121, len(classless)]) + classless + b"\xff"
    return dhcp.udp_ipv4(SERVER, "255.255.255.255", 67, 68, payload)


def rfc3442(routes: list[tuple[str, str]]) -> bytes:
    """Option 121's value for (network, router) pairs, as RFC 3442 section 3 lays it out:
    the width, the significant octets of the destination, the router."""
    out = b""
    for network, router in routes:
        net = ipaddress.IPv4Network(network)
        out += bytes([net.prefixlen]) + net.network_address.packed[:(net.prefixlen + 7) // 8]
        out += ipaddress.IPv4Address(router).packed
    return out


def sends(actions: list) -> list[Sent]:
    """The DHCP messages sent (not the ARP announcements)."""
    return [parse(a.frame) for a in actions if isinstance(a, Send) and a.frame[12:14] == b"\x08\x00"]


def announcements(actions: list) -> list[str]:
    """The addresses announced by ARP (RFC 5227 2.3: sender and target both the address)."""
    found = []
    for a in actions:
        if isinstance(a, Send) and a.frame[12:14] == b"\x08\x06":
            frame = a.frame
            assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC
            assert frame[14:22] == b"\x00\x01\x08\x00\x06\x04\x00\x01" and frame[22:28] == MAC
            assert frame[28:32] == frame[38:42]
            found.append(str(ipaddress.IPv4Address(frame[28:32])))
    return found


def only(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def client() -> DhcpClient:
    return DhcpClient(MAC, rng=random.Random(5))


def bound(c: DhcpClient, now: float = 0.0, **lease: int) -> dhcp.Lease:
    (discover,) = sends(c.carrier(True, now))
    (request,) = sends(c.receive(reply(discover, 2, **lease), SERVER_MAC, now))
    actions = c.receive(reply(request, 5, **lease), SERVER_MAC, now)
    (configure,) = only(actions, Configure)
    assert c.state == State.BOUND
    return configure.lease


def test_the_exchange_discover_offer_request_ack():
    c = client()
    actions = c.carrier(True, 10.0)
    assert only(actions, Changed) == [Changed(State.OFF, State.SELECTING, "carrier on")]
    (discover,) = sends(actions)
    assert discover.kind == "DISCOVER" and discover.eth_dst == b"\xff" * 6
    assert (discover.ip_src, discover.ip_dst) == ("0.0.0.0", "255.255.255.255")
    assert discover.msg["flags"] & 0x8000  # the board's server answers by broadcast
    (request,) = sends(c.receive(reply(discover, 2), SERVER_MAC, 10.2))
    assert request.kind == "REQUEST" and request.msg["xid"] == discover.msg["xid"]
    assert request.msg["options"]["requested_ip"] == OFFERED
    assert request.msg["options"]["server_id"] == SERVER
    assert c.state == State.REQUESTING
    actions = c.receive(reply(request, 5, t1=30, t2=50), SERVER_MAC, 10.3)
    (configure,) = only(actions, Configure)
    lease = configure.lease
    assert configure.previous is None and announcements(actions) == [OFFERED]
    assert (lease.interface, lease.router, lease.server_id) == (f"{OFFERED}/24", SERVER, SERVER)
    assert lease.server_mac == SERVER_MAC
    assert lease.obtained == 10.2  # counted from the REQUEST (RFC 2131 4.4.1)
    assert lease.expires == 130.2 and c.next_deadline() == 40.2  # T1 as the server said
    assert c.counts["leases"] == 1 and c.counts["offers"] == 1 and c.counts["acks"] == 1
    assert c.snapshot(10.3)["state"] == "bound" and c.snapshot(10.3)["address"] == lease.interface


def test_t1_renews_by_unicast_to_the_server():
    c = client()
    lease = bound(c)  # 120 s, T1 60, T2 105 (RFC 2131's defaults)
    assert c.next_deadline() == 60.0
    assert c.tick(59.9) == []
    actions = c.tick(60.0)
    assert only(actions, Changed) == [Changed(State.BOUND, State.RENEWING, "T1")]
    (renew,) = sends(actions)
    assert renew.kind == "REQUEST" and renew.eth_dst == SERVER_MAC
    assert (renew.ip_src, renew.ip_dst) == (OFFERED, SERVER)
    assert renew.msg["ciaddr"] == OFFERED and "requested_ip" not in renew.msg["options"]
    actions = c.receive(reply(renew, 5), SERVER_MAC, 60.5)
    (configure,) = only(actions, Configure)
    assert configure.previous == lease and configure.lease.obtained == 60.0
    assert announcements(actions) == []  # the same address: nothing new to tell
    assert c.state == State.BOUND and c.counts["renewals"] == 1 and c.counts["leases"] == 1
    assert c.next_deadline() == 120.0  # the next T1, from the renewal


# The schedule of a lease of 120 s (T1 60, T2 105) whose server went away: (time,
# state after tick, frames sent, their destination MAC).
SILENT_SERVER = [
    (60.0, State.RENEWING, 1, SERVER_MAC),  # T1
    (82.5, State.RENEWING, 1, SERVER_MAC),  # half the time left to T2
    (93.75, State.RENEWING, 1, SERVER_MAC),
    (99.375, State.RENEWING, 1, SERVER_MAC),
    (103.375, State.RENEWING, 1, SERVER_MAC),  # RENEW_RETRY_MIN, no later than T2
    (105.0, State.REBINDING, 1, b"\xff" * 6),  # T2: broadcast, to any server
    (112.5, State.REBINDING, 1, b"\xff" * 6),
    (116.5, State.REBINDING, 1, b"\xff" * 6),
    (120.0, State.SELECTING, 1, b"\xff" * 6),  # expired: address dropped, DISCOVER
]


def test_a_silent_server_renews_rebinds_then_the_lease_is_lost():
    c = client()
    lease = bound(c)
    for when, state, count, destination in SILENT_SERVER:
        assert c.next_deadline() == pytest.approx(when)
        actions = c.tick(when)
        assert c.state == state, when
        frames = sends(actions)
        assert len(frames) == count and frames[0].eth_dst == destination, when
    assert only(actions, Deconfigure) == [Deconfigure(lease, "expired")]
    assert frames[0].kind == "DISCOVER" and c.lease is None
    assert c.counts["lost"] == 1 and c.counts["rebinds"] == 1 and c.counts["renewals"] == 0


def test_rebinding_reaches_another_server():
    c = client()
    bound(c)
    c.tick(60.0)
    (rebind,) = sends(c.tick(105.0))
    assert rebind.kind == "REQUEST" and rebind.ip_dst == "255.255.255.255"
    assert rebind.msg["ciaddr"] == OFFERED
    c.receive(reply(rebind, 5), SERVER_MAC, 105.1)
    assert c.state == State.BOUND and c.counts["renewals"] == 1


@pytest.mark.parametrize("state_at", [0.0, 60.0, 105.0])  # REQUESTING, RENEWING, REBINDING
def test_a_nak_drops_the_address_and_starts_over(state_at):
    c = client()
    lease = None
    if state_at == 0.0:
        (discover,) = sends(c.carrier(True, 0.0))
        (request,) = sends(c.receive(reply(discover, 2), SERVER_MAC, 0.1))
    else:
        lease = bound(c)
        (request,) = sends(c.tick(60.0))
        if state_at > 60.0:
            (request,) = sends(c.tick(state_at))
    actions = c.receive(reply(request, 6), SERVER_MAC, state_at + 0.5)
    assert c.state == State.SELECTING and c.counts["naks"] == 1 and c.lease is None
    assert only(actions, Deconfigure) == ([Deconfigure(lease, "nak")] if lease else [])
    assert [s.kind for s in sends(actions)] == ["DISCOVER"]
    assert c.counts["lost"] == 0


def test_a_replug_asks_for_the_same_address_and_a_nak_gets_a_new_one():
    c = client()
    lease = bound(c)
    assert c.carrier(False, 20.0) == [Changed(State.BOUND, State.OFF, "carrier off")]
    assert c.tick(59.0) == [] and c.next_deadline() == lease.expires  # nothing sent while off
    actions = c.carrier(True, 30.0)
    (reboot,) = sends(actions)
    assert c.state == State.REBOOTING and reboot.kind == "REQUEST"
    assert reboot.msg["options"]["requested_ip"] == OFFERED and reboot.msg["ciaddr"] == "0.0.0.0"
    assert reboot.eth_dst == b"\xff" * 6 and reboot.ip_src == "0.0.0.0"
    actions = c.receive(reply(reboot, 6), SERVER_MAC, 30.1)  # another board: not its network
    assert only(actions, Deconfigure) == [Deconfigure(lease, "nak")]
    (discover,) = sends(actions)
    (request,) = sends(c.receive(reply(discover, 2, OTHER), SERVER_MAC, 30.2))
    actions = c.receive(reply(request, 5, OTHER), SERVER_MAC, 30.3)
    (configure,) = only(actions, Configure)
    assert configure.lease.address == OTHER and configure.previous is None
    assert announcements(actions) == [OTHER]
    assert c.counts["leases"] == 2 and c.counts["naks"] == 1


def test_a_replug_with_the_same_board_keeps_the_address():
    c = client()
    lease = bound(c)
    c.carrier(False, 20.0)
    (reboot,) = sends(c.carrier(True, 21.0))
    (configure,) = only(c.receive(reply(reboot, 5), SERVER_MAC, 21.1), Configure)
    assert configure.lease.address == lease.address and configure.previous == lease
    assert c.state == State.BOUND


def test_a_lease_that_expires_while_unplugged_is_lost_and_replug_discovers():
    c = client()
    lease = bound(c)
    c.carrier(False, 1.0)
    actions = c.tick(120.0)
    assert actions == [Deconfigure(lease, "expired")] and c.state == State.OFF
    assert c.counts["lost"] == 1 and c.next_deadline() is None
    assert [s.kind for s in sends(c.carrier(True, 200.0))] == ["DISCOVER"]


def test_a_lease_that_expires_while_rebooting_unanswered_starts_over():
    """A replug with time left on the lease, a server that does not answer until it runs
    out: the client looks for a new one (it had raised on the next REQUEST, lease gone)."""
    c = client()
    bound(c, lease=120)
    c.carrier(False, 1.0)
    assert sends(c.carrier(True, 30.0))[0].kind == "REQUEST" and c.state == State.REBOOTING
    actions = c.tick(120.0)  # expiry and the next retransmission both due
    assert [a.reason for a in only(actions, Deconfigure)] == ["expired"]
    assert [s.kind for s in sends(actions)] == ["DISCOVER"] and c.state == State.SELECTING
    assert c.lease is None and c.counts["lost"] == 1


def test_discover_backs_off_to_every_16_seconds():
    c = client()
    c.carrier(True, 0.0)
    times = [0.0]
    for _ in range(7):
        when = c.next_deadline()
        assert [s.kind for s in sends(c.tick(when))] == ["DISCOVER"]
        times.append(when)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for gap, nominal in zip(gaps, [1, 2, 4, 8, 16, 16, 16], strict=True):
        assert nominal * 0.9 <= gap <= nominal * 1.1
    assert c.counts["discovers"] == 8


def test_a_server_never_found_is_looked_for_every_16_seconds_for_ever():
    c = client()
    c.carrier(True, 0.0)
    for _ in range(2000):  # 2**1024 seconds would overflow a float
        c.tick(c.next_deadline())
    when = c.next_deadline()
    c.tick(when)
    assert 14.4 <= c.next_deadline() - when <= 17.6
    assert c.counts["discovers"] == 2002


def test_an_unanswered_request_starts_over():
    c = client()
    (discover,) = sends(c.carrier(True, 0.0))
    c.receive(reply(discover, 2), SERVER_MAC, 0.1)
    kinds = []
    while c.state == State.REQUESTING:
        kinds += [s.kind for s in sends(c.tick(c.next_deadline()))]
    assert kinds == ["REQUEST"] * (dhcp.REQUEST_TRIES - 1) + ["DISCOVER"]
    assert c.state == State.SELECTING and c.counts["restarts"] == 1


def test_replies_for_others_are_ignored_and_garbage_is_counted():
    c = client()
    (discover,) = sends(c.carrier(True, 0.0))
    assert c.receive(reply(discover, 2, xid=discover.msg["xid"] ^ 1), SERVER_MAC, 0.1) == []
    assert c.receive(reply(discover, 2, chaddr=bytes(6)), SERVER_MAC, 0.1) == []
    assert c.receive(reply(discover, 5), SERVER_MAC, 0.1) == []  # an ACK nobody asked for
    assert c.counts["ignored"] == 3
    garbage = dhcp.udp_ipv4(SERVER, "255.255.255.255", 67, 68, b"\x02" * 20)
    assert c.receive(garbage, SERVER_MAC, 0.1) == [] and c.counts["malformed"] == 1
    assert c.state == State.SELECTING


def test_infinite_and_missing_times():
    c = client()
    lease = bound(c, lease=-1)
    assert lease.expires is None and c.next_deadline() is None
    c = client()
    lease = bound(c, lease=0)  # taken as MIN_LEASE: not a loop as fast as the server
    assert lease.expires == dhcp.MIN_LEASE and c.next_deadline() == dhcp.MIN_LEASE / 2
    c = client()
    lease = bound(c, lease=100, t1=90, t2=80)  # T1 after T2: T1 is RFC 2131's default
    assert (lease.t1, lease.t2) == (50.0, 80.0)
    c = client()
    lease = bound(c, lease=100, t1=20, t2=200)  # T2 past the expiry: the default
    assert (lease.t1, lease.t2) == (20.0, 87.5)


def test_is_dhcp_reply():
    packet = dhcp.udp_ipv4(SERVER, OFFERED, 67, 68, b"x" * 10)
    assert dhcp.is_dhcp_reply(packet)
    assert not dhcp.is_dhcp_reply(dhcp.udp_ipv4(SERVER, OFFERED, 67, 69, b"x"))
    fragment = bytearray(packet)
    fragment[6] = 0x20  # more fragments
    assert not dhcp.is_dhcp_reply(bytes(fragment)) and not dhcp.is_dhcp_reply(packet[:20])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["on", "off", "tick", "offer", "ack", "nak", "junk"]),
                          st.floats(0, 90), st.sampled_from([OFFERED, OTHER])), max_size=40))
def test_any_sequence_keeps_the_interface_and_the_lease_in_step(events):
    """Whatever happens, the addresses the actions leave on the interface are the
    client's lease (or none), nothing is sent while the carrier is off, and there is
    always a next deadline when something is pending."""
    c = client()
    now, configured, last = 0.0, None, None
    for event, step, address in events:
        now += step
        if event == "on":
            actions = c.carrier(True, now)
        elif event == "off":
            actions = c.carrier(False, now)
        elif event == "tick":
            actions = c.tick(now)
        elif event == "junk":
            actions = c.receive(b"\x45" + bytes(40), SERVER_MAC, now)
        elif last is None:
            continue
        else:
            kind = {"offer": 2, "ack": 5, "nak": 6}[event]
            actions = c.receive(reply(last, kind, address), SERVER_MAC, now)
        for action in actions:
            if isinstance(action, Configure):
                assert action.previous == configured
                configured = action.lease
            elif isinstance(action, Deconfigure):
                assert action.lease == configured
                configured = None
        sent = sends(actions)
        if sent:
            last = sent[-1]
        assert not (sent and c.state == State.OFF)
        assert configured == c.lease
        if c.state != State.OFF:
            assert c.next_deadline() is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["selecting", "requesting", "bound"]))
def test_any_payload_to_port_68_is_counted_never_raised(payload, state):
    c = client()
    (discover,) = sends(c.carrier(True, 0.0))
    if state != "selecting":
        (request,) = sends(c.receive(reply(discover, 2), SERVER_MAC, 0.1))
        if state == "bound":
            c.receive(reply(request, 5), SERVER_MAC, 0.2)
    before = dict(c.counts)
    actions = c.receive(dhcp.udp_ipv4(SERVER, "255.255.255.255", 67, 68, payload), SERVER_MAC, 1.0)
    assert c.state.name.lower() == state or actions
    changed = {k for k in c.counts if c.counts[k] != before[k]}
    assert changed <= {"malformed", "ignored"} and len(changed) == 1


# --- option 121 (RFC 3442), DNS servers and domain ------------------------------------------

def test_the_client_asks_for_classless_routes_dns_and_domain():
    (discover,) = sends(client().carrier(True, 0.0))
    asked = discover.msg["options"]["parameter_list"]
    assert {1, 3, 6, 15, 121} <= set(asked)
    assert asked.index(121) < asked.index(3)  # RFC 3442 section 4


def test_classless_routes_replace_the_router_and_dns_is_only_shown():
    c = client()
    routes = [("10.0.0.0/8", "192.168.7.254"), ("0.0.0.0/0", SERVER), ("172.16.5.0/24", "0.0.0.0")]
    (discover,) = sends(c.carrier(True, 0.0))
    options = {"classless": rfc3442(routes), "dns": [SERVER, "9.9.9.9"], "domain": "board.lan"}
    (request,) = sends(c.receive(reply(discover, 2, **options), SERVER_MAC, 0.0))
    actions = c.receive(reply(request, 5, router="192.168.7.99", **options), SERVER_MAC, 0.1)
    (configure,) = only(actions, Configure)
    lease = configure.lease
    # RFC 3442: with option 121 the Router option is ignored, 121's own default route kept.
    assert lease.router is None
    assert [(r.destination, r.router) for r in lease.routes] == routes
    assert (lease.dns, lease.domain) == ((SERVER, "9.9.9.9"), "board.lan")
    snapshot = c.snapshot(0.1)
    assert snapshot["routes"] == ["10.0.0.0/8 via 192.168.7.254", f"0.0.0.0/0 via {SERVER}",
                                  "172.16.5.0/24"]
    assert snapshot["dns"] == [SERVER, "9.9.9.9"] and snapshot["domain"] == "board.lan"
    (changed,) = only(actions, Changed)
    assert "route 10.0.0.0/8 via 192.168.7.254" in changed.reason
    assert "dns 192.168.7.1 9.9.9.9" in changed.reason and "domain board.lan" in changed.reason
    assert c.counts["bad_routes"] == 0
    # Without option 121 the router is the default route, as before.
    c = client()
    lease = bound(c)
    assert [(r.destination, r.router) for r in lease.routes] == [("0.0.0.0/0", SERVER)]
    assert (lease.dns, lease.domain) == ((), None)
    assert c.snapshot(0.0)["routes"] == [f"0.0.0.0/0 via {SERVER}"]


def test_a_renewal_with_other_routes_carries_both_route_sets():
    c = client()
    bound(c, classless=rfc3442([("10.1.0.0/16", SERVER)]), t1=10)
    (renew,) = sends(c.tick(c.next_deadline()))
    actions = c.receive(reply(renew, 5, classless=rfc3442([("10.2.0.0/16", SERVER)])),
                        SERVER_MAC, 11.0)
    (configure,) = only(actions, Configure)
    assert [r.destination for r in configure.previous.routes] == ["10.1.0.0/16"]
    assert [r.destination for r in configure.lease.routes] == ["10.2.0.0/16"]


@pytest.mark.parametrize("value", [
    b"",  # empty
    bytes([33, 10, 0, 0, 0, 0, 192, 168, 7, 1]),  # width over 32
    bytes([24, 10, 1, 2, 192, 168]),  # cut short in the router
    bytes([8, 10, 192, 168, 7, 1, 16, 10]),  # a good route, then one cut short
])
def test_a_malformed_option_121_is_ignored_whole_and_counted(value):
    c = client()
    lease = bound(c, classless=value)
    assert [(r.destination, r.router) for r in lease.routes] == [("0.0.0.0/0", SERVER)]
    assert lease.router == SERVER and c.counts["bad_routes"] == 1
    assert c.snapshot(0.0)["bad_routes"] == 1


def test_destination_bits_past_the_width_are_cleared():
    # 10.1.2.3/8 as a careless server might write it: the significant octet is 10.
    assert dhcp.classless_routes(list(bytes([12, 10, 0x1F, 1, 2, 3, 4]))) == (
        dhcp.Route("10.16.0.0/12", "1.2.3.4"),)


routes_strategy = st.lists(st.tuples(
    st.builds(lambda a, w: str(ipaddress.IPv4Network((a, w), strict=False)),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(0, 2**32 - 1))),
    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(routes_strategy)
def test_any_route_list_round_trips_through_option_121(routes):
    decoded = dhcp.classless_routes(list(rfc3442(routes)))
    assert decoded is not None
    assert [(r.destination, r.router) for r in decoded] == routes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=255))
def test_any_option_121_binds_with_its_routes_or_the_router(value):
    """Whatever the bytes, the ACK binds: with option 121's routes when they decode (the
    router then ignored), else the router's default route and bad_routes counted."""
    c = client()
    lease = bound(c, classless=value)
    decoded = dhcp.classless_routes(list(value))
    if decoded:
        assert lease.routes == decoded and lease.router is None and c.counts["bad_routes"] == 0
    else:
        assert [(r.destination, r.router) for r in lease.routes] == [("0.0.0.0/0", SERVER)]
        assert c.counts["bad_routes"] == 1
