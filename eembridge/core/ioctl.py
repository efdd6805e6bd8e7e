"""ioctl request numbers, computed the way <asm-generic/ioctl.h> does (_IO, _IOR, _IOW,
_IOWR) rather than pasted as magic numbers, for the TAP (link.tap) and usbfs
(usb.device) alike.

A few architectures lay the request word out differently (3 direction bits, 13 size
bits, other direction codes: asm/ioctl.h on powerpc, mips, sparc, alpha, parisc);
everything else (x86, arm, arm64, riscv, s390, loongarch) uses the generic one.
"""

from __future__ import annotations

import platform


def layout(machine: str) -> tuple[int, int, int]:
    """(size bits, write direction, read direction) of `machine`'s request word."""
    machine = machine.lower()
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 13, 4, 2
    if machine.startswith("parisc"):
        return 14, 2, 1
    return 14, 1, 2


_SIZEBITS, _WRITE, _READ = layout(platform.machine())
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + 8
_SIZESHIFT = _TYPESHIFT + 8
_DIRSHIFT = _SIZESHIFT + _SIZEBITS


def IOC(direction: int, type_: str, nr: int, size: int) -> int:  # noqa: N802 - C macro name
    if not 0 <= size < 1 << _SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the request word")
    return ((direction << _DIRSHIFT) | (ord(type_) << _TYPESHIFT) | (nr << _NRSHIFT)
            | (size << _SIZESHIFT))


def IO(type_: str, nr: int) -> int:  # noqa: N802
    return IOC(0, type_, nr, 0)


def IOW(type_: str, nr: int, size: int) -> int:  # noqa: N802
    return IOC(_WRITE, type_, nr, size)


def IOR(type_: str, nr: int, size: int) -> int:  # noqa: N802
    return IOC(_READ, type_, nr, size)


def IOWR(type_: str, nr: int, size: int) -> int:  # noqa: N802
    return IOC(_READ | _WRITE, type_, nr, size)
