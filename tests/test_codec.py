"""Behaviour of the EEM codec, over both implementations (reference and Cython).

Readers are tested three ways (all at once, a byte at a time, with trailing garbage),
then on the faults a real link produces.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge.core.events import Echo, EchoResponse, Frame, Hint
from eembridge.core.protocol import (
    CMD_ECHO,
    CMD_ECHO_RESPONSE,
    CMD_RESPONSE_HINT,
    CMD_TICKLE,
    DEFAULT_MAX_LENGTH,
    DEFRAMER_COUNTERS,
    HEADER_SIZE,
    MAX_ECHO_DATA,
    MAX_PENDING_COMMANDS,
)

from conftest import IMPLEMENTATIONS, load_codec
from eemstreams import command, data_packet, ethernet_frame, feed_all, split

RNG = random.Random(1234)
FRAMES = [ethernet_frame(RNG, n) for n in (46, 1500, 0, 100, 1486, 7)]


def frames_of(events):
    return [e.data for e in events if isinstance(e, Frame)]


def accounted(counters, deframer) -> int:
    """Bytes the deframer can explain: delivered, skipped, carried or waiting."""
    return (
        counters["bytes"]
        + 6 * counters["frames"]
        + 2 * counters["zlps"]
        + counters["bytes_skipped"]
        + deframer.carried
    )


@pytest.mark.parametrize("crc", [True, False])
def test_round_trip_one_packet_per_transfer(codec, crc):
    framer, deframer = codec.Framer(crc=crc), codec.Deframer()
    events = []
    for frame in FRAMES:
        for transfer in framer.pack([frame]):
            events += deframer.feed(transfer, True)
    assert events == [Frame(f, crc) for f in FRAMES]
    c = deframer.counters()
    assert list(c) == list(DEFRAMER_COUNTERS)
    assert c["frames"] == len(FRAMES) and c["crc_frames"] == (len(FRAMES) if crc else 0)
    assert c["bytes"] == sum(map(len, FRAMES))
    assert c["resyncs"] == c["bytes_skipped"] == 0


def test_all_at_once_byte_at_a_time_and_trailing_garbage(codec):
    stream = b"".join(data_packet(f, i % 2 == 0) for i, f in enumerate(FRAMES))
    expected = [Frame(f, i % 2 == 0) for i, f in enumerate(FRAMES)]
    assert codec.Deframer().feed(stream, True) == expected

    one_by_one = codec.Deframer()
    assert feed_all(one_by_one, split(stream, 1) + [b""]) == expected

    with_garbage = codec.Deframer()
    events = with_garbage.feed(stream + b"\x13\x37\xff", True)
    assert events == expected
    assert with_garbage.counters()["bytes_skipped"] == 3


def test_zero_length_packets_are_skipped(codec):
    stream = b"\x00\x00" + data_packet(FRAMES[0], True) + b"\x00\x00\x00\x00"
    deframer = codec.Deframer()
    assert deframer.feed(stream, True) == [Frame(FRAMES[0], True)]
    assert deframer.counters()["zlps"] == 3


def test_packets_span_full_transfers(codec):
    stream = b"".join(data_packet(f, True) for f in FRAMES)
    for size in (64, 512, 1000, 1024):
        deframer = codec.Deframer()
        events = feed_all(deframer, split(stream, size) + [b""])
        assert frames_of(events) == FRAMES, size


def test_short_transfer_ends_a_packet_in_progress(codec):
    packet = data_packet(FRAMES[1], True)
    deframer = codec.Deframer()
    assert deframer.feed(packet[:700], True) == []
    # The next transfer starts clean: the rest of the cut packet is not glued on.
    assert deframer.feed(data_packet(FRAMES[0], True), True) == [Frame(FRAMES[0], True)]
    c = deframer.counters()
    assert c["truncated"] == 1 and c["bytes_skipped"] == 700


def test_echo_alone_in_a_short_transfer_is_answered(codec):
    deframer = codec.Deframer()
    assert deframer.feed(command(CMD_ECHO, 5, b"hello"), True) == [Echo(b"hello")]
    assert deframer.counters()["echo"] == 1


def test_commands_wait_for_a_verified_packet(codec):
    deframer = codec.Deframer()
    stream = (
        command(CMD_ECHO, 3, b"abc")
        + command(CMD_TICKLE, 0)
        + command(CMD_ECHO_RESPONSE, 2, b"ok")
        + data_packet(FRAMES[0], False)
    )
    # Across a full-transfer boundary the commands wait for the frame that follows.
    assert deframer.feed(stream[:9], False) == []
    assert deframer.waiting_commands == 2
    events = deframer.feed(stream[9:], False)
    assert events == [Echo(b"abc"), Hint(CMD_TICKLE, 0), EchoResponse(b"ok"), Frame(FRAMES[0], False)]
    c = deframer.counters()
    assert (c["echo"], c["echo_response"], c["hints"]) == (1, 1, 1)


def test_command_followed_by_garbage_is_never_acted_on(codec):
    deframer = codec.Deframer()
    stream = command(CMD_ECHO, 4, b"abcd") + b"\x55" * 40 + data_packet(FRAMES[0], True)
    events = deframer.feed(stream, True)
    assert events == [Frame(FRAMES[0], True)]
    c = deframer.counters()
    assert c["echo"] == 0 and c["unconfirmed_commands"] == 1 and c["resyncs"] == 1


def test_echo_running_past_a_short_transfer_is_garbage(codec):
    deframer = codec.Deframer()
    assert deframer.feed(command(CMD_ECHO, 100, b"x" * 20), True) == []
    c = deframer.counters()
    assert c["truncated"] == 1 and c["echo"] == 0 and c["bytes_skipped"] == 22


@pytest.mark.parametrize(
    "garbage, counter",
    [
        ((0x3FFF).to_bytes(2, "little"), "oversize"),  # data, bmLength 16383
        ((DEFAULT_MAX_LENGTH + 1).to_bytes(2, "little"), "oversize"),
        ((0x4004).to_bytes(2, "little") + b"\0\0\0\0", "runts"),  # CRC of nothing is 0
        ((0x8000 | (6 << 11)).to_bytes(2, "little"), "reserved_commands"),
        ((0xC000 | (3 << 11)).to_bytes(2, "little"), "reserved_commands"),  # bit 14 set
    ],
)
def test_garbage_headers_are_counted_and_skipped(codec, garbage, counter):
    deframer = codec.Deframer()
    events = deframer.feed(garbage + data_packet(FRAMES[3], True), True)
    assert events == [Frame(FRAMES[3], True)]
    c = deframer.counters()
    assert c[counter] == 1 and c["resyncs"] == 1 and c["bytes_skipped"] == len(garbage)


@pytest.mark.parametrize("crc", [True, False])
def test_bad_check_is_dropped_and_the_next_frame_recovered(codec, crc):
    bad = bytearray(data_packet(FRAMES[1], crc))
    bad[-2] ^= 0x01  # inside the check
    good = data_packet(FRAMES[0], crc)
    deframer = codec.Deframer()
    assert deframer.feed(bytes(bad) + good, True) == [Frame(FRAMES[0], crc)]
    c = deframer.counters()
    assert c["crc_errors" if crc else "sentinel_errors"] == 1
    assert c["bytes_skipped"] == len(bad)


@pytest.mark.parametrize("crc", [True, False])
def test_field_failure_lost_packet_reads_as_immense_command(codec, crc):
    """A device streams EEM in 64-byte USB packets without ever ending a transfer short.

    One USB packet is lost; the bytes after it read as a command "of immense length"
    (an Echo with the largest parameter). The host must not answer it, must not wait
    for 2 KB of echo data, and must find the stream again.
    """
    rng = random.Random(7)
    frames = [ethernet_frame(rng, rng.randrange(46, 300)) for _ in range(40)]
    packets = [data_packet(f, crc) for f in frames]
    stream = bytearray(b"".join(packets))
    # Make the first two bytes of USB packet 10 read as Echo with param 0x7FF.
    cut = 10 * 64
    stream[cut + 64 : cut + 66] = (0x87FF).to_bytes(2, "little")
    starts = [sum(map(len, packets[:i])) for i in range(len(packets))]
    lossy = bytes(stream[:cut] + stream[cut + 64 :])
    deframer = codec.Deframer()
    # 64-byte full transfers: an Echo of 2047 bytes would be waited for if trusted.
    events = feed_all(deframer, split(lossy, 64), short_last=False)
    events += deframer.feed(b"", True)
    assert not [e for e in events if not isinstance(e, Frame)]
    c = deframer.counters()
    assert c["echo"] == 0 and c["resyncs"] >= 1
    # Every packet wholly outside the damage (the lost packet and the two bytes that
    # read as the immense command) is delivered, in order, and nothing else.
    damaged = (cut, cut + 66)
    untouched = [
        f
        for f, s, p in zip(frames, starts, packets, strict=True)
        if s + len(p) <= damaged[0] or s >= damaged[1]
    ]
    assert frames_of(events) == untouched
    assert len(untouched) >= len(frames) - 2
    assert deframer.carried < 2 * DEFAULT_MAX_LENGTH


def test_framer_appends_zlp_on_packet_boundary(codec):
    for max_packet in (64, 512, 1024):
        framer = codec.Framer(crc=True, max_packet=max_packet, max_transfer=4096)
        # 2 + n + 4 == max_packet: the packet alone ends exactly on the boundary.
        frame = ethernet_frame(random.Random(1), max_packet - 6 - 14)
        (transfer,) = framer.pack([frame])
        assert len(transfer) == max_packet + 2 and transfer.endswith(b"\0\0")
        assert framer.counters()["zlps"] == 1
        assert codec.Deframer().feed(transfer, True) == [Frame(frame, True)]


def test_framer_batches_within_the_transfer_limit(codec):
    framer = codec.Framer(crc=False, max_transfer=1536, max_packet=512)
    rng = random.Random(3)
    frames = [ethernet_frame(rng, rng.randrange(0, 1501)) for _ in range(200)]
    transfers = framer.pack(frames)
    assert all(len(t) <= 1536 and len(t) % 512 for t in transfers)
    assert len(transfers) < len(frames)  # small frames share transfers
    deframer = codec.Deframer()
    events = [e for t in transfers for e in deframer.feed(t, True)]
    assert frames_of(events) == frames


def test_framer_refuses_and_counts_frames_it_cannot_send(codec):
    framer = codec.Framer()
    assert framer.pack([b"\0" * 1600, b"\0" * 10]) == []
    c = framer.counters()
    assert c["oversize"] == 1 and c["runts"] == 1 and c["frames"] == 0


def test_framer_options_are_validated(codec):
    with pytest.raises(ValueError, match="max_packet"):
        codec.Framer(max_packet=100)
    with pytest.raises(ValueError, match="max_transfer"):
        codec.Framer(max_transfer=1000)
    with pytest.raises(ValueError, match="max_length"):
        codec.Deframer(max_length=5)


def test_echo_response_is_built_with_the_zlp_rule(codec):
    framer = codec.Framer(max_packet=64)
    assert framer.echo_response(b"ping") == command(CMD_ECHO_RESPONSE, 4, b"ping")
    data = bytes(62)  # 2 + 62 == 64: ends on a packet boundary
    assert framer.echo_response(data) == command(CMD_ECHO_RESPONSE, 62, data) + b"\0\0"
    with pytest.raises(ValueError):
        framer.echo(bytes(2048))


def test_garbage_keeps_memory_bounded(codec):
    """Random bytes in full transfers: nothing grows, every byte counted."""
    rng = random.Random(99)
    deframer = codec.Deframer()
    tracemalloc.start()
    fed = 0
    # Scanning random bytes is the reference's slowest path (a CRC per candidate
    # header), so a modest amount; the Cython-only memory test in the bench goes further.
    for _ in range(40):
        transfer = rng.randbytes(16384)
        deframer.feed(transfer, False)
        fed += len(transfer)
        # A held-over packet is at most the longest data packet or command (2047
        # bytes of Echo data) plus its header.
        assert deframer.carried <= max(DEFAULT_MAX_LENGTH, MAX_ECHO_DATA) + HEADER_SIZE
        assert deframer.waiting_commands <= MAX_PENDING_COMMANDS
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000
    c = deframer.counters()
    assert c["bytes_in"] == fed


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
    crc=st.booleans(),
    corrupt=st.booleans(),
)
def test_split_invariance_and_accounting(impl, seed, sizes, crc, corrupt):
    """The events do not depend on how a stream is cut into full transfers, and every
    byte fed is delivered, skipped, carried or waiting."""
    codec = load_codec(impl)
    rng = random.Random(seed)
    parts = []
    for _ in range(30):
        roll = rng.random()
        if roll < 0.7:
            parts.append(data_packet(ethernet_frame(rng, rng.randrange(0, 600)), crc))
        elif roll < 0.8:
            n = rng.randrange(0, 40)
            parts.append(command(rng.choice([CMD_ECHO, CMD_ECHO_RESPONSE]), n, rng.randbytes(n)))
        elif roll < 0.9:
            parts.append(command(CMD_RESPONSE_HINT, rng.randrange(0, 2048)))
        else:
            parts.append(b"\0\0")
    stream = bytearray(b"".join(parts))
    if corrupt:
        for _ in range(3):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
    stream = bytes(stream)

    whole = codec.Deframer()
    expected = whole.feed(stream, True)

    cut = codec.Deframer()
    transfers, pos = [], 0
    for size in sizes:
        transfers.append(stream[pos : pos + size])
        pos += size
    transfers.append(stream[pos:])
    events = []
    for transfer in transfers[:-1]:
        events += cut.feed(transfer, False)
        c = cut.counters()
        waiting = c["bytes_in"] - accounted(c, cut)
        assert waiting >= 0
    events += cut.feed(transfers[-1], True)
    assert events == expected
    c = cut.counters()
    commands = sum(
        len(e.data) + 2 if isinstance(e, (Echo, EchoResponse)) else 2
        for e in events
        if not isinstance(e, Frame)
    )
    assert c["bytes_in"] == len(stream) == accounted(c, cut) + commands
