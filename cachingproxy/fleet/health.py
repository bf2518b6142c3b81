"""Whether the shared store answers: degraded, not down (SPEC 12).

Every operation on the store reports here.  While the store fails, the nodes
skip it (they serve their local tier and upstream) and only the periodic
poll (purge.py) tries it, so a dead store costs no client any waiting; the
failure is logged once a minute, and shown as ``shared_store`` on ``/`` and
in ``/status.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()

LOG_EVERY = 60.0
"""Seconds between two log lines about the same outage."""


class Health:
    """The shared store's state as seen by this node."""

    def __init__(self, clock: IReactorTime, where: str) -> None:
        self._clock = clock
        self.where = where
        self.ok = True
        self.error = ""
        self.since = clock.seconds()
        self.failures = 0
        self._logged_at: float | None = None
        self.on_recovered: Callable[[], object] = lambda: None
        """Called when the store answers again after failing."""

    def failed(self, error: object) -> None:
        """An operation could not reach the store (or the store failed it)."""
        now = self._clock.seconds()
        self.failures += 1
        self.error = str(error) or type(error).__name__
        if self.ok:
            self.ok = False
            self.since = now
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            _log.warn(
                "shared store {where} unreachable since {since:.0f}s ago: {error};"
                " serving from the local tier and upstream",
                where=self.where,
                since=now - self.since,
                error=self.error,
            )

    def succeeded(self) -> None:
        if not self.ok:
            self.ok = True
            self.since = self._clock.seconds()
            self._logged_at = None
            _log.info("shared store {where} reachable again", where=self.where)
            self.on_recovered()

    def snapshot(self) -> dict[str, Any]:
        """``shared_store`` in ``/status.json``."""
        return {
            "ok": self.ok,
            "url": self.where,
            "since": self.since,
            "error": None if self.ok else self.error,
            "failures": self.failures,
        }


__all__ = ["LOG_EVERY", "Health"]
