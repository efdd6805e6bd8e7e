"""EEM codec throughput: the Cython codec against the pure-Python reference, one run.

Deframe: streams of back-to-back EEM packets cut into 16 KB full bulk IN transfers
(packets span transfers), CRC and sentinel mode, full-size (1514-byte) and minimum
(64-byte) Ethernet frames. Three paths:
  feed      Deframer.feed(), the API both implementations share (one Frame per frame)
  in place  Deframer.feed_buffer(), the Cython C path the bridge uses (eem_deframe on
            memory holding the carried bytes right before each transfer; frames come
            back as records, no per-frame Python object, GIL released)
  reference eembridge.core.codec.Deframer.feed()
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
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

# This checkout's eembridge, or another tree's (--checkout DIR, for before/after tables).
_checkout = Path(__file__).resolve().parent.parent
if "--checkout" in sys.argv:
    _checkout = Path(sys.argv[sys.argv.index("--checkout") + 1]).resolve()
sys.path.insert(0, str(_checkout))
from eembridge._fast import eem as cython  # noqa: E402  (directly: a broken build must fail)
from eembridge.core import codec as reference  # noqa: E402

TRANSFER = 16384
STREAM = 4 << 20  # bytes of packets per stream (a multiple of TRANSFER)
FRAME_SIZES = (1514, 64)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return ~(int.from_bytes(data, "big") % 0xFFFF) & 0xFFFF


def make_frames(frame_size: int, count: int = 64) -> list[bytes]:
    """UDP/IPv4 frames of frame_size bytes, random payload, right checksums: what the
    deframer's plausibility and checksum rules (codec.py, "Trust") take."""
    frames = []
    for _ in range(count):
        data = os.urandom(frame_size - 14 - 20 - 8)
        udp = bytearray(struct.pack("!HHHH", 1, 2, 8 + len(data), 0) + data)
        pseudo = bytes([10, 0, 0, 2, 10, 0, 0, 1, 0, 17]) + struct.pack("!H", len(udp))
        udp[6:8] = struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                                   bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])))
        ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
        frames.append(bytes.fromhex("020000000001020000000002") + b"\x08\x00" + ip + udp)
    return frames


