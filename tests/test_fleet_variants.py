"""Every variant of a URL is shared (SPEC 12: an object any node fetched is a
HIT on every node, "with its headers, variants and freshness"): two
``twistd cachingproxy`` nodes on a real SeaweedFS bucket, and the tiered
store in process for what a lookup costs the bucket."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store import DiskStore
from cachingproxy.fleet import layout, tiered
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.s3 import S3Client
from cachingproxy.fleet.shared import SharedTier
from cachingproxy.fleet.tiered import TieredStore
from tests.fleetnodes import BUCKET, Node, make_bucket, objects, start_nodes, wait_until
from tests.seaweed import shared_seaweed
from tests.support import StoppableOrigin
from tests.test_store import make_entry

HTML = "text/html"
JSON = "application/vnd.pypi.simple.v1+json"
URL = "https://pypi.example/simple/demo/"


class VariantsAcrossNodesTests(TestCase):
    timeout = 180

    def test_second_variant_is_a_hit_on_another_node(self) -> defer.Deferred[None]:
        """Node a fetches both variants of a URL that varies on Accept; node b
        asks for one (a HIT, copied into its local tier), then for the other:
        a HIT too, from the shared tier, with its own bytes; the origin saw
        two GETs in all."""
        return defer.Deferred.fromCoroutine(self._two_variants())

    async def _two_variants(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        bodies = {
            HTML: b"<html><a href='demo-1.0.tar.gz'>demo</a></html>" + os.urandom(64),
            JSON: b'{"meta": {"api-version": "1.1"}, "files": []}' + os.urandom(64),
        }

        def page(request: Request) -> bytes:
            accept = (request.getHeader(b"accept") or b"").decode()
            kind = JSON if JSON in accept else HTML
            request.setHeader(b"Content-Type", kind.encode())
            request.setHeader(b"Vary", b"Accept")
            request.setHeader(b"Cache-Control", b"max-age=600")
            return bodies[kind]

        origin.origin.route("/simple/demo/", page)
        url = f"http://127.0.0.1:{origin.port}/simple/demo/"
        a, b = await start_nodes(self, weed, prefix, 2)

        async def get(node: Node, kind: str) -> tuple[str, bytes]:
            status, headers, body = await node.get(self, url, f"Accept: {kind}\r\n")
            self.assertEqual(status, 200)
            return headers["x-cache"][0], body

        for kind in (HTML, JSON):
            self.assertEqual(await get(a, kind), ("MISS", bodies[kind]))

        async def uploaded() -> bool:
            return len(await objects(s3, prefix)) >= 2

        await wait_until(uploaded, 30)
        self.assertEqual(await get(b, HTML), ("HIT", bodies[HTML]))

        async def copied() -> bool:
            return bool((await b.status(self))["entries"] == 1)

        await wait_until(copied, 30)  # b's local tier has the HTML variant
        self.assertEqual(await get(b, JSON), ("HIT", bodies[JSON]))
        self.assertEqual(await get(b, HTML), ("HIT", bodies[HTML]))
        self.assertEqual(origin.origin.count("/simple/demo/"), 2)


class _Counted:
    """Counts the shared tier's lookups (each one LIST of the bucket)."""

    def __init__(self, shared: SharedTier) -> None:
        self.calls = 0
        self._lookup = shared.lookup

        async def lookup(url: str, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await self._lookup(url, *args, **kwargs)

        shared.lookup = lookup  # type: ignore[method-assign]


class VariantLookupTests(TestCase):
    """The tiered store in process: a local entry without Vary never costs a
    bucket request; the shared variants of a varying URL are listed at most
    once per :data:`tiered.LISTING_TTL`, and a purge forgets them."""

    timeout = 120

    async def _store(self, prefix: str, clock: Any) -> TieredStore:
        weed = shared_seaweed()
        s3 = S3Client(reactor, BUCKET, weed.endpoint)
        await s3.create_bucket()
        local = DiskStore.open(os.path.abspath(self.mktemp()), reactor)
        where = layout.Location(BUCKET, prefix)
        store = TieredStore(
            local, SharedTier(s3, where, Health(reactor, str(where))), clock
        )
        self.addCleanup(lambda: store.close())
        return store

    async def _commit(self, store: Any, entry: StoredResponse) -> StoredResponse:
        writer = await store.open_writer(entry.url)
        writer.write(entry.variant.encode() * 100)
        stored: StoredResponse = await writer.commit(entry)
        if isinstance(store, TieredStore):
            await store.settled(entry.url)
        return stored

    async def _fleet(self) -> tuple[TieredStore, TieredStore, task.Clock]:
        """Node ``one`` (on the reactor) and node ``two`` (its lookups on a
        Clock) on one new prefix."""
        prefix = f"t{os.urandom(6).hex()}/"
        clock = task.Clock()
        clock.advance(reactor.seconds())
        return (
            await self._store(prefix, reactor),
            await self._store(prefix, clock),
            clock,
        )

    def test_local_hit_without_vary(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._plain())

    async def _plain(self) -> None:
        one, two, _ = await self._fleet()
        await self._commit(one, make_entry(URL))
        await self._commit(two.local, make_entry(URL))
        counted = _Counted(two.shared)
        for _ in range(3):
            [entry] = await two.lookup(URL)
            self.assertIsNone(layout.parse_shared_ref(entry.body_ref))
        self.assertEqual(counted.calls, 0)

    def test_varying_lookup(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._varying())

    async def _varying(self) -> None:
        one, two, clock = await self._fleet()
        html = make_entry(URL, HTML, stored_at=clock.seconds())
        json = make_entry(URL, JSON, stored_at=clock.seconds())
        for entry in (html, json):
            await self._commit(one, entry)
        await self._commit(two.local, html)
        counted = _Counted(two.shared)

        async def variants() -> dict[str, bool]:
            """Variant -> whether the lookup answered it from the bucket."""
            return {
                e.variant: layout.parse_shared_ref(e.body_ref) is not None
                for e in await two.lookup(URL)
            }

        self.assertEqual(await variants(), {HTML: False, JSON: True})
        self.assertEqual(await variants(), {HTML: False, JSON: True})
        self.assertEqual(counted.calls, 1)  # the listing is remembered
        clock.advance(tiered.LISTING_TTL)
        self.assertEqual(await variants(), {HTML: False, JSON: True})
        self.assertEqual(counted.calls, 2)
        # A purge heard from the fleet: the remembered listing goes with it.
        await one.remove(URL)
        two.purged({"url": URL})
        self.assertEqual(await variants(), {HTML: False})
        self.assertEqual(counted.calls, 3)

    def test_prefix_purge_forgets(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._prefix())

    async def _prefix(self) -> None:
        one, two, clock = await self._fleet()
        html = make_entry(URL, HTML, stored_at=clock.seconds())
        json = make_entry(URL, JSON, stored_at=clock.seconds())
        for entry in (html, json):
            await self._commit(one, entry)
        await self._commit(two.local, html)
        self.assertEqual(len(await two.lookup(URL)), 2)
        await one.remove_prefix("https://pypi.example/simple/")
        two.purged({"prefix": "https://pypi.example/simple/"})
        [entry] = await two.lookup(URL)
        self.assertEqual(entry.variant, HTML)  # the local copy (not yet purged)
