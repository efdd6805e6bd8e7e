"""TCP throughput through bridge + simulated device vs the kernel-only veth ceiling.

Both links join the root namespace to a fresh namespace with the same MTU and no
offloads (TAP devices have none unless asked; veth's are turned off with ethtool), so
the ratio says what the userspace bridge costs relative to the kernel moving the same
frames. Prints one table; run as root:

    python3 bench/bridge.py [--mb 64] [--json] [--tun] [--user]

--tun adds the TUN link (--link tun: Ethernet translated by a Python pump thread between
a socketpair and the TUN) beside the TAP link, in the same run, and their ratio.
--user adds the user link (--link user: libslirp in a thread of its own, reached through
--forward ports on localhost): the same transfers, the clients connecting to the
forwarded localhost port instead of the board, beside the TAP link without offload (the
user link has none).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# This checkout's eembridge, not an installed one (the script's own directory is bench/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eembridge import CODEC  # noqa: E402
from eembridge.bridge import Bridge, BridgeOptions  # noqa: E402
from eembridge.link.netns import (  # noqa: E402
    configure_link,
    create_netns,
    delete_netns,
    free_linklocal_subnet,
    run_in_netns,
    unique_name,
)
from eembridge.sim.link import SimLink  # noqa: E402

CHUNK = bytes(1 << 16)


def cpu_seconds() -> float:
    """CPU of this process (bridge, simulated device) and of its waited-for children
    (the iperf3 ends)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# --user: the board's ports the transfers use, each reached through a forward.
USER_PORTS = {"tcp": 5301, "udp": 5303, "iperf": 5302}


