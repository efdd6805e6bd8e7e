"""Differential tests: the Cython codec (eembridge._fast.eem) equals the reference
(eembridge.core.codec, the specification) on every event, counter and byte.

Hypothesis draws EEM streams: frames framed by the reference Framer (CRC, sentinel or
mixed; 64/512/1024-byte max packets; random transfer limits), commands (Echo, Echo
Response, hints, reserved, immense lengths), zero-length packets, then corrupts them
the way a bad link does (bit flips, lost 64/512-byte USB packets, inserted garbage,
random headers) and cuts them into transfers (all full but the last short, or random
short flags). Both deframers must agree after every transfer. The in-place paths
(feed_buffer, deframe_into) run on ring-like memory, the carried bytes just before
each transfer and scribbles everywhere else, and must find what feed() finds.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge.core import protocol as eem
from eembridge.core.events import Echo, EchoResponse, Frame, Hint

from conftest import IMPLEMENTATIONS, load_codec
from eemstreams import command, data_packet, ethernet_frame, transport_frame

REF = load_codec("python")
FAST = load_codec("cython")

MAX_LENGTHS = [18, 600, eem.DEFAULT_MAX_LENGTH, 16383]


# -- stream builders --------------------------------------------------------------------


def random_header(rng: random.Random) -> bytes:
    """A header a lost USB packet or a confused device could leave in the stream."""
    kind = rng.randrange(6)
    if kind == 0:
        value = 0x8000 | (eem.CMD_ECHO << 11) | 0x7FF  # Echo "of immense length"
    elif kind == 1:
        value = 0x8000 | (rng.choice([6, 7]) << 11) | rng.randrange(0x800)  # reserved
    elif kind == 2:
        value = 0xC000 | (rng.randrange(8) << 11) | rng.randrange(0x800)  # bit 14 set
    elif kind == 3:
        value = rng.choice([0x3FFF, 0x7FFF, 0x4000 | rng.randrange(18)])  # oversize, runt
    elif kind == 4:
        value = (0x4000 if rng.random() < 0.5 else 0) | rng.randrange(18, 1600)  # bad check
    else:
        value = rng.randrange(0x10000)
    return struct.pack("<H", value)


def build_stream(seed: int, crc_mode: str, max_packet: int, max_transfer: int,
                 corruption: int) -> bytes:
    """Frames framed by the reference Framer, mixed with commands, ZLPs and garbage,
    then damaged `corruption` times."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    for _ in range(rng.randrange(1, 20)):
        roll = rng.random()
        if roll < 0.55:
            crc = rng.random() < 0.5 if crc_mode == "mixed" else crc_mode == "crc"
            framer = REF.Framer(crc=crc, max_packet=max_packet,
                                max_transfer=max(max_transfer, eem.DEFAULT_MAX_LENGTH + 4))
            sizes = [rng.choice([rng.randrange(0, 100), rng.randrange(0, 1501)])
                     for _ in range(rng.randrange(1, 6))]
            parts += framer.pack(ethernet_frame(rng, n) for n in sizes)
        elif roll < 0.65:
            n = rng.randrange(0, 80)
            parts.append(command(rng.choice([eem.CMD_ECHO, eem.CMD_ECHO_RESPONSE]), n, rng.randbytes(n)))
        elif roll < 0.75:
            parts.append(command(rng.randrange(2, 6), rng.randrange(0x800)))  # hints
        elif roll < 0.8:
            parts.append(b"\0\0" * rng.randrange(1, 4))
        elif roll < 0.9:
            parts.append(random_header(rng))
        else:
            parts.append(rng.randbytes(rng.randrange(1, 300)))
    data = bytearray(b"".join(parts))
    for _ in range(corruption):
        if not data:
            break
        kind = rng.randrange(4)
        at = rng.randrange(len(data))
        if kind == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a lost USB packet
            size = rng.choice([64, 512])
            at -= at % size
            del data[at : at + size]
        elif kind == 2:
            data[at:at] = rng.randbytes(rng.randrange(1, 100))
        else:
            data[at:at] = random_header(rng)
    return bytes(data)


