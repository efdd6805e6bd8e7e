"""memcpy-into-ring throughput from Python, 16 KB chunks (one table).

Each row runs one thread doing produce + consume per chunk, for --seconds:
  ring memoryview  reserve(n), view[:] = chunk, commit(n), consume(n)
  ring numpy       reserve(n), numpy.copyto(frombuffer(view), chunk), commit, consume
  plain memoryview the same copy into a plain bytearray's memoryview: no ring
The ring size is not a multiple of the chunk, so chunks regularly straddle the end of
the first mapping: the mirror makes those copies contiguous too.

    python3 bench/ring.py [--seconds 1.0] [--chunk 16384] [--ring-size 1052672]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Runnable alone from a source checkout, with the extension built in place.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eembridge._fast.ring import Ring  # noqa: E402


def _rate(step: Callable[[], None], chunk: int, seconds: float) -> tuple[float, float]:
    """(GB/s, microseconds per chunk) of calling step() for about `seconds`."""
    for _ in range(100):  # warm caches and page in the ring
        step()
    calls, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            step()
        calls += 1000
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - started
    return calls * chunk / elapsed / 1e9, elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per row (default 1)")
    parser.add_argument("--chunk", type=int, default=16 * 1024, help="bytes per copy")
    parser.add_argument(
        "--ring-size", type=int, default=1024 * 1024 + 4096, help="ring bytes (page-rounded)"
    )
    args = parser.parse_args()
    chunk_size = args.chunk
    chunk = bytes(range(256)) * (chunk_size // 256) + bytes(chunk_size % 256)
    chunk_array = np.frombuffer(chunk, dtype=np.uint8)

    ring = Ring(args.ring_size)

    def ring_memoryview() -> None:
        view = ring.reserve(chunk_size)
        view[:] = chunk
        ring.commit(chunk_size)
        ring.consume(chunk_size)

    def ring_numpy() -> None:
        view = ring.reserve(chunk_size)
        np.copyto(np.frombuffer(view, dtype=np.uint8), chunk_array)
        ring.commit(chunk_size)
        ring.consume(chunk_size)

    plain = memoryview(bytearray(ring.size + chunk_size))
    offset = 0

    def plain_memoryview() -> None:
        nonlocal offset
        plain[offset : offset + chunk_size] = chunk
        offset = (offset + chunk_size) % ring.size

    rows = [
        ("ring memoryview", ring_memoryview),
        ("ring numpy", ring_numpy),
        ("plain memoryview (no ring)", plain_memoryview),
    ]
    print(
        f"memcpy into ring, {chunk_size} B chunks, ring {ring.size} B, {args.seconds:g} s per row"
    )
    print(f"{'path':<28}{'GB/s':>8}{'us/chunk':>11}")
    for name, step in rows:
        gbps, micros = _rate(step, chunk_size, args.seconds)
        print(f"{name:<28}{gbps:>8.2f}{micros:>11.2f}")


if __name__ == "__main__":
    main()
