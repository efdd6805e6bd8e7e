"""out_chunk: OUT transfers of many frames for a device that takes them buffer by buffer.

Linux f_eem receives into 1536-byte requests (2048 at SuperSpeed) and fails a request
whose packet runs past its end; a longer transfer simply goes on in the next request.
With out_chunk no packet crosses a multiple of it, so one transfer can carry many
frames. The reference (codec.Framer) is the specification; the Cython framer and the C
TX path must keep its rules, and every chunk must unpack on its own as f_eem would.
"""

from __future__ import annotations

import os
import random
import socket
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eembridge.core.protocol import CHECK_SIZE, DEFAULT_MAX_LENGTH, FRAMER_COUNTERS

from conftest import load_codec

REF = load_codec("python")
FAST = load_codec("cython")


def f_eem_unwrap(request: bytes) -> list[bytes] | None:
    """What Linux f_eem's eem_unwrap makes of one request: its frames, or None where the
    whole request fails (a header cut short, a packet running past the end)."""
    frames, pos = [], 0
    while pos < len(request):
        if len(request) - pos < 2:
            return None
        header = int.from_bytes(request[pos : pos + 2], "little")
        pos += 2
        if header & 0x8000 or header == 0:
            continue  # commands (no Echo here) and zero-length packets: skipped
        length = header & 0x3FFF
        if len(request) - pos < length or length < 18:
            return None
        body = request[pos : pos + length]
        if header & 0x4000:
            assert int.from_bytes(body[-4:], "little") == zlib.crc32(body[:-4])
        frames.append(body[:-4])
        pos += length
    return frames


def through_f_eem(transfers: list[bytes], chunk: int) -> list[bytes]:
    frames = []
    for transfer in transfers:
        for at in range(0, len(transfer), chunk):
            got = f_eem_unwrap(transfer[at : at + chunk])
            assert got is not None, f"request at {at} of a {len(transfer)}-byte transfer fails"
            frames.extend(got)
    return frames


def padded(frame: bytes) -> bytes:
    return frame + b"\0" if len(frame) % 2 else frame


chunks = st.sampled_from([1536, 2048, 3072])
sizes = st.lists(st.integers(14, 1518), max_size=60)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), crc=st.booleans(), chunk=chunks, sizes=sizes,
       chunks_per_transfer=st.integers(1, 12), max_packet=st.sampled_from([64, 512]))
def test_framers_agree_and_every_chunk_unpacks_on_its_own(seed, crc, chunk, sizes,
                                                           chunks_per_transfer, max_packet):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    options = dict(crc=crc, max_packet=max_packet, max_transfer=chunk * chunks_per_transfer,
                   out_chunk=chunk)
    ref, fast = REF.Framer(**options), FAST.Framer(**options)
    transfers = ref.pack(frames)
    assert fast.pack(frames) == transfers
    assert fast.counters() == ref.counters()
    assert list(fast.counters()) == list(FRAMER_COUNTERS)
    assert all(len(t) <= options["max_transfer"] for t in transfers)
    assert through_f_eem(transfers, chunk) == [padded(f) for f in frames]
    assert ref.counters()["padded"] == sum(len(f) % 2 for f in frames)
    if chunks_per_transfer > 1 and len(frames) > 2 * chunks_per_transfer:
        assert len(transfers) < len(frames)  # the point: many frames per transfer


def test_without_out_chunk_nothing_changes():
    frames = [os.urandom(n) for n in (61, 1514, 99, 1513, 60)]
    plain = REF.Framer(max_transfer=16384).pack(frames)
    assert b"".join(plain).count(b"\x00\x00") >= 0
    assert REF.Framer(max_transfer=16384).counters()["padded"] == 0
    # The reference without out_chunk never pads: frames go as they came.
    assert through_f_eem([b"".join(plain)], 1 << 20) == frames


def test_out_chunk_is_checked():
    with pytest.raises(ValueError, match="out_chunk"):
        REF.Framer(out_chunk=1000)  # not a multiple of 512
    with pytest.raises(ValueError, match="out_chunk"):
        FAST.Framer(out_chunk=1024, max_packet=512)  # cannot hold a full packet
    assert FAST.Framer(out_chunk=1536, max_packet=512, max_transfer=16384).out_chunk == 1536


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), chunk=chunks, sizes=sizes,
       chunks_per_transfer=st.integers(1, 12))
