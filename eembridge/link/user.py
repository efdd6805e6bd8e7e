"""`--link user`: the board's frames end in passt, a user-mode network stack; no root, no
interface.

Theory of operation
-------------------
`UserLink` is a link.pump.FramePump: the bridge gets one end of a SEQPACKET socketpair as
its frame descriptor, and the pump thread carries frames between the other end and a
UNIX stream socket to passt, in QEMU's framing (a 4-byte big-endian length, then the
Ethernet frame), as QEMU's `-netdev stream` and podman speak to it:

  bridge --frame--> socketpair --> pump: egress check --len+frame--> passt --> host sockets
  host sockets --> passt --len+frame--> pump --frame--> socketpair --> bridge

passt is started per bridge, in the foreground, on an already connected socket: one end
of a socketpair handed over as `--fd` (no path anywhere, so no other user can connect to
it, and nothing on the file system to clean up), for one client only (`--one-off`: it
exits when the pump closes its end; terminated if it has not). Its messages go to an
unlinked temporary file, read for the one line given if it refuses to start. Started
means answered: the link asks passt, as the board would, for the gateway's MAC (ARP)
before the bridge runs. The board has a static address, so passt is told it rather than the host's own:
`--address` the board's (--peer), `--netmask` and `--gateway` from the host's side
(--ip), `--mac-addr` the link's MAC; no DHCP, DHCPv6 or router advertisements; IPv4 only
(the forwards go to --peer). `--forward tcp:8022:22` becomes `-t 127.0.0.1/8022:22`: the
host's port is bound on loopback only, so a forward does not expose the board to the
host's network. A connection to it reaches the board from the gateway address.

The board's own traffic out (to the host's network, or to the host itself through the
gateway address) is refused unless `--nat`: this passt has no switch for that, so the
pump filters (eembridge.core.egress, which says what passes and why), counts what it
refuses, and answers a refused SYN with a reset.

Known limits of this passt (0.0~git20230309), measured on the simulated device:
* a TCP connection that one side half-closes (shutdown(SHUT_WR), from the host or from
  the board) stalls in the other direction;
* a forwarded connection's handshake with the board ends (passt's ACK of the board's
  SYN-ACK) only with the host side's first data: a protocol whose server speaks first
  waits until the client sends (ssh clients send their banner at once: unaffected);
* lost frames towards passt (--sim-loss 0.01) and a batching device's bursts stall a
  download from the board: the board's data stays unacknowledged for good (cause not
  found in the time given; the pump counts no drop). Without loss and batching, 16 MB
  crosses intact in 0.4 s.

Backpressure and bounded buffers: frames for passt queue in one buffer of at most
TO_STACK_LIMIT bytes; while it is full the pump stops reading the bridge's socket, whose
queue then fills and the bridge's writes find EAGAIN, as on a full TAP. Frames from passt
go through the pump's backlog (link.pump); while it is not empty the pump stops reading
passt's socket, passt's writes find it full and passt's TCP slows down.

Why passt and not libslirp
--------------------------
* passt is a separate, maintained program (Debian package `passt`, one binary depending on
  libc alone): nothing to compile or bind here. libslirp is a C library (libslirp0 4.7.0 in
  bookworm, on GLib) that would need a Cython binding and its GLib-style event loop
  driven from the pump.
* passt runs sandboxed in its own process (it drops to nobody when started as root, and
  detaches into namespaces of its own), so a bug in a network stack parsing the board's
  packets is not a bug in the bridge's process.
* What it costs: passt is Linux-only (it is built on epoll, splice and unshare, all three
  in the binary's imports here); no macOS port of passt was found. libslirp does run on
  macOS (MacPorts has it, with glib2): a macOS user link would be a libslirp binding
  behind this same pump, the frame descriptor and the egress filter unchanged.
Throughput against the TAP link: bench/bridge.py --user.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import shutil
import socket
import struct
import subprocess
import tempfile

from ..core.egress import Egress
from ..core.errors import UserError
from ..core.l3 import BROADCAST, ETH_P_ARP, arp_packet, ethernet, stable_mac
from ..core.options import Forward, parse_forward
from .pump import BURST, FramePump

log = logging.getLogger(__name__)

PASST = "passt"
START_TIMEOUT = 5.0  # seconds for passt to answer its first ARP request
STOP_TIMEOUT = 2.0  # seconds for passt to exit once its client has gone
TO_STACK_LIMIT = 256 * 1024  # bytes queued for passt before the bridge's side is not read
READ_SIZE = 256 * 1024
LENGTH = struct.Struct("!I")
# passt's own noise where there is no syslog, and its notice about dropping root.
NOISE = ("Failed to send", "Don't run as root")


class UserLinkError(UserError):
    pass


def passt_option(forward: Forward) -> list[str]:
    """The host's port bound on loopback only: a forward does not expose the board to the
    host's network."""
    flag = "--tcp-ports" if forward.protocol == "tcp" else "--udp-ports"
    return [flag, f"127.0.0.1/{forward.host_port}:{forward.board_port}"]