def cut(data: bytes, sizes: list[int], shorts: list[bool] | None) -> list[tuple[bytes, bool]]:
    """Transfers of the given sizes, then the rest; all full but the last unless
    `shorts` gives random flags (the last is always short)."""
    transfers, pos = [], 0
    for i, size in enumerate(sizes):
        short = shorts[i % len(shorts)] if shorts else False
        transfers.append((data[pos : pos + size], short))
        pos += size
    transfers.append((data[pos:], True))
    return transfers


def assert_same_state(fast, ref) -> None:
    assert fast.counters() == ref.counters()
    assert list(fast.counters()) == list(eem.DEFRAMER_COUNTERS)
    assert fast.carried == ref.carried
    assert fast.waiting_commands == ref.waiting_commands


def run_both(transfers: list[tuple[bytes, bool]], max_length: int = eem.DEFAULT_MAX_LENGTH,
             wrap=bytes) -> list:
    fast, ref = FAST.Deframer(max_length), REF.Deframer(max_length)
    events = []
    for transfer, short in transfers:
        expected = ref.feed(transfer, short)
        got = fast.feed(wrap(transfer), short)
        assert got == expected
        assert_same_state(fast, ref)
        events += got
    return events


seeds = st.integers(0, 2**32 - 1)
max_packets = st.sampled_from([64, 512, 1024])  # bulk max packet at full, high, super speed
max_transfers = st.integers(1526, 20000)  # from one full frame up
# The Framer's options and a seed for the frames it gets: @given(**framer_args, ...).
framer_args = dict(seed=seeds, crc=st.booleans(), max_packet=max_packets, max_transfer=max_transfers,
                   batch=st.booleans())
streams = st.builds(
    build_stream,
    seed=seeds,
    crc_mode=st.sampled_from(["crc", "sentinel", "mixed"]),
    max_packet=max_packets,
    max_transfer=max_transfers,
    corruption=st.integers(0, 6),
)
sizes = st.lists(st.integers(0, 4000), max_size=12)
short_flags = st.none() | st.lists(st.booleans(), min_size=1, max_size=12)


# -- deframer: Cython == reference ------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=streams, sizes=sizes, shorts=short_flags, max_length=st.sampled_from(MAX_LENGTHS))
def test_deframers_agree_on_damaged_streams(data, sizes, shorts, max_length):
    run_both(cut(data, sizes, shorts), max_length)


@settings(max_examples=100, deadline=None)
@given(
    **framer_args,
    frame_sizes=st.lists(st.integers(0, 1600), min_size=1, max_size=30),
)
def test_deframers_agree_on_framed_transfers(seed, crc, max_packet, max_transfer, batch,
                                             frame_sizes):
    """The Framer's own transfers, each ending short as on the wire, then the same bytes
    as one stream cut at max-packet multiples (a device that never ends short)."""
    rng = random.Random(seed)
    frames = [ethernet_frame(rng, n) for n in frame_sizes]
    framer = REF.Framer(crc=crc, max_packet=max_packet, max_transfer=max_transfer, batch=batch)
    transfers = framer.pack(frames)
    sendable = [f for f in frames if 14 <= len(f) <= eem.DEFAULT_MAX_LENGTH - 4]
    events = run_both([(t, True) for t in transfers])
    assert events == [Frame(f, crc) for f in sendable]
    stream = b"".join(transfers)
    step = max_packet * rng.randrange(1, 33)
    chunks = [(stream[i : i + step], False) for i in range(0, len(stream), step)]
    assert run_both(chunks + [(b"", True)]) == events


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=6000), sizes=st.lists(st.integers(0, 3000), max_size=6),
       shorts=short_flags, max_length=st.sampled_from(MAX_LENGTHS))
def test_deframers_agree_on_noise(data, sizes, shorts, max_length):
    run_both(cut(data, sizes, shorts), max_length)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, crc=st.booleans())
def test_deframers_agree_on_long_noise_in_full_transfers(seed, crc):
    """Random bytes in 512-byte full transfers with a few real packets buried in them:
    long scans, candidates spanning transfers, resyncs."""
    rng = random.Random(seed)
    parts = []
    for _ in range(8):
        parts.append(rng.randbytes(rng.randrange(0, 3000)))
        parts.append(data_packet(ethernet_frame(rng, rng.randrange(0, 1500)), crc))
    stream = b"".join(parts)
    transfers = [(stream[i : i + 512], False) for i in range(0, len(stream), 512)]
    run_both(transfers + [(b"", True)])


