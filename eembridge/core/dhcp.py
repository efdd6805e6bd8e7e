"""A DHCPv4 client for the TUN link (`--link tun --dhcp`), sans-IO.

The board's DHCP server (dnsmasq on most Linux gadgets) sits behind EEM and speaks
Ethernet; the host's side of a TUN has none, so the client speaks on the bridge's side
of the translation (eembridge.core.l3), with the translator's MAC: its frames go to the
board as the translator's do, and the replies (UDP to port 68) are handed to it instead
of the TUN. eembridge.link.tun runs it in its pump thread.

Theory of operation
-------------------
As eembridge.core.linkpolicy: no I/O, no thread, no clock. The caller reports what
happened with the time it happened (`carrier(on, now)`, `receive(packet, now)`,
`tick(now)`) and carries out, in order, the actions each call returns: `Send` (an
Ethernet frame for the board), `Configure` (put the lease's address, prefix and
routes on the interface; drop the previous lease's address and the routes it no longer
has), `Deconfigure` (take the address and routes away) and `Changed` (the state changed:
one log line). `next_deadline()` says when `tick` has work.

Routes (`Lease.routes`): the classless static routes of option 121 (RFC 3442) when the
server gives them, and then the router of option 3 is ignored, as RFC 3442 requires
(a default route is one of the 121 routes if the server wants one); otherwise a default
route through option 3's first router. A route whose router is 0.0.0.0 is on the link.
An option 121 that does not decode is ignored whole (counted `bad_routes`) and option 3
used instead: half a route table could send traffic where the server did not mean it to.

DNS servers (option 6) and the domain name (option 15) are taken into the lease and
shown (the log line, `snapshot()`: stats section dhcp) but not used: the host's resolver
is the user's (NetworkManager, systemd-resolved or a hand-written resolv.conf), and a
bridge that rewrote it for a board could break the host's name resolution whenever a
board is plugged in. A tool that wants them reads them from `eembridge stats --json`.

The messages are pyroute2.dhcp's (dhcp4msg encodes and decodes them; its `messages`
module builds DISCOVER and the REQUESTs of RFC 2131 4.3.2 and 4.3.6), and so are the
state names (pyroute2.dhcp.fsm.State). Its client is not used: it is asyncio bound to
a raw socket on an interface with Ethernet, and keeps its lease times by the wall
clock; here there is no such interface, and the time comes in with each event.

States (RFC 2131 figure 5)::

    OFF --carrier on, no lease--> SELECTING --OFFER--> REQUESTING --ACK--> BOUND
    OFF --carrier on, lease not expired--> REBOOTING --ACK--> BOUND
    BOUND --T1--> RENEWING (unicast to the server) --T2--> REBINDING (broadcast)
    RENEWING, REBINDING --ACK--> BOUND (a renewal)
    REQUESTING, REBOOTING, RENEWING, REBINDING --NAK--> SELECTING (address dropped)
    REQUESTING, REBOOTING --no answer after REQUEST_TRIES--> SELECTING
    any --lease expired--> the address is dropped (lost); BOUND, RENEWING, REBINDING,
        REBOOTING go to SELECTING, the others stay where they are
    any --carrier off--> OFF (the lease is kept until it expires; a replug asks for it
        again with REBOOTING, the server may NAK it: a different board)

Retransmissions (RFC 2131 4.1): DISCOVER and REQUEST again after 1, 2, 4, 8, 16 s
(±10 %) and every 16 s after that. RFC 2131's 4 to 64 s is for a LAN shared with many
clients; here one host and one board share a cable, and a board that boots after the
bridge should be found within seconds. RENEWING and REBINDING send again after half
the time left until T2 (or expiry), at least RENEW_RETRY_MIN.

Not done, on purpose: no DECLINE after an ARP probe of the offered address (the link
has one board and one host; the board's server picked the address); no INFORM, no
RELEASE at exit (the interface goes with the bridge; a board keeps the lease for
the next start of the same host, whose MAC is stable).
"""