class UserLink(FramePump):
    """What the bridge takes for its TAP when --link user: a frame descriptor (fileno),
    the MAC passt uses, and the counters of the pump and the egress filter
    (`user_stats`)."""

    offload = False
    KIND = "user"
    FATAL = (UserLinkError,)

    def __init__(self, name: str, *, host: str, peer: str, forwards: list[Forward],
                 nat: bool = False, mtu: int = 1500, mac: str | None = None,
                 peer_mac: str | None = None) -> None:
        host_mac = bytes.fromhex(mac.replace(":", "")) if mac else stable_mac(name)
        self.mac = host_mac.hex(":")
        self.forwards = list(forwards)
        self.egress = Egress(nat=nat, udp_reply_ports=[f.board_port for f in forwards
                                                        if f.protocol == "udp"])
        self._max_frame = mtu + 14 + 4
        self._log = tempfile.TemporaryFile()  # passt's messages; unlinked already
        self._process: subprocess.Popen[bytes] | None = None
        self._stack, passt_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with passt_end:
                self._process = self._spawn(
                    _passt_argv(passt_end.fileno(), host, peer, forwards, self.mac, mtu),
                    passt_end.fileno())
            self._check_started(host, peer, peer_mac)
        except BaseException:
            self._stop_passt()
            raise
        self._stack.setblocking(False)
        super().__init__(name)
        self.pump_counters.update(to_stack_frames=0, from_stack_frames=0, stack_full=0,
                                  oversize_from_stack=0)
        self._to_stack = bytearray()
        self._from_stack = bytearray()
        self.start()

    # --- what the bridge uses ---------------------------------------------------------

    def user_stats(self) -> dict[str, int]:
        """The pump's counters and the egress filter's refusals."""
        return {**self.pump_counters, **self.egress.counters()}

    def close(self) -> None:
        self.stop_pump()
        self._stop_passt()

    @property
    def passt_pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __repr__(self) -> str:
        return f"<UserLink {self.name} forwards={','.join(map(str, self.forwards))}>"

    # --- passt ------------------------------------------------------------------------

    def _spawn(self, argv: list[str], fd: int) -> subprocess.Popen[bytes]:
        if shutil.which(argv[0]) is None:
            raise UserLinkError("--link user needs passt, which is not installed "
                                "(Debian/Ubuntu: apt-get install passt)")
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                stderr=self._log, pass_fds=(fd,), start_new_session=True)

    def _check_started(self, host: str, peer: str, peer_mac: str | None) -> None:
        """Ask passt, as the board would, for the gateway's MAC: its answer shows it took
        its options and listens. A passt that exits instead says why, in one line."""
        board_mac = bytes.fromhex(peer_mac.replace(":", "")) if peer_mac else BROADCAST
        request = arp_packet(1, board_mac, ipaddress.ip_address(peer).packed, bytes(6),
                             ipaddress.ip_interface(host).ip.packed)
        frame = ethernet(BROADCAST, board_mac, ETH_P_ARP, request)
        self._stack.settimeout(START_TIMEOUT)
        try:
            self._stack.sendall(LENGTH.pack(len(frame)) + frame)
            answer = b""
            while len(answer) < LENGTH.size or len(answer) < LENGTH.size + LENGTH.unpack_from(
                    answer)[0]:
                data = self._stack.recv(READ_SIZE)
                if not data:
                    break
                answer += data
        except TimeoutError:
            raise UserLinkError(f"passt did not answer within {START_TIMEOUT:.0f} s: "
                                f"{self._passt_said()}") from None
        except OSError:
            answer = b""
        if not answer:
            assert self._process is not None
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            raise UserLinkError(f"passt refused to start: {self._passt_said()}")

    def _passt_said(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines()
                 if line.strip() and not line.startswith(NOISE)]
        return lines[-1] if lines else "no message"

    def _stop_passt(self) -> None:
        self._stack.close()
        process = self._process
        if process is not None and process.poll() is None:
            try:
                process.wait(STOP_TIMEOUT)  # --one-off: it exits once we hang up
            except subprocess.TimeoutExpired:
                log.warning("passt (pid %d) did not exit with its client gone; terminating it",
                            process.pid)
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._log.close()

    # --- the pump -------------------------------------------------------------------

    def _pump(self) -> None:
        sock, stack = self._pump_end, self._stack
        sock_fd, stack_fd = sock.fileno(), stack.fileno()
        # One byte more than the longest frame shows a longer one as oversize.
        frame_view = memoryview(bytearray(self._max_frame + 1))
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        masks = {sock_fd: -1, stack_fd: -1}
        while True:
            # Read the bridge while passt's queue has room, passt while the bridge's does.
            wanted = {sock_fd: (select.POLLIN if len(self._to_stack) < TO_STACK_LIMIT else 0)
                      | (select.POLLOUT if self._backlog else 0),
                      stack_fd: (0 if self._backlog else select.POLLIN)
                      | (select.POLLOUT if self._to_stack else 0)}
            for fd, mask in wanted.items():
                if masks[fd] != mask:
                    (poller.modify if masks[fd] >= 0 else poller.register)(fd, mask)
                    masks[fd] = mask
            events = self._poll(poller)
            if events is None:
                return
            for fd, mask in events:
                if fd == sock_fd:
                    if not self._bridge_side(mask, lambda: self._from_bridge(sock, frame_view)):
                        return  # the bridge closed its end
                else:
                    if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._from_passt(stack)
                    if mask & select.POLLOUT:
                        self._flush(stack)

    def _from_bridge(self, sock: socket.socket, view: memoryview) -> None:
        counters = self.pump_counters
        for _ in range(BURST):
            if len(self._to_stack) >= TO_STACK_LIMIT:
                break
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                break
            passed, replies = self.egress.check(view[:n])
            if replies:
                self._send(replies)
            if passed:
                self._to_stack += LENGTH.pack(n)
                self._to_stack += view[:n]
                counters["to_stack_frames"] += 1
        self._flush(self._stack)

    def _flush(self, stack: socket.socket) -> None:
        if not self._to_stack:
            return
        try:
            sent = stack.send(self._to_stack)
        except BlockingIOError:
            self.pump_counters["stack_full"] += 1
            return
        except OSError as exc:
            raise UserLinkError(f"passt's socket failed: {exc.strerror or exc}") from None
        del self._to_stack[:sent]
        if self._to_stack:
            self.pump_counters["stack_full"] += 1

    def _from_passt(self, stack: socket.socket) -> None:
        try:
            data = stack.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise
            raise UserLinkError(f"passt's socket failed: {exc.strerror or exc}") from None
        if not data:
            raise UserLinkError(f"passt exited: {self._passt_said()}")
        buffer = self._from_stack
        buffer += data
        frames, at = [], 0
        while len(buffer) - at >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buffer, at)
            if len(buffer) - at - LENGTH.size < length:
                break
            start = at + LENGTH.size
            at = start + length
            if length > self._max_frame:
                self.pump_counters["oversize_from_stack"] += 1
                continue
            frames.append(buffer[start:at])  # the slice is the one copy a frame needs
        del buffer[:at]
        self.pump_counters["from_stack_frames"] += len(frames)
        if frames:
            self._send(frames)


