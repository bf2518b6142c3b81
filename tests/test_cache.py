"""Loopback integration tests of the caching path: real origin, proxy, client."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import client, fetch, header, start_origin, start_proxy


class MissThenHitTests(TestCase):
    def test_miss_then_hit(self) -> defer.Deferred[None]:
        """A second request is served from cache: one origin request, same bytes."""
        return defer.Deferred.fromCoroutine(self._miss_then_hit())

    async def _miss_then_hit(self) -> None:
        origin, oport = start_origin(self)
        body = bytes(range(256)) * 4000
        origin.static("/pkg-1.0.tar.gz", body)
        _, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/pkg-1.0.tar.gz"
        r1, b1 = await fetch(http, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((r1.code, header(r1, "x-cache")), (200, "MISS"))
        self.assertEqual((r2.code, header(r2, "x-cache")), (200, "HIT"))
        self.assertEqual(b1, body)
        self.assertEqual(b2, body)
        self.assertEqual(origin.count("/pkg-1.0.tar.gz"), 1)