from __future__ import annotations

import ipaddress
import random as _random
import struct
from dataclasses import dataclass

from pyroute2.dhcp import messages
from pyroute2.dhcp.dhcp4msg import dhcp4msg
from pyroute2.dhcp.enums import bootp
from pyroute2.dhcp.enums.dhcp import MessageType, Option
from pyroute2.dhcp.fsm import State

from .l3 import ARP_REQUEST, BROADCAST, ETH_P_ARP, ETH_P_IP, arp_packet, ethernet
from .offload import ones_sum

CLIENT_PORT, SERVER_PORT = 68, 67
UDP = 17
# Option 121 before option 3: RFC 3442 asks clients that support it to request it, and
# servers (dnsmasq among them) send only what is asked for.
PARAMETERS = (Option.SUBNET_MASK, Option.CLASSLESS_STATIC_ROUTE, Option.ROUTER,
              Option.NAME_SERVER, Option.DOMAIN_NAME, Option.LEASE_TIME, Option.RENEWAL_TIME,
              Option.REBINDING_TIME, Option.SERVER_ID)
RETRY_FIRST = 1.0  # seconds before the first retransmission; doubled up to RETRY_MAX
RETRY_MAX = 16.0
RETRY_JITTER = 0.1  # ± this share, so clients started together spread out
REQUEST_TRIES = 4  # REQUESTs in REQUESTING and REBOOTING before starting over
RENEW_RETRY_MIN = 4.0  # seconds between REQUESTs in RENEWING and REBINDING, at least
DEFAULT_LEASE = 3600.0  # an ACK without a lease time (RFC 2131 requires one)
# A shorter lease is taken as this long: a server handing out 0-second leases would
# otherwise have the client bind, expire and ask again as fast as the server answers.
MIN_LEASE = 1.0
INFINITE = 0xFFFFFFFF

COUNTERS = (
    "discovers",  # DISCOVERs sent (retransmissions included)
    "offers",  # OFFERs taken
    "requests",  # REQUESTs sent, all states, retransmissions included
    "acks",  # ACKs taken
    "naks",  # NAKs taken: the address (if any) is dropped, negotiation starts over
    "leases",  # leases bound from SELECTING or REBOOTING (the first, and after a restart)
    "renewals",  # leases extended in RENEWING or REBINDING
    "rebinds",  # times T2 came without an answer from the server (REBINDING entered)
    "lost",  # leases that expired: the address was dropped
    "restarts",  # REQUESTING or REBOOTING gave up unanswered (back to SELECTING)
    "ignored",  # DHCP replies for another client, another exchange, or a state not asking
    "malformed",  # UDP to port 68 that does not decode as a DHCP reply
    "bad_routes",  # ACKs whose option 121 did not decode: ignored, option 3 used
)

ON_LINK = "0.0.0.0"  # a route's router when the destination is on the link (RFC 3442)


@dataclass(frozen=True)
class Route:
    destination: str  # "a.b.c.d/n"
    router: str  # ON_LINK: no router, the destination is on the link

    def __str__(self) -> str:
        return self.destination + ("" if self.router == ON_LINK else f" via {self.router}")


@dataclass(frozen=True)
class Lease:
    address: str
    prefix: int
    router: str | None  # option 3's first router; None when absent or option 121 is given
    server_id: str
    server_mac: bytes
    obtained: float  # when the REQUEST that got it was first sent (RFC 2131 4.4.1)
    lease_time: float | None  # None: infinite
    t1: float | None
    t2: float | None
    classless: tuple[Route, ...] = ()  # option 121
    dns: tuple[str, ...] = ()  # option 6, shown only: see the theory of operation
    domain: str | None = None  # option 15, likewise

    @property
    def interface(self) -> str:
        return f"{self.address}/{self.prefix}"

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes to put on the interface: option 121's, or the default route through
        option 3's router."""
        if self.classless:
            return self.classless
        return () if self.router is None else (Route("0.0.0.0/0", self.router),)

    def describe(self) -> str:
        """Its routes, DNS servers and domain, for the log line (empty when none)."""
        parts = [f"route {route}" for route in self.routes]
        if self.dns:
            parts.append("dns " + " ".join(self.dns))
        if self.domain:
            parts.append(f"domain {self.domain}")
        return ", ".join(parts)

    def at(self, offset: float | None) -> float | None:
        return None if offset is None else self.obtained + offset

    @property
    def expires(self) -> float | None:
        return self.at(self.lease_time)


