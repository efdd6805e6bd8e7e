"""False-frame soak: lossy bulk IN streams through the deframer, false frames per million.

Traffic is what a host sees from a device: TCP/IPv4 data and ACKs, UDP and TCP over
IPv6, ICMP, ARP (mixed sizes, short frames padded to 60 bytes; a few broadcast and
multicast, the rest to HOST_MAC). A pool of distinct frames (random payloads) is
drawn from with a seeded generator and framed as a device would: CRC or sentinel
mode, one packet per transfer (Linux f_eem) or batched up to --device-transfer
bytes; every device transfer ends with a short packet (an EEM zero-length packet is
appended when it would end on a max-packet boundary, as codec.Framer does). Each
max-packet-sized USB packet is then lost with probability --loss (seeded). The host's
bulk IN transfers are what it would see: packets gather until --in-transfer bytes or
a short packet ends them (a lost short packet merges two device transfers).

Printed per cell: false frames per million frames sent (a delivered frame that is not
byte-identical to one in the pool), frames lost (%), frames refused by the new
plausibility rule and resyncs. 10M frames: --frames 10000000 (times: bench/RESULTS.md).

    python3 bench/falseframes.py [--frames 1000000] [--loss 1,2,5] [--impl cython]
        [--checkout DIR] [--max-packet 512] [--seed 1] [--json]

--checkout runs another tree's eembridge (e.g. the code before a change) with this
script, for before/after tables.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HOST_MAC = bytes.fromhex("020000000001")
DEVICE_MAC = bytes.fromhex("020000000002")
SENTINEL = b"\xde\xad\xbe\xef"
POOL = 20000  # distinct frames; a false frame equal to one of them would go unseen


def _ipv4_checksum(data: bytes) -> int:
    """The Internet checksum of data (RFC 1071): the one's complement sum of its 16-bit
    words is the number they make modulo 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return ~total & 0xFFFF


def _with_checksum(segment: bytes, at: int, pseudo: bytes) -> bytes:
    checksum = _ipv4_checksum(pseudo + segment)
    return segment[:at] + struct.pack("!H", checksum) + segment[at + 2 :]


SRC_IP, DST_IP = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
SRC_IP6, DST_IP6 = b"\xfe\x80" + bytes(13) + b"\x02", b"\xfe\x80" + bytes(13) + b"\x01"


def _ipv4(rng: np.random.Generator, proto: int, payload: bytes) -> bytes:
    """An IPv4 packet; TCP, UDP and ICMP payloads get their checksum (the first two
    over the pseudo-header), as a real stack sends them."""
    if proto in (6, 17):
        pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, proto, len(payload))
        payload = _with_checksum(payload, 16 if proto == 6 else 6, pseudo)
    elif proto == 1:
        payload = _with_checksum(payload, 2, b"")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload),
                                   int(rng.integers(65536)), 0x4000, 64, proto, 0, SRC_IP,
                                   DST_IP))
    header[10:12] = struct.pack("!H", _ipv4_checksum(bytes(header)))
    return bytes(header) + payload


def _tcp(rng: np.random.Generator, data: bytes) -> bytes:
    """A TCP segment, checksum zero until _ipv4/_ipv6 computes it."""
    return struct.pack("!HHIIHHHH", 5201, int(rng.integers(1024, 65536)),
                       int(rng.integers(1 << 32)), int(rng.integers(1 << 32)), 0x5010,
                       65535, 0, 0) + data


def _ipv6(proto: int, segment: bytes) -> bytes:
    pseudo = SRC_IP6 + DST_IP6 + struct.pack("!I3xB", len(segment), proto)
    segment = _with_checksum(segment, 16 if proto == 6 else 6, pseudo)
    return struct.pack("!IHBB16s16s", 0x60000000, len(segment), proto, 64, SRC_IP6,
                       DST_IP6) + segment


