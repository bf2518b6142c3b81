"""The memo of the lean hit path stays within its bound whatever the
requests look like (handler/quick.py)."""

from __future__ import annotations

import re
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.config import Rule
from cachingproxy.handler.quick import Prepared, QuickHits
from cachingproxy.interfaces import ICacheStore, IKnownLookups


class _Store:
    def known(self, url: str) -> list[StoredResponse] | None:
        return None

    def touch(self, entry: StoredResponse) -> None:
        pass


class MemoBoundTests(SynchronousTestCase):
    def test_long_targets_count(self) -> None:
        """Many keys for one small entry (a target with a long fragment
        differs on every request but names the same URL): what the memo
        holds, keys included, stays within its bound."""
        store = _Store()
        directlyProvides(store, ICacheStore, IKnownLookups)
        bound = 1024 * 1024
        quick = QuickHits(
            store,  # type: ignore[arg-type]
            Clock(),
            reusable=lambda rule, entry, now: True,
            allowed=lambda client: True,
            purging=lambda url: None,
            expected=lambda url: None,
            record=lambda client, ready, now, status, sent: None,
            max_bytes=bound,
        )
        entry = StoredResponse(
            url="http://o/f",
            variant="",
            vary=(),
            status=200,
            headers=(("Content-Length", "0"),),
            stored_at=0,
            initial_age=0,
            size=0,
        )
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Cache: HIT\r\n"
        for n in range(2000):
            target = b"/f#" + b"%d" % n + b"x" * 8000
            ready = Prepared(
                url="http://o/f",
                upstream="o",
                rule=Rule(re.compile(""), 60, name="r"),
                entry=entry,
                mirror=False,
                expected=None,
                head=head,
                head304=head,
                dated=False,
                body=b"",
            )
            quick._keep((target, b"o", "127.0.0.1", 80), ready)
        held = sum(
            len(key[0]) + len(key[1]) + sys.getsizeof(ready.head) + len(ready.body)
            for key, ready in quick._memo.items()
        )
        self.assertLessEqual(held, bound)
        self.assertGreater(len(quick._memo), 0)
