"""Regenerate tests/fixtures/cdc_eem_{usbmon,eth}.pcap from the real-peer guest.

Boots the guest once (guest.py), brings up the f_eem gadget at high speed with
cdc_eem as the host driver (gadget.sh), flushes the ARP caches so the exchange starts
with ARP, and captures 3 pings plus 32 KB of TCP each way twice at once: as URBs on
usbmon0 and as Ethernet on the cdc_eem netdev (capture.sh). Then checks that the two
captures tell the same story (check_fixture) before copying them into tests/fixtures.

    python3 tests/interop/make_fixture.py [--bytes N] [--speed high|super|full]
    python3 tests/interop/make_fixture.py --check-only      # just verify the fixtures

The check is self-contained (no eembridge import): it is what the fixture promises.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest import REPO_DIR, run_in_guest  # noqa: E402

FIXTURES = REPO_DIR / "tests" / "fixtures"
USBMON_PCAP = FIXTURES / "cdc_eem_usbmon.pcap"
ETH_PCAP = FIXTURES / "cdc_eem_eth.pcap"
MAX_FIXTURE_BYTES = 500_000
LINKTYPE_ETHERNET = 1
LINKTYPE_USB_LINUX_MMAPPED = 220
SENTINEL = b"\xde\xad\xbe\xef"

GUEST_SCRIPT = """
bash $INTEROP/gadget.sh up {speed} > $RW/env.txt
. $RW/env.txt
ip neigh flush dev $HOST_IF
ip -n $PEER_NS neigh flush dev $PEER_IF
rm -rf $RW/capture
bash $INTEROP/capture.sh $RW/capture $HOST_IF $PEER_IP {nbytes}
cat $RW/env.txt
"""


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """(linktype, record payloads) of a classic little- or big-endian pcap file."""
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
              b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}[magic]
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    records, off = [], 24
    while off < len(data):
        incl = struct.unpack_from(endian + "I", data, off + 8)[0]
        records.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return linktype, records


@dataclass
class Story:
    """What the usbmon capture says crossed the link, per direction."""
    out_frames: list[bytes] = field(default_factory=list)  # host -> device, check stripped
    in_frames: list[bytes] = field(default_factory=list)
    out_crc: int = 0  # data packets with bmCRC=1
    out_sentinel: int = 0
    in_crc: int = 0
    in_sentinel: int = 0
    bad_checks: int = 0
    commands: int = 0
    packets_per_transfer: set[int] = field(default_factory=set)


def eem_packets(buf: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 2 <= len(buf):
        (hdr,) = struct.unpack_from("<H", buf, i)
        i += 2
        if hdr & 0x8000:  # command: only Echo (0) and Echo Response (1) carry data
            n = hdr & 0x7FF if (hdr >> 11 & 7) < 2 else 0
        else:  # data (0x0000 is a zero-length packet)
            n = hdr & 0x3FFF
        out.append((hdr, buf[i:i + n]))
        i += n
    return out


def usbmon_story(records: list[bytes]) -> Story:
    st = Story()
    for rec in records:
        kind, xfer, ep = rec[8:9], rec[9], rec[10]
        flag_data, length, len_cap = rec[15], *struct.unpack_from("<II", rec, 32)
        if xfer != 3 or flag_data != 0:  # bulk only, with data present
            continue
        is_in = bool(ep & 0x80)
        if (kind, is_in) not in ((b"S", False), (b"C", True)):
            continue
        data = rec[64:64 + len_cap]
        assert len(data) == len_cap == length, "usbmon record lost data: raise the snaplen"
        pkts = eem_packets(data)
        st.packets_per_transfer.add(sum(1 for h, _ in pkts if h != 0))
        for hdr, body in pkts:
            if hdr == 0:
                continue
            if hdr & 0x8000:
                st.commands += 1
                continue
            frame, check = body[:-4], body[-4:]
            crc = bool(hdr & 0x4000)
            ok = check == (struct.pack("<I", zlib.crc32(frame)) if crc else SENTINEL)
            st.bad_checks += not ok
            if is_in:
                st.in_frames.append(frame)
                st.in_crc += crc
                st.in_sentinel += not crc
            else:
                st.out_frames.append(frame)
                st.out_crc += crc
                st.out_sentinel += not crc
    return st


def check_fixture(usbmon: Path = USBMON_PCAP, eth: Path = ETH_PCAP) -> Story:
    """Assert the two captures agree frame for frame; return the usbmon story."""
    for p in (usbmon, eth):
        assert p.stat().st_size < MAX_FIXTURE_BYTES, f"{p} is {p.stat().st_size} bytes"
    lt_u, urbs = read_pcap(usbmon)
    lt_e, frames = read_pcap(eth)
    assert lt_u == LINKTYPE_USB_LINUX_MMAPPED, f"usbmon linktype {lt_u}"
    assert lt_e == LINKTYPE_ETHERNET, f"eth linktype {lt_e}"
    st = usbmon_story(urbs)
    host_mac = st.out_frames[0][6:12]
    eth_out = [f for f in frames if f[6:12] == host_mac]
    eth_in = [f for f in frames if f[6:12] != host_mac]
    assert st.bad_checks == 0, f"{st.bad_checks} EEM packets with a bad CRC/sentinel"
    assert st.out_frames == eth_out, "host->device EEM frames differ from the Ethernet capture"
    assert st.in_frames == eth_in, "device->host EEM frames differ from the Ethernet capture"
    return st


def describe(st: Story) -> str:
    return (f"out {len(st.out_frames)} frames (crc {st.out_crc}, sentinel {st.out_sentinel}), "
            f"in {len(st.in_frames)} frames (crc {st.in_crc}, sentinel {st.in_sentinel}), "
            f"commands {st.commands}, EEM packets per transfer {sorted(st.packets_per_transfer)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=int, default=32768, help="TCP bytes each way")
    ap.add_argument("--speed", default="high", choices=("high", "super", "full"))
    ap.add_argument("--rwdir", type=Path, default=REPO_DIR / "build" / "interop" / "fixture")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    if not args.check_only:
        if args.rwdir.exists():
            shutil.rmtree(args.rwdir)
        res = run_in_guest(GUEST_SCRIPT.format(speed=args.speed, nbytes=args.bytes), args.rwdir)
        print(res.output[-1500:])
        res.check()
        cap = args.rwdir / "capture"
        check_fixture(cap / "usbmon.pcap", cap / "eth.pcap")
        FIXTURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cap / "usbmon.pcap", USBMON_PCAP)
        shutil.copyfile(cap / "eth.pcap", ETH_PCAP)
        print(f"guest took {res.seconds:.1f} s")
    st = check_fixture()
    print(f"{USBMON_PCAP.name} ({USBMON_PCAP.stat().st_size} B), {ETH_PCAP.name} "
          f"({ETH_PCAP.stat().st_size} B) agree: {describe(st)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