@dataclass(frozen=True)
class Send:
    frame: bytes


@dataclass(frozen=True)
class Configure:
    lease: Lease
    previous: Lease | None  # its address goes if it is another one


@dataclass(frozen=True)
class Deconfigure:
    lease: Lease
    reason: str  # "expired", "nak"


@dataclass(frozen=True)
class Changed:
    old: State
    new: State
    reason: str


Action = Send | Configure | Deconfigure | Changed


class DhcpClient:
    """One interface's DHCPv4 client: see the theory of operation above."""

    def __init__(self, mac: bytes, *, rng: _random.Random | None = None) -> None:
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError("the client's MAC must be 6 bytes and unicast")
        self.mac = bytes(mac)
        self._rng = rng or _random.Random()
        self.state = State.OFF
        self.lease: Lease | None = None  # the one configured on the interface
        self._offer: dhcp4msg | None = None
        self._offer_mac = BROADCAST
        self._xid = 0
        self._tries = 0
        self._first_sent = 0.0  # of the current exchange: leases count from it
        self._next: float | None = None  # retransmission or state timer
        self.counts = dict.fromkeys(COUNTERS, 0)

    # --- events ----------------------------------------------------------------------

    def carrier(self, on: bool, now: float) -> list[Action]:
        """The board is there (connected) or gone (unplugged)."""
        if not on:
            if self.state == State.OFF:
                return []
            self._next = None
            return [self._change(State.OFF, "carrier off")]
        if self.state != State.OFF:
            return []
        if self.lease is not None and not self._expired(now):
            return self._reboot(now)
        return self._discover(now, "carrier on")

    def receive(self, packet: bytes | bytearray | memoryview, source_mac: bytes,
                now: float) -> list[Action]:
        """An IPv4 packet from the board carrying UDP to port 68 (`is_dhcp_reply`), and
        the Ethernet source it came from (the server's MAC, for RENEWING's unicast)."""
        msg = self._decode(packet)
        if msg is None:
            self.counts["malformed"] += 1
            return []
        server_mac = bytes(source_mac)
        kind = msg["options"].get("message_type")
        if msg["xid"] != self._xid or msg["chaddr"] != self.mac.hex(":"):
            self.counts["ignored"] += 1
            return []
        if kind == MessageType.OFFER and self.state == State.SELECTING:
            return self._request_offer(msg, server_mac, now)
        asking = (State.REQUESTING, State.REBOOTING, State.RENEWING, State.REBINDING)
        if kind == MessageType.ACK and self.state in asking:
            return self._bind(msg, server_mac, now)
        if kind == MessageType.NAK and self.state in asking:
            self.counts["naks"] += 1
            return self._drop("nak") + self._discover(now, "NAK")
        self.counts["ignored"] += 1
        return []

    def tick(self, now: float) -> list[Action]:
        """Retransmissions, T1, T2 and the lease's expiry. Call at `next_deadline()`."""
        actions: list[Action] = []
        if self.lease is not None and self._expired(now):
            self.counts["lost"] += 1
            actions += self._drop("expired")
            # REBOOTING too: it was asking for the lease now gone, and has nothing to ask for.
            if self.state in (State.BOUND, State.RENEWING, State.REBINDING, State.REBOOTING):
                return actions + self._discover(now, "lease expired")
        if self._next is None or now < self._next:
            return actions
        state = self.state
        if state == State.SELECTING:
            actions += self._send_discover(now)
        elif state in (State.REQUESTING, State.REBOOTING):
            if self._tries >= REQUEST_TRIES:
                self.counts["restarts"] += 1
                actions += self._discover(now, f"no answer in {state.name}")
            else:
                actions += self._send_request(now)
        elif state == State.BOUND:
            actions.append(self._change(State.RENEWING, "T1"))
            actions += self._renew(now)
        elif state in (State.RENEWING, State.REBINDING):
            assert self.lease is not None
            t2 = self.lease.at(self.lease.t2)
            if state == State.RENEWING and t2 is not None and now >= t2:
                self.counts["rebinds"] += 1
                actions.append(self._change(State.REBINDING, "T2"))
            actions += self._renew(now)
        return actions

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._next, self.lease.expires if self.lease else None)
                     if d is not None]
        return min(deadlines, default=None)

    def snapshot(self, now: float) -> dict[str, object]:
        lease = self.lease
        expires = lease.expires if lease else None
        return {"state": self.state.name.lower(),
                "address": lease.interface if lease else None,
                "router": lease.router if lease else None,
                "routes": [str(route) for route in lease.routes] if lease else [],
                "dns": list(lease.dns) if lease else [],
                "domain": lease.domain if lease else None,
                "server": lease.server_id if lease else None,
                "expires_in": None if expires is None else round(max(0.0, expires - now), 1),
                **self.counts}

    # --- states ----------------------------------------------------------------------

    def _change(self, new: State, reason: str) -> Changed:
        old, self.state = self.state, new
        return Changed(old, new, reason)

    def _new_exchange(self, now: float) -> None:
        self._xid = self._rng.getrandbits(32)
        self._tries = 0
        self._first_sent = now

    def _discover(self, now: float, reason: str) -> list[Action]:
        self._new_exchange(now)
        self._offer = None
        return [self._change(State.SELECTING, reason), *self._send_discover(now)]

    def _reboot(self, now: float) -> list[Action]:
        self._new_exchange(now)
        return [self._change(State.REBOOTING, "carrier on, lease kept"), *self._send_request(now)]

    def _request_offer(self, offer: dhcp4msg, server_mac: bytes, now: float) -> list[Action]:
        if not offer["options"].get("server_id") or offer["yiaddr"] == "0.0.0.0":
            self.counts["malformed"] += 1
            return []
        self.counts["offers"] += 1
        self._offer, self._offer_mac = offer, server_mac
        self._tries = 0
        self._first_sent = now
        return [self._change(State.REQUESTING, f"OFFER of {offer['yiaddr']}"),
                *self._send_request(now)]

    def _bind(self, ack: dhcp4msg, server_mac: bytes, now: float) -> list[Action]:
        if ack["yiaddr"] == "0.0.0.0":
            self.counts["malformed"] += 1
            return []
        self.counts["acks"] += 1
        renewing = self.state in (State.RENEWING, State.REBINDING)
        self.counts["renewals" if renewing else "leases"] += 1
        previous, lease = self.lease, _lease(ack, server_mac, self._first_sent)
        if lease.classless == () and "classless_static_route" in ack["options"]:
            self.counts["bad_routes"] += 1
        self.lease = lease
        self._next = lease.at(lease.t1)
        verb = "renewed" if renewing else "bound"
        expiry = "never" if lease.lease_time is None else f"{lease.lease_time:.0f} s"
        actions: list[Action] = [Configure(lease, previous)]
        if previous is None or previous.address != lease.address or not renewing:
            actions.append(self._announce(lease.address))
        extra = lease.describe()
        return [*actions, self._change(State.BOUND, f"{verb} {lease.interface} from "
                                                    f"{lease.server_id}, lease {expiry}"
                                                    + (f"; {extra}" if extra else ""))]

    def _announce(self, address: str) -> Send:
        """The new address's owner, to the board (RFC 2131 4.4.1, as an RFC 5227 ARP
        Announcement): a server that pinged the address before offering it (dnsmasq does)
        left its kernel a failed neighbour entry for it, which would drop the first reply
        to the host otherwise."""
        ip = ipaddress.IPv4Address(address).packed
        return Send(ethernet(BROADCAST, self.mac, ETH_P_ARP,
                             arp_packet(ARP_REQUEST, self.mac, ip, bytes(6), ip)))

    def _drop(self, reason: str) -> list[Action]:
        lease, self.lease = self.lease, None
        return [] if lease is None else [Deconfigure(lease, reason)]

    def _expired(self, now: float) -> bool:
        expires = self.lease.expires if self.lease else None
        return expires is not None and now >= expires

    # --- messages --------------------------------------------------------------------

    def _retry_at(self, now: float) -> float:
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(self._tries, 16))  # no float overflow
        self._tries += 1
        return now + delay * (1 + self._rng.uniform(-RETRY_JITTER, RETRY_JITTER))

    def _send_discover(self, now: float) -> list[Action]:
        self.counts["discovers"] += 1
        self._next = self._retry_at(now)
        return [self._frame(messages.discover(PARAMETERS))]

    def _send_request(self, now: float) -> list[Action]:
        self.counts["requests"] += 1
        self._next = self._retry_at(now)
        if self.state == State.REBOOTING:
            assert self.lease is not None
            message = messages.request_for_lease(PARAMETERS, _pyroute2_lease(self.lease),
                                                 State.REBOOTING)
        else:
            assert self._offer is not None
            message = messages.request_for_offer(PARAMETERS, messages.ReceivedDHCPMessage(
                dhcp=self._offer, eth_src=self._offer_mac.hex(":")))
        return [self._frame(message)]

    def _renew(self, now: float) -> list[Action]:
        """A REQUEST for the lease: unicast to its server (RENEWING) or broadcast
        (REBINDING); the next one after half the time left (RFC 2131 4.4.5)."""
        assert self.lease is not None
        lease = self.lease
        self.counts["requests"] += 1
        self._xid = self._rng.getrandbits(32)
        self._first_sent = now
        until = lease.at(lease.t2) if self.state == State.RENEWING else lease.expires
        if until is None or until <= now:
            until = lease.expires
        wait = RENEW_RETRY_MIN if until is None else max(RENEW_RETRY_MIN, (until - now) / 2)
        self._next = now + wait
        if until is not None and self._next > until and until > now:
            self._next = until  # T2 (or expiry) is the next thing to happen
        message = messages.request_for_lease(PARAMETERS, _pyroute2_lease(lease), self.state)
        return [self._frame(message)]

    def _frame(self, message: messages.SentDHCPMessage) -> Send:
        msg = message.dhcp
        msg["xid"] = self._xid
        msg["chaddr"] = self.mac.hex(":")
        payload = msg.encode().buf
        eth_dst = BROADCAST if message.eth_dst in (None, "ff:ff:ff:ff:ff:ff") else \
            bytes.fromhex(message.eth_dst.replace(":", ""))
        packet = udp_ipv4(message.ip_src, message.ip_dst, CLIENT_PORT, SERVER_PORT, payload)
        return Send(ethernet(eth_dst, self.mac, ETH_P_IP, packet))

    @staticmethod
    def _decode(packet: bytes | bytearray | memoryview) -> dhcp4msg | None:
        """The DHCP message of a BOOTREPLY, or None."""
        view = bytes(packet)
        header = (view[0] & 0x0F) * 4
        try:
            msg = dhcp4msg(buf=view, offset=header + 8).decode()
            if msg["op"] != bootp.MessageType.BOOTREPLY or "message_type" not in msg["options"]:
                return None
        except Exception:  # pyroute2's decoder raises what struct and its codecs raise
            return None
        return msg


