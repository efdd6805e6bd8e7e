"""One guest boot and the result files its script left, as the guest tests read them.

The in-guest scripts (lib.sh) record every step as files under $RW: NAME.rc holds the
step's exit status, NAME.txt/.err/.json/.log what it printed. A test reads its own
files through `BootResults`; a missing file or a non-zero step fails naming the file
and showing the console or the bridge logs, never a bare KeyError or assert.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from guest import SETUP_HINT, GuestError, GuestResult, missing_facilities, run_in_guest


def boot_guest(script: str, rwdir: Path, *, timeout: float, label: str,
               check: bool = False) -> GuestResult | str:
    """Boot once running `script`; the result, or why it could not boot (for pytest.fail).

    Without `check`, a script that stops half-way is not an error here: it leaves some
    files missing, and the tests reading them fail showing the console tail.
    """
    missing = missing_facilities()
    if missing:
        return f"real-peer guest cannot boot, missing: {', '.join(missing)} ({SETUP_HINT})"
    try:
        result = run_in_guest(script, rwdir, timeout=timeout)
        return result.check() if check else result
    except GuestError as exc:  # no boot at all, a timeout, or (check) a failed script
        return f"{label}: {exc}"


def boot_or_fail(script: str, rwdir: Path, *, timeout: float, label: str,
                 check: bool = False) -> GuestResult:
    """boot_guest, failing the test (not erroring it) when the guest cannot boot."""
    result = boot_guest(script, rwdir, timeout=timeout, label=label, check=check)
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


class BootResults:
    """The files one guest script wrote, under `subdir` of the rwdir if given.

    `logs` are the bridge logs whose tails a failing step shows; `label` prefixes every
    failure (which speed, when one boot runs the checks more than once).
    """

    def __init__(self, result: GuestResult, *, subdir: str = "", label: str = "",
                 logs: tuple[str, ...] = ("bridge.log",)) -> None:
        self.result = result
        self.dir: Path = result.rwdir / subdir if subdir else result.rwdir
        self.label = label
        self.logs = logs

    def read(self, name: str) -> str:
        path = self.dir / name
        assert path.exists(), f"{self.label}the guest wrote no {name}; console tail:\n{self.result.output[-3000:]}"
        return path.read_text().strip()

    def json(self, name: str) -> Any:  # whatever the command printed
        return json.loads(self.read(name))

    def env(self) -> dict[str, str]:
        """env.txt (VAR=value lines, from gadget.sh or the script itself) as a dict."""
        return dict(line.split("=", 1) for line in self.read("env.txt").splitlines() if "=" in line)

    def rc(self, name: str) -> None:
        """Step NAME exited 0; otherwise show what it printed and the bridge log tails."""
        code = self.read(f"{name}.rc")
        if code == "0":
            return
        extra = ""
        for suffix in (".txt", ".err", ".json", ".log"):
            p = self.dir / f"{name}{suffix}"
            if p.exists():
                extra += f"\n--- {p.name}:\n{p.read_text()[-2000:]}"
        for log in self.logs:
            p = self.dir / log
            tail = p.read_text()[-3000:] if p.exists() else f"(no {log})"
            extra += f"\n--- {log} tail:\n{tail}"
        pytest.fail(f"{self.label}step {name} exited {code}{extra}", pytrace=False)