def strided(data: bytes) -> memoryview:
    """A non-contiguous memoryview of data."""
    spread = bytearray(2 * len(data))
    spread[::2] = data
    return memoryview(spread)[::2]


@pytest.mark.parametrize("wrap", [bytearray, memoryview, lambda b: memoryview(b"xy" + b)[2:],
                                  strided])
def test_feed_takes_what_the_reference_takes(wrap):
    """bytearray, memoryview slices, non-contiguous memoryviews (copied, as bytes() does)."""
    rng = random.Random(5)
    stream = b"".join(data_packet(ethernet_frame(rng, n), n % 2 == 0) for n in (0, 900, 46))
    stream += command(eem.CMD_ECHO, 3, b"abc")
    for size in (1, 7, 64, 5000):
        transfers = [(stream[i : i + size], False) for i in range(0, len(stream), size)]
        run_both(transfers + [(b"", True)], wrap=wrap)


def test_odd_inputs_are_counted_in_bytes():
    """A multi-byte memoryview is taken as the bytes it holds, by both; anything that
    is not a buffer is refused."""
    packet = data_packet(ethernet_frame(random.Random(1), 46), True)
    for transfer in (memoryview(packet).cast("H"), bytearray(packet)):
        fast, ref = FAST.Deframer(), REF.Deframer()
        assert fast.feed(transfer, True) == ref.feed(transfer, True) == [
            Frame(packet[2:-4], True)
        ]
        assert_same_state(fast, ref)
        assert ref.counters()["bytes_in"] == len(packet)
    for bad in (5, "text", None, list(packet)):
        fast, ref = FAST.Deframer(), REF.Deframer()
        with pytest.raises(TypeError):
            ref.feed(bad, True)
        with pytest.raises(TypeError):
            fast.feed(bad, True)
        assert_same_state(fast, ref)


def test_framer_counts_bytes_and_only_what_it_built():
    frame = ethernet_frame(random.Random(3), 100)[:112]  # a multiple of 4 bytes
    for impl in (REF, FAST):
        framer = impl.Framer(crc=True)
        (transfer,) = framer.pack([memoryview(frame).cast("I")])
        assert transfer[2:-4] == frame and framer.counters()["bytes"] == len(frame)
        with pytest.raises(ValueError, match="exceeds"):
            framer.echo(bytes(eem.MAX_ECHO_DATA + 1))
        with pytest.raises(ValueError, match="exceeds"):
            framer.echo_response(memoryview(bytes(eem.MAX_ECHO_DATA + 1)))
        assert framer.counters()["echo"] == framer.counters()["echo_response"] == 0
        framer.echo(memoryview(b"abcd").cast("H"))
        assert framer.counters()["echo"] == 1


def test_frame_events_are_real_frames():
    """feed() builds Frame objects without calling Frame(); they must be the same thing."""
    packet = data_packet(b"\x02" * 14 + b"payload", False)
    (event,) = FAST.Deframer().feed(packet, True)
    assert type(event) is Frame and event == Frame(b"\x02" * 14 + b"payload", False)
    assert hash(event) == hash(Frame(event.data, False)) and event.crc is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = b""  # type: ignore[misc]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_reset_keeps_counters_and_forgets_the_stream(impl):
    codec = load_codec(impl)
    deframer = codec.Deframer()
    packet = data_packet(ethernet_frame(random.Random(2), 500), True)
    assert deframer.feed(command(eem.CMD_TICKLE, 1) + packet[:100], False) == []
    assert deframer.carried == 100 and deframer.waiting_commands == 1
    deframer.reset()
    assert deframer.carried == 0 and deframer.waiting_commands == 0
    assert deframer.feed(packet, True) == [Frame(packet[2:-4], True)]
    assert deframer.counters()["bytes_in"] == 102 + len(packet)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_options_are_validated_alike(impl):
    codec = load_codec(impl)
    for bad in (17, 16384, -1):
        with pytest.raises(ValueError, match="max_length"):
            codec.Deframer(bad)
    for kwargs, word in [({"max_packet": 96}, "max_packet"), ({"max_packet": 2048}, "max_packet"),
                         ({"max_transfer": 1525}, "max_transfer"), ({"max_length": 10}, "max_length")]:
        with pytest.raises(ValueError, match=word):
            codec.Framer(**kwargs)
    assert codec.Framer(max_transfer=1526).max_transfer == 1526
    assert codec.Deframer(600).max_length == 600


