"""Tests for cachingproxy.cache.store: one behaviour suite for every ICacheStore."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorThreads,
    IReactorTime,
)
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cachingproxy.cache.entry import StoredResponse, Usage
from cachingproxy.cache.store import CacheDirError, DiskStore, MemoryStore, disk
from cachingproxy.cache.store._diskwriter import IBodyCommitter
from cachingproxy.cache.store.disk import FLUSH_INTERVAL
from cachingproxy.cache.store.index import prefix_successor
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IPartialReader

REACTOR = IReactorThreads(reactor)
OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('format', '1');
CREATE TABLE entries (
    url TEXT NOT NULL, variant TEXT NOT NULL, vary TEXT NOT NULL,
    status INTEGER NOT NULL, headers TEXT NOT NULL, stored_at REAL NOT NULL,
    initial_age REAL NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL,
    body_ref TEXT NOT NULL, last_used REAL NOT NULL
);
CREATE UNIQUE INDEX entries_key ON entries (url, variant);
"""
"""An index as the first release made it: no entries_last_used."""
URL = "https://files.example/packages/demo-1.0.tar.gz"
CHUNK = 256 * 1024
BODY = bytes(range(256)) * 2400  # 600 KiB: three chunks of the producer


def make_entry(url: str = URL, variant: str = "", **changes: Any) -> StoredResponse:
    """A typical entry before the store fills in size, digest and body_ref."""
    entry = StoredResponse(
        url=url,
        variant=variant,
        vary=("Accept",) if variant else (),
        status=200,
        headers=(("Content-Type", "application/gzip"), ("ETag", '"v1"')),
        stored_at=1000.0,
        initial_age=3.0,
    )
    return entry.replace(**changes)


