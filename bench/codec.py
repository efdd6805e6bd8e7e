"""EEM codec throughput: the Cython codec against the pure-Python reference, one run.

Deframe: streams of back-to-back EEM packets cut into 16 KB full bulk IN transfers
(packets span transfers), CRC and sentinel mode, full-size (1514-byte) and minimum
(64-byte) Ethernet frames. Three paths:
  feed      Deframer.feed(), the API both implementations share (one Frame per frame)
  in place  Deframer.feed_buffer(), the Cython C path the bridge uses (eem_deframe on
            memory holding the carried bytes right before each transfer; frames come
            back as records, no per-frame Python object, GIL released)
  reference eembridge.codec.Deframer.feed()
Frame: Framer.pack() of the same frames into 1536-byte transfers (Cython and
reference), and in place (frame_buffer/close_buffer on frames already sitting 2 bytes
into their slots; one Python call per frame, so it measures call overhead for small
frames). Below the table, what bounds a deframer on the same bytes: zlib.crc32 (every
byte of a CRC packet goes through it) and memcpy.

    python3 bench/codec.py [--seconds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's eembridge
from eembridge import _eem as cython  # noqa: E402  (directly: a broken build must fail)
from eembridge import codec as reference  # noqa: E402

TRANSFER = 16384
STREAM = 4 << 20  # bytes of packets per stream (a multiple of TRANSFER)
FRAME_SIZES = (1514, 64)


def make_frames(frame_size: int, count: int = 64) -> list[bytes]:
    header = bytes.fromhex("020000000001020000000002") + b"\x08\x00"
    return [header + os.urandom(frame_size - len(header)) for _ in range(count)]


def make_stream(frames: list[bytes], crc: bool) -> bytes:
    framer = reference.Framer(crc=crc)
    packets = b"".join(framer.packet(f) for f in frames)
    return (packets * (STREAM // len(packets) + 1))[:STREAM]


def timed(step: Callable[[], tuple[int, int]], seconds: float) -> tuple[float, float]:
    """Run step() (returns bytes, frames done) until `seconds` passed: bytes/s, frames/s."""
    done_bytes = done_frames = 0
    start = time.perf_counter()
    while True:
        nbytes, nframes = step()
        done_bytes += nbytes
        done_frames += nframes
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done_bytes / elapsed, done_frames / elapsed


def deframe_feed(module, stream: bytes, seconds: float) -> tuple[float, float]:
    deframer = module.Deframer()
    transfers = [stream[i : i + TRANSFER] for i in range(0, len(stream), TRANSFER)]
    position = [0]

    def step() -> tuple[int, int]:
        transfer = transfers[position[0]]
        position[0] = (position[0] + 1) % len(transfers)
        frames = sum(1 for e in deframer.feed(transfer, False) if type(e) is reference.Frame)
        return len(transfer), frames

    return timed(step, seconds)


def deframe_in_place(stream: bytes, seconds: float) -> tuple[float, float]:
    """feed_buffer over the stream in one buffer, as a mirrored ring presents it."""
    memory = np.frombuffer(bytearray(stream), dtype=np.uint8)
    deframer = cython.Deframer()
    deframer.set_capacity(TRANSFER)

    def step() -> tuple[int, int]:
        frames = 0
        deframer.reset()  # start of the stream again (the tail packet is dropped)
        for offset in range(0, len(memory), TRANSFER):
            records, _ = deframer.feed_buffer(memory, offset, deframer.carried, TRANSFER, False)
            frames += len(records)
        return len(memory), frames

    return timed(step, seconds)


def frame_pack(module, frames: list[bytes], seconds: float) -> tuple[float, float]:
    framer = module.Framer(crc=True)
    nbytes = sum(map(len, frames))

    def step() -> tuple[int, int]:
        framer.pack(frames)
        return nbytes, len(frames)

    return timed(step, seconds)


def frame_in_place(frames: list[bytes], crc: bool, seconds: float) -> tuple[float, float]:
    """Frames already in transfer memory 2 bytes past their packet's start (where a TAP
    read would put them); frame_buffer() each, close_buffer() each batch."""
    framer = cython.Framer(crc=crc)
    memory = bytearray(len(frames) * (max(map(len, frames)) + 8) + 4096)
    batches: list[tuple[int, list[tuple[int, int]]]] = []  # (transfer start, [(offset, n)])
    start = length = 0
    packets: list[tuple[int, int]] = []
    for frame in frames:
        if length and not framer.fits(length + len(frame) + 6):
            batches.append((start, packets))
            start, length, packets = start + length + 2, 0, []
        memory[start + length + 2 : start + length + 2 + len(frame)] = frame
        packets.append((start + length, len(frame)))
        length += len(frame) + 6
    batches.append((start, packets))
    nbytes = sum(map(len, frames))
    frame_buffer, close_buffer = framer.frame_buffer, framer.close_buffer

    def step() -> tuple[int, int]:
        for transfer, batch in batches:
            size = 0
            for offset, n in batch:
                size += frame_buffer(memory, offset, n)
            close_buffer(memory, transfer, size)
        return nbytes, len(frames)

    return timed(step, seconds)


def bound(fn: Callable[[], None], nbytes: int, seconds: float) -> float:
    return timed(lambda: (fn(), (nbytes, 0))[1], seconds)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    s = args.seconds
    rows = []
    crc_in_c = {}  # zlib crc32 called from C on frame-sized blocks: the CRC work per frame
    for frame_size in FRAME_SIZES:
        frames = make_frames(frame_size)
        blocks = np.frombuffer(b"".join(frames) * 64, dtype=np.uint8)
        crc_in_c[frame_size] = bound(lambda b=blocks, n=frame_size: cython._crc32_blocks(b, n),
                                     len(blocks) // frame_size * frame_size, s)
        for crc in (True, False):
            stream = make_stream(frames, crc)
            feed = deframe_feed(cython, stream, s)
            place = deframe_in_place(stream, s)
            ref = deframe_feed(reference, stream, s)
            rows.append({"op": "deframe", "frame": frame_size, "mode": "crc" if crc else "sentinel",
                         "cython": feed, "in_place": place, "reference": ref})
        for crc in (True, False):
            pack = frame_pack(cython, frames * 16, s) if crc else None
            ref = frame_pack(reference, frames * 16, s) if crc else None
            place = frame_in_place(frames * 16, crc, s)
            rows.append({"op": "frame", "frame": frame_size, "mode": "crc" if crc else "sentinel",
                         "cython": pack, "in_place": place, "reference": ref})
    stream = make_stream(make_frames(1514), True)
    block = stream[:TRANSFER]
    source = np.frombuffer(stream, dtype=np.uint8)
    target = np.empty_like(source)
    bounds = {
        "zlib_crc32_16k": bound(lambda: zlib.crc32(block), len(block), s),
        "zlib_crc32_1514": bound(lambda: zlib.crc32(block[:1514]), 1514, s),
        "zlib_crc32_4m": bound(lambda: zlib.crc32(stream), len(stream), s),
        "memcpy_4m": bound(lambda: np.copyto(target, source), len(stream), s),
        "memcpy_16k": bound(lambda: bytearray(block), len(block), s),
    }
    for row in rows:
        for path in ("cython", "in_place", "reference"):
            if row[path] is not None:
                row[f"{path}_mb_s"], row[f"{path}_frames_s"] = row[path][0] / 1e6, row[path][1]
            del row[path]
        if row.get("reference_mb_s"):
            for path in ("cython", "in_place"):
                if row.get(f"{path}_mb_s"):
                    row[f"{path}_vs_reference"] = row[f"{path}_mb_s"] / row["reference_mb_s"]
        if row["op"] == "deframe" and row["mode"] == "crc":
            # Share of the in-place deframer's time spent in zlib's crc32 (the frames it
            # delivered per second times the time crc32 takes per frame, from C).
            row["in_place_crc32_share"] = (row["in_place_frames_s"] * row["frame"]
                                           / crc_in_c[row["frame"]])
    for frame_size, rate in crc_in_c.items():
        bounds[f"zlib_crc32_in_c_{frame_size}"] = rate
    if args.json:
        print(json.dumps({"transfer": TRANSFER, "seconds": s, "rows": rows,
                          "bounds_mb_s": {k: v / 1e6 for k, v in bounds.items()}}, indent=2))
        return
    print_table(rows, bounds, s)


def print_table(rows: list[dict], bounds: dict[str, float], seconds: float) -> None:
    def num(value: float | None, width: int, digits: int = 0) -> str:
        return f"{value:>{width}.{digits}f}" if value else f"{'-':>{width}}"

    def ratio(value: float | None, width: int) -> str:
        return f"{value:>{width - 1}.0f}x" if value else f"{'-':>{width}}"

    print(f"EEM codec, {TRANSFER}-byte transfers, {seconds:g} s per cell "
          "(MB/s of bytes fed for deframe, of Ethernet bytes for frame)")
    print(f"{'op':<8}{'frame':>6} {'mode':<9}{'cython MB/s':>12}{'frames/s':>11}"
          f"{'in-place MB/s':>14}{'frames/s':>11}{'ref MB/s':>10}{'frames/s':>10}"
          f"{'cy/ref':>8}{'in-pl/ref':>10}{'in crc32':>9}")
    for r in rows:
        share = r.get("in_place_crc32_share")
        print(f"{r['op']:<8}{r['frame']:>6} {r['mode']:<9}"
              f"{num(r.get('cython_mb_s'), 12)}{num(r.get('cython_frames_s'), 11)}"
              f"{num(r.get('in_place_mb_s'), 14)}{num(r.get('in_place_frames_s'), 11)}"
              f"{num(r.get('reference_mb_s'), 10, 1)}{num(r.get('reference_frames_s'), 10)}"
              f"{ratio(r.get('cython_vs_reference'), 8)}{ratio(r.get('in_place_vs_reference'), 10)}"
              f"{f'{share:>8.0%}' if share else f'{chr(45):>9}'}")
    b = {k: v / 1e6 for k, v in bounds.items()}
    print(f"bounds, MB/s: zlib crc32 from C on 1514-byte blocks {b['zlib_crc32_in_c_1514']:.0f}, "
          f"on 64-byte blocks {b['zlib_crc32_in_c_64']:.0f}; zlib.crc32 from Python on 16 KB "
          f"{b['zlib_crc32_16k']:.0f}, on 4 MB {b['zlib_crc32_4m']:.0f}; memcpy 4 MB "
          f"{b['memcpy_4m']:.0f}, 16 KB bytearray copy {b['memcpy_16k']:.0f}")
    print("'in crc32': share of the in-place deframer's time spent in zlib's crc32 (its "
          "frames/s x the C time per frame's CRC); the rest is parsing and call overhead.")
    print("frame rows: 'cython'/'ref' = pack() into 1536-byte transfers (CRC mode); 'in-place'"
          " = frame_buffer() per frame + close_buffer() per transfer, from Python.")


if __name__ == "__main__":
    main()