# -- deframer: in place on ring-like memory ---------------------------------------------


def events_from_records(buffer: np.ndarray, base: int, frames, commands) -> list:
    """The event list feed() would return, rebuilt from in-place records."""
    events, j = [], 0
    for i, (offset, length, crc) in enumerate(frames.tolist()):
        while j < len(commands) and commands[j][0] == i:
            events.append(commands[j][1])
            j += 1
        events.append(Frame(buffer[base + offset : base + offset + length].tobytes(), bool(crc)))
    events += [event for _, event in commands[j:]]
    return events


def run_in_place(transfers, max_length: int, rng: random.Random) -> None:
    """feed_buffer on a ring-like numpy buffer: each transfer lands at a random offset
    with the carried bytes copied right before it (as the mirror presents them) and
    garbage everywhere else; the result must equal the reference's feed()."""
    ring = np.empty(4 * 20000, dtype=np.uint8)
    in_place, ref = FAST.Deframer(max_length), REF.Deframer(max_length)
    in_place.set_capacity(max(len(t) for t, _ in transfers))
    previous = b""  # the bytes the deframer was handed last, carry included
    for transfer, short in transfers:
        carried = in_place.carried
        assert carried == ref.carried
        ring[:] = np.frombuffer(random.Random(len(previous)).randbytes(len(ring)), np.uint8)
        offset = rng.randrange(carried, len(ring) - len(transfer) - carried + 1)
        held = previous[len(previous) - carried :] if carried else b""
        ring[offset - carried : offset] = np.frombuffer(held, np.uint8)
        ring[offset : offset + len(transfer)] = np.frombuffer(transfer, np.uint8)
        frames, commands = in_place.feed_buffer(ring, offset, carried, len(transfer), short)
        expected = ref.feed(transfer, short)
        assert events_from_records(ring, offset - carried, frames, commands) == expected
        assert_same_state(in_place, ref)
        previous = held + transfer


@settings(max_examples=200, deadline=None)
@given(data=streams, sizes=sizes, shorts=short_flags, max_length=st.sampled_from(MAX_LENGTHS),
       seed=seeds)
def test_in_place_equals_reference_on_ring_memory(data, sizes, shorts, max_length, seed):
    run_in_place(cut(data, sizes, shorts), max_length, random.Random(seed))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), sizes=st.lists(st.integers(0, 3000), max_size=6),
       shorts=short_flags, seed=seeds)
def test_in_place_equals_reference_on_noise(data, sizes, shorts, seed):
    run_in_place(cut(data, sizes, shorts), eem.DEFAULT_MAX_LENGTH, random.Random(seed))


@settings(max_examples=60, deadline=None)
@given(data=streams, sizes=sizes, shorts=short_flags)
def test_deframe_into_equals_feed(data, sizes, shorts):
    """deframe_into (datapath.RingRxPath's entry point) on one contiguous buffer, the
    carried bytes right before each transfer, finds what feed() finds."""
    transfers = cut(data, sizes, shorts)
    buffer = bytearray(b"".join(t for t, _ in transfers)) + bytearray(8)
    by_feed, in_place = FAST.Deframer(), FAST.Deframer()
    pos = 0
    for transfer, short in transfers:
        events = by_feed.feed(transfer, short)
        commands = in_place.deframe_into(buffer, pos, len(transfer), short)
        frames = [bytes(buffer[o : o + n]) for o, n in in_place.frame_records()]
        assert frames == [e.data for e in events if type(e) is Frame]
        assert commands == [e for e in events if type(e) is not Frame]
        assert in_place.counters() == by_feed.counters()
        assert in_place.carried == by_feed.carried
        pos += len(transfer)


