"""Large hits when the sender cannot start (cache/store/_sendfile.py): the
client gets an error, and nothing is left held — no mapped-stream slot, no
body descriptor, no reader that spares the body from eviction."""

from __future__ import annotations

import errno
import os
import random

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.cache.store import _sendfile

from .support import (
    client,
    fetch,
    header,
    raw_get,
    run,
    start_origin,
    start_proxy,
    stored,
)

PATH = "/big-1.0-py3-none-any.whl"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CannotStartTests(TestCase):
    def test_no_descriptor_left(self) -> defer.Deferred[None]:
        """``os.dup`` of the client's socket fails (EMFILE): a 500 for that
        client, then everything is as before (the next hit is whole)."""
        return run(self._no_descriptor())

    async def _no_descriptor(self) -> None:
        body = random.Random(7).randbytes(1024 * 1024)
        origin, oport = start_origin(self)
        origin.static(PATH, body, [("Content-Type", "application/octet-stream")])
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}{PATH}"
        response, got = await fetch(client(self, pport), url)
        self.assertEqual((header(response, "x-cache"), got), ("MISS", body))
        await stored(service, url)
        store = service.store
        assert store is not None

        real_dup, failing = os.dup, [True]

        def no_dup(fd: int) -> int:
            if failing[0]:
                raise OSError(errno.EMFILE, "Too many open files")
            return real_dup(fd)

        used = _sendfile.MAPPED_NOW.used
        self.addCleanup(setattr, _sendfile.MAPPED_NOW, "used", used)
        before = open_fds()
        self.patch(_sendfile.os, "dup", no_dup)
        status, _, _ = await raw_get(self, pport, url)
        self.assertEqual(status, 500)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(_sendfile.MAPPED_NOW.used, 0)
        self.assertFalse(store._readers)  # type: ignore[attr-defined]
        self.assertLessEqual(open_fds(), before)
        failing[0] = False
        status, headers, got = await raw_get(self, pport, url)
        self.assertEqual((status, headers["x-cache"], got), (200, ["HIT"], body))
