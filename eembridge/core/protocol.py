"""CDC-EEM protocol facts (USB CDC EEM 1.0), shared by both codec implementations.

Everything here is a plain constant or a pure function, so the Cython codec and the
pure-Python reference import the same names and emit the same events and counters.
"""

from __future__ import annotations

# Interface triple that marks an EEM function.
USB_CLASS_CDC = 0x02
USB_SUBCLASS_EEM = 0x0C
USB_PROTOCOL_EEM = 0x07

HEADER_SIZE = 2
CHECK_SIZE = 4  # CRC-32 or sentinel that ends every data packet
SENTINEL = b"\xde\xad\xbe\xef"

# Header bits.
TYPE_COMMAND = 0x8000  # bmType
DATA_CRC = 0x4000  # bmCRC in a data header; reserved in a command header
DATA_LENGTH_MASK = 0x3FFF
COMMAND_SHIFT = 11
COMMAND_MASK = 0x7
COMMAND_PARAM_MASK = 0x07FF

# bmEEMCmd values.
CMD_ECHO = 0
CMD_ECHO_RESPONSE = 1
CMD_SUSPEND_HINT = 2
CMD_RESPONSE_HINT = 3
CMD_RESPONSE_COMPLETE_HINT = 4
CMD_TICKLE = 5
HINT_COMMANDS = (CMD_SUSPEND_HINT, CMD_RESPONSE_HINT, CMD_RESPONSE_COMPLETE_HINT, CMD_TICKLE)
COMMAND_NAMES = {
    CMD_ECHO: "echo",
    CMD_ECHO_RESPONSE: "echo_response",
    CMD_SUSPEND_HINT: "suspend_hint",
    CMD_RESPONSE_HINT: "response_hint",
    CMD_RESPONSE_COMPLETE_HINT: "response_complete_hint",
    CMD_TICKLE: "tickle",
    6: "reserved6",
    7: "reserved7",
}

ETH_HEADER = 14
# Shortest bmLength worth believing: an Ethernet header plus the check. Anything
# shorter carries no frame, and accepting it would let four zero bytes after 0x4004
# (the CRC of nothing is 0) pass as a "valid" packet while scanning garbage.
MIN_DATA_LENGTH = ETH_HEADER + CHECK_SIZE
# Default longest bmLength: a VLAN-tagged 1500-byte-MTU frame plus its check.
DEFAULT_MAX_LENGTH = 1500 + ETH_HEADER + 4 + CHECK_SIZE
MAX_ECHO_DATA = COMMAND_PARAM_MASK

# Linux f_eem queues 1536-byte OUT requests and fails a whole request when a packet
# runs past it, so by default never send a longer transfer.
DEFAULT_MAX_TRANSFER = 1536
MAX_PACKET_SIZES = (64, 512, 1024)  # full, high, super speed bulk

# Commands wait for confirmation (see codec.py); these bound what may wait.
MAX_PENDING_COMMANDS = 16
MAX_PENDING_COMMAND_BYTES = 4 * (MAX_ECHO_DATA + HEADER_SIZE)

# Deframer counters, in a stable order: names are part of the public interface
# (stats, metrics, JSON output), so only ever add to this list.
DEFRAMER_COUNTERS = (
    "transfers",  # bulk IN transfers fed
    "short_transfers",  # of which ended short (or were a ZLP)
    "bytes_in",  # bytes fed
    "frames",  # data packets delivered
    "bytes",  # Ethernet bytes delivered (check stripped)
    "crc_frames",  # delivered frames that carried a CRC (the rest carried the sentinel)
    "zlps",  # zero-length EEM packets skipped
    "crc_errors",  # bmCRC=1 packet whose CRC did not match
    "sentinel_errors",  # bmCRC=0 packet whose last 4 bytes were not DE AD BE EF
    "oversize",  # bmLength above the configured maximum
    "runts",  # bmLength too short to hold an Ethernet header and check
    "truncated",  # packet cut off by the end of a short transfer
    "reserved_commands",  # bmEEMCmd 6 or 7, or a command with reserved bit 14 set
    "unconfirmed_commands",  # commands dropped because what followed them was garbage
    "resyncs",  # times the deframer found its way back after garbage
    "bytes_skipped",  # bytes dropped as garbage, truncated or unconfirmed
    "echo",  # Echo commands received
    "echo_response",  # Echo Response commands received
    "hints",  # Suspend Hint, Response Hint, Response Complete Hint, Tickle
    "implausible",  # sentinel packets found by scanning refused by the plausibility rule
    "unchecked",  # CRC packets refused unchecked: the budget for failed CRC work was spent
    "spliced",  # sentinel packets refused: a whole plausible packet ends inside at their sentinel
)

# Failed CRC checks are paid from a budget (codec.py, "Cost of garbage"): every byte the
# deframer moves past earns this many bytes of CRC work.
CRC_BUDGET_PER_BYTE = 2
# What a CRC check costs beyond its bytes (zlib's per-call cost is that of ~64 bytes of
# CRC), so that short candidates at every offset are bounded too.
CRC_CHECK_OVERHEAD = 64

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD
# Longest frame (check stripped) that may carry Ethernet padding after its IP packet or
# ARP message: 60 bytes, 64 with an 802.1Q tag.
PADDED_FRAME_MAX = 64

FRAMER_COUNTERS = (
    "frames",  # data packets framed
    "bytes",  # Ethernet bytes framed
    "transfers",  # transfers produced
    "transfer_bytes",  # bytes in those transfers
    "zlps",  # zero-length EEM packets appended for the max-packet rule
    "oversize",  # frames refused: longer than the configured maximum
    "runts",  # frames refused: shorter than an Ethernet header
    "echo",  # Echo commands built
    "echo_response",  # Echo Responses built
    "fill",  # zero-length EEM packets that fill a chunk (out_chunk) so no packet crosses it
    "padded",  # odd-length frames sent with one zero byte more (out_chunk)
)


def data_header(length_with_check: int, crc: bool) -> int:
    return (DATA_CRC if crc else 0) | length_with_check


def command_header(command: int, param: int) -> int:
    return TYPE_COMMAND | (command << COMMAND_SHIFT) | param
