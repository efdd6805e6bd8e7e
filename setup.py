"""Build the Cython extensions in eembridge/_fast/ as eembridge._fast.<name>.

Each extension is named for where its source lies, so the .pxd beside a .pyx is that
module's own and a cdef class declared there is the one other modules cimport.

A missing compiler, Cython or libusb header is reported in one line naming the
package to install, instead of a page of compiler output.
"""

import os
import shutil
import sys

from setuptools import Extension, setup


def _fail(message: str) -> None:
    sys.stderr.write(f"eembridge build error: {message}\n")
    raise SystemExit(1)


try:
    from Cython.Build import cythonize
except ImportError:
    _fail("Cython is not installed: pip install cython")

try:
    import numpy
except ImportError:
    _fail("numpy is not installed: pip install numpy")

if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "cc", "gcc", "clang")):
    _fail("no C compiler found: apt-get install build-essential")

LIBUSB_INCLUDE = "/usr/include/libusb-1.0"

extensions = [
    Extension("eembridge._fast.ring", ["eembridge/_fast/ring.pyx"]),
    Extension("eembridge._fast.eem", ["eembridge/_fast/eem.pyx"], libraries=["z"]),
    Extension("eembridge._fast.datapath", ["eembridge/_fast/datapath.pyx"]),
    # The engine (engine.pxi) driven by the simulated device; usb drives it by libusb.
    Extension("eembridge._fast.simlink", ["eembridge/_fast/simlink.pyx"]),
    # The TUN link's Ethernet <-> IP fast path (link/tun.py installs it).
    Extension("eembridge._fast.tunlink", ["eembridge/_fast/tunlink.pyx"]),
]
# Built only when their sources exist, so a partial checkout still builds.
extensions = [ext for ext in extensions if os.path.exists(ext.sources[0])]
# EEMBRIDGE_BUILD_ONLY=ring,eem builds a subset (handy while another is being edited).
_only = os.environ.get("EEMBRIDGE_BUILD_ONLY")
if _only:
    extensions = [ext for ext in extensions if ext.name.split(".")[-1] in _only.split(",")]
if os.path.exists(os.path.join("eembridge", "_fast", "usb.pyx")):
    if not os.path.exists(os.path.join(LIBUSB_INCLUDE, "libusb.h")):
        _fail(f"libusb.h not found in {LIBUSB_INCLUDE}: apt-get install libusb-1.0-0-dev")
    extensions.append(
        Extension(
            "eembridge._fast.usb",
            ["eembridge/_fast/usb.pyx"],
            include_dirs=[LIBUSB_INCLUDE],
            libraries=["usb-1.0"],
        )
    )


def _slirp_flags() -> tuple[list[str], list[str]]:
    """Include directories and libraries of libslirp, by pkg-config. Its slirp.pc requires
    glib-2.0's .pc (libglib2.0-dev) although libslirp.h includes nothing of GLib, so
    without it the header's own directory will do."""
    import subprocess

    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "slirp"], check=True,
                               capture_output=True, text=True).stdout.split()
        return ([f[2:] for f in flags if f.startswith("-I") and "glib" not in f],
                [f[2:] for f in flags if f.startswith("-l") and "glib" not in f])
    except (OSError, subprocess.CalledProcessError):
        if os.path.exists("/usr/include/slirp/libslirp.h"):
            return ["/usr/include/slirp"], ["slirp"]
    _fail("libslirp.h not found (the user link's network stack): apt-get install libslirp-dev")
    raise AssertionError  # _fail exits


if os.path.exists(os.path.join("eembridge", "_fast", "slirp.pyx")) and (
        not _only or "slirp" in _only.split(",")):
    _slirp_include, _slirp_libraries = _slirp_flags()
    extensions.append(Extension("eembridge._fast.slirp", ["eembridge/_fast/slirp.pyx"],
                                include_dirs=_slirp_include, libraries=_slirp_libraries))

for ext in extensions:
    ext.include_dirs.append(numpy.get_include())
    ext.extra_compile_args.extend(["-O3", "-Wno-unreachable-code"])
    ext.define_macros.append(("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"))

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
