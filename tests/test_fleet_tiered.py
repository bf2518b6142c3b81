"""The tiered store (local disk in front of a real SeaweedFS bucket) in
process: uploads after commit (single and multipart), read-through copies
checked against their digest, removals (SPEC 12)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from cachingproxy.cache.store import DiskStore
from cachingproxy.fleet import layout
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.s3 import S3Client
from cachingproxy.fleet.shared import SharedTier
from cachingproxy.fleet.tiered import TieredStore
from tests.fleetnodes import BUCKET, wait_until
from tests.seaweed import shared_seaweed
from tests.test_store import RecordingConsumer, make_entry

MiB = 1024 * 1024
URL = "https://files.example/packages/demo-1.0.tar.gz"


class TieredStoreTests(TestCase):
    timeout = 120

    async def _node(self, prefix: str, **client: Any) -> TieredStore:
        weed = shared_seaweed()
        s3 = S3Client(reactor, BUCKET, weed.endpoint, **client)
        await s3.create_bucket()
        local = DiskStore.open(os.path.abspath(self.mktemp()), reactor)
        where = layout.Location(BUCKET, prefix)
        store = TieredStore(
            local, SharedTier(s3, where, Health(reactor, str(where))), reactor
        )
        self.addCleanup(lambda: store.close())
        return store

    async def _put(self, store: TieredStore, body: bytes) -> Any:
        writer = await store.open_writer(URL)
        for i in range(0, len(body), 256 * 1024):
            writer.write(body[i : i + 256 * 1024])
        entry = await writer.commit(make_entry())
        await store.settled(URL)
        return entry

    async def _read(self, store: TieredStore, entry: Any, **kw: Any) -> bytes:
        consumer = RecordingConsumer(**kw)
        with contextlib.suppress(Exception):
            await store.read(entry, consumer)
        return consumer.data

    def test_upload_then_read_through(self) -> defer.Deferred[None]:
        """A committed body goes up (multipart when large); another node finds
        it, reads it from the bucket while copying it into its local tier, and
        then reads its local copy."""
        return defer.Deferred.fromCoroutine(self._through())

    async def _through(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        small = dict(part_size=5 * MiB, multipart_threshold=6 * MiB)
        one = await self._node(prefix, **small)
        two = await self._node(prefix, **small)
        body = os.urandom(13 * MiB)
        stored = await self._put(one, body)
        [found] = await two.lookup(URL)
        self.assertIsNotNone(layout.parse_shared_ref(found.body_ref))
        self.assertEqual((found.size, found.digest), (len(body), stored.digest))
        self.assertEqual(found.headers, stored.headers)
        self.assertEqual(found.stored_at, stored.stored_at)
        got = await self._read(two, found)
        self.assertEqual(hashlib.sha256(got).hexdigest(), stored.digest)

        async def copied() -> bool:
            entries = await two.local.lookup(URL)
            return bool(entries) and entries[0].digest == stored.digest

        await two.settled(URL)
        self.assertTrue(await copied())
        [local] = await two.lookup(URL)
        self.assertIsNone(layout.parse_shared_ref(local.body_ref))
        self.assertEqual(await self._read(two, local), body)

    def test_copy_survives_the_client_leaving(self) -> defer.Deferred[None]:
        """A client that stops reading a shared body early does not stop the
        copy into the local tier."""
        return defer.Deferred.fromCoroutine(self._leaving())

    async def _leaving(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one, two = await self._node(prefix), await self._node(prefix)
        body = os.urandom(3 * MiB)
        stored = await self._put(one, body)
        [found] = await two.lookup(URL)
        got = await self._read(two, found, stop_after=1)
        self.assertLess(len(got), len(body))
        await two.settled(URL)
        [copy] = await two.local.lookup(URL)
        self.assertEqual(copy.digest, stored.digest)

    def test_corrupt_object_not_copied(self) -> defer.Deferred[None]:
        """A shared object whose body does not match its published sha256 is
        never served whole, never copied into the local tier, and deleted."""
        return defer.Deferred.fromCoroutine(self._corrupt())

    async def _corrupt(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        two = await self._node(prefix)
        body = os.urandom(100_000)
        entry = make_entry(size=len(body), digest="0" * 64)
        key = layout.object_key(prefix, URL, "")
        await two.shared.client.put(key, layout.encode_header(entry) + body)
        [found] = await two.lookup(URL)
        got = await self._read(two, found)
        self.assertEqual(got, body[:-1])  # never the whole of a bad body
        await two.settled(URL)  # the copy was aborted
        self.assertEqual(await two.local.lookup(URL), [])

        async def dropped() -> bool:
            return await two.shared.lookup(URL) == []

        await wait_until(dropped, 10)

    def test_remove(self) -> defer.Deferred[None]:
        """Removing a URL removes the shared object and tells the fleet;
        removing one variant (a body gone missing here) stays local."""
        return defer.Deferred.fromCoroutine(self._remove())

    async def _remove(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one = await self._node(prefix)
        told: list[dict[str, str]] = []
        one.on_remove = told.append
        await self._put(one, b"x" * 1000)
        self.assertEqual(await one.remove(URL, ""), 1)
        self.assertEqual(told, [])
        self.assertEqual(len(await one.shared.lookup(URL)), 1)
        self.assertEqual(await one.remove(URL), 1)
        self.assertEqual(told, [{"url": URL}])
        self.assertEqual(await one.shared.lookup(URL), [])

    def test_purge_during_a_download(self) -> defer.Deferred[None]:
        """A purge heard from the fleet while a body was being written: the
        commit keeps nothing locally and uploads nothing."""
        return defer.Deferred.fromCoroutine(self._race())

    async def _race(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one = await self._node(prefix)
        writer = await one.open_writer(URL)
        writer.write(b"y" * 5000)
        one.purged({"url": URL})
        await writer.commit(make_entry())
        await one.settled(URL)
        self.assertEqual(await one.local.lookup(URL), [])
        self.assertEqual(await one.shared.lookup(URL), [])

    def test_backlog_uploaded_when_the_store_is_back(self) -> defer.Deferred[None]:
        """A body committed while the store was unusable is uploaded once the
        store answers again."""
        return defer.Deferred.fromCoroutine(self._backlog())

    async def _backlog(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one = await self._node(prefix)
        one.shared.health.on_recovered = one.store_back
        one.shared.health.failed(OSError("down for the test"))
        stored = await self._put(one, b"z" * 7000)
        self.assertEqual(await one.shared.client.list(prefix), [])
        one.shared.health.succeeded()
        await one.settled(URL)
        [found] = await one.shared.lookup(URL)
        self.assertEqual(found.digest, stored.digest)

    def test_remove_prefix(self) -> defer.Deferred[None]:
        """A prefix purge deletes the shared objects of every URL under it
        (and only those) and tells the fleet."""
        return defer.Deferred.fromCoroutine(self._prefix())

    async def _prefix(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one = await self._node(prefix)
        told: list[dict[str, str]] = []
        one.on_remove = told.append
        urls = [
            "https://files.example/packages/a-1.0.tar.gz",
            "https://files.example/packages/b-1.0.tar.gz",
            "https://files.example/other/c-1.0.tar.gz",
        ]
        for url in urls:
            writer = await one.open_writer(url)
            writer.write(url.encode())
            await writer.commit(make_entry(url))
            await one.settled(url)
        removed = await one.remove_prefix("https://files.example/packages/")
        self.assertEqual(removed, 2)
        self.assertEqual(told, [{"prefix": "https://files.example/packages/"}])
        left = [
            layout.decode_header(
                await one.shared.client.get_bytes(o.key, 0, layout.HEADER_PROBE), o.key
            ).url
            for o in await one.shared.client.list(prefix + "objects/")
        ]
        self.assertEqual(left, [urls[2]])

    def test_prefix_purge_finds_long_urls(self) -> defer.Deferred[None]:
        """URLs too long for a key (kept as the start of their encoding and
        their hash) are found by lookups and by prefix purges, also by a
        prefix longer than what their key keeps."""
        return defer.Deferred.fromCoroutine(self._long())

    async def _long(self) -> None:
        prefix = f"t{os.urandom(6).hex()}/"
        one, two = await self._node(prefix), await self._node(prefix)
        base = "https://files.example/packages/"
        first = base + "a" * 800 + "/one.tar.gz"
        second = base + "a" * 690 + "b" * 200 + "/two.tar.gz"
        third = base + "c" * 900 + "/three.tar.gz"
        other = "https://files.example/other/" + "d" * 900
        middling = base + "m" * 250  # over 255 bytes with its variant hash
        for url in (first, second, third, other, middling):
            writer = await one.open_writer(url)
            writer.write(url.encode())
            await writer.commit(make_entry(url))
            await one.settled(url)
        for url in (first, middling):
            [found] = await two.lookup(url)
            self.assertEqual(found.url, url)
            self.assertIsNotNone(layout.parse_shared_ref(found.body_ref))

        async def shared() -> list[str]:
            urls = []
            for o in await one.shared.client.list(prefix + "objects/"):
                head = await one.shared.client.get_bytes(o.key, 0, layout.HEADER_PROBE)
                urls.append(layout.decode_header(head, o.key).url)
            return sorted(urls)

        # A prefix longer than the start of the URLs their keys keep.
        self.assertEqual(await one.remove_prefix(base + "a" * 700), 1)
        self.assertEqual(await shared(), sorted([second, third, other, middling]))
        self.assertEqual(await one.remove_prefix(base), 3)
        self.assertEqual(await shared(), [other])