def test_in_place_refusals():
    rng = random.Random(3)
    packet = data_packet(ethernet_frame(rng, 1000), True)
    ring = np.zeros(40000, dtype=np.uint8)
    ring[100 : 100 + len(packet)] = np.frombuffer(packet, np.uint8)
    deframer = FAST.Deframer()  # sized for 16 KB transfers until set_capacity()
    before = deframer.counters()
    with pytest.raises(ValueError, match="set_capacity"):
        deframer.feed_buffer(ring, 100, 0, 30000, False)
    with pytest.raises(ValueError, match="does not lie"):
        deframer.feed_buffer(ring, 100, 0, 40000, False)
    with pytest.raises(ValueError, match="does not lie"):
        deframer.feed_buffer(ring, 10, 20, 5, False)  # carried bytes before the buffer
    assert deframer.counters() == before  # refused calls change nothing
    frames, _ = deframer.feed_buffer(ring, 100, 0, 500, False)
    assert len(frames) == 0 and deframer.carried == 500
    with pytest.raises(ValueError, match="holds over 500"):
        deframer.feed_buffer(ring, 600, 0, 100, False)
    with pytest.raises(RuntimeError, match="reset"):
        deframer.feed(b"", True)  # the carry is in the caller's memory, not ours
    # A view of the records pins them: growing them now would pull the memory away.
    with pytest.raises(BufferError):
        deframer.set_capacity(1 << 20)
    frames, _ = deframer.feed_buffer(ring, 600, 500, len(packet) - 500, True)
    assert frames.tolist() == [(2, 1014, 1)] and not frames.flags.writeable  # from 600 - 500
    del frames
    deframer.set_capacity(1 << 20)
    deframer.reset()
    assert deframer.feed(packet, True) == [Frame(packet[2:-4], True)]
    with pytest.raises(RuntimeError, match="reset"):
        deframer.feed_buffer(ring, 100, 0, len(packet), True)


def test_in_place_commands_keep_their_place():
    """Commands confirmed in a call come back with the frame they precede."""
    rng = random.Random(4)
    f1, f2 = ethernet_frame(rng, 60), ethernet_frame(rng, 70)
    stream = (command(eem.CMD_ECHO, 2, b"hi") + data_packet(f1, True)
              + command(eem.CMD_RESPONSE_HINT, 9) + command(eem.CMD_ECHO_RESPONSE, 1, b"!")
              + data_packet(f2, False) + command(eem.CMD_TICKLE, 0))
    deframer = FAST.Deframer()
    frames, commands = deframer.feed_buffer(np.frombuffer(stream, np.uint8), 0, 0, len(stream), True)
    second = 4 + len(f1) + 6 + 2 + 3 + 2  # echo, packet, hint, echo response, header
    assert frames.tolist() == [(6, len(f1), 1), (second, len(f2), 0)]
    assert commands == [(0, Echo(b"hi")), (1, Hint(eem.CMD_RESPONSE_HINT, 9)),
                        (1, EchoResponse(b"!")), (2, Hint(eem.CMD_TICKLE, 0))]


# -- framer: Cython == reference --------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    **framer_args,
    max_length=st.sampled_from([18, 600, eem.DEFAULT_MAX_LENGTH]),
    sizes=st.lists(st.integers(0, 1600), max_size=40),
    echo=st.binary(max_size=eem.MAX_ECHO_DATA + 1),
)
def test_framers_agree(seed, crc, max_packet, max_transfer, batch, max_length, sizes, echo):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    options = dict(crc=crc, max_packet=max_packet, max_transfer=max_transfer,
                   max_length=max_length, batch=batch)
    ref, fast = REF.Framer(**options), FAST.Framer(**options)
    assert fast.pack(frames) == ref.pack(frames)
    assert fast.pack(map(memoryview, frames[:5])) == ref.pack(map(bytearray, frames[:5]))
    for build in ("echo", "echo_response"):
        if len(echo) > eem.MAX_ECHO_DATA:
            with pytest.raises(ValueError, match="exceeds"):
                getattr(ref, build)(echo)
            with pytest.raises(ValueError, match="exceeds"):
                getattr(fast, build)(echo)
        else:
            assert getattr(fast, build)(echo) == getattr(ref, build)(echo)
    for frame in frames[:3]:
        assert fast.packet(frame) == ref.packet(frame)
    assert fast.counters() == ref.counters()
    assert list(fast.counters()) == list(eem.FRAMER_COUNTERS)


