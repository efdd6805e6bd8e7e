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
