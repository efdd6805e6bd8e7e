"""Deframe and frame throughput: Cython codec vs the pure-Python reference, one run.

Streams of 16 KB bulk IN transfers holding back-to-back EEM packets, CRC and sentinel
mode, full-size (1514-byte) and minimum (64-byte) frames. Also raw zlib.crc32 and
memcpy on the same bytes, which bound what any deframer can do. Prints one table:

    python3 bench/codec.py [--seconds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

from eembridge import _eem as cython  # directly: a broken build must fail, not fall back
from eembridge import codec as reference
from eembridge.codec import Framer

TRANSFER = 16384


def make_transfers(frame_size: int, crc: bool, total: int = 4 << 20) -> tuple[list[bytes], int]:
    framer = Framer(crc=crc, max_transfer=1 << 20, max_packet=512)
    frame = bytes(12) + b"\x08\x00" + os.urandom(frame_size - 14)
    count = total // (frame_size + 6)
    (stream,) = framer.pack([frame] * min(count, (1 << 20) // (frame_size + 6)))
    stream = stream * (total // len(stream) + 1)
    transfers = [stream[i : i + TRANSFER] for i in range(0, total, TRANSFER)]
    return transfers, sum(map(len, transfers))


def time_deframe(module, transfers: list[bytes], seconds: float) -> tuple[float, float]:
    deframer = module.Deframer()
    done_bytes, start = 0, time.perf_counter()
    while True:
        for transfer in transfers:
            deframer.feed(transfer, False)  # full transfers: packets span them
        done_bytes += sum(map(len, transfers))
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done_bytes / elapsed, deframer.counters()["frames"] / elapsed


def time_in_place(transfers: list[bytes], seconds: float) -> tuple[float, float]:
    """deframe_into over one contiguous buffer (how a mirrored ring presents the stream):
    frames come out as offsets, with no per-frame Python object."""
    stream = bytearray(b"".join(transfers))
    sizes = [len(t) for t in transfers]
    done_bytes, frames, start = 0, 0, time.perf_counter()
    while True:
        deframer = cython.Deframer()
        pos = 0
        for n in sizes:
            deframer.deframe_into(stream, pos, n, False)
            pos += n
        done_bytes += pos
        frames += deframer.counters()["frames"]
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done_bytes / elapsed, frames / elapsed


def time_bytes(fn, data: bytes, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(data)
        n += len(data)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for frame_size in (1514, 64):
        for crc in (True, False):
            transfers, _ = make_transfers(frame_size, crc)
            fast_bps, fast_fps = time_deframe(cython, transfers, args.seconds)
            place_bps, place_fps = time_in_place(transfers, args.seconds)
            ref_bps, ref_fps = time_deframe(reference, transfers[: max(1, len(transfers) // 16)],
                                            args.seconds)
            rows.append({"frame": frame_size, "mode": "crc" if crc else "sentinel",
                         "cython_mb_s": fast_bps / 1e6, "cython_frames_s": fast_fps,
                         "in_place_mb_s": place_bps / 1e6, "in_place_frames_s": place_fps,
                         "reference_mb_s": ref_bps / 1e6, "reference_frames_s": ref_fps,
                         "ratio": fast_bps / ref_bps, "ratio_in_place": place_bps / ref_bps})
    block = os.urandom(TRANSFER)
    bounds = {"zlib_crc32_mb_s": time_bytes(zlib.crc32, block, args.seconds) / 1e6,
              "memcpy_mb_s": time_bytes(bytearray, block, args.seconds) / 1e6}
    if args.json:
        print(json.dumps({"deframe": rows, "bounds": bounds}, indent=2))
        return
    print(f"deframe, {TRANSFER}-byte transfers, {args.seconds:g} s per cell")
    print(f"{'frame':>6} {'mode':>9} {'feed MB/s':>10} {'frames/s':>10} {'in-place MB/s':>14} "
          f"{'frames/s':>10} {'ref MB/s':>9} {'frames/s':>9} {'feed/ref':>9} {'in-place/ref':>13}")
    for r in rows:
        print(f"{r['frame']:>6} {r['mode']:>9} {r['cython_mb_s']:>10.0f} {r['cython_frames_s']:>10.0f} "
              f"{r['in_place_mb_s']:>14.0f} {r['in_place_frames_s']:>10.0f} "
              f"{r['reference_mb_s']:>9.1f} {r['reference_frames_s']:>9.0f} {r['ratio']:>8.0f}x "
              f"{r['ratio_in_place']:>12.0f}x")
    print(f"bounds: zlib.crc32 {bounds['zlib_crc32_mb_s']:.0f} MB/s, "
          f"memcpy (bytearray copy) {bounds['memcpy_mb_s']:.0f} MB/s")


if __name__ == "__main__":
    main()
