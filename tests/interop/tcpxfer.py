"""One TCP transfer of N deterministic bytes, checked by sha256 on both ends.

Runs inside the guest (host side in the root netns, peer side via
`ip netns exec peer`). Each end prints one JSON line: role, bytes, sha256, seconds.

    tcpxfer.py serve --port 5001 --send 8388608        # peer sends 8 MB
    tcpxfer.py connect 169.254.77.2 5001 --recv        # host receives, prints sha256
    tcpxfer.py expect 8388608                          # sha256 the sender must produce

`serve --ready` first prints {"listening": PORT} once it listens, so a caller can start
the other end without polling (bench/bridge.py: through a forward, a connection made
before the board listens is accepted by the forwarder, then reset).

The payload is random.Random(seed).randbytes(n), so both ends and the checker agree
without shipping the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 64 * 1024


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def pump(sock: socket.socket, send: int | None, seed: int) -> dict[str, object]:
    """Send `send` bytes then half-close, or (send is None) receive until EOF."""
    digest = hashlib.sha256()
    total = 0
    view = memoryview(payload(send, seed)) if send is not None else None  # not timed
    start = time.monotonic()
    if send is not None:
        assert view is not None
        for off in range(0, send, CHUNK):
            piece = view[off:off + CHUNK]
            sock.sendall(piece)
            digest.update(piece)
            total += len(piece)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver's close: the data is then all across
    else:
        while chunk := sock.recv(CHUNK):
            digest.update(chunk)
            total += len(chunk)
    secs = time.monotonic() - start
    return {"bytes": total, "sha256": digest.hexdigest(), "seconds": round(secs, 3),
            "mbit_s": round(total * 8 / secs / 1e6, 1) if secs > 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("serve", "connect"):
        p = sub.add_parser(name)
        if name == "connect":
            p.add_argument("host")
            p.add_argument("port", type=int)
            p.add_argument("--retry", type=float, default=10.0, help="seconds to retry connecting")
        else:
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--bind", default="0.0.0.0")
            p.add_argument("--ready", action="store_true", help='print {"listening": PORT} first')
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--send", type=int, metavar="N")
        g.add_argument("--recv", action="store_true")
        p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("expect")
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if args.mode == "expect":
        print(hashlib.sha256(payload(args.n, args.seed)).hexdigest())
        return 0
    if args.mode == "serve":
        with socket.create_server((args.bind, args.port)) as srv:
            if args.ready:
                print(json.dumps({"listening": srv.getsockname()[1]}), flush=True)
            sock, _ = srv.accept()
    else:
        deadline = time.monotonic() + args.retry
        while True:
            try:
                sock = socket.create_connection((args.host, args.port), timeout=30)
                break
            except OSError:  # server not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    with sock:
        sock.settimeout(120)
        result = pump(sock, args.send, args.seed)
    result["role"] = f"{args.mode}-{'send' if args.send is not None else 'recv'}"
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