@settings(max_examples=150, deadline=None)
@given(
    **framer_args,
    sizes=st.lists(st.integers(0, 1600), max_size=40),
)
def test_framing_in_place_equals_pack(seed, crc, max_packet, max_transfer, batch, sizes):
    """A TX loop in place: each frame lands 2 bytes past the batch's end and is framed
    there; if the packet does not fit the batch, the batch is closed by the ZLP rule
    (which may write over the new packet's first 2 bytes, so the packet is set aside
    first) and the packet starts the next one. Transfers and counters equal pack()'s."""
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    options = dict(crc=crc, max_packet=max_packet, max_transfer=max_transfer, batch=batch)
    ref, fast = REF.Framer(**options), FAST.Framer(**options)
    expected = ref.pack(frames)
    slot = bytearray(rng.randbytes(max_transfer + 2048))  # old bytes: all must be overwritten
    transfers, length = [], 0
    for frame in frames:
        slot[length + 2 : length + 2 + len(frame)] = frame
        size = fast.frame_buffer(slot, length, len(frame))
        if not size:
            continue  # refused and counted, as pack() does
        if length and not fast.fits(length + size):
            packet = bytes(slot[length : length + size])
            transfers.append(bytes(slot[: fast.close_buffer(slot, 0, length)]))
            slot[:size] = packet
            length = 0
        length += size
    if length:
        length = fast.close_buffer(slot, 0, length)
        transfers.append(bytes(slot[:length]))
    assert transfers == expected
    assert fast.counters() == ref.counters()


def test_packet_refuses_what_bmlength_cannot_describe():
    """packet() applies no configured maximum, only the 14-bit bmLength: both agree up
    to it and both refuse one byte more."""
    for crc in (True, False):
        ref, fast = REF.Framer(crc=crc), FAST.Framer(crc=crc)
        for n in (0, 13, 1514, 16379):
            assert fast.packet(bytes(n)) == ref.packet(bytes(n))
        for n in (16380, 0x10000):
            with pytest.raises(ValueError, match="does not fit"):
                ref.packet(bytes(n))
            with pytest.raises(ValueError, match="does not fit"):
                fast.packet(bytes(n))


def test_framer_in_place_refusals_and_bytes():
    framer = FAST.Framer(crc=True, max_packet=64)
    slot = bytearray(100)
    slot[2:62] = bytes(range(60))
    assert framer.frame_buffer(slot, 0, 60) == 66
    assert slot[:2] == struct.pack("<H", 0x4000 | 64)
    assert slot[62:66] == struct.pack("<I", zlib.crc32(bytes(range(60))))
    assert framer.frame_buffer(slot, 0, 13) == 0  # runt: refused, untouched, counted
    assert framer.close_buffer(slot, 0, 64) == 66 and slot[64:66] == b"\0\0"
    assert framer.close_buffer(slot, 0, 65) == 65
    with pytest.raises(ValueError, match="does not fit"):
        framer.frame_buffer(slot, 50, 60)
    with pytest.raises(ValueError, match="does not fit"):
        framer.close_buffer(slot, 0, 128)
    with pytest.raises(BufferError):
        framer.frame_buffer(b"read-only" * 20, 0, 14)
    c = framer.counters()
    assert (c["frames"], c["runts"], c["transfers"], c["zlps"]) == (1, 1, 2, 1)
    sentinel = FAST.Framer(crc=False)
    slot[2:16] = bytes(14)
    assert sentinel.frame_buffer(slot, 0, 14) == 20 and slot[16:20] == eem.SENTINEL


# -- false frames and the cost of garbage (codec.py: "Trust", "Cost of garbage") --------

HOST = bytes.fromhex("020000000001")


def mutate(rng: random.Random, frame: bytes) -> bytes:
    out = bytearray(frame)
    for _ in range(rng.randrange(0, 3)):
        kind = rng.randrange(3)
        if kind == 0 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            del out[rng.randrange(len(out)) :]
        else:
            out += rng.randbytes(rng.randrange(1, 8))
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(seed=seeds, size=st.integers(0, 300), mac=st.sampled_from([None, HOST, bytes(6)]),
       vlan=st.booleans())
