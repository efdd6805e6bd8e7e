"""Compile a small Cython module that cimports eembridge/_fast's .pxd files the way the
package's own extensions do, to test their C-level API (cached by source hash)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(name: str, source: str) -> ModuleType:
    pxds = b"".join(p.read_bytes() for p in sorted((ROOT / "eembridge" / "_fast").glob("*.pxd")))
    key = hashlib.sha256(source.encode() + pxds + sys.version.encode()).hexdigest()[:16]
    build_dir = ROOT / "build" / "tmp-cython-user" / f"{name}-{key}"
    built = list(build_dir.glob(f"{name}*.so"))
    if not built:
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / f"{name}.pyx").write_text(source)
        script = (
            "from setuptools import Extension, setup\n"
            "from Cython.Build import cythonize\n"
            f"setup(ext_modules=cythonize([Extension({name!r}, [{name + '.pyx'!r}],"
            " extra_compile_args=['-O2'])],"
            f" include_path=[{str(ROOT)!r}], quiet=True),"
            " script_args=['build_ext', '--inplace', '-q'])\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=build_dir, capture_output=True, text=True
        )
        built = list(build_dir.glob(f"{name}*.so"))
        if result.returncode != 0 or not built:
            pytest.fail(
                f"could not build the C-level test module {name} (needs Cython and a C "
                "compiler):\n" + result.stdout[-3000:] + result.stderr[-3000:]
            )
    spec = importlib.util.spec_from_file_location(name, built[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