def is_dhcp_reply(packet: bytes | bytearray | memoryview) -> bool:
    """An unfragmented IPv4 packet carrying UDP to the DHCP client's port."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != UDP:
        return False
    if (packet[6] << 8 | packet[7]) & 0x3FFF:  # more fragments, or an offset
        return False
    header = (packet[0] & 0x0F) * 4
    return len(packet) >= header + 8 and (packet[header + 2] << 8 | packet[header + 3]) == CLIENT_PORT


def udp_ipv4(source: str, destination: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet (no options, TTL 64) of one UDP datagram, both checksums set."""
    src, dst = ipaddress.IPv4Address(source).packed, ipaddress.IPv4Address(destination).packed
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    pseudo = src + dst + struct.pack("!xBH", UDP, len(udp))
    checksum = ~ones_sum(pseudo + bytes(udp)) & 0xFFFF
    udp[6:8] = struct.pack("!H", checksum or 0xFFFF)  # 0 means "no checksum" in UDP
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, UDP, 0,
                               src, dst))
    ip[10:12] = struct.pack("!H", ~ones_sum(bytes(ip)) & 0xFFFF)
    return bytes(ip + udp)


def _seconds(value: object) -> float | None:
    """A lease time option as seconds; None for infinite (0xffffffff, -1 signed)."""
    if not isinstance(value, int):
        return None
    if value in (-1, INFINITE):
        return None
    return float(max(0, value))