@implementer(IConsumer)
class RecordingConsumer:
    """Records writes; optionally pauses or stops its producer on each write."""

    def __init__(self, pause: bool = False, stop_after: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.streaming: bool | None = None
        self.unregistered = False
        self._pause = pause
        self._stop_after = stop_after

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        self.producer = IPushProducer(producer)
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered = True

    def write(self, data: bytes) -> None:
        assert self.producer is not None, "write without a registered producer"
        self.chunks.append(data)
        if self._stop_after is not None and len(self.chunks) >= self._stop_after:
            self.producer.stopProducing()
        elif self._pause:
            self.producer.pauseProducing()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


@implementer(IReactorThreads, IReactorTime)
class ClockReactor:
    """Threads from the real reactor, time from a ``task.Clock``.

    A DiskStore needs a thread pool for fsync; with this its periodic index
    flush runs only when a test advances the clock.
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock

    def getThreadPool(self) -> ThreadPool:
        return REACTOR.getThreadPool()

    def callInThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        REACTOR.callInThread(callable, *args, **kwargs)

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        REACTOR.callFromThread(callable, *args, **kwargs)

    def suggestThreadPoolSize(self, size: int) -> None:
        REACTOR.suggestThreadPoolSize(size)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(
        self,
        delay: float,
        callable: Callable[..., Any],
        *args: object,
        **kwargs: object,
    ) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kwargs)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self.clock.getDelayedCalls()


def capture_log(case: unittest.TestCase) -> list[LogEvent]:
    """Log events emitted until the end of the test."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class StoreBehaviourMixin:
    """The ICacheStore contract, run against each implementation."""

    def make_store(self) -> ICacheStore:
        raise NotImplementedError

    def make_budget_store(self, max_size: int | None) -> ICacheStore:
        """A new store (also ``self.store``) bounded by ``max_size``, whose time
        moves only by :meth:`advance`."""
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store made by make_budget_store."""

    def check_at_rest(self) -> None:
        """Assert what the store holds agrees with its usage figures."""

    # mixed into unittest.TestCase
    successResultOf: Any
    failureResultOf: Any
    assertNoResult: Any
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertRaises: Any
    assertLessEqual: Any
    assertLess: Any
    assertIn: Any
    addCleanup: Any
    store: ICacheStore

    async def store_body(
        self, body: bytes = BODY, entry: StoredResponse | None = None
    ) -> StoredResponse:
        writer = self.successResultOf(self.store.open_writer(URL))
        for i in range(0, len(body), 100_000):
            writer.write(body[i : i + 100_000])
        stored: StoredResponse = await writer.commit(entry or make_entry())
        return stored

    def lookup(self, url: str = URL) -> list[StoredResponse]:
        result: list[StoredResponse] = self.successResultOf(self.store.lookup(url))
        return result

    def read_all(
        self, entry: StoredResponse, start: int = 0, end: int | None = None
    ) -> bytes:
        consumer = RecordingConsumer()
        self.assertIsNone(
            self.successResultOf(self.store.read(entry, consumer, start, end))
        )
        self.assertTrue(consumer.unregistered)
        return consumer.data

    def test_interfaces(self) -> None:
        """The store, its writers and their readers provide their interfaces."""
        self.assertTrue(verifyObject(ICacheStore, self.store))
        writer = self.successResultOf(self.store.open_writer(URL))
        self.assertTrue(verifyObject(IBodyWriter, writer))
        reader = writer.open_reader()
        self.assertTrue(verifyObject(IPartialReader, reader))
        reader.close()
        self.successResultOf(writer.abort())

    async def test_commit_then_lookup(self) -> None:
        """A committed entry is found with size, sha256 digest and body_ref set."""
        stored = await self.store_body()
        self.assertEqual(stored.size, len(BODY))
        self.assertEqual(stored.digest, hashlib.sha256(BODY).hexdigest())
        self.assertTrue(stored.body_ref)
        self.assertEqual(stored.replace(size=0, digest="", body_ref=""), make_entry())
        self.assertEqual(self.lookup(), [stored])
        self.assertEqual(self.lookup(URL + "x"), [])

    async def test_empty_body(self) -> None:
        """An empty body is stored and read back as zero bytes."""
        stored = await self.store_body(b"")
        self.assertEqual(stored.size, 0)
        self.assertEqual(stored.digest, hashlib.sha256(b"").hexdigest())
        self.assertEqual(self.read_all(stored), b"")

    def test_invisible_before_commit(self) -> None:
        """Written bytes are not visible to lookup until the writer commits."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"partial")
        self.assertEqual(writer.bytes_written, 7)
        self.assertEqual(self.lookup(), [])
        self.successResultOf(writer.abort())

    def test_abort(self) -> None:
        """An aborted writer leaves nothing behind, and abort is idempotent."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"partial")
        self.assertIsNone(self.successResultOf(writer.abort()))
        self.assertIsNone(self.successResultOf(writer.abort()))
        self.assertEqual(self.lookup(), [])
        self.failureResultOf(writer.commit(make_entry()), ValueError)

    async def test_abort_after_commit(self) -> None:
        """abort after commit is a no-op: the entry stays."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"body")
        stored = await writer.commit(make_entry())
        self.successResultOf(writer.abort())
        self.assertEqual(self.lookup(), [stored])
        self.assertEqual(self.read_all(stored), b"body")

    async def test_replace(self) -> None:
        """Committing the same (url, variant) again replaces the entry and body."""
        await self.store_body(b"old body")
        new = await self.store_body(b"new", make_entry(status=203))
        self.assertEqual(self.lookup(), [new])
        self.assertEqual(self.read_all(new), b"new")

    async def test_variants_apart(self) -> None:
        """Variants of one URL are separate entries with separate bodies."""
        html = await self.store_body(b"<html>", make_entry(variant="text/html"))
        json_ = await self.store_body(b"{}", make_entry(variant="application/json"))
        self.assertEqual(self.lookup(), [json_, html])
        self.assertEqual(self.read_all(html), b"<html>")
        self.assertEqual(self.read_all(json_), b"{}")

    async def test_read_full(self) -> None:
        """Reading a whole body writes exactly its bytes in 256 KiB chunks."""
        stored = await self.store_body()
        consumer = RecordingConsumer()
        d = self.store.read(stored, consumer)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(consumer.streaming)
        self.assertTrue(consumer.unregistered)
        self.assertEqual([len(c) for c in consumer.chunks], [CHUNK, CHUNK, 90112])
        self.assertEqual(consumer.data, BODY)

    async def test_read_ranges(self) -> None:
        """Ranges [start, end) are byte-exact, across chunks and clamped to size."""
        stored = await self.store_body()
        n = len(BODY)
        for start, end in [
            (0, 10),
            (100, CHUNK + 5),
            (CHUNK, 2 * CHUNK),
            (n - 1, None),
            (5, 5),
            (n - 10, n + 100),
            (n, None),
        ]:
            self.assertEqual(self.read_all(stored, start, end), BODY[start:end])

    async def test_read_bad_range(self) -> None:
        """A negative start or an end before start is refused."""
        stored = await self.store_body()
        consumer = RecordingConsumer()
        self.failureResultOf(self.store.read(stored, consumer, -1), ValueError)
        self.failureResultOf(self.store.read(stored, consumer, 10, 5), ValueError)
        self.assertEqual(consumer.chunks, [])

    async def test_read_pauses(self) -> None:
        """A paused producer writes nothing more until resumeProducing."""
        stored = await self.store_body()
        consumer = RecordingConsumer(pause=True)
        d = self.store.read(stored, consumer)
        self.assertEqual(len(consumer.chunks), 1)
        self.assertNoResult(d)
        producer = consumer.producer
        assert producer is not None
        producer.resumeProducing()
        self.assertEqual(len(consumer.chunks), 2)
        self.assertNoResult(d)
        producer.resumeProducing()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(consumer.data, BODY)
        self.assertTrue(consumer.unregistered)

    async def test_read_stopped(self) -> None:
        """stopProducing mid-read fails the read with ConnectionDone."""
        stored = await self.store_body()
        consumer = RecordingConsumer(pause=True)
        d = self.store.read(stored, consumer)
        producer = consumer.producer
        assert producer is not None
        producer.stopProducing()
        self.failureResultOf(d, ConnectionDone)
        producer.resumeProducing()
        self.assertEqual(len(consumer.chunks), 1)

    async def test_read_stopped_inside_write(self) -> None:
        """stopProducing called from within consumer.write ends the read at once."""
        stored = await self.store_body()
        consumer = RecordingConsumer(stop_after=2)
        self.failureResultOf(self.store.read(stored, consumer), ConnectionDone)
        self.assertEqual(consumer.data, BODY[: 2 * CHUNK])

    async def test_read_removed(self) -> None:
        """Reading an entry that was removed fails with BodyMissing, writing nothing."""
        stored = await self.store_body()
        self.assertEqual(self.successResultOf(self.store.remove(URL)), 1)
        consumer = RecordingConsumer()
        self.failureResultOf(self.store.read(stored, consumer), BodyMissing)
        self.assertEqual(consumer.chunks, [])
        self.assertIsNone(consumer.producer)

    async def test_partial_reader(self) -> None:
        """A reader sees bytes as written and keeps working after commit."""
        writer = self.successResultOf(self.store.open_writer(URL))
        reader = writer.open_reader()
        self.assertEqual(reader.read(0, 10), b"")
        writer.write(b"abc")
        self.assertEqual(reader.read(0, 10), b"abc")
        writer.write(b"defg")
        self.assertEqual(reader.read(2, 3), b"cde")
        self.assertEqual(reader.read(5, 100), b"fg")
        self.assertEqual(reader.read(50, 10), b"")
        await writer.commit(make_entry())
        self.assertEqual(reader.read(0, 100), b"abcdefg")
        reader.close()
        reader.close()
        self.assertRaises(ValueError, reader.read, 0, 1)

    async def test_open_reader_when_finished(self) -> None:
        """Readers must be opened before commit or abort; later it is an error."""
        for finish in ["commit", "abort"]:
            writer = self.successResultOf(self.store.open_writer(URL))
            writer.write(b"abc")
            if finish == "commit":
                await writer.commit(make_entry())
            else:
                await writer.abort()
            self.assertRaises(ValueError, writer.open_reader)

    def test_closed_store_fails(self) -> None:
        """After close, index operations fail through their Deferreds."""
        self.successResultOf(self.store.close())
        self.failureResultOf(self.store.lookup(URL), ValueError)
        self.failureResultOf(self.store.update(make_entry()), ValueError)
        self.failureResultOf(self.store.remove(URL), ValueError)

    def test_partial_reader_after_abort(self) -> None:
        """A reader keeps returning the written bytes after the writer aborts."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"abcdef")
        reader = writer.open_reader()
        self.successResultOf(writer.abort())
        self.assertEqual(reader.read(1, 4), b"bcde")
        reader.close()

    async def test_update(self) -> None:
        """update replaces the metadata and keeps the body."""
        stored = await self.store_body(b"body")
        refreshed = stored.replace(
            stored_at=2000.0, initial_age=0.0, headers=[("ETag", '"v2"')]
        )
        self.assertEqual(self.successResultOf(self.store.update(refreshed)), refreshed)
        self.assertEqual(self.lookup(), [refreshed])
        self.assertEqual(self.read_all(refreshed), b"body")

    async def test_update_gone(self) -> None:
        """update of a removed or since-replaced entry fails with BodyMissing."""
        stored = await self.store_body(b"one")
        await self.store_body(b"two")
        self.failureResultOf(self.store.update(stored), BodyMissing)
        self.successResultOf(self.store.remove(URL))
        self.failureResultOf(self.store.update(stored), BodyMissing)
        self.assertEqual(self.lookup(), [])

    async def test_remove(self) -> None:
        """remove drops one variant or all of them and counts what it dropped."""
        await self.store_body(b"a", make_entry(variant="a"))
        b = await self.store_body(b"b", make_entry(variant="b"))
        await self.store_body(b"c", make_entry(variant="c"))
        self.assertEqual(self.successResultOf(self.store.remove(URL, "a")), 1)
        self.assertEqual(self.successResultOf(self.store.remove(URL, "a")), 0)
        self.assertEqual([e.variant for e in self.lookup()], ["b", "c"])
        self.assertEqual(self.successResultOf(self.store.remove(URL)), 2)
        self.assertEqual(self.lookup(), [])
        self.assertEqual(self.successResultOf(self.store.remove(URL)), 0)
        self.failureResultOf(self.store.read(b, RecordingConsumer()), BodyMissing)

    async def test_remove_during_read(self) -> None:
        """A read that already started finishes even if the entry is removed."""
        stored = await self.store_body()
        consumer = RecordingConsumer(pause=True)
        d = self.store.read(stored, consumer)
        self.successResultOf(self.store.remove(URL))
        producer = consumer.producer
        assert producer is not None
        while consumer.producer is not None:
            producer.resumeProducing()
        self.successResultOf(d)
        self.assertEqual(consumer.data, BODY)

    def test_closed_store_refuses_writers(self) -> None:
        """After close, open writers are aborted and their writes raise StoreFull."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"abc")
        self.successResultOf(self.store.close())
        self.assertRaises(StoreFull, writer.write, b"more")
        self.failureResultOf(self.store.open_writer(URL), StoreFull)

    # -- usage, touch, eviction, remove_prefix ------------------------------------

    async def store_at(
        self, url: str, body: bytes, variant: str = ""
    ) -> StoredResponse:
        """Commit ``body`` as the entry for ``url`` (and ``variant``)."""
        return await self.store_body(body, make_entry(url=url, variant=variant))

    def present(self, *entries: StoredResponse) -> list[bool]:
        """Whether each entry is still stored (same body)."""
        return [
            any(e.body_ref == entry.body_ref for e in self.lookup(entry.url))
            for entry in entries
        ]

    async def test_usage_counts(self) -> None:
        """usage() counts committed bodies and entries through every change."""
        self.assertEqual(self.store.usage(), Usage(bytes=0, entries=0, max_size=None))
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"not yet committed")
        self.assertEqual(self.store.usage().bytes, 0)
        self.successResultOf(writer.abort())
        await self.store_body(b"12345", make_entry(variant="a"))
        await self.store_body(b"123", make_entry(variant="b"))
        await self.store_at(URL + "2", b"1234567")
        self.assertEqual(self.store.usage(), Usage(bytes=15, entries=3, max_size=None))
        await self.store_body(b"1", make_entry(variant="a"))
        self.assertEqual(self.store.usage(), Usage(bytes=11, entries=3, max_size=None))
        self.successResultOf(self.store.remove(URL, "b"))
        self.assertEqual(self.store.usage(), Usage(bytes=8, entries=2, max_size=None))
        self.successResultOf(self.store.remove_prefix(URL))
        self.assertEqual(self.store.usage(), Usage(bytes=0, entries=0, max_size=None))

    async def test_remove_prefix(self) -> None:
        """remove_prefix drops every variant of the URLs starting with the prefix,
        counts them, and keeps URLs just outside the prefix's range."""
        base = "https://files.example/pkg/"
        inside = [
            await self.store_at(base, b"1"),
            await self.store_at(base + "a", b"2"),
            await self.store_at(base + "a/b", b"3", "x"),
            await self.store_at(base + "a/b", b"4", "y"),
            await self.store_at(base + "ab~\U0010ffff", b"5"),
        ]
        outside = [
            await self.store_at("https://files.example/pkg", b"6"),
            await self.store_at("https://files.example/pkg0", b"7"),  # "/" + 1
            await self.store_at("https://files.example/pkf/z", b"8"),
            await self.store_at("https://other.example/pkg/a", b"9"),
        ]
        self.assertEqual(self.successResultOf(self.store.remove_prefix(base)), 5)
        self.assertEqual(self.present(*inside), [False] * 5)
        self.assertEqual(self.present(*outside), [True] * 4)
        self.assertEqual(self.store.usage().entries, 4)
        self.failureResultOf(
            self.store.read(inside[1], RecordingConsumer()), BodyMissing
        )
        self.assertEqual(self.successResultOf(self.store.remove_prefix(base)), 0)
        self.assertEqual(self.successResultOf(self.store.remove_prefix("")), 4)
        self.assertEqual(self.store.usage(), Usage(bytes=0, entries=0, max_size=None))

    async def test_remove_prefix_last_character(self) -> None:
        """A prefix ending in the highest code point still matches (no successor
        of that character exists)."""
        top = "https://x.example/\U0010ffff"
        doomed = [await self.store_at(top, b"a"), await self.store_at(top + "z", b"b")]
        kept = await self.store_at("https://x.example/\U0010fffe", b"c")
        self.assertEqual(self.successResultOf(self.store.remove_prefix(top)), 2)
        self.assertEqual(self.present(*doomed, kept), [False, False, True])

    async def test_lru_eviction_honours_touches(self) -> None:
        """Over the budget, the least recently used entries go first, touched
        entries count as used, and eviction stops at 90 % of the budget."""
        self.make_budget_store(1000)
        events = capture_log(cast(unittest.TestCase, self))
        a = await self.store_at(URL + "a", b"a" * 300)
        self.advance(1)
        b = await self.store_at(URL + "b", b"b" * 300)
        self.advance(1)
        c = await self.store_at(URL + "c", b"c" * 300)
        self.advance(1)
        self.store.touch(a)
        self.advance(1)
        d = await self.store_at(URL + "d", b"d" * 300)
        self.assertEqual(self.present(a, b, c, d), [True, False, True, True])
        self.assertEqual(self.store.usage(), Usage(bytes=900, entries=3, max_size=1000))
        [evicted] = [e for e in events if "Evicted" in e.get("log_format", "")]
        self.assertEqual((evicted["count"], evicted["bytes"]), (1, 300))
        self.advance(1)
        e = await self.store_at(URL + "e", b"e" * 400)
        self.assertEqual(self.present(a, c, d, e), [False, False, True, True])
        self.check_at_rest()

    async def test_budget_holds_at_rest(self) -> None:
        """After each of many commits of random sizes, some concurrent, with
        touches in between, the stored bytes never exceed max_size and the
        entry just committed is kept."""
        rng = random.Random(3)
        max_size = 4000
        self.make_budget_store(max_size)
        stored: list[StoredResponse] = []
        for i in range(50):
            self.advance(1)
            entry = await self.store_at(
                f"{URL}/{i}", rng.randbytes(rng.randrange(1, 900))
            )
            stored.append(entry)
            self.assertTrue(self.present(entry)[0])
            self.assertLessEqual(self.store.usage().bytes, max_size)
            if i % 3 == 0:
                self.store.touch(rng.choice(stored))
            self.check_at_rest()
        writers = []
        for i in range(8):
            writer = self.successResultOf(self.store.open_writer(URL))
            writer.write(rng.randbytes(rng.randrange(1, 900)))
            writers.append((writer, make_entry(url=f"{URL}/c{i}")))
        await defer.gatherResults([w.commit(e) for w, e in writers])
        self.assertLessEqual(self.store.usage().bytes, max_size)
        self.check_at_rest()
        self.assertLess(self.store.usage().entries, 58)

    async def test_reader_is_not_evicted(self) -> None:
        """An entry whose body is being read survives an eviction that would
        otherwise take it; its reader gets every byte; it is evicted later."""
        size = len(BODY)
        self.make_budget_store(size * 5 // 2)
        body_a = os.urandom(size)
        a = await self.store_at(URL + "a", body_a)
        self.advance(1)
        b = await self.store_at(URL + "b", os.urandom(size))
        self.advance(1)
        consumer = RecordingConsumer(pause=True)
        reading = self.store.read(a, consumer)
        self.assertEqual(len(consumer.chunks), 1)
        c = await self.store_at(URL + "c", os.urandom(size))
        self.assertEqual(self.present(a, b, c), [True, False, True])
        producer = consumer.producer
        assert producer is not None
        while consumer.producer is not None:
            producer.resumeProducing()
        self.successResultOf(reading)
        self.assertEqual(consumer.data, body_a)
        self.advance(1)
        d = await self.store_at(URL + "d", os.urandom(size))
        self.assertEqual(self.present(a, c, d), [False, True, True])
        self.check_at_rest()

    async def test_body_larger_than_budget(self) -> None:
        """A body larger than max_size fails its commit with StoreFull, is not
        stored, and evicts nothing."""
        self.make_budget_store(1000)
        kept = await self.store_at(URL + "kept", b"k" * 600)
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"x" * 600)
        writer.write(b"x" * 401)
        self.failureResultOf(writer.commit(make_entry()), StoreFull)
        self.assertEqual(self.lookup(), [])
        self.assertEqual(self.present(kept), [True])
        self.assertEqual(self.store.usage(), Usage(bytes=600, entries=1, max_size=1000))
        self.successResultOf(writer.abort())
        self.check_at_rest()
        exact = await self.store_at(URL, b"y" * 1000)
        self.assertEqual(self.present(kept, exact), [False, True])

    async def test_touch_unknown(self) -> None:
        """Touching an entry that is gone does nothing (and does not bring it
        back)."""
        self.make_budget_store(None)
        gone = await self.store_body(b"gone")
        self.successResultOf(self.store.remove(URL))
        self.store.touch(gone)
        self.advance(FLUSH_INTERVAL)
        self.assertEqual(self.lookup(), [])
        self.assertEqual(self.store.usage().entries, 0)