def test_the_c_tx_path_keeps_the_chunk_rule(seed, chunk, sizes, chunks_per_transfer):
    """Frames read from a TAP (a socket pair here) straight into OUT transfers, moved
    past a chunk boundary in place: every chunk unpacks on its own, in order."""
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    framer = FAST.Framer(crc=True, max_packet=512, max_transfer=chunk * chunks_per_transfer,
                         out_chunk=chunk)
    transfers = through_the_c_tx_path(framer, frames)
    assert through_f_eem(transfers, chunk) == [padded(f) for f in frames]
    assert all(len(t) <= chunk * chunks_per_transfer for t in transfers)
    counters = framer.counters()
    assert counters["frames"] == len(frames) and counters["oversize"] == 0


def through_the_c_tx_path(framer, frames: list[bytes]) -> list[bytes]:
    """The OUT transfers the C TX path builds from these frames, queued on a TAP (a
    socket pair here) and read straight into transfers."""
    from eembridge._fast.datapath import TxPath

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setblocking(False)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        tx = TxPath(framer, a.fileno(), 64 * framer.max_transfer)
        for frame in frames:
            b.send(frame)
        return [bytes(t.buffer) for t in tx.fill()]
    finally:
        a.close()
        b.close()


def test_longest_frames_fill_one_chunk_each():
    frames = [os.urandom(DEFAULT_MAX_LENGTH - CHECK_SIZE) for _ in range(10)]  # 1518 bytes: 4 a transfer
    transfers = REF.Framer(max_transfer=1536 * 4, out_chunk=1536).pack(frames)
    assert [len(t) for t in transfers] == [1536 * 3 + 1524, 1536 * 3 + 1524, 1536 + 1524]


# -- batch=False: one frame per transfer, what Linux's cdc_eem sends --------------------

ZEPHYR_RX_BUFFER = 1514 + 4 + 2  # Zephyr's EEM rx_buf: NET_ETH_MAX_FRAME_SIZE + sentinel + header


def zephyr_eem_read(transfer: bytes) -> list[bytes] | None:
    """What Zephyr's EEM function (subsys/usb/device/class/netusb/function_eem.c,
    eem_read_cb) makes of one OUT transfer: it reads the transfer into one buffer of
    ZEPHYR_RX_BUFFER bytes (None: it does not fit) and walks the EEM packets in it,
    stopping at the first zero-length one. It checks no CRC and never joins a packet
    across transfers: firmware written against Linux's cdc_eem, not the whole spec."""
    if len(transfer) > ZEPHYR_RX_BUFFER:
        return None
    frames, pos, size = [], 0, len(transfer)
    while size >= 2:
        header = int.from_bytes(transfer[pos : pos + 2], "little")
        length = header & (0x07FF if header & 0x8000 else 0x3FFF)
        if length + 2 > size:
            return None  # "pkt size error": the rest of the transfer is lost
        size, pos = size - 2, pos + 2
        if not header & 0x8000:
            if not size or not length:
                break  # "no payload": whatever follows a zero-length packet is ignored
            frames.append(transfer[pos : pos + length - 4])
        size, pos = size - length, pos + length
    return frames


frame_sizes = st.lists(st.integers(14, 1514), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), crc=st.booleans(), sizes=frame_sizes,
       max_packet=st.sampled_from([64, 512, 1024]))
def test_without_batching_every_frame_has_a_transfer_of_its_own(seed, crc, sizes, max_packet):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    for impl in (REF, FAST):
        framer = impl.Framer(crc=crc, max_packet=max_packet, max_transfer=16384, batch=False)
        transfers = framer.pack(frames)
        assert len(transfers) == len(frames)
        assert [zephyr_eem_read(t) for t in transfers] == [[f] for f in frames]
        assert framer.counters()["transfers"] == len(frames)


def test_a_batched_transfer_is_what_zephyr_cannot_take():
    """Why batching is not the default for a device not known to take it: the same
    frames batched for f_eem reach Zephyr's EEM function incomplete."""
    frames = [os.urandom(n) for n in (60, 90, 1514, 200, 1400, 66, 66, 1000)]
    batched = REF.Framer(max_transfer=12288, out_chunk=1536).pack(frames)
    got = [zephyr_eem_read(t) for t in batched]
    assert None in got or sum(len(g) for g in got if g) < len(frames)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), sizes=frame_sizes)
def test_the_c_tx_path_without_batching_sends_one_frame_per_transfer(seed, sizes):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    framer = FAST.Framer(crc=False, max_packet=64, max_transfer=1526, batch=False)
    transfers = through_the_c_tx_path(framer, frames)
    assert [zephyr_eem_read(t) for t in transfers] == [[f] for f in frames]