def _lease(ack: dhcp4msg, server_mac: bytes, obtained: float) -> Lease:
    options = ack["options"]
    lease_time = _seconds(options.get("lease_time", int(DEFAULT_LEASE)))
    if lease_time is not None:
        lease_time = max(MIN_LEASE, lease_time)
    t1, t2 = _seconds(options.get("renewal_time")), _seconds(options.get("rebinding_time"))
    if lease_time is not None:
        # RFC 2131 4.4.5's defaults when the server gives none, or gives them out of order.
        if t2 is None or not 0 < t2 <= lease_time:
            t2 = lease_time * 0.875
        if t1 is None or not 0 < t1 <= t2:
            t1 = lease_time * 0.5
    mask = options.get("subnet_mask")
    if mask:
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
    else:  # RFC 2132 3.3 lets a client assume its address class's mask
        first = int(ack["yiaddr"].split(".")[0])
        prefix = 8 if first < 128 else 16 if first < 192 else 24
    classless = classless_routes(options.get("classless_static_route")) or ()
    routers = options.get("router") or []
    # RFC 3442: with option 121 the client MUST ignore the Router option.
    router = routers[0] if routers and not classless else None
    dns = options.get("name_server") or []
    domain = options.get("domain_name")
    return Lease(address=ack["yiaddr"], prefix=prefix, router=router,
                 server_id=options.get("server_id") or "255.255.255.255", server_mac=server_mac,
                 obtained=obtained, lease_time=lease_time, t1=t1, t2=t2, classless=classless,
                 dns=tuple(dns) if isinstance(dns, list) else (),
                 domain=domain if isinstance(domain, str) and domain else None)


def classless_routes(value: object) -> tuple[Route, ...] | None:
    """Option 121's routes (RFC 3442), from the bytes pyroute2 leaves undecoded (a list of
    ints: it has no codec for the option). None when absent, empty or malformed: a width
    over 32, a descriptor cut short. Bits of the destination past its width are cleared,
    as the kernel would refuse the route otherwise."""
    if not isinstance(value, list) or not value:
        return None
    data = bytes(value)
    routes: list[Route] = []
    at = 0
    while at < len(data):
        width = data[at]
        significant = (width + 7) // 8
        end = at + 1 + significant + 4
        if width > 32 or end > len(data):
            return None
        destination = data[at + 1:at + 1 + significant].ljust(4, b"\0")
        network = ipaddress.IPv4Network((destination, width), strict=False)
        router = ipaddress.IPv4Address(data[end - 4:end])
        routes.append(Route(str(network), str(router)))
        at = end
    return tuple(routes)


def _pyroute2_lease(lease: Lease) -> object:
    """What pyroute2.dhcp.messages reads of a lease: ip, server_id, server_mac."""

    class _View:
        ip = lease.address
        server_id = lease.server_id
        server_mac = lease.server_mac.hex(":")

    return _View()
