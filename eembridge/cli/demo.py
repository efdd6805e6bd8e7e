"""`eembridge demo`: the main job on a simulated instrument, end to end, verified.

The simulated device plays an instrument's measuring module: a TCP server in its own
network namespace streams an OTDR trace over EEM, through a lossy simulated USB link
and the bridge, to a client on the host. The client checks the SHA-256; the summary
says what the link did. Exit status 1 if anything arrived wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from ..bridge import Bridge, BridgeOptions
from ..core.errors import UserError
from ..core.options import Choice, Integer, Number, Option, Switch
from ..core.options import add_arguments as add_options
from ..link.netns import NetnsThread, free_linklocal_subnet, run_in_netns, unique_name
from .assemble import needs_privileges
from .trace import otdr_trace

PORT = 5025  # SCPI raw socket port, as instruments use


OPTIONS = (
    Option("--size", Number(0.001, 1000.0, unit="MB"), "trace size in MB (default 24)", 24.0,
           metavar="MB"),
    Option("--loss", Number(0.0, 1.0),
           "probability a USB packet is lost (default 0.01 on the tap link, 0.002 on the user "
           "link: libslirp's TCP has no SACK and a retransmission timeout of a second or more, "
           "so at 0.01 a 64-byte-packet device's frame loss slows its transfer to minutes)",
           None, metavar="P"),
    Option("--flip", Number(0.0, 1.0), "probability of a flipped bit per packet", 0.0,
           metavar="P"),
    Option("--max-packet", Choice(("64", "512", "1024"), (64, 512, 1024)),
           "the device's bulk max packet size (default 64)", 64),
    Option("--device-tx", Choice(("crc", "sentinel")), "how the device checks its frames",
           "sentinel"),
    Option("--batch", Switch(), "device batches packets across transfers", False,
           action="store_true"),
    Option("--mtu", Integer(576, 9000), "the link's MTU (default 1500)", 1500),
    Option("--seed", Integer(0, (1 << 64) - 1), "seed of the trace and the faults (default 1)", 1),
    Option("--timeout", Number(0.0, 86400.0, low_open=True, unit="seconds"),
           "give up after this many seconds (default 600)", 600.0),
    Option("--json", Switch(), "print one JSON summary, no progress bar", False,
           action="store_true"),
    Option("--link", Choice(("auto", "tap", "user")),
           "tap: a TAP on the host and the device in a network namespace (needs root); user: "
           "no root at all, the device in an unprivileged user namespace and the trace "
           "through libslirp and a forwarded localhost port (--link user); auto (default): tap "
           "as root, user otherwise", "auto"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


QUERY = b":TRACE:DATA?\n"  # SCPI: the client asks, the instrument answers


def _serve_trace(listener: socket.socket, trace: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        request = b""
        while not request.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return
            request += chunk
        conn.sendall(trace)
        conn.shutdown(socket.SHUT_WR)


def _receive(sock: socket.socket, total: int, progress: Any, task: Any, deadline: float) -> tuple[int, str]:
    digest = hashlib.sha256()
    received = 0
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        n = sock.recv_into(view)
        if n == 0:
            break
        digest.update(view[:n])
        received += n
        if progress is not None:
            progress.update(task, completed=received)
    return received, digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    from ..sim.link import SimLink
    from ..sim.userns import UserNsSimLink

    size = int(args.size * 1_000_000)
    if size <= 0:
        raise UserError("--size must be positive")
    trace = otdr_trace(size, seed=args.seed)
    expected = hashlib.sha256(trace).hexdigest()
    subnet = free_linklocal_subnet()
    device_ip, host_ip = f"{subnet[1]}/{subnet.prefixlen}", f"{subnet[2]}/{subnet.prefixlen}"
    link = args.link if args.link != "auto" else ("tap" if os.geteuid() == 0 else "user")
    device = dict(address=device_ip, max_packet=args.max_packet, tx_crc=args.device_tx == "crc",
                  batch=args.batch, flip=args.flip, mtu=args.mtu, seed=args.seed,
                  loss=args.loss if args.loss is not None else (0.002 if link == "user" else 0.01))
    if link == "user":
        sim: Any = UserNsSimLink(**device)
    else:
        with needs_privileges("eembridge demo (--link user runs without root)"):
            sim = SimLink(**device)
    with sim:
        options = BridgeOptions(tap=unique_name("eemdemo"), addresses=[host_ip], peer=str(subnet[1]),
                                peer_mac=sim.mac, mtu=args.mtu, stats_socket=None)
        if link == "user":
            host_port = _free_port()
            options = replace(options, link="user", forwards=[f"tcp:{host_port}:{PORT}"])
        with Bridge(sim.connect, options) as bridge:
            if not bridge.connected.wait(10):
                raise UserError("the simulated device did not connect within 10 s")
            if link == "user":
                # The board's server runs in its namespace's child (sim/userns.py), which
                # makes the same trace from the same seed.
                sim.call(f"{__name__}:listen_in_child", str(subnet[1])).result(30)
                server: Any = sim.call(f"{__name__}:serve_in_child", size, args.seed)
                connect, source = ("127.0.0.1", host_port), None
            else:
                listener = run_in_netns(sim.namespace, _listen, str(subnet[1]))
                server = NetnsThread(sim.namespace, _serve_trace, listener, trace)
                server.start()
                connect, source = (str(subnet[1]), PORT), (str(subnet[2]), 0)
            started = time.monotonic()
            deadline = started + args.timeout
            try:
                client = socket.create_connection(connect, timeout=30, source_address=source)
                with client:
                    # Asked for, as an instrument's trace is.
                    client.sendall(QUERY)
                    if args.json:
                        received, digest = _receive(client, size, None, None, deadline)
                    else:
                        from rich.progress import (
                            BarColumn,
                            DownloadColumn,
                            Progress,
                            TransferSpeedColumn,
                        )

                        with Progress("[progress.description]{task.description}", BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn()) as progress:
                            task = progress.add_task("OTDR trace", total=size)
                            received, digest = _receive(client, size, progress, task, deadline)
            except OSError as exc:
                cause = f" (bridge: {bridge.error})" if bridge.error else ""
                raise UserError(f"the trace transfer failed: {exc}{cause}") from None
            elapsed = time.monotonic() - started
            if link == "user":
                server.result(10)
            else:
                server.join_and_raise(10)
                listener.close()
            rtts = []
            for _ in range(5):
                try:
                    rtts.append(bridge.echo(timeout=1.0))
                except TimeoutError:
                    pass
            stats = bridge.stats()
        faults = sim.fault_counters()
    ok = received == size and digest == expected
    summary = {
        "ok": ok,
        "link": link,
        "codec": stats["codec"],
        "bytes_expected": size,
        "bytes_received": received,
        "sha256_expected": expected,
        "sha256_received": digest,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(received / elapsed / 1e6, 3) if elapsed else None,
        "usb_faults": faults,
        "eem_rx": stats["rx"],
        "bridge": stats["bridge"],
        "drop_reasons": stats["drop_reasons"],
        "echo_rtt_ms": [round(r * 1000, 3) for r in rtts],
        "echo_lost": 5 - len(rtts),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if ok else 1


def _listen(ip: str) -> socket.socket:
    # Created in a thread inside the device's namespace: the socket stays there.
    return socket.create_server((ip, PORT))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_CHILD_LISTENERS: list[socket.socket] = []


def listen_in_child(ip: str) -> bool:
    """In sim/userns.py's child: listen before the host connects (the user link's stack
    would otherwise find the port closed and end the forwarded connection at once)."""
    _CHILD_LISTENERS.append(_listen(ip))
    return True


def serve_in_child(size: int, seed: int) -> bool:
    with _CHILD_LISTENERS.pop() as listener:
        _serve_trace(listener, otdr_trace(size, seed=seed))
    return True


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rx = s["eem_rx"]
    table = Table(title="eembridge demo: OTDR trace over a simulated lossy EEM link")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("trace", f"{s['bytes_received']:,} of {s['bytes_expected']:,} bytes")
    table.add_row("SHA-256", "match" if s["ok"] else "MISMATCH")
    table.add_row("throughput", f"{s['mb_per_s']} MB/s in {s['seconds']} s")
    lost = s["usb_faults"]
    table.add_row("USB faults injected", ", ".join(f"{k} {v}" for k, v in lost.items() if v) or "none")
    table.add_row("EEM frames delivered", f"{rx['frames']:,}")
    reasons = ("crc_errors", "sentinel_errors", "oversize", "runts", "truncated",
               "reserved_commands", "unconfirmed_commands")
    table.add_row("EEM packets dropped", ", ".join(f"{k} {rx[k]}" for k in reasons if rx[k]) or "none")
    table.add_row("resyncs / bytes skipped", f"{rx['resyncs']} / {rx['bytes_skipped']:,}")
    rtts = s["echo_rtt_ms"]
    table.add_row("EEM echo RTT", (f"min {min(rtts)} ms, max {max(rtts)} ms" if rtts else "no answer")
                  + (f", {s['echo_lost']} lost" if s["echo_lost"] else ""))
    Console().print(table)
    if not s["ok"]:
        print("eembridge demo: the trace did NOT arrive intact", file=sys.stderr)

