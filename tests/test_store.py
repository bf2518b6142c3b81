"""Tests for cachingproxy.store: one behaviour suite for every ICacheStore."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IProducer,
    IPushProducer,
    IReactorThreads,
)
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cachingproxy.entry import StoredResponse
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IPartialReader
from cachingproxy.store import CacheDirError, DiskStore, MemoryStore, disk

REACTOR = IReactorThreads(reactor)
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


class StoreBehaviourMixin:
    """The ICacheStore contract, run against each implementation."""

    def make_store(self) -> ICacheStore:
        raise NotImplementedError

    # mixed into unittest.TestCase
    successResultOf: Any
    failureResultOf: Any
    assertNoResult: Any
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertRaises: Any
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


class MemoryStoreTests(StoreBehaviourMixin, unittest.TestCase):
    """MemoryStore keeps the ICacheStore contract."""

    def setUp(self) -> None:
        self.store = self.make_store()

    def make_store(self) -> ICacheStore:
        return MemoryStore()

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

    def files(self, sub: str) -> list[str]:
        """Files under ``sub`` of the cache dir, relative to it, sorted."""
        top = os.path.join(self.path, sub)
        return sorted(
            os.path.relpath(os.path.join(d, f), top)
            for d, _, names in os.walk(top)
            for f in names
        )

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
        os.makedirs(os.path.join(self.path, "bodies", "ff"))
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
