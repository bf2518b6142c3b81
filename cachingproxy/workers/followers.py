"""How many clients follow each download, summed over the workers (SPEC 9's
``in_flight[].clients`` with ``--workers``).

Each worker publishes its own counts, URL to clients, in one small file
``<pid>.clients`` in the claims directory whenever they change (looked at every
``PUBLISH_EVERY`` seconds); whoever answers ``/status.json`` sums the files of
the workers still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

PUBLISH_EVERY = 1.0
"""Seconds between a worker's looks at its own counts."""

SUFFIX = ".clients"


def local_counts(downloads: Iterable[Any]) -> dict[str, int]:
    """URL to clients of this worker's downloads (its own and those it
    follows in another worker)."""
    counts: dict[str, int] = {}
    for download in downloads:
        url = getattr(download, "url", None)
        clients = getattr(download, "clients", 0)
        if isinstance(url, str) and isinstance(clients, int) and clients > 0:
            counts[url] = counts.get(url, 0) + clients
    return counts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Followers:
    """This worker's published counts, and everyone's sum."""

    def __init__(self, directory: str, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._path = os.path.join(directory, f"{self.pid}{SUFFIX}")
        self._published: Mapping[str, int] | None = None
        self._loop: task.LoopingCall | None = None

    def publish(self, counts: Mapping[str, int]) -> None:
        """Write ``counts`` unless they are what was written last."""
        if counts == self._published:
            return
        if not counts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        else:
            tmp = f"{self._path}.tmp"
            with open(tmp, "w") as f:
                json.dump(dict(counts), f)
            os.replace(tmp, self._path)
        self._published = dict(counts)

    def totals(self) -> dict[str, int]:
        """URL to clients, summed over the workers alive."""
        totals: dict[str, int] = {}
        try:
            names = os.listdir(self.directory)
        except OSError:
            return totals
        for name in names:
            stem, _, rest = name.partition(SUFFIX)
            if rest or not name.endswith(SUFFIX) or not stem.isdigit():
                continue
            if int(stem) != self.pid and not _alive(int(stem)):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    counts = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(counts, dict):
                for url, n in counts.items():
                    if isinstance(n, int):
                        totals[url] = totals.get(url, 0) + n
        return totals

    def start(
        self, clock: IReactorTime, downloads: Callable[[], Iterable[Any]]
    ) -> None:
        """Publish this worker's counts every ``PUBLISH_EVERY`` seconds."""
        self._loop = task.LoopingCall(lambda: self.publish(local_counts(downloads())))
        self._loop.clock = clock
        self._loop.start(PUBLISH_EVERY, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.publish({})


__all__ = ["Followers", "local_counts"]