class MemoryStoreTests(StoreBehaviourMixin, unittest.TestCase):
    """MemoryStore keeps the ICacheStore contract."""

    def setUp(self) -> None:
        self.store = self.make_store()

    def make_store(self) -> ICacheStore:
        return MemoryStore()

    def make_budget_store(self, max_size: int | None) -> ICacheStore:
        self.store = MemoryStore(max_size=max_size)
        return self.store

    def test_capacity(self) -> None:
        """Writes past the capacity raise StoreFull; only abort is valid then."""
        store = MemoryStore(capacity=10)
        writer = self.successResultOf(store.open_writer(URL))
        writer.write(b"12345678")
        self.assertRaises(StoreFull, writer.write, b"abc")
        self.assertEqual(writer.bytes_written, 8)
        self.assertRaises(StoreFull, writer.write, b"a")
        self.failureResultOf(writer.commit(make_entry()), StoreFull)
        self.successResultOf(writer.abort())
        other = self.successResultOf(store.open_writer(URL))
        other.write(b"0123456789")


class DiskStoreTests(StoreBehaviourMixin, unittest.TestCase):
    """DiskStore keeps the ICacheStore contract and its on-disk promises."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.store = self.make_store()

    def make_store(self) -> DiskStore:
        store = DiskStore.open(self.path, REACTOR)
        self.addCleanup(store.close)
        return store

    def make_budget_store(self, max_size: int | None) -> DiskStore:
        """A store in a new directory on a ClockReactor at 1000 s."""
        self.path = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(1000)
        store = DiskStore.open(self.path, ClockReactor(self.clock), max_size=max_size)
        self.addCleanup(store.close)
        self.store = store
        return store

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def check_at_rest(self) -> None:
        """Usage, rows and body files agree; nothing is left in tmp/."""
        usage = self.store.usage()
        db = self.index()
        rows = db.execute("SELECT body_ref, size FROM entries").fetchall()
        self.assertEqual(
            (usage.entries, usage.bytes), (len(rows), sum(s for _, s in rows))
        )
        self.assertEqual(self.files("bodies"), sorted(ref for ref, _ in rows))
        on_disk = sum(
            os.path.getsize(os.path.join(self.path, "bodies", ref)) for ref, _ in rows
        )
        self.assertEqual(on_disk, usage.bytes)
        if usage.max_size is not None:
            self.assertLessEqual(on_disk, usage.max_size)

    def index(self) -> sqlite3.Connection:
        """A second connection to the store's index, as another process has."""
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        self.addCleanup(db.close)
        return db

    def last_used(self, entry: StoredResponse) -> float:
        [(value,)] = self.index().execute(
            "SELECT last_used FROM entries WHERE url = ? AND variant = ?",
            (entry.url, entry.variant),
        )
        return cast(float, value)

    def files(self, sub: str) -> list[str]:
        """Files under ``sub`` of the cache dir, relative to it, sorted."""
        top = os.path.join(self.path, sub)
        return sorted(
            os.path.relpath(os.path.join(d, f), top)
            for d, _, names in os.walk(top)
            for f in names
        )

    async def test_touch_is_batched(self) -> None:
        """touch writes nothing at once; the latest use of each entry is written
        in one batch when the flush interval has passed."""
        store = self.make_budget_store(None)
        a = await self.store_at(URL + "a", b"a")
        b = await self.store_at(URL + "b", b"b")
        statements: list[str] = []
        store._index.db.set_trace_callback(statements.append)
        self.advance(1)
        store.touch(a)
        self.advance(2)
        store.touch(a)
        store.touch(b)
        self.assertEqual((self.last_used(a), self.last_used(b)), (1000, 1000))
        self.assertEqual([s for s in statements if "UPDATE" in s], [])
        self.advance(FLUSH_INTERVAL - 3)
        self.assertEqual((self.last_used(a), self.last_used(b)), (1003, 1003))
        self.assertTrue(any("UPDATE" in s for s in statements))
        statements.clear()
        self.advance(FLUSH_INTERVAL)
        self.assertEqual(statements, ["PRAGMA data_version"])

    async def test_touch_written_on_close(self) -> None:
        """Uses not yet written are written when the store closes."""
        store = self.make_budget_store(None)
        a = await self.store_at(URL, b"a")
        self.advance(2)
        store.touch(a)
        await store.close()
        self.assertEqual(self.last_used(a), 1002)

    async def test_usage_rereads_index(self) -> None:
        """Entries deleted by another process (the cache tool) leave the usage
        figures at the next flush."""
        store = self.make_budget_store(None)
        await self.store_at(URL + "a", b"12345")
        await self.store_at(URL + "b", b"123")
        db = self.index()
        db.execute("DELETE FROM entries WHERE url = ?", (URL + "a",))
        db.commit()
        self.assertEqual(store.usage(), Usage(bytes=8, entries=2, max_size=None))
        self.advance(FLUSH_INTERVAL)
        self.assertEqual(store.usage(), Usage(bytes=3, entries=1, max_size=None))

    async def test_usage_loaded_at_open(self) -> None:
        """A reopened store starts from the index's figures."""
        await self.store_at(URL + "a", b"12345")
        await self.store_at(URL + "b", b"123")
        await self.store.close()
        store = DiskStore.open(self.path, REACTOR, max_size=10)
        self.addCleanup(store.close)
        self.assertEqual(store.usage(), Usage(bytes=8, entries=2, max_size=10))

    async def test_over_budget_evicted_when_readers_finish(self) -> None:
        """When every older entry is being read, a commit may leave the store
        over budget; the next flush after the reads end evicts the excess."""
        size = len(BODY)
        store = self.make_budget_store(size * 5 // 2)
        a = await self.store_at(URL + "a", BODY)
        self.advance(1)
        b = await self.store_at(URL + "b", BODY)
        self.advance(1)
        readers = [RecordingConsumer(pause=True) for _ in range(2)]
        reads = [store.read(e, r) for e, r in zip([a, b], readers, strict=True)]
        c = await self.store_at(URL + "c", BODY)
        self.assertEqual(self.present(a, b, c), [True, True, True])
        self.assertEqual(store.usage().bytes, 3 * size)
        for reader, d in zip(readers, reads, strict=True):
            while reader.producer is not None:
                reader.producer.resumeProducing()
            self.successResultOf(d)
            self.assertEqual(reader.data, BODY)
        self.advance(FLUSH_INTERVAL)
        self.assertEqual(self.present(a, b, c), [False, True, True])
        self.check_at_rest()

    async def test_smaller_budget_applies_at_first_flush(self) -> None:
        """Reopening a cache with a max_size below what it holds evicts the
        least recently used entries down to 90 % at the first flush."""
        store = self.make_budget_store(None)
        entries = []
        for i in range(5):
            entries.append(await self.store_at(f"{URL}/{i}", b"x" * 100))
            self.advance(1)
        await store.close()
        store = DiskStore.open(self.path, ClockReactor(self.clock), max_size=350)
        self.addCleanup(store.close)
        self.store = store
        self.assertEqual(store.usage().bytes, 500)
        self.advance(FLUSH_INTERVAL)
        self.assertEqual(self.present(*entries), [False, False, True, True, True])
        self.assertEqual(store.usage(), Usage(bytes=300, entries=3, max_size=350))
        self.check_at_rest()

    def test_last_used_index_added(self) -> None:
        """Opening an index made before the last_used index existed adds it,
        and eviction's ORDER BY last_used then uses it."""
        self.successResultOf(self.store.close())
        path = self.path = self.mktemp()
        os.makedirs(os.path.join(path, "bodies", "ab"))
        with open(os.path.join(path, "bodies", "ab", "ab" + "0" * 30), "wb") as f:
            f.write(b"old body")
        db = sqlite3.connect(os.path.join(path, "index.sqlite"))
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO entries VALUES (?, '', '[]', 200, '[]', 1, 0, 8, '', ?, 1)",
            (URL, "ab/ab" + "0" * 30),
        )
        db.commit()
        db.close()
        store = DiskStore.open(path, REACTOR)
        self.addCleanup(store.close)
        db = self.index()
        names = [row[1] for row in db.execute("PRAGMA index_list(entries)")]
        self.assertIn("entries_last_used", names)
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT rowid, url FROM entries ORDER BY last_used"
        ).fetchall()
        self.assertIn("USING INDEX entries_last_used", str(plan))
        self.assertEqual(store.usage(), Usage(bytes=8, entries=1, max_size=None))

    def test_prefix_successor(self) -> None:
        """The upper bound of a prefix range skips the surrogates and carries
        past the highest code point."""
        self.assertEqual(prefix_successor("https://a/"), "https://a0")
        self.assertEqual(prefix_successor("a\U0010ffff"), "b")
        self.assertEqual(prefix_successor("a\ud7ff"), "a\ue000")
        self.assertIsNone(prefix_successor("\U0010ffff\U0010ffff"))
        self.assertIsNone(prefix_successor(""))

    def test_prefix_is_indexed(self) -> None:
        """remove_prefix searches the url index, not the whole table."""
        statements: list[str] = []
        store = cast(DiskStore, self.store)
        store._index.db.set_trace_callback(statements.append)
        self.successResultOf(store.remove_prefix("https://a/"))
        [sql] = [s for s in statements if s.startswith("DELETE")]
        [plan] = self.index().execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        self.assertIn("SEARCH entries USING", plan[3])
        self.assertIn("INDEX entries_key (url>? AND url<?)", plan[3])

    def test_layout(self) -> None:
        """open creates the index (WAL, format marker), bodies/ and tmp/."""
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("bodies"), [])
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(
            db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone(),
            ("1",),
        )

    def test_lookup_is_indexed(self) -> None:
        """Lookups by url and by url prefix use an index, not a table scan."""
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        self.addCleanup(db.close)
        for where in ["url = 'u'", "url >= 'u' AND url < 'v'"]:
            plan = db.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM entries WHERE {where}"
            ).fetchall()
            self.assertIn("USING INDEX", str(plan))

    async def test_body_file(self) -> None:
        """A committed body is a file bodies/XX/NAME named by body_ref."""
        stored = await self.store_body()
        shard, name = stored.body_ref.split("/")
        self.assertEqual(shard, name[:2])
        self.assertEqual(self.files("bodies"), [stored.body_ref])
        self.assertEqual(self.files("tmp"), [])
        with open(os.path.join(self.path, "bodies", stored.body_ref), "rb") as f:
            self.assertEqual(f.read(), BODY)
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        self.addCleanup(db.close)
        [(last_used,)] = db.execute("SELECT last_used FROM entries").fetchall()
        self.assertLess(abs(last_used - reactor.seconds()), 60)

    def test_temp_file(self) -> None:
        """An open writer writes to tmp/, visible to readers of the file at once."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"abc")
        [name] = self.files("tmp")
        with open(os.path.join(self.path, "tmp", name), "rb") as f:
            self.assertEqual(f.read(), b"abc")
        self.successResultOf(writer.abort())
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("bodies"), [])

    async def test_replace_deletes_old_body(self) -> None:
        """Replacing an entry deletes the old body file and keeps one row."""
        old = await self.store_body(b"old")
        new = await self.store_body(b"new")
        self.assertNotEqual(old.body_ref, new.body_ref)
        self.assertEqual(self.files("bodies"), [new.body_ref])
        self.assertEqual(self.lookup(), [new])

    async def test_remove_deletes_bodies(self) -> None:
        """Removed entries' body files are deleted."""
        await self.store_body(b"a", make_entry(variant="a"))
        await self.store_body(b"b", make_entry(variant="b"))
        self.successResultOf(self.store.remove(URL))
        self.assertEqual(self.files("bodies"), [])

    async def test_read_deleted_file(self) -> None:
        """A body file deleted behind the store's back gives BodyMissing."""
        stored = await self.store_body()
        os.unlink(os.path.join(self.path, "bodies", stored.body_ref))
        consumer = RecordingConsumer()
        self.failureResultOf(self.store.read(stored, consumer), BodyMissing)
        self.assertEqual(consumer.chunks, [])
        self.assertIsNone(consumer.producer)

    async def test_read_bad_body_ref(self) -> None:
        """A body_ref that is not one of ours is never opened."""
        stored = await self.store_body()
        for ref in ["../index.sqlite", "", "/etc/passwd"]:
            consumer = RecordingConsumer()
            d = self.store.read(stored.replace(body_ref=ref), consumer)
            self.failureResultOf(d, BodyMissing)

    async def test_read_closes_file(self) -> None:
        """A finished or stopped read closes its file descriptor."""
        if not os.path.isdir("/proc/self/fd"):
            raise unittest.SkipTest("needs /proc/self/fd")
        stored = await self.store_body()
        before = len(os.listdir("/proc/self/fd"))
        self.read_all(stored)
        consumer = RecordingConsumer(pause=True)
        d = self.store.read(stored, consumer)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 1)
        assert consumer.producer is not None
        consumer.producer.stopProducing()
        self.failureResultOf(d, ConnectionDone)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    async def test_read_yields(self) -> None:
        """A consumer that never pauses gets at most 4 MiB per reactor turn."""
        body = os.urandom(5 * 1024 * 1024)
        stored = await self.store_body(body)
        consumer = RecordingConsumer()
        d = self.store.read(stored, consumer)
        self.assertEqual(len(consumer.data), 4 * 1024 * 1024)
        self.assertNoResult(d)
        await d
        self.assertEqual(consumer.data, body)

    async def test_read_truncated(self) -> None:
        """A body file shorter than its entry fails the read with BodyMissing."""
        stored = await self.store_body()
        os.truncate(os.path.join(self.path, "bodies", stored.body_ref), 10)
        consumer = RecordingConsumer()
        self.failureResultOf(self.store.read(stored, consumer), BodyMissing)
        self.assertEqual(consumer.data, BODY[:10])
        self.assertTrue(consumer.unregistered)

    async def test_reopen(self) -> None:
        """Entries and bodies survive closing and re-opening the store."""
        stored = await self.store_body()
        await self.store.close()
        self.store = self.make_store()
        self.assertEqual(self.lookup(), [stored])
        self.assertEqual(self.read_all(stored), BODY)

    async def test_close_waits_for_commit(self) -> None:
        """close waits for a commit in progress, which then survives re-opening."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"body")
        committed = writer.commit(make_entry())
        other = self.successResultOf(self.store.open_writer(URL))
        other.write(b"other")
        closed = self.store.close()
        stored = await committed
        await closed
        self.assertEqual(self.files("tmp"), [])
        self.store = self.make_store()
        self.assertEqual(self.lookup(), [stored])

    async def test_sweep(self) -> None:
        """open deletes temp files, orphan bodies and rows whose body is gone."""
        kept = await self.store_body(b"kept", make_entry(variant="kept"))
        lost = await self.store_body(b"lost", make_entry(variant="lost"))
        short = await self.store_body(b"short", make_entry(variant="short"))
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"in flight")
        await self.store.close()
        with open(os.path.join(self.path, "tmp", "0123abcd"), "wb") as f:
            f.write(b"left by a crash")
        # A stored body may already live in shard ff (refs are random).
        os.makedirs(os.path.join(self.path, "bodies", "ff"), exist_ok=True)
        with open(os.path.join(self.path, "bodies", "ff", "ff" + "0" * 30), "wb") as f:
            f.write(b"orphan")
        os.unlink(os.path.join(self.path, "bodies", lost.body_ref))
        os.truncate(os.path.join(self.path, "bodies", short.body_ref), 2)
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        self.store = self.make_store()

        self.assertEqual(self.lookup(), [kept])
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("bodies"), [kept.body_ref])
        [swept] = [e for e in events if "temps" in e]
        self.assertEqual((swept["temps"], swept["orphans"], swept["rows"]), (1, 2, 2))

    async def test_commit_failure_leaves_nothing(self) -> None:
        """If fsync or rename fails, commit fails and no row or file is left."""
        for name in ["fsync", "rename"]:

            def broken(*args: object) -> None:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

            writer = self.successResultOf(self.store.open_writer(URL))
            writer.write(b"body")
            patched = self.patch(disk.os, name, broken)
            with self.assertRaises(OSError):
                await writer.commit(make_entry())
            patched.restore()
            self.assertEqual(self.lookup(), [])
            self.assertEqual(self.files("tmp"), [])
            self.assertEqual(self.files("bodies"), [])
            self.failureResultOf(writer.commit(make_entry()), ValueError)

    async def test_index_failure_removes_the_body(self) -> None:
        """If the body moved into place but its row cannot be written, commit
        fails and neither the body nor the temp file is left."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"body")
        self.assertTrue(verifyObject(IBodyCommitter, writer._committer))

        def broken(*args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        patched = self.patch(self.store._index, "insert", broken)
        with self.assertRaises(sqlite3.OperationalError):
            await writer.commit(make_entry())
        patched.restore()
        self.assertEqual(self.lookup(), [])
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("bodies"), [])

    def test_store_full(self) -> None:
        """ENOSPC from os.write becomes StoreFull; then only abort is valid."""
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(b"fits")

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(disk.os, "write", full)
        self.assertRaises(StoreFull, writer.write, b"does not fit")
        self.assertEqual(writer.bytes_written, 4)
        self.assertRaises(StoreFull, writer.write, b"x")
        self.failureResultOf(writer.commit(make_entry()), StoreFull)
        self.successResultOf(writer.abort())
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.lookup(), [])

    def test_short_writes(self) -> None:
        """Short os.write results are retried until every byte is written."""
        real_write = os.write

        def short(fd: int, data: bytes) -> int:
            return real_write(fd, bytes(data[:3]))

        writer = self.successResultOf(self.store.open_writer(URL))
        self.patch(disk.os, "write", short)
        writer.write(b"0123456789")
        reader = writer.open_reader()
        self.addCleanup(reader.close)
        self.assertEqual(reader.read(0, 100), b"0123456789")
        self.successResultOf(writer.abort())

    def test_default_reactor(self) -> None:
        """open without a reactor uses the global one."""
        store = DiskStore.open(self.mktemp())
        self.successResultOf(store.close())

    def test_foreign_directory(self) -> None:
        """A directory with other files and no index is refused."""
        path = self.mktemp()
        os.makedirs(path)
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("mine")
        self.assertRaises(CacheDirError, DiskStore.open, path, REACTOR)
        self.assertFalse(os.path.exists(os.path.join(path, "tmp")))

    def test_foreign_index(self) -> None:
        """An index.sqlite that is not ours (or not SQLite) is refused."""
        for content in [b"not a database at all" * 100, None]:
            path = self.mktemp()
            os.makedirs(path)
            index = os.path.join(path, "index.sqlite")
            if content is None:
                db = sqlite3.connect(index)
                db.execute("CREATE TABLE other (x)")
                db.commit()
                db.close()
            else:
                with open(index, "wb") as f:
                    f.write(content)
            self.assertRaises(CacheDirError, DiskStore.open, path, REACTOR)

    def test_other_format(self) -> None:
        """An index of another format version is refused."""
        self.successResultOf(self.store.close())
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
        db.commit()
        db.close()
        self.assertRaises(CacheDirError, DiskStore.open, self.path, REACTOR)
