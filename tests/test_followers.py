"""The clients following each download, summed over the workers (SPEC 9
``in_flight[].clients`` with ``--workers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cachingproxy.workers.followers import PUBLISH_EVERY, Followers, local_counts


class _Download:
    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.clients = clients


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, check=True, text=True)  # fmt: skip
    return int(child.stdout)


class FollowersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_local_counts(self) -> None:
        """Clients per URL, downloads without clients (or URL) left out."""
        downloads: list[Any] = [
            _Download("http://a/x", 2),
            _Download("http://a/x", 1),
            _Download("http://a/y", 0),
            object(),
        ]
        self.assertEqual(local_counts(downloads), {"http://a/x": 3})

    def test_totals_over_live_workers(self) -> None:
        """Every live worker's counts are summed; a dead worker's file is
        left out; an empty count removes this worker's file."""
        mine = Followers(self.directory)
        other = Followers(self.directory, pid=os.getppid())
        dead = Followers(self.directory, pid=_dead_pid())
        mine.publish({"http://a/x": 2})
        other.publish({"http://a/x": 3, "http://a/y": 1})
        dead.publish({"http://a/x": 100})
        self.assertEqual(mine.totals(), {"http://a/x": 5, "http://a/y": 1})
        mine.publish({})
        other.publish({})
        self.assertEqual(mine.totals(), {})
        self.assertEqual(os.listdir(self.directory), [f"{dead.pid}.clients"])

    def test_published_on_the_clock(self) -> None:
        """start() publishes the live counts every PUBLISH_EVERY seconds;
        stop() withdraws them."""
        clock = Clock()
        downloads = [_Download("http://a/x", 1)]
        followers = Followers(self.directory)
        followers.start(clock, lambda: downloads)
        self.assertEqual(followers.totals(), {})
        clock.advance(PUBLISH_EVERY)
        self.assertEqual(followers.totals(), {"http://a/x": 1})
        downloads.append(_Download("http://a/x", 2))
        clock.advance(PUBLISH_EVERY)
        self.assertEqual(followers.totals(), {"http://a/x": 3})
        followers.stop()
        self.assertEqual(followers.totals(), {})
        self.assertEqual(os.listdir(self.directory), [])