def iperf_download(server_ns: str, server_ip: str, nbytes: int,
                   via: tuple[str, int] | None = None) -> float:
    """Seconds to stream nbytes from iperf3 in server_ns to iperf3 here (-R): the TCP
    ends are processes of their own, as on two real machines, not threads sharing the
    bridge's GIL."""
    port = str(USER_PORTS["iperf"] if via else 5201 + os.getpid() % 1000)
    target, target_port = (via[0], str(via[1])) if via else (server_ip, port)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip,
                               "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(50):
            client = subprocess.run(["iperf3", "-c", target, "-p", target_port, "-R", "-n",
                                     str(nbytes), "-J"], capture_output=True, text=True)
            try:
                report = json.loads(client.stdout)
            except ValueError:
                report = {"error": client.stderr.strip() or "no output"}
            result = report.get("end", {}).get("sum_received")
            if result and not report.get("error"):
                break
            # Not listening yet: refused directly; through a forward, slirp accepts and the
            # board's reset then ends the control connection.
            if not any(word in str(report.get("error")) for word in ("connect", "reset",
                                                                    "receive", "closed")):
                raise RuntimeError(f"iperf3: {report.get('error') or 'no result'}")
            time.sleep(0.1)  # the server is not listening yet
        else:
            raise RuntimeError(f"iperf3: {report.get('error')}")
        return float(result["seconds"]) * nbytes / float(result["bytes"])
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tcp_download(server_ns: str, server_ip: str, nbytes: int,
                 via: tuple[str, int] | None = None) -> float:
    """Seconds to stream nbytes from a server in server_ns to a client here."""
    listener = run_in_netns(server_ns, socket.create_server,
                            (server_ip, USER_PORTS["tcp"] if via else 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            left = nbytes
            while left > 0:
                left -= conn.send(CHUNK[: min(len(CHUNK), left)])

    thread = threading.Thread(target=serve)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(via or (server_ip, port), timeout=60) as client:
        buffer = bytearray(1 << 16)
        got = 0
        while got < nbytes:
            n = client.recv_into(buffer)
            if not n:
                break
            got += n
    elapsed = time.perf_counter() - start
    thread.join()
    listener.close()
    if got != nbytes:
        raise RuntimeError(f"short transfer: {got} of {nbytes}")
    return elapsed


_UDP_RECEIVER = """
import socket, sys
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind((sys.argv[1], int(sys.argv[2])))
r.settimeout(0.5)
print(r.getsockname()[1], flush=True)
n = 0
while True:
    try:
        r.recv(64)
    except OSError:
        break
    n += 1
print(n, flush=True)
"""

_UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
address, payload = (sys.argv[1], int(sys.argv[2])), bytes(22)
end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    for _ in range(100):
        try:
            s.sendto(payload, address)
        except OSError:
            pass  # queue full: that is the point of a flood
"""


def udp_small_frames(server_ns: str, server_ip: str, seconds: float,
                     via: tuple[str, int] | None = None) -> float:
    """Frames per second delivered for 64-byte Ethernet frames (22-byte UDP payload).
    Sender and receiver are processes of their own, not threads sharing the GIL."""
    receiver = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", _UDP_RECEIVER,
                                 server_ip, str(USER_PORTS["udp"] if via else 0)],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    target, target_port = (via[0], str(via[1])) if via else (server_ip, port)
    subprocess.run([sys.executable, "-c", _UDP_SENDER, target, target_port, str(seconds)],
                   check=True)
    received = int(receiver.stdout.readline())
    receiver.wait()
    return received / seconds


def measure(namespace: str, server_ip: str, nbytes: int,
            forwards: dict[str, int] | None = None) -> dict[str, float]:
    """forwards (--user): the localhost port forwarded to each of USER_PORTS."""
    def via(kind: str) -> tuple[str, int] | None:
        return ("127.0.0.1", forwards[kind]) if forwards else None

    tcp_download(namespace, server_ip, 1 << 20, via("tcp"))  # warm up: ARP, slow start
    cpu = cpu_seconds()
    seconds = tcp_download(namespace, server_ip, nbytes, via("tcp"))
    cpu = cpu_seconds() - cpu
    iperf_cpu = cpu_seconds()
    iperf_seconds = iperf_download(namespace, server_ip, nbytes, via("iperf"))
    iperf_cpu = cpu_seconds() - iperf_cpu
    return {
        "mb_per_s": nbytes / seconds / 1e6,
        "cpu_s_per_gb": cpu / (nbytes / 1e9),
        "iperf_mb_per_s": nbytes / iperf_seconds / 1e6,
        "iperf_cpu_s_per_gb": iperf_cpu / (nbytes / 1e9),
        "small_frames_per_s": udp_small_frames(namespace, server_ip, 2.0, via("udp")),
    }


def run_veth(nbytes: int, mtu: int) -> dict[str, float]:
    namespace = create_netns("eembench-")
    near, far = unique_name("vb"), unique_name("vb")
    subnet = free_linklocal_subnet()
    try:
        subprocess.run(["ip", "link", "add", near, "mtu", str(mtu), "type", "veth", "peer", "name", far,
                        "mtu", str(mtu), "netns", namespace], check=True)
        for name, ns in ((near, None), (far, namespace)):
            prefix = [] if ns is None else ["ip", "netns", "exec", ns]
            subprocess.run(prefix + ["ethtool", "-K", name, "tso", "off", "gso", "off", "gro", "off",
                                     "tx", "off", "rx", "off"], check=True, capture_output=True)
        configure_link(None, near, [f"{subnet[2]}/24"])
        configure_link(namespace, far, [f"{subnet[1]}/24"])
        return measure(namespace, str(subnet[1]), nbytes)
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True)
        delete_netns(namespace)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_bridge(nbytes: int, mtu: int, max_packet: int, link: str = "tap",
               offload: bool | None = None, batch: bool = True) -> dict[str, float]:
    subnet = free_linklocal_subnet()
    forwards = ({kind: free_port(socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
                 for kind in USER_PORTS} if link == "user" else None)
    with SimLink(f"{subnet[1]}/24", max_packet=max_packet, mtu=mtu, batch=batch) as sim:
        options = BridgeOptions(
            tap=unique_name("eembench"), addresses=[f"{subnet[2]}/24"], peer=str(subnet[1]),
            peer_mac=sim.mac, mtu=mtu, stats_socket=None, link=link, offload=offload,
            forwards=[f"{'udp' if kind == 'udp' else 'tcp'}:{port}:{USER_PORTS[kind]}"
                      for kind, port in (forwards or {}).items()])
        with Bridge(sim.connect, options) as bridge:
            if not bridge.connected.wait(10):
                raise RuntimeError("bridge did not connect")
            return measure(sim.namespace, str(subnet[1]), nbytes, forwards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64.0, help="MB per TCP transfer")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--max-packet", type=int, default=512, choices=(64, 512, 1024))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tun", action="store_true", help="also the TUN link (--link tun)")
    parser.add_argument("--user", action="store_true",
                        help="also the user link (--link user, through libslirp)")
    args = parser.parse_args()
    nbytes = int(args.mb * 1e6)
    veth = run_veth(nbytes, args.mtu)
    bridge = run_bridge(nbytes, args.mtu, args.max_packet)
    rows = {"veth (kernel ceiling)": veth, f"eembridge + sim (codec {CODEC})": bridge}
    tun = run_bridge(nbytes, args.mtu, args.max_packet, link="tun") if args.tun else None
    user = run_bridge(nbytes, args.mtu, args.max_packet, link="user") if args.user else None
    if tun is not None:
        # The TUN link has no offload: the TAP without it is the like-for-like row.
        rows["  the same, TAP --no-offload"] = run_bridge(nbytes, args.mtu, args.max_packet,
                                                          offload=False)
        rows["  the same, --link tun"] = tun
    if user is not None:
        if "  the same, TAP --no-offload" not in rows:
            rows["  the same, TAP --no-offload"] = run_bridge(nbytes, args.mtu, args.max_packet,
                                                              offload=False)
        rows["  the same, --link user (libslirp)"] = user
    ratio = bridge["mb_per_s"] / veth["mb_per_s"]
    ratio_iperf = bridge["iperf_mb_per_s"] / veth["iperf_mb_per_s"]
    ratio_small = bridge["small_frames_per_s"] / veth["small_frames_per_s"]
    if args.json:
        print(json.dumps({"rows": rows, "ratio_tcp": ratio, "ratio_tcp_iperf3": ratio_iperf,
                          "ratio_64b_frames": ratio_small,
                          **({"tun_over_tap": _ratios(tun, bridge),
                              "tun_over_tap_no_offload":
                                  _ratios(tun, rows["  the same, TAP --no-offload"])}
                             if tun else {}),
                          **({"user_over_tap_no_offload":
                                  _ratios(user, rows["  the same, TAP --no-offload"])}
                             if user else {})}, indent=2))
        return
    import eembridge

    print(f"eembridge from {Path(eembridge.__file__).parent}")
    print(f"TCP {args.mb:g} MB, MTU {args.mtu}, device max packet {args.max_packet}, batch device")
    print("TCP in-process: Python TCP ends as threads of the bridge's process; iperf3: TCP ends"
          " in processes of their own")
    print(f"{'link':<34}{'TCP MB/s':>10}{'CPU s/GB':>10}{'iperf3 MB/s':>12}{'CPU s/GB':>10}"
          f"{'64B frames/s':>14}")
    for name, row in rows.items():
        print(f"{name:<34}{row['mb_per_s']:>10.1f}{row['cpu_s_per_gb']:>10.1f}"
              f"{row['iperf_mb_per_s']:>12.1f}{row['iperf_cpu_s_per_gb']:>10.1f}"
              f"{row['small_frames_per_s']:>14.0f}")
    print(f"ratio eembridge/veth: TCP in-process {ratio:.3f}, TCP iperf3 {ratio_iperf:.3f}, "
          f"64-byte frames {ratio_small:.3f}")
    if tun is not None:
        print("ratio tun/tap: " + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(tun, bridge).items()))
        plain = rows["  the same, TAP --no-offload"]
        print("ratio tun/tap --no-offload: "
              + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(tun, plain).items()))
    if user is not None:
        plain = rows["  the same, TAP --no-offload"]
        print("ratio user/tap --no-offload: "
              + ", ".join(f"{k} {v:.3f}" for k, v in _ratios(user, plain).items()))


def _ratios(tun: dict[str, float], tap: dict[str, float]) -> dict[str, float]:
    return {"TCP in-process": tun["mb_per_s"] / tap["mb_per_s"],
            "TCP iperf3": tun["iperf_mb_per_s"] / tap["iperf_mb_per_s"],
            "64-byte frames": tun["small_frames_per_s"] / tap["small_frames_per_s"]}


if __name__ == "__main__":
    main()
