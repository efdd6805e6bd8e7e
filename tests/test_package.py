"""The package as a user meets it: version line, codec choice, linters clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eembridge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=60,
    )


def test_version_names_the_cython_codec():
    env = {k: v for k, v in os.environ.items() if k != "EEMBRIDGE_PUREPYTHON"}
    result = subprocess.run(
        [sys.executable, "-m", "eembridge", "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(codec: cython)"), result.stdout


def test_purepython_switch_forces_the_reference():
    result = run("--version", EEMBRIDGE_PUREPYTHON="1")
    assert result.stdout.strip().endswith("(codec: python)"), result.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed (pip install -e '.[test]')"
    result = subprocess.run(
        [ruff, "check", "eembridge", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


LAYERS = ("core", "datapath", "usb", "link", "observe", "capture", "sim", "cli", "farm")


def _imports(path: Path) -> set[str]:
    """The eembridge modules a source file imports (absolute names)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "eembridge" or n.startswith("eembridge.")}


def test_the_package_is_laid_out_in_layers():
    """Each layer is a sub-package with a docstring saying what it holds; at the top
    only the face (__init__), the bridge and __main__."""
    top = {p.name for p in (ROOT / "eembridge").glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "bridge.py"}, top
    for layer in LAYERS:
        init = ROOT / "eembridge" / layer / "__init__.py"
        assert init.read_text().startswith('"""'), f"{layer} has no docstring"


def test_core_is_sans_io_and_depends_on_nothing_outside_it():
    for path in (ROOT / "eembridge" / "core").glob("*.py"):
        outside = {n for n in _imports(path)
                   if not n.startswith("eembridge.core") and n not in ("eembridge", "eembridge.CODEC")}
        assert not outside, f"{path.name} imports {sorted(outside)}"
        source = path.read_text()
        for io in ("import socket", "import threading", "import select", "os.read(", "os.write("):
            assert io not in source, f"{path.name}: {io}"


def test_the_face_exports_what_an_embedding_program_needs():
    code = ("import eembridge as e; "
            "print(sorted(n for n in e.__all__ if getattr(e, n, None) is None))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    import eembridge

    assert {"Bridge", "BridgeOptions", "Transport", "Deframer", "Framer", "events", "errors",
            "__version__"} <= set(eembridge.__all__)


def test_each_extension_is_the_module_its_source_names():
    """eembridge/_fast/X.pyx is built as eembridge._fast.X: only then is the X.pxd beside it
    that module's own, so the cdef classes other extensions cimport are the real types,
    checked by Cython, and no C pointer passes through a PyCapsule."""
    import importlib

    fast = ROOT / "eembridge" / "_fast"
    sources = sorted(p.stem for p in fast.glob("*.pyx"))
    assert {"eem", "ring", "datapath", "usb", "simlink", "tunlink"} <= set(sources), sources
    for name in sources:
        module = importlib.import_module(f"eembridge._fast.{name}")
        assert Path(module.__file__).parent == fast, module.__file__
    for path in [*fast.glob("*.pyx"), *fast.glob("*.pxd"), *fast.glob("*.pxi")]:
        assert "pycapsule" not in path.read_text().lower(), path.name
    import eembridge

    assert eembridge.Deframer.__module__ == "eembridge._fast.eem"
