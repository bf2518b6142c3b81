"""Large hits that go wrong in the sender (cache/store/_sendfile.py): when
it cannot start, or when the body file is cut short while a window of it is
mapped.  The client gets an error or a closed connection, and nothing is
left held — no mapped-stream slot, no body descriptor, no reader that spares
the body from eviction."""

from __future__ import annotations

import errno
import os
import random
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.cache.store import _sendfile

from .support import (
    client,
    fetch,
    header,
    pause,
    raw_connect,
    raw_get,
    run,
    start_origin,
    start_proxy,
    stored,
    wait_for,
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


class CutWhileMappedTests(TestCase):
    def test_cut_under_a_mapped_window(self) -> defer.Deferred[None]:
        """The body file is cut to nothing while a slow loopback client is
        sent from a mapped window: no SIGBUS (the kernel refuses the write
        from the pages past the end), and as with sendfile the entry is
        dropped and the client's connection closed, not left open with a
        prefix of the body."""
        return run(self._cut())

    async def _cut(self) -> None:
        body = random.Random(8).randbytes(24 * 1024 * 1024)
        origin, oport = start_origin(self)
        origin.static(PATH, body, [("Content-Type", "application/octet-stream")])
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}{PATH}"
        response, got = await fetch(client(self, pport), url)
        self.assertEqual((header(response, "x-cache"), got), ("MISS", body))
        await stored(service, url)
        store: Any = service.store
        (entry,) = await store.lookup(url)
        head = f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n"
        raw = await raw_connect(self, pport, head.encode(), stalled=True)
        await wait_for(lambda: _sendfile.MAPPED_NOW.used == 1)
        await wait_for(lambda: store._readers)
        await pause(0.2)  # the client's socket buffers fill
        os.truncate(store._body_path(entry.body_ref), 0)
        raw.resume()
        await wait_for(lambda: raw.closed, timeout=10)
        self.assertLess(len(raw.received), len(body))
        self.assertEqual(_sendfile.MAPPED_NOW.used, 0)
        self.assertFalse(store._readers)
        self.assertEqual(await store.lookup(url), [])
