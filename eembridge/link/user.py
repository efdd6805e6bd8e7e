"""`--link user`: the board's frames end in libslirp, a user-mode network stack; no root,
no interface.

Theory of operation
-------------------
`UserLink` is a link.pump.FramePump: the bridge gets one end of a SEQPACKET socketpair as
its frame descriptor, and the pump thread runs a libslirp stack (eembridge._fast.slirp, the
binding in _fast/slirp.pyx, which says why libslirp and how its loop runs) on the other
end:

  bridge --frame--> socketpair --> pump thread: egress check --> slirp_input --> host sockets
  host sockets --> slirp --> send_packet --frame--> socketpair --> bridge

Only that thread touches the stack (libslirp is not thread-safe): the forwards are added
before it starts, and the stack is cleaned up after it has stopped.

Addresses (QEMU's user networking, made to fit the bridge's options): the network and the
gateway are the host's side, --ip (default 10.0.2.2/24); the board is --peer (default
10.0.2.15), the first address slirp's DHCP server leases, so a board that asks for an
address by DHCP gets the one the forwards go to, and one configured statically works as
well. IPv6 is on: slirp announces PREFIX6 by router advertisements and answers NDP. The
gateway's MAC is slirp's own: 52:55 then the gateway's IPv4 address; the board learns it
by ARP (or NDP), and slirp learns the board's from the board's ARP and DHCP. `--forward
tcp:8022:22` listens on 127.0.0.1 only (a forward does not expose the board to the host's
network); a connection to it reaches the board from the gateway address.

The board's own traffic out (to the host's network, or to the host's loopback through the
gateway address) is refused unless `--nat`, twice: eembridge.core.egress judges the
board's frames first (counted by kind; a SYN is answered with a reset so connect() fails
at once), and the stack runs `restricted` (libslirp carries nothing the board starts,
whatever passes the filter). Except with a `--forward udp:`: a restricted libslirp drops
every datagram from the board, the forward's replies too, so then the stack runs
unrestricted and the filter alone guards. It passes the board's UDP only back along a
flow a forwarded client started: learnt from the client's datagrams as slirp sends them
to the board, kept five minutes after the client's last one, at most 1024 (core.egress
says why). So the board answers the forward's clients and reaches no other port of the
host's loopback, nor the host's network; nothing else the filter passes is carried out
by an unrestricted libslirp either (a TCP segment of no connection gets a reset, ICMP
errors and echo replies end in the stack). Without --nat slirp's DNS forwarder is off
too (it would ask the host's resolvers for the board). With --nat, slirp's NAT carries
everything and the gateway address is the host's loopback.

Known limit, measured on the simulated device: libslirp's TCP (4.4BSD's: no SACK, a
retransmission timeout of a second or more) recovers a lost frame slowly where it is the
sender, towards the board: at 1% of 512-byte USB packets lost (a frame in about 30),
2 MB up took 23 s and 2 MB down 0.35 s (the board's Linux TCP sending); a 64-byte-packet
device at 0.5% loss (a frame in 9) took 29 to 72 s for the demo's 3 MB. Slow, never
stalled, intact (tests/test_user_link.py). Lossless, a 32 MB download runs at about a
third of the TAP link's rate (bench/bridge.py --user).

Backpressure and bounded buffers: see _fast/slirp.pyx (frames towards the bridge wait
for room in the socket, up to a second, while slirp reads no host socket; frames from
the bridge are read only as fast as slirp takes them).
Throughput against the TAP link: bench/bridge.py --user.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from ..core.egress import Egress
from ..core.errors import UserError
from ..core.options import Forward, parse_forward
from .pump import FramePump

log = logging.getLogger(__name__)

DEFAULT_HOST = "10.0.2.2/24"  # QEMU's user networking: the gateway (and host) address
DEFAULT_PEER = "10.0.2.15"  # and the guest's, its first DHCP lease
PREFIX6 = ipaddress.IPv6Network("fd00:eeb::/64")  # announced to the board by slirp's RA
LOOPBACK = ipaddress.IPv4Address("127.0.0.1").packed


class UserLinkError(UserError):
    pass


def gateway_mac(host: ipaddress.IPv4Address) -> str:
    """The MAC slirp answers ARP with for its addresses (libslirp's special_ethaddr)."""
    return (b"\x52\x55" + host.packed).hex(":")


class UserLink(FramePump):
    """What the bridge takes for its TAP when --link user: a frame descriptor (fileno),
    the gateway's MAC, the forwards, and the counters of the stack and the egress filter
    (`user_stats`)."""

    offload = False
    KIND = "user"
    FATAL = (UserLinkError, OSError)

    def __init__(self, name: str, *, host: str = DEFAULT_HOST, peer: str = DEFAULT_PEER,
                 forwards: list[Forward] = (), nat: bool = False,  # type: ignore[assignment]
                 mtu: int = 1500) -> None:
        try:
            from .._fast.slirp import Stack
        except ImportError:
            raise UserLinkError("--link user needs the compiled eembridge._fast.slirp (apt-get install "
                                "libslirp-dev, then python3 setup.py build_ext --inplace)") from None
        gateway = ipaddress.IPv4Interface(host)
        board = ipaddress.IPv4Address(peer)
        self.host, self.peer = gateway, board
        self.mac = gateway_mac(gateway.ip)
        self.forwards = list(forwards)
        self.nat = nat
        udp_ports = [f.board_port for f in self.forwards if f.protocol == "udp"]
        self.egress = Egress(nat=nat, udp_forwards=udp_ports)
        self._stack = Stack(
            network=gateway.network.network_address.packed,
            netmask=gateway.network.netmask.packed, host=gateway.ip.packed,
            dhcp_start=board.packed, nameserver=_nameserver(gateway, board).packed,
            prefix6=PREFIX6.network_address.packed, prefix6_len=PREFIX6.prefixlen,
            host6=PREFIX6[2].packed, nameserver6=PREFIX6[3].packed, mtu=mtu,
            restricted=not (nat or udp_ports), dns=nat, egress=None if nat else self.egress)
        super().__init__(name)
        try:
            for forward in self.forwards:
                failed = self._stack.add_forward(forward.protocol == "udp", LOOPBACK,
                                                 forward.host_port, board.packed,
                                                 forward.board_port)
                if failed:
                    raise UserLinkError(f"--forward {forward}: cannot listen on 127.0.0.1:"
                                        f"{forward.host_port}: {os.strerror(failed)}")
        except BaseException:
            self.close()
            raise
        self.start()

    # --- what the bridge uses ---------------------------------------------------------

    @property
    def forwarded_ports(self) -> dict[str, int]:
        """"tcp:22" (the board's port) -> the localhost port reaching it."""
        return {f"{f.protocol}:{f.board_port}": f.host_port for f in self.forwards}

    def user_stats(self) -> dict[str, int]:
        """The stack's counters and the egress filter's refusals."""
        return {**self._stack.counters(), **self.egress.counters()}

    def close(self) -> None:
        self.stop_pump()
        if self._thread.is_alive():  # libslirp is not thread-safe: leave it to the thread
            log.error("the user link's thread for %s did not stop; its stack is left open",
                      self.name)
            return
        self._stack.close()

    def __repr__(self) -> str:
        return f"<UserLink {self.name} forwards={','.join(map(str, self.forwards))}>"

    def _pump(self) -> None:
        self._stack.run(self._pump_end.fileno(), self._stop_r)


def _nameserver(gateway: ipaddress.IPv4Interface,
                board: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    """slirp's DNS address: .3 as in QEMU, or the next host address that is neither the
    gateway nor the board."""
    for candidate in gateway.network.hosts():
        if int(candidate) - int(gateway.network.network_address) >= 3 and \
                candidate not in (gateway.ip, board):
            return candidate
    raise UserError(f"--link user: the subnet {gateway.network} has no address left for "
                    "slirp's DNS (a /29 or larger)")


def open_user_link(name: str, *, addresses: list[str], peer: str | None, forwards: list[str],
                   nat: bool, mtu: int, mac: str | None) -> UserLink:
    """--link user from the bridge's options; one line naming what is missing or wrong."""
    if mac:
        raise UserError("--mac is for the TAP and TUN links: on --link user the gateway's MAC "
                        "is libslirp's (52:55 then the gateway's IPv4 address)")
    ipv4 = [a for a in addresses if ipaddress.ip_interface(a).version == 4]
    host = ipaddress.IPv4Interface(ipv4[0] if ipv4 else DEFAULT_HOST)
    if peer is None:
        peer = DEFAULT_PEER if not ipv4 else None
    if peer is None or ipaddress.ip_address(peer).version != 4:
        raise UserError("--link user needs the board's IPv4 address as --peer (the forwards' "
                        "destination and its DHCP lease, e.g. --peer 169.254.7.1)")
    if ipaddress.ip_address(peer) not in host.network or ipaddress.ip_address(peer) in (
            host.ip, host.network.network_address, host.network.broadcast_address):
        raise UserError(f"--link user: --peer {peer} must be another host address in --ip "
                        f"{host}'s subnet {host.network}")
    return UserLink(name, host=str(host), peer=peer, forwards=[parse_forward(f) for f in forwards],
                    nat=nat, mtu=mtu)

