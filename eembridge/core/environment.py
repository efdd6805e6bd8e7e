"""Every EEMBRIDGE_* environment variable eembridge reads, read here, once, at import.

They are switches for comparing and testing, not configuration (that is the option table,
core/options.py): a user never needs one.

  EEMBRIDGE_PUREPYTHON=1      the pure-Python codec and data path (the readable reference)
  EEMBRIDGE_REQUIRE_CYTHON=1  a missing or broken extension is an ImportError, not a silent
                              fall back to the reference (CI must not pass on a bad build)
  EEMBRIDGE_NATIVE=0          the bridge's Python loop even where the C engine could run
                              (bench/interop.py --variant compares the two)
  EEMBRIDGE_USBFS_MMAP=0      IN transfers land in the ring, not in memory mapped from usbfs

Code reads `environment.ENV` when it decides (not a copy taken at its own import), so a
test can swap in another `Environment`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Environment:
    purepython: bool = False
    require_cython: bool = False
    native: bool = True
    usbfs_mmap: bool = True


def read(environ: Mapping[str, str] = os.environ) -> Environment:
    return Environment(
        purepython=bool(environ.get("EEMBRIDGE_PUREPYTHON")),
        require_cython=bool(environ.get("EEMBRIDGE_REQUIRE_CYTHON")),
        native=environ.get("EEMBRIDGE_NATIVE") != "0",
        usbfs_mmap=environ.get("EEMBRIDGE_USBFS_MMAP") != "0",
    )


ENV = read()
