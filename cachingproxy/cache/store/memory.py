"""A cache store in memory, for unit tests of the modules that use a store.

It follows the same contract as :class:`~cachingproxy.cache.store.disk.DiskStore`
(the behaviour tests run against both) but every result is synchronous.  Its
entries dict is kept in order of use, least recent first, which is all LRU
eviction needs.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse, Usage
from cachingproxy.cache.store._producer import produce, read_range
from cachingproxy.cache.store.disk import LOW_WATER
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IPartialReader

_log = Logger()


@implementer(IPartialReader)
class _MemoryReader:
    """Reads the buffer of a writer, up to what it has accepted."""

    def __init__(self, writer: _MemoryWriter) -> None:
        self._writer = writer
        self._closed = False

    def read(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise ValueError("reader is closed")
        stop = min(offset + length, self._writer.bytes_written)
        return bytes(self._writer.buffer[offset:stop])

    def close(self) -> None:
        self._closed = True


@implementer(IBodyWriter)
class _MemoryWriter:
    """A body accumulating in a bytearray."""

    def __init__(self, store: MemoryStore, url: str) -> None:
        self.bytes_written = 0
        self.buffer = bytearray()
        self._store = store
        self._url = url
        self._state = "open"  # -> full | committed | aborted

    def write(self, data: bytes) -> None:
        if self._state != "open":
            if self._state == "full" or self._store.closed:
                raise StoreFull(f"cannot store {self._url}: writer is {self._state}")
            raise ValueError(f"write to a {self._state} writer")
        if not self._store._reserve(len(data)):
            self._state = "full"
            raise StoreFull(f"cannot store {self._url}: over capacity")
        self.buffer += data
        self.bytes_written += len(data)

    def open_reader(self) -> IPartialReader:
        if self._state in ("committed", "aborted"):
            raise ValueError(f"open_reader on a {self._state} writer")
        return _MemoryReader(self)

    def commit(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        if self._state != "open" or self._store.closed:
            full = self._state == "full" or self._store.closed
            error = StoreFull if full else ValueError
            return defer.fail(
                error(f"cannot commit {self._url}: writer is {self._state}")
            )
        max_size = self._store.max_size
        if max_size is not None and self.bytes_written > max_size:
            self.abort()
            return defer.fail(
                StoreFull(f"cannot store {self._url}: larger than max_size {max_size}")
            )
        self._state = "committed"
        body = bytes(self.buffer)
        stored = entry.replace(
            size=len(body), digest=hashlib.sha256(body).hexdigest(), body_ref=""
        )
        return defer.succeed(self._store._insert(stored, body, self))

    def abort(self) -> Deferred[None]:
        if self._state in ("open", "full"):
            self._state = "aborted"
            self._store._release(self, self.bytes_written)
        return defer.succeed(None)


@implementer(ICacheStore)
class MemoryStore:
    """Cached responses in dicts; ``capacity`` (bytes) makes writes fail.

    ``capacity`` counts committed bodies plus bodies being written, so tests
    can provoke :class:`StoreFull`.  ``max_size`` bounds committed bodies
    only, by LRU eviction as in the disk store.
    """

    def __init__(
        self, capacity: int | None = None, max_size: int | None = None
    ) -> None:
        self.capacity = capacity
        self.max_size = max_size
        self.closed = False
        self._entries: dict[tuple[str, str], StoredResponse] = {}
        """Least recently used first."""
        self._bodies: dict[str, bytes] = {}
        self._writers: set[_MemoryWriter] = set()
        self._readers: Counter[str] = Counter()
        self._used = 0
        self._stored = 0
        self._refs = itertools.count(1)

    def _reserve(self, size: int) -> bool:
        if self.capacity is not None and self._used + size > self.capacity:
            return False
        self._used += size
        return True

    def _release(self, writer: _MemoryWriter, size: int) -> None:
        self._used -= size
        self._writers.discard(writer)

    def _insert(
        self, entry: StoredResponse, body: bytes, writer: _MemoryWriter
    ) -> StoredResponse:
        self._writers.discard(writer)
        entry = entry.replace(body_ref=f"mem-{next(self._refs)}")
        key = (entry.url, entry.variant)
        old = self._entries.get(key)
        if old is not None:
            self._drop(old)
        self._evict(len(body))
        self._entries[key] = entry
        self._bodies[entry.body_ref] = body
        self._stored += len(body)
        return entry

    def _evict(self, incoming: int) -> None:
        """Drop LRU entries not being read until ``incoming`` more bytes fit."""
        if self.max_size is None or self._stored + incoming <= self.max_size:
            return
        target = int(self.max_size * LOW_WATER) - incoming
        victims = []
        freed = 0
        for entry in self._entries.values():
            if self._stored - freed <= target:
                break
            if not self._readers[entry.body_ref]:
                victims.append(entry)
                freed += entry.size
        for entry in victims:
            self._drop(entry)
        if victims:
            _log.info(
                "Evicted {count} entries ({bytes} bytes) from memory",
                count=len(victims),
                bytes=freed,
            )

    def _drop(self, entry: StoredResponse) -> None:
        del self._entries[(entry.url, entry.variant)]
        body = self._bodies.pop(entry.body_ref, b"")
        self._used -= len(body)
        self._stored -= len(body)

    def usage(self) -> Usage:
        return Usage(
            bytes=self._stored, entries=len(self._entries), max_size=self.max_size
        )

    def touch(self, entry: StoredResponse) -> None:
        key = (entry.url, entry.variant)
        current = self._entries.pop(key, None)
        if current is not None:
            self._entries[key] = current

    def lookup(self, url: str) -> Deferred[list[StoredResponse]]:
        if self.closed:
            return defer.fail(ValueError("the store is closed"))
        found = [e for (u, _), e in self._entries.items() if u == url]
        return defer.succeed(sorted(found, key=lambda e: e.variant))

    def read(
        self,
        entry: StoredResponse,
        consumer: IConsumer,
        start: int = 0,
        end: int | None = None,
    ) -> Deferred[None]:
        span = read_range(entry, start, end)
        if span is None:
            return defer.fail(ValueError(f"bad range {start}-{end}"))
        body = self._bodies.get(entry.body_ref)
        if body is None:
            return defer.fail(BodyMissing(f"the body of {entry.url} is gone"))

        ref = entry.body_ref
        self._readers[ref] += 1

        def pread(length: int, offset: int) -> bytes:
            return body[offset : offset + length]

        def release() -> None:
            self._readers[ref] -= 1
            if not self._readers[ref]:
                del self._readers[ref]

        return produce(consumer, pread, release, *span)

    def open_writer(self, url: str) -> Deferred[IBodyWriter]:
        if self.closed:
            return defer.fail(StoreFull("the store is closed"))
        writer = _MemoryWriter(self, url)
        self._writers.add(writer)
        return defer.succeed(writer)

    def update(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        if self.closed:
            return defer.fail(ValueError("the store is closed"))
        key = (entry.url, entry.variant)
        current = self._entries.get(key)
        if current is None or current.body_ref != entry.body_ref:
            return defer.fail(BodyMissing(f"{entry.url} is no longer stored"))
        stored = entry.replace(size=current.size, digest=current.digest)
        del self._entries[key]  # a refresh is a use: it moves to the end
        self._entries[key] = stored
        return defer.succeed(stored)

    def remove(self, url: str, variant: str | None = None) -> Deferred[int]:
        if self.closed:
            return defer.fail(ValueError("the store is closed"))
        doomed = [
            e
            for (u, v), e in self._entries.items()
            if u == url and (variant is None or v == variant)
        ]
        for entry in doomed:
            self._drop(entry)
        return defer.succeed(len(doomed))

    def remove_prefix(self, prefix: str) -> Deferred[int]:
        if self.closed:
            return defer.fail(ValueError("the store is closed"))
        doomed = [e for (u, _), e in self._entries.items() if u.startswith(prefix)]
        for entry in doomed:
            self._drop(entry)
        return defer.succeed(len(doomed))

    def close(self) -> Deferred[None]:
        """Abort the writers still open; later writes raise StoreFull."""
        self.closed = True
        for writer in list(self._writers):
            writer.abort()
        return defer.succeed(None)


__all__ = ["MemoryStore"]