def test_plausibility_and_checksum_rules_agree(seed, size, mac, vlan):
    rng = random.Random(seed)
    frame = transport_frame(rng, size, rng.choice([HOST, b"\xff" * 6, bytes(6)]))
    if vlan:
        frame = frame[:12] + b"\x81\x00\x00\x07" + frame[12:]
    frame = mutate(rng, frame)
    assert FAST._plausible_frame(frame, mac) == REF.plausible(frame, mac)
    assert FAST._l4_intact_frame(frame) == REF.l4_intact(frame)


def run_both_with(transfers, max_length: int, mac: bytes | None) -> list:
    fast, ref = FAST.Deframer(max_length, mac=mac), REF.Deframer(max_length, mac=mac)
    events = []
    for transfer, short in transfers:
        expected = ref.feed(transfer, short)
        assert fast.feed(transfer, short) == expected
        assert_same_state(fast, ref)
        assert fast.budget == ref.budget
        events += expected
    return events


HOSTILE_UNITS = [b"\xf2\x45", b"\x12\x40", b"\xff\x7f", b"\xf2\x05", b"\x00\x00", b"\xff\xff",
                 b"\x12\x00" + bytes(14) + eem.SENTINEL]


def lossy_stream(rng: random.Random, crc_mode: str, max_packet: int, batch: bool,
                 loss: float, hostile: bool) -> list[tuple[bytes, bool]]:
    """Device transfers of real frames (sentinel, CRC or mixed), USB packets lost,
    optionally with hostile garbage runs between them, cut as a host receives them."""
    transfers = []
    pending = b""
    for _ in range(rng.randrange(1, 40)):
        crc = rng.random() < 0.5 if crc_mode == "mixed" else crc_mode == "crc"
        framer = REF.Framer(crc=crc, max_packet=max_packet, max_transfer=4096, batch=batch)
        frames = [transport_frame(rng, rng.choice([rng.randrange(0, 100), 1400,
                                                   rng.randrange(0, 1440)]))
                  for _ in range(rng.randrange(1, 6))]
        device = framer.pack(frames)
        if hostile and rng.random() < 0.3:
            unit = rng.choice(HOSTILE_UNITS + [data_packet(frames[0], crc)[:-4] + bytes(4)])
            device.insert(rng.randrange(len(device) + 1), unit * rng.randrange(1, 200))
        for transfer in device:
            for i in range(0, len(transfer), max_packet):
                piece = transfer[i : i + max_packet]
                if rng.random() < loss:
                    continue
                pending += piece
                if len(piece) < max_packet or len(pending) >= 8192:
                    transfers.append((pending, len(piece) < max_packet))
                    pending = b""
    transfers.append((pending, True))
    return transfers


@settings(max_examples=150, deadline=None)
@given(seed=seeds, crc_mode=st.sampled_from(["crc", "sentinel", "mixed"]),
       max_packet=st.sampled_from([64, 512]), batch=st.booleans(),
       loss=st.sampled_from([0.0, 0.02, 0.1, 0.3]), hostile=st.booleans(),
       max_length=st.sampled_from([600, eem.DEFAULT_MAX_LENGTH, 16383]),
       mac=st.sampled_from([None, HOST]))
def test_deframers_agree_on_lossy_and_hostile_streams(seed, crc_mode, max_packet, batch, loss,
                                                      hostile, max_length, mac):
    """Loss, splices, hostile garbage (budget exhausted), devices that end every
    transfer short: the same events, counters and budget."""
    run_both_with(lossy_stream(random.Random(seed), crc_mode, max_packet, batch, loss, hostile),
                  max_length, mac)


def test_the_lossy_streams_reach_every_new_rule():
    """The strategy above is no use unless it makes each new counter count."""
    totals = dict.fromkeys(["implausible", "unchecked", "spliced"], 0)
    for seed in range(60):
        rng = random.Random(seed)
        transfers = lossy_stream(rng, rng.choice(["crc", "sentinel", "mixed"]),
                                 rng.choice([64, 512]), seed % 2 == 0, 0.1, seed % 3 == 0)
        ref = REF.Deframer(eem.DEFAULT_MAX_LENGTH, mac=HOST)
        for transfer, short in transfers:
            ref.feed(transfer, short)
        for name in totals:
            totals[name] += ref.counters()[name]
    assert all(totals.values()), totals