def _eth(dst: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = dst + DEVICE_MAC + struct.pack("!H", ethertype) + payload
    return frame + bytes(max(0, 60 - len(frame)))  # Ethernet minimum, padded


def make_pool(rng: np.random.Generator, count: int = POOL) -> list[bytes]:
    """Distinct realistic frames; the mix is roughly a bulk TCP transfer plus chatter."""
    frames = set()
    while len(frames) < count:
        kind = rng.random()
        dst = HOST_MAC
        if kind < 0.45:  # full-size TCP data
            frame = _eth(dst, 0x0800, _ipv4(rng, 6, _tcp(rng, rng.bytes(1460))))
        elif kind < 0.60:  # TCP data of any size
            frame = _eth(dst, 0x0800, _ipv4(rng, 6, _tcp(rng, rng.bytes(int(rng.integers(1, 1461))))))
        elif kind < 0.80:  # TCP ACK
            frame = _eth(dst, 0x0800, _ipv4(rng, 6, _tcp(rng, b"")))
        elif kind < 0.88:  # IPv6: UDP or TCP of any size
            data = rng.bytes(int(rng.integers(0, 1421)))
            if rng.random() < 0.5:
                segment, proto = struct.pack("!HHHH", 5353, 5353, 8 + len(data), 0) + data, 17
            else:
                segment, proto = _tcp(rng, data), 6
            if rng.random() < 0.2:
                dst = bytes.fromhex("333300000001")
            frame = _eth(dst, 0x86DD, _ipv6(proto, segment))
        elif kind < 0.94:  # ICMP echo of any size
            frame = _eth(dst, 0x0800, _ipv4(rng, 1, b"\x00\x00\x00\x00" + rng.bytes(int(rng.integers(4, 1473)))))
        else:  # ARP request (broadcast) or reply
            request = rng.random() < 0.5
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1 if request else 2, DEVICE_MAC,
                              bytes([10, 0, 0, 2]), bytes(6) if request else HOST_MAC,
                              bytes([10, 0, int(rng.integers(256)), int(rng.integers(256))]))
            frame = _eth(b"\xff" * 6 if request else dst, 0x0806, arp)
        frames.add(frame)
    return sorted(frames)


def packetise(frames: list[bytes], crc: bool) -> list[bytes]:
    out = []
    for frame in frames:
        check = struct.pack("<I", zlib.crc32(frame)) if crc else SENTINEL
        out.append(struct.pack("<H", (0x4000 if crc else 0) | (len(frame) + 4)) + frame + check)
    return out


def device_transfers(rng: np.random.Generator, order: np.ndarray, packets: list[bytes],
                     batch: int, max_packet: int):
    """Yield the device's transfers (bytes) for the frames in `order`."""
    current: list[bytes] = []
    size = 0
    for index in order.tolist():
        packet = packets[index]
        if current and (not batch or size + len(packet) + 2 > batch):
            transfer = b"".join(current)
            yield transfer + b"\0\0" if len(transfer) % max_packet == 0 else transfer
            current, size = [], 0
        current.append(packet)
        size += len(packet)
    if current:
        transfer = b"".join(current)
        yield transfer + b"\0\0" if len(transfer) % max_packet == 0 else transfer