def _passt_argv(fd: int, host: str, peer: str, forwards: list[Forward], mac: str,
                mtu: int) -> list[str]:
    """passt's command line (passt(1) of 0.0~git20230309); ValueError-free: the addresses
    were checked by the option table and open_user_link."""
    gateway = ipaddress.ip_interface(host)
    argv = [PASST, "--foreground", "--one-off", "--quiet", "--fd", str(fd),
            "--ipv4-only", "--address", peer, "--netmask", str(gateway.network.prefixlen),
            "--gateway", str(gateway.ip), "--mac-addr", mac, "--mtu", str(mtu),
            "--no-dhcp", "--no-dhcpv6", "--no-ra", "--no-ndp"]
    for forward in forwards:
        argv += passt_option(forward)
    return argv


def open_user_link(name: str, *, addresses: list[str], peer: str | None, forwards: list[str],
                   nat: bool, mtu: int, mac: str | None, peer_mac: str | None) -> UserLink:
    """--link user from the bridge's options; one line naming what is missing or wrong."""
    ipv4 = [a for a in addresses if ipaddress.ip_interface(a).version == 4]
    if not ipv4:
        raise UserError("--link user needs the host's side as an IPv4 --ip ADDR/PREFIX (passt's "
                        "gateway address on the board's subnet, e.g. --ip 169.254.7.2/24)")
    if peer is None or ipaddress.ip_address(peer).version != 4:
        raise UserError("--link user needs the board's IPv4 address as --peer (the forwards' "
                        "destination, e.g. --peer 169.254.7.1)")
    host = ipaddress.ip_interface(ipv4[0])
    if ipaddress.ip_address(peer) not in host.network or ipaddress.ip_address(peer) == host.ip:
        raise UserError(f"--link user: --peer {peer} must be another address in --ip {host}'s "
                        f"subnet {host.network}")
    return UserLink(name, host=str(host), peer=peer, forwards=[parse_forward(f) for f in forwards],
                    nat=nat, mtu=mtu, mac=mac, peer_mac=peer_mac)
