"""Differential tests: the Cython codec equals the reference on every input.

The reference (eembridge.codec) is the specification. Hypothesis generates EEM streams
(well-formed, corrupted, and pure noise), cuts them into transfers of random sizes with
random short flags, and both implementations must emit identical events and counters,
and the framers identical bytes.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_codec
from eemstreams import command, data_packet, ethernet_frame

REF = load_codec("python")
FAST = load_codec("cython")


def stream_from(seed: int, crc_mix: bool, corruption: int) -> bytes:
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randrange(1, 25)):
        roll = rng.random()
        if roll < 0.6:
            crc = rng.random() < 0.5 if crc_mix else True
            parts.append(data_packet(ethernet_frame(rng, rng.randrange(0, 1600)), crc))
        elif roll < 0.75:
            n = rng.randrange(0, 60)
            parts.append(command(rng.randrange(0, 2), n, rng.randbytes(n)))
        elif roll < 0.85:
            parts.append(command(rng.randrange(2, 8), rng.randrange(0, 2048)))
        elif roll < 0.9:
            parts.append((0x87FF).to_bytes(2, "little"))  # an Echo of immense length
        elif roll < 0.95:
            parts.append(b"\0\0")
        else:
            parts.append(rng.randbytes(rng.randrange(1, 200)))
    data = bytearray(b"".join(parts))
    for _ in range(corruption):
        if not data:
            break
        kind = rng.random()
        at = rng.randrange(len(data))
        if kind < 0.5:
            data[at] ^= 1 << rng.randrange(8)
        else:  # a lost USB packet
            size = rng.choice([64, 512])
            del data[at : at + size]
    return bytes(data)


def run_both(data: bytes, cuts: list[int], shorts: list[bool], max_length: int):
    ref, fast = REF.Deframer(max_length), FAST.Deframer(max_length)
    pos = 0
    for i, cut in enumerate(cuts + [len(data)]):
        chunk = data[pos : pos + cut] if i < len(cuts) else data[pos:]
        pos += len(chunk)
        short = shorts[i % len(shorts)] if i < len(cuts) else True
        assert fast.feed(chunk, short) == ref.feed(chunk, short)
        assert fast.counters() == ref.counters()
        assert fast.carried == ref.carried and fast.waiting_commands == ref.waiting_commands


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    crc_mix=st.booleans(),
    corruption=st.integers(0, 6),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    shorts=st.lists(st.booleans(), min_size=1, max_size=12),
    max_length=st.sampled_from([18, 600, 1522, 16383]),
)
def test_deframers_agree_on_streams(seed, crc_mix, corruption, cuts, shorts, max_length):
    run_both(stream_from(seed, crc_mix, corruption), cuts, shorts, max_length)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 3000), max_size=6),
       shorts=st.lists(st.booleans(), min_size=1, max_size=6))
def test_deframers_agree_on_noise(data, cuts, shorts):
    run_both(data, cuts, shorts, 1522)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    crc=st.booleans(),
    max_packet=st.sampled_from([64, 512, 1024]),
    max_transfer=st.integers(1526, 20000),
    sizes=st.lists(st.integers(0, 1600), max_size=40),
    echo=st.binary(max_size=2047),
)
def test_framers_agree(seed, crc, max_packet, max_transfer, sizes, echo):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    ref = REF.Framer(crc=crc, max_packet=max_packet, max_transfer=max_transfer)
    fast = FAST.Framer(crc=crc, max_packet=max_packet, max_transfer=max_transfer)
    assert fast.pack(frames) == ref.pack(frames)
    assert fast.echo(echo) == ref.echo(echo)
    assert fast.echo_response(echo) == ref.echo_response(echo)
    for frame in frames[:3]:
        assert fast.packet(frame) == ref.packet(frame)
    assert fast.counters() == ref.counters()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    corruption=st.integers(0, 4),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    shorts=st.lists(st.booleans(), min_size=1, max_size=12),
)
def test_in_place_deframing_equals_feed(seed, corruption, cuts, shorts):
    """deframe_into on one contiguous buffer (as a mirrored ring presents it, carried
    bytes right before each transfer) finds the frames feed() finds, with equal counters."""
    data = stream_from(seed, True, corruption)
    buffer = bytearray(data) + bytearray(8)
    by_feed, in_place = FAST.Deframer(), FAST.Deframer()
    pos = 0
    for i, cut in enumerate(cuts + [len(data)]):
        n = min(cut, len(data) - pos) if i < len(cuts) else len(data) - pos
        short = shorts[i % len(shorts)] if i < len(cuts) else True
        events = by_feed.feed(data[pos : pos + n], short)
        commands = in_place.deframe_into(buffer, pos, n, short)
        frames = [bytes(buffer[o : o + length]) for o, length in in_place.frame_records()]
        assert frames == [e.data for e in events if type(e).__name__ == "Frame"]
        assert commands == [e for e in events if type(e).__name__ != "Frame"]
        assert in_place.counters() == by_feed.counters()
        assert in_place.carried == by_feed.carried
        pos += n
