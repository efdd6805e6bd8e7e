"""Logging for people and for collectors: one line per event that matters.

Three formats:
* ``journal``: ``<6>eembridge.bridge: message``. The ``<N>`` prefix is the syslog
  priority that journald reads from a service's stdout/stderr (sd-daemon(3)); no
  timestamp, the journal has its own. Chosen by default when JOURNAL_STREAM names our
  stderr, i.e. when systemd connected it to the journal.
* ``text``: timestamp, level, logger, message; the default on a terminal.
* ``json``: one JSON object per line (ts, level, logger, msg, and ``event`` plus its
  fields for the events below), for log collectors.

Events a collector can key on are logged with ``extra=event("name", field=value)``:
started, claimed, reconnected, unplugged, disconnected, stopped, resync (the garbage
summary), keepalive_lost. A transport that detaches a kernel driver logs ``detached``.

Garbage after a lost USB packet is normal on a bad link, so it is never logged per
packet: `GarbageSummary` turns the deframer's counters into at most one line per
interval ("resync: 37 garbage packets, 4123 bytes in the last 5.0 s").
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from ..core.options import FORMATS

# Python level -> syslog priority (sd-daemon.h SD_ERR ... SD_DEBUG).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# Deframer counters that each stand for one garbage packet (a header that did not hold).
GARBAGE_COUNTERS = (
    "crc_errors",
    "sentinel_errors",
    "oversize",
    "runts",
    "truncated",
    "reserved_commands",
    "unconfirmed_commands",
)


def event(name: str, **fields: Any) -> dict[str, Any]:
    """`extra=` for a log call that is an event: JSON lines carry name and fields."""
    return {"event": name, "fields": fields}


def journal_connected(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """True if systemd connected `fd` to the journal (JOURNAL_STREAM is "dev:inode")."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def syslog_priority(levelno: int) -> int:
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"<{syslog_priority(record.levelno)}>"
        # Every physical line gets the prefix, or journald files the rest at the default.
        return "\n".join(prefix + line for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        name = getattr(record, "event", None)
        if name:
            entry["event"] = name
            fields = getattr(record, "fields", None) or {}
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def resolve_format(fmt: str, environ: dict[str, str] | None = None) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        return "journal" if journal_connected(environ) else "text"
    return fmt


def setup_logging(verbose: int = 0, fmt: str = "auto", stream: Any = None) -> str:
    """Configure the root logger once; returns the format in use."""
    fmt = resolve_format(fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "journal":
        handler.setFormatter(JournalFormatter())
    elif fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    return fmt


class GarbageSummary:
    """At most one log line per `interval` about garbage the deframer dropped.

    `update(now, counters)` is called from the bridge's timer tick with the deframer's
    counters (cumulative, as `Deframer.counters()` returns them). Nothing is logged while
    nothing new was dropped; otherwise one line covers everything since the last one.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.log = logger
        self.interval = interval
        # The deframer's counters start at zero, so the baseline is zero too: garbage
        # counted before the first tick still goes into the first line.
        self._last: dict[str, int] = {}
        self._since: float | None = None
        self.lines = 0  # summaries logged (tests and stats can compare)

    def update(self, now: float, counters: dict[str, int], final: bool = False) -> bool:
        """Log a summary if the interval is over (or `final`: the bridge is stopping)."""
        if self._since is None:
            self._since = now
            if not final:
                return False
        if now - self._since < self.interval and not final:
            return False
        delta = {name: counters.get(name, 0) - self._last.get(name, 0)
                 for name in (*GARBAGE_COUNTERS, "bytes_skipped", "resyncs")}
        packets = sum(delta[name] for name in GARBAGE_COUNTERS)
        if packets <= 0 and delta["bytes_skipped"] <= 0:
            # Quiet: restart the window, so a later line does not claim a stale span.
            self._last, self._since = dict(counters), now
            return False
        window = now - self._since
        kinds = ", ".join(f"{name} {delta[name]}" for name in GARBAGE_COUNTERS if delta[name])
        self.log.warning(
            "resync: %d garbage packets, %d bytes in the last %.1f s (%s; %d resyncs)",
            packets, delta["bytes_skipped"], window, kinds or "skipped bytes only",
            delta["resyncs"],
            extra=event("resync", garbage_packets=packets, bytes=delta["bytes_skipped"],
                        seconds=round(window, 3), resyncs=delta["resyncs"],
                        **{name: delta[name] for name in GARBAGE_COUNTERS if delta[name]}),
        )
        self.lines += 1
        self._last, self._since = dict(counters), now
        return True


class RepeatSummary:
    """A warning that may repeat fast (an Echo Response nobody asked for, under a fault):
    the first one is logged as it happens, the rest at most once per `interval` as one
    line with their number. `hit()` where it happens, `tick()` from the timer tick."""

    def __init__(self, logger: logging.Logger, name: str, what: str, interval: float = 5.0) -> None:
        self.log = logger
        self.name = name  # event name in JSON/journal output
        self.what = what  # e.g. "Echo Responses nobody asked for: device or link fault"
        self.interval = interval
        self._since = float("-inf")  # when the last line was logged
        self._held = 0  # hits since then, not logged yet
        self.lines = 0

    def hit(self, now: float, detail: str) -> None:
        if now - self._since >= self.interval and not self._held:
            self.log.warning("%s: %s (%s)", self.name, self.what, detail,
                             extra=event(self.name, count=1, detail=detail))
            self._since = now
            self.lines += 1
        else:
            self._held += 1

    def tick(self, now: float, final: bool = False) -> None:
        if self._held and (final or now - self._since >= self.interval):
            span = now - self._since
            self.log.warning("%s: %d more %s in the last %.1f s", self.name, self._held,
                             self.what, span,
                             extra=event(self.name, count=self._held, seconds=round(span, 3)))
            self._held = 0
            self._since = now
            self.lines += 1