def make_stream(frames: list[bytes], crc: bool) -> bytes:
    framer = reference.Framer(crc=crc)
    packets = b"".join(framer.packet(f) for f in frames)
    return (packets * (STREAM // len(packets) + 1))[:STREAM]


def timed(step: Callable[[], tuple[int, int]], seconds: float,
          clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Run step() (returns bytes, frames done) until `seconds` passed: bytes/s, frames/s."""
    done_bytes = done_frames = 0
    start = clock()
    while True:
        nbytes, nframes = step()
        done_bytes += nbytes
        done_frames += nframes
        elapsed = clock() - start
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


def _ipv4_packet(length: int, crc_bit: bool, check: bytes) -> bytes:
    """An EEM data packet holding a plausible IPv4 frame (to the group address
    01:00:5e:00:00:01) of bmLength `length`, with the given 4-byte check."""
    frame_len = length - 4
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, frame_len - 14, 0, 0, 64, 17, 0,
                               bytes(4), bytes(4)))
    total = sum(struct.unpack("!10H", ip))
    total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    frame = bytes.fromhex("01005e000001020000000002") + b"\x08\x00" + bytes(ip)
    frame += bytes(frame_len - len(frame))
    return struct.pack("<H", (0x4000 if crc_bit else 0) | length) + frame + check


def _garbage_patterns() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes repeated to fill the stream, max_length)."""
    rng = np.random.default_rng(7)
    random = rng.bytes(1 << 20)
    longest = 16383
    plausible_bad_crc = _ipv4_packet(1522, True, b"\0\0\0\0")
    plausible_long = _ipv4_packet(longest, True, b"\0\0\0\0")
    # A plausible sentinel frame, its sentinel broken, right after a header claiming
    # it: every candidate is plausible until the sentinel compare.
    plausible_no_sentinel = _ipv4_packet(1522, False, b"\xde\xad\xbe\xee")
    # Short CRC candidates at every other byte (bmLength 18, bmCRC 1).
    short_crc = b"\x12\x40"
    # DE AD BE EF every 20 bytes with data headers (bmLength 18) right before each
    # position 18 bytes earlier: sentinel candidates that verify, then are refused.
    sentinel_every_20 = (b"\x12\x00" + bytes(14) + b"\xde\xad\xbe\xef")
    # A valid tiny packet, then a header claiming max_length with a wrong CRC: the
    # in-sync check runs, fails, the scan finds the next tiny packet at once.
    tiny = _ipv4_packet(18 + 24, False, b"\xde\xad\xbe\xef")
    tiny_then_bad = tiny + struct.pack("<H", 0x4000 | 1522)
    return {
        "random": (random, DEFAULT_MAX_LENGTH_),
        "random, max_length 16383": (random, longest),
        "F2 45 repeated (CRC, bmLength 1522)": (b"\xf2\x45", DEFAULT_MAX_LENGTH_),
        "FF 7F repeated (CRC, bmLength 16383)": (b"\xff\x7f", longest),
        "F2 05 repeated (sentinel, bmLength 1522)": (b"\xf2\x05", DEFAULT_MAX_LENGTH_),
        "12 40 repeated (CRC, bmLength 18)": (short_crc, DEFAULT_MAX_LENGTH_),
        "all zero (ZLPs)": (bytes(4096), DEFAULT_MAX_LENGTH_),
        "all 0xFF (reserved commands)": (b"\xff" * 4096, DEFAULT_MAX_LENGTH_),
        "plausible IPv4, CRC wrong, back to back": (plausible_bad_crc, DEFAULT_MAX_LENGTH_),
        "plausible IPv4 16383, CRC wrong": (plausible_long, longest),
        "plausible IPv4, sentinel wrong": (plausible_no_sentinel, DEFAULT_MAX_LENGTH_),
        "sentinel every 20 bytes": (sentinel_every_20, DEFAULT_MAX_LENGTH_),
        "valid tiny packet + bad 1522 CRC header": (tiny_then_bad, DEFAULT_MAX_LENGTH_),
    }


DEFAULT_MAX_LENGTH_ = 1522
GARBAGE_STREAM = 2 << 20


def garbage_rate(pattern: bytes, max_length: int, seconds: float, module=None) -> float:
    """MB/s of garbage deframed: in place (Cython) or, with module, through feed()."""
    stream = (pattern * (GARBAGE_STREAM // len(pattern) + 1))[:GARBAGE_STREAM]
    if module is not None:
        deframer = module.Deframer(max_length=max_length)
        transfers = [stream[i : i + TRANSFER] for i in range(0, len(stream), TRANSFER)]
        where = [0]

        def feed_step() -> tuple[int, int]:
            transfer = transfers[where[0]]
            where[0] = (where[0] + 1) % len(transfers)
            return len(transfer), len(deframer.feed(transfer, False))

        return timed(feed_step, seconds, time.thread_time)[0] / 1e6
    memory = np.frombuffer(bytearray(stream), dtype=np.uint8)
    deframer = cython.Deframer(max_length=max_length)
    deframer.set_capacity(TRANSFER)
    offsets = list(range(0, len(memory), TRANSFER))
    at = [0]

    def step() -> tuple[int, int]:
        if at[0] == len(offsets):
            deframer.reset()
            at[0] = 0
        offset = offsets[at[0]]
        at[0] += 1
        records, _ = deframer.feed_buffer(memory, offset, deframer.carried, TRANSFER, False)
        return TRANSFER, len(records)

    return timed(step, seconds, time.thread_time)[0] / 1e6


def garbage_main(seconds: float, with_reference: bool, as_json: bool) -> None:
    rows = []
    for name, (pattern, max_length) in _garbage_patterns().items():
        row = {"pattern": name, "max_length": max_length,
               "cython_mb_s": garbage_rate(pattern, max_length, seconds)}
        if with_reference:
            row["reference_mb_s"] = garbage_rate(pattern, max_length, seconds, reference)
        rows.append(row)
        if not as_json:
            ref = f"{row['reference_mb_s']:>10.2f}" if with_reference else ""
            print(f"{name:<44}{max_length:>6}{row['cython_mb_s']:>10.1f}{ref}", flush=True)
    worst = min(rows, key=lambda r: r["cython_mb_s"])
    if as_json:
        print(json.dumps({"checkout": str(_checkout), "transfer": TRANSFER, "rows": rows,
                          "worst": worst["pattern"]}, indent=2))
    else:
        print(f"worst (Cython, in place): {worst['pattern']}: {worst['cython_mb_s']:.1f} MB/s")


def _searched_patterns(count: int, seed: int):
    """`count` generated garbage patterns (name, bytes), five families in turn: short
    random periods, CRC headers of random length before random bytes, sentinels at
    random strides after random lengths, random data with every header a data packet,
    and plausible IPv4 frames of random length with a wrong check. The named table
    holds the worst of each family found so far; this looks for worse."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        family = i % 5
        if family == 0:
            period = int(rng.integers(2, 64))
            yield f"period {period}, random", rng.bytes(period)
        elif family == 1:
            length, fill = int(rng.integers(14, 16384)), rng.bytes(int(rng.integers(0, 64)))
            yield f"CRC header bmLength {length} + {len(fill)} random", (
                struct.pack("<H", 0x4000 | length) + fill)
        elif family == 2:
            stride, length = int(rng.integers(4, 200)), int(rng.integers(14, 16384))
            pattern = bytearray(rng.bytes(stride))
            pattern[0:2] = struct.pack("<H", length)
            pattern[-4:] = b"\xde\xad\xbe\xef"
            yield f"sentinel every {stride} bytes, bmLength {length}", bytes(pattern)
        elif family == 3:
            data = bytearray(rng.bytes(4096))
            data[1::2] = bytes(b & 0x3F for b in data[1::2])  # bmType 0, bmCRC 0 or 1
            yield "random, every header a data packet", bytes(data)
        else:
            length = int(rng.integers(60, 16383))
            yield f"plausible IPv4 bmLength {length}, check wrong", _ipv4_packet(
                length, bool(rng.integers(0, 2)), rng.bytes(4))


def search_main(count: int, seed: int, seconds: float) -> None:
    """Every generated pattern at max_length 1522 and 16383; the worst eight, and the
    named worst (random, max_length 16383) measured in the same run for scale."""
    rows = []
    for name, pattern in _searched_patterns(count, seed):
        for max_length in (DEFAULT_MAX_LENGTH_, 16383):
            rows.append((garbage_rate(pattern, max_length, seconds), name, max_length))
    rows.sort()
    named = garbage_rate(_garbage_patterns()["random, max_length 16383"][0], 16383, 1.0)
    print(f"{count} generated patterns (seed {seed}) x 2 max_lengths, {seconds:g} s each; "
          f"MB/s; for scale, random with max_length 16383: {named:.1f}")
    for rate, name, max_length in rows[:8]:
        print(f"{name:<52}{max_length:>6}{rate:>10.1f}")


def bound(fn: Callable[[], None], nbytes: int, seconds: float) -> float:
    return timed(lambda: (fn(), (nbytes, 0))[1], seconds)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--garbage", action="store_true", help="garbage patterns instead")
    parser.add_argument("--reference", action="store_true", help="with --garbage: the reference too")
    parser.add_argument("--checkout", type=Path, help="run another tree's eembridge")
    parser.add_argument("--search", type=int, metavar="N",
                        help="with --garbage: N generated patterns besides the named ones, "
                             "the worst eight shown")
    parser.add_argument("--seed", type=int, default=1, help="with --search (default 1)")
    args = parser.parse_args()
    s = args.seconds
    if args.garbage and args.search:
        search_main(args.search, args.seed, s)
        return
    if args.garbage:
        if not args.json:
            print(f"EEM garbage, {_checkout}, {TRANSFER}-byte full transfers, {s:g} s per cell; MB/s")
            print(f"{'pattern':<44}{'maxlen':>6}{'cython':>10}{'reference' if args.reference else '':>10}")
        garbage_main(s, args.reference, args.json)
        return
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
