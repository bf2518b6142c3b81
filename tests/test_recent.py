"""The in-memory lookups in front of the disk store's index stay correct when
the store itself or another connection (another worker, cachingproxy-cache)
changes the index."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IReactorThreads
from twisted.trial import unittest

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store import DiskStore

from .support import run
from .test_store import URL, make_entry

REACTOR = IReactorThreads(reactor)


class RecentLookupTests(unittest.TestCase):
    def setUp(self) -> None:
        path = self.mktemp()
        self.store = DiskStore.open(path, REACTOR)
        self.other = DiskStore.open(path, REACTOR)
        self.addCleanup(self.store.close)
        self.addCleanup(self.other.close)

    async def put(self, store: DiskStore, body: bytes, etag: str) -> StoredResponse:
        writer = await store.open_writer(URL)
        writer.write(body)
        entry = make_entry(headers=(("ETag", etag),))
        stored: StoredResponse = await writer.commit(entry)
        return stored

    async def etags(self, store: DiskStore) -> list[str | None]:
        return [e.header("etag") for e in await store.lookup(URL)]

    def test_own_changes(self) -> defer.Deferred[None]:
        """Replace, refresh and purge through the same store are seen at once."""
        return run(self._own())

    async def _own(self) -> None:
        await self.put(self.store, b"one", '"1"')
        self.assertEqual(await self.etags(self.store), ['"1"'])
        self.assertEqual(await self.etags(self.store), ['"1"'])
        entry = await self.put(self.store, b"two", '"2"')
        self.assertEqual(await self.etags(self.store), ['"2"'])
        await self.store.update(entry.replace(stored_at=5000.0))
        (refreshed,) = await self.store.lookup(URL)
        self.assertEqual(refreshed.stored_at, 5000.0)
        await self.store.remove(URL)
        self.assertEqual(await self.etags(self.store), [])
        await self.put(self.store, b"three", '"3"')
        self.assertEqual(await self.etags(self.store), ['"3"'])
        await self.store.remove_prefix(URL[:10])
        self.assertEqual(await self.etags(self.store), [])

    def test_changes_by_another_connection(self) -> defer.Deferred[None]:
        """A purge or a replacement committed by another connection to the
        same index is seen by the next lookup (no stale entry is served)."""
        return run(self._other())

    async def _other(self) -> None:
        await self.put(self.store, b"one", '"1"')
        self.assertEqual(await self.etags(self.store), ['"1"'])
        self.assertEqual(await self.etags(self.other), ['"1"'])
        await self.other.remove(URL)
        self.assertEqual(await self.etags(self.store), [])
        await self.put(self.other, b"two", '"2"')
        self.assertEqual(await self.etags(self.store), ['"2"'])
        self.assertEqual(await self.etags(self.store), ['"2"'])
        await self.put(self.other, b"three", '"3"')
        self.assertEqual(await self.etags(self.store), ['"3"'])
