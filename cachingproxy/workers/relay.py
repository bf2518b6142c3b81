"""Worker log lines, relayed through the supervisor's own log.

A worker writes each event to its stderr as ``L [worker N (pid)] text``
(``L`` the level's initial, no timestamp); the supervisor reads the pipe and
logs every line at that level, so worker logs land wherever twistd logs
(stdout under ``-n``, ``--logfile`` when daemonized) with one timestamp.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText
from zope.interface import implementer

_LEVELS = {
    "D": LogLevel.debug,
    "I": LogLevel.info,
    "W": LogLevel.warn,
    "E": LogLevel.error,
    "C": LogLevel.critical,
}
_log = Logger(namespace="cachingproxy.workers")
MAX_LINE = 64 * 1024
"""A longer line without its end is relayed in pieces."""


def worker_observer(label: str, out: IO[str] = sys.stderr) -> ILogObserver:
    """The worker's log observer: one relayable line per line of text."""

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        level = event.get("log_level", LogLevel.info)
        initial = str(getattr(level, "name", "info"))[:1].upper() or "I"
        out.write(
            "".join(f"{initial} [{label}] {line}\n" for line in text.splitlines())
        )
        out.flush()

    return observe


class LineRelay:
    """Turns a worker's stderr bytes into supervisor log events."""

    def __init__(self) -> None:
        self._buffer = b""

    def received(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            lines.append(self._buffer)
            self._buffer = b""
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        level = _LEVELS.get(line[:1]) if line[1:2] == " " else None
        if level is None:
            # Not from the worker's observer (an early error, a traceback
            # printed by Python itself).
            _log.emit(LogLevel.error, "{line}", line=line)
        else:
            _log.emit(level, "{line}", line=line[2:])


__all__ = ["LineRelay", "worker_observer"]