def host_transfers(rng: np.random.Generator, transfers, loss: float, max_packet: int,
                   in_transfer: int):
    """Yield (bytes, short) as the host's bulk IN transfers complete, packets lost at
    random. Every device transfer ends with a short packet, so without a loss each one
    is one host transfer (or several full ones and a short one, if longer)."""
    pending = bytearray()  # a host transfer still open (its short packet was lost)
    draws = rng.random(1 << 16)
    used = 0
    for transfer in transfers:
        n = -(-len(transfer) // max_packet)
        if used + n > len(draws):
            draws, used = rng.random(1 << 16), 0
        lost = draws[used : used + n] < loss
        used += n
        if not pending and not lost.any() and len(transfer) <= in_transfer:
            yield transfer, True
            continue
        for i in range(n):
            if lost[i]:
                continue
            piece = transfer[i * max_packet : (i + 1) * max_packet]
            pending += piece
            if len(pending) == in_transfer:
                yield bytes(pending), False
                pending.clear()
            elif len(piece) < max_packet:
                yield bytes(pending), True
                pending.clear()
            elif len(pending) + max_packet > in_transfer:
                # The host's buffer cannot take another whole packet: usbfs would end the
                # transfer with an overflow; as if it were full.
                yield bytes(pending), False
                pending.clear()
    if pending:
        yield bytes(pending), True


def run_cell(module, pool: list[bytes], crc: bool, batch: int, loss: float, frames: int,
             seed: int, max_packet: int, in_transfer: int, mac: bytes | None) -> dict:
    rng = np.random.default_rng(seed)
    packets = packetise(pool, crc)
    pool_set = set(pool)
    try:
        deframer = module.Deframer(mac=mac)
    except TypeError:  # the codec before the plausibility rule has no mac
        deframer = module.Deframer()
    Frame = sys.modules[module.__name__.rsplit(".", 1)[0] + ".events"].Frame
    false = genuine = 0
    examples: list[str] = []
    start = time.perf_counter()
    done = 0
    chunk = 200_000
    while done < frames:
        order = rng.integers(len(pool), size=min(chunk, frames - done))
        done += len(order)
        for data, short in host_transfers(rng, device_transfers(rng, order, packets, batch, max_packet),
                                          loss, max_packet, in_transfer):
            for event in deframer.feed(data, short):
                if type(event) is Frame:
                    if event.data in pool_set:
                        genuine += 1
                    else:
                        false += 1
                        if len(examples) < 3:
                            examples.append(event.data[:16].hex())
    elapsed = time.perf_counter() - start
    counters = deframer.counters()
    return {
        "mode": "crc" if crc else "sentinel", "batch": batch, "loss": loss, "frames": frames,
        "false": false, "false_per_million": false * 1e6 / frames,
        "lost_pct": 100.0 * (frames - genuine) / frames,
        "implausible": counters.get("implausible", None), "resyncs": counters["resyncs"],
        "seconds": elapsed, "examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames per cell")
    parser.add_argument("--loss", default="1,2,5", help="percent of USB packets lost, comma list")
    parser.add_argument("--impl", choices=("cython", "python"), default="cython")
    parser.add_argument("--modes", default="sentinel,crc")
    parser.add_argument("--batch", default="0,16384",
                        help="device transfer sizes: 0 = one packet per transfer (default 0,16384)")
    parser.add_argument("--max-packet", type=int, default=512)
    parser.add_argument("--in-transfer", type=int, default=16384, help="host IN transfer size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-mac", action="store_true", help="do not tell the deframer HOST_MAC")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="tree whose eembridge to run (default: this one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    import importlib

    module = importlib.import_module("eembridge._fast.eem" if args.impl == "cython" else "eembridge.core.codec")
    pool = make_pool(np.random.default_rng(args.seed))
    rows = []
    if not args.json:
        print(f"false-frame soak: {module.__name__} from {args.checkout}, {args.frames} frames per "
              f"cell, max packet {args.max_packet}, host IN transfers {args.in_transfer}, "
              f"seed {args.seed}, mac {'-' if args.no_mac else HOST_MAC.hex(':')}")
        print(f"{'mode':<9}{'device xfer':>12}{'loss %':>7}{'false/M':>9}{'false':>7}"
              f"{'lost %':>8}{'implaus.':>9}{'resyncs':>9}{'s':>7}  examples")
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for loss in (float(x) / 100 for x in args.loss.split(",")):
                row = run_cell(module, pool, mode == "crc", batch, loss, args.frames, args.seed,
                               args.max_packet, args.in_transfer, None if args.no_mac else HOST_MAC)
                rows.append(row)
                if not args.json:
                    implausible = "-" if row["implausible"] is None else row["implausible"]
                    print(f"{row['mode']:<9}{batch or 'one pkt':>12}{100 * loss:>7g}"
                          f"{row['false_per_million']:>9.2f}{row['false']:>7}{row['lost_pct']:>8.3f}"
                          f"{implausible:>9}{row['resyncs']:>9}{row['seconds']:>7.0f}  "
                          f"{' '.join(row['examples'])}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
