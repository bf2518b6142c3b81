"""Operating a fleet (SPEC 12): purges reach every node, and a store that goes
away degrades the fleet to lone caches without failing a request."""

from __future__ import annotations

import os
from urllib.parse import quote

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.fleetnodes import make_bucket, objects, start_nodes, wait_until
from tests.seaweed import Seaweed, shared_seaweed, weed_binary
from tests.support import StoppableOrigin, own_page


class FleetOpsTests(TestCase):
    timeout = 180

    def test_purge_reaches_every_node(self) -> defer.Deferred[None]:
        """DELETE /cache?url= on one node removes the shared object and, within
        10 s, the copies in the other nodes' local tiers: the next request is
        a MISS fetched upstream again."""
        return defer.Deferred.fromCoroutine(self._purge())

    async def _purge(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(100_000)
        origin.origin.static("/p-1.0.tgz", body)
        url = f"http://127.0.0.1:{origin.port}/p-1.0.tgz"
        a, b, c = await start_nodes(self, weed, prefix)
        await a.get(self, url)

        async def uploaded() -> bool:
            return len(await objects(s3, prefix)) == 1

        await wait_until(uploaded, 30)
        for node in (b, c):
            status, headers, _ = await node.get(self, url)
            self.assertEqual((status, headers["x-cache"]), (200, ["HIT"]))

        async def copied() -> bool:
            return all([(await n.status(self))["entries"] == 1 for n in (a, b, c)])

        await wait_until(copied, 30)
        response, answer = await own_page(
            self, a.port, f"/cache?url={quote(url, safe='')}", method="DELETE"
        )
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(await objects(s3, prefix), [])

        async def purged() -> bool:
            return all([(await n.status(self))["entries"] == 0 for n in (a, b, c)])

        await wait_until(purged, 10)
        status, headers, got = await c.get(self, url)
        self.assertEqual((status, headers["x-cache"], got), (200, ["MISS"], body))
        self.assertEqual(origin.origin.count("/p-1.0.tgz"), 2)

    def test_store_down_mid_run(self) -> defer.Deferred[None]:
        """The object store killed mid-run: hits, misses and files only the
        store had keep succeeding (from the local tier or upstream), and
        /status.json shows shared_store ok false."""
        return defer.Deferred.fromCoroutine(self._store_down())

    async def _store_down(self) -> None:
        if weed_binary() is None:
            self.skipTest("weed not installed")
        weed = Seaweed()  # this test's own: it kills it
        self.addCleanup(weed.close)
        weed.start()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        one, two = os.urandom(50_000), os.urandom(60_000)
        origin.origin.static("/one-1.0.tgz", one)
        origin.origin.static("/two-1.0.tgz", two)
        base = f"http://127.0.0.1:{origin.port}"
        a, b = await start_nodes(self, weed, prefix, 2)
        await a.get(self, base + "/one-1.0.tgz")

        async def uploaded() -> bool:
            return len(await objects(s3, prefix)) == 1

        await wait_until(uploaded, 30)
        self.assertTrue((await b.status(self))["shared_store"]["ok"])
        weed.kill()
        for node, path, body, cache in (
            (a, "/one-1.0.tgz", one, "HIT"),
            (b, "/two-1.0.tgz", two, "MISS"),
            (b, "/one-1.0.tgz", one, "MISS"),
            (b, "/two-1.0.tgz", two, "HIT"),
        ):
            status, headers, got = await node.get(self, base + path)
            self.assertEqual((status, headers["x-cache"], got), (200, [cache], body))

        async def degraded() -> bool:
            store = (await b.status(self))["shared_store"]
            return store["ok"] is False and bool(store["error"])

        await wait_until(degraded, 30)
        _, page = await own_page(self, b.port, "/")
        self.assertIn(b"UNREACHABLE", page)
        self.assertEqual(origin.origin.count("/one-1.0.tgz"), 2)
