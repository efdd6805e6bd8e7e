"""ioctl request numbers against the values the kernel's headers give."""

from __future__ import annotations

import platform

import pytest

from eembridge.core import ioctl


def test_numbers_match_the_kernel_headers_on_this_machine():
    assert platform.machine() == "x86_64", "these values are x86_64's: add this machine's"
    assert ioctl.IOW("T", 202, 4) == 0x400454CA  # TUNSETIFF
    assert ioctl.IOR("T", 210, 4) == 0x800454D2  # TUNGETIFF
    assert ioctl.IOWR("U", 18, 16) == 0xC0105512  # USBDEVFS_IOCTL (64-bit struct)
    assert ioctl.IO("U", 23) == 0x5517  # USBDEVFS_CONNECT


def test_other_layouts_follow_their_asm_ioctl_h():
    # powerpc: 13 size bits, write 4, read 2 -> TUNSETIFF is 0x800454ca there.
    bits, write, read = ioctl.layout("ppc64le")
    assert (write << (16 + bits)) | (4 << 16) | (ord("T") << 8) | 202 == 0x800454CA
    assert ioctl.layout("parisc") == (14, 2, 1)
    assert ioctl.layout("aarch64") == ioctl.layout("x86_64") == (14, 1, 2)


def test_an_argument_too_large_for_the_request_word_is_refused():
    with pytest.raises(ValueError):
        ioctl.IOW("T", 1, 1 << 14)
