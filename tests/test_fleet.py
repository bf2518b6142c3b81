"""A fleet of ``twistd cachingproxy`` nodes sharing a real SeaweedFS bucket
(SPEC 12): shared hits, serving during an origin outage, the internal
endpoint's secret."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.fleet.s3 import S3Client
from tests.fleetnodes import (
    SECRET,
    Node,
    make_bucket,
    objects,
    start_nodes,
    wait_until,
)
from tests.seaweed import shared_seaweed
from tests.support import StoppableOrigin, own_page, pause

MiB = 1024 * 1024


class SharedTierTests(TestCase):
    timeout = 180

    async def _uploaded(self, s3: S3Client, prefix: str, count: int) -> None:
        async def enough() -> bool:
            return len(await objects(s3, prefix)) >= count

        await wait_until(enough, 30)

    async def _local_entries(self, node: Node, count: int) -> None:
        """Wait until ``node``'s local tier holds ``count`` entries."""

        async def there() -> bool:
            return (await node.status(self))["entries"] == count

        await wait_until(there, 30)

    def test_hit_on_every_node(self) -> defer.Deferred[None]:
        """A file fetched through one node is a HIT on the two others with the
        same bytes, and the origin saw one request; the second request on a
        node is served from its local tier."""
        return defer.Deferred.fromCoroutine(self._hit_on_every_node())

    async def _hit_on_every_node(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(3 * MiB + 7)
        origin.origin.static("/pkg-1.0.tar.gz", body)
        url = f"http://127.0.0.1:{origin.port}/pkg-1.0.tar.gz"
        a, b, c = await start_nodes(self, weed, prefix)
        status, headers, got = await a.get(self, url)
        self.assertEqual((status, headers["x-cache"], got), (200, ["MISS"], body))
        await self._uploaded(s3, prefix, 1)
        [(_key, _size, body_size)] = await objects(s3, prefix)
        self.assertEqual(body_size, len(body))
        for node in (b, c, b):
            status, headers, got = await node.get(self, url)
            self.assertEqual(status, 200)
            self.assertEqual(headers["x-cache"], ["HIT"])
            self.assertEqual(
                hashlib.sha256(got).digest(), hashlib.sha256(body).digest()
            )
            if node is b:
                # b's copy into its local tier is committed after the
                # client has the last byte: wait for it, so the second
                # request on b is a local hit.
                await self._local_entries(b, 1)
        self.assertEqual(origin.origin.count("/pkg-1.0.tar.gz"), 1)
        status_b = await b.status(self)
        self.assertEqual(status_b["entries"], 1)  # copied into b's local tier
        self.assertTrue(status_b["shared_store"]["ok"])

    def test_outage_served_by_node_that_never_saw_it(self) -> defer.Deferred[None]:
        """With the origin gone, a node that never saw an index page or a file
        serves both from the shared tier (the stale index as STALE)."""
        return defer.Deferred.fromCoroutine(self._outage())

    async def _outage(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        index = b"<html><a href='pkg-1.0.tar.gz'>pkg</a></html>"
        body = os.urandom(200_000)
        origin.origin.static(
            "/simple/pkg/", index, headers=[("Content-Type", "text/html")]
        )
        origin.origin.static("/pkg-1.0.tar.gz", body)
        base = f"http://127.0.0.1:{origin.port}"
        a, _b, c = await start_nodes(self, weed, prefix, 3, "--index-ttl", "1")
        for path in ("/simple/pkg/", "/pkg-1.0.tar.gz"):
            status, _, _ = await a.get(self, base + path)
            self.assertEqual(status, 200)
        await self._uploaded(s3, prefix, 2)
        await origin.stop()
        await pause(1.5)  # the index is stale now
        status, headers, got = await c.get(self, base + "/simple/pkg/")
        self.assertEqual((status, got), (200, index))
        self.assertEqual(headers["x-cache"], ["STALE"])
        status, headers, got = await c.get(self, base + "/pkg-1.0.tar.gz")
        self.assertEqual((status, headers["x-cache"], got), (200, ["HIT"], body))

    def test_internal_endpoint_needs_the_secret(self) -> defer.Deferred[None]:
        """/_fleet/object without the fleet secret (or with a wrong one) is 403;
        with it, a node hands out what it has."""
        return defer.Deferred.fromCoroutine(self._internal())

    async def _internal(self) -> None:
        weed = shared_seaweed()
        _, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(10_000)
        origin.origin.static("/f.whl", body)
        url = f"http://127.0.0.1:{origin.port}/f.whl"
        (a,) = await start_nodes(self, weed, prefix, 1)
        await a.get(self, url)
        from urllib.parse import quote

        path = f"/_fleet/object?url={quote(url, safe='')}"
        response, _ = await own_page(self, a.port, path)
        self.assertEqual(response.code, 403)
        response, _ = await own_page(
            self, a.port, path, headers={"X-Fleet-Secret": "wrong" * 8}
        )
        self.assertEqual(response.code, 403)
        response, got = await own_page(
            self, a.port, path, headers={"X-Fleet-Secret": SECRET}
        )
        self.assertEqual((response.code, got), (200, body))
        self.assertEqual(origin.origin.count("/f.whl"), 1)
