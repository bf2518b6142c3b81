"""Two tiers behind one ICacheStore: the node's disk first, the fleet's
bucket second (SPEC 12).

- A lookup asks the local tier; only when it has no variant of the URL does
  it ask the shared tier, whose entries carry a ``body_ref`` naming their
  object (``layout.shared_ref``).
- Reading such an entry streams the object to the client and, at the same
  time, into a local writer; the copy is committed only when its length and
  sha256 match the entry's metadata, so the next request is a local hit.  A
  client that goes away does not stop the copy.
- A body committed locally is uploaded afterwards, in the background (never
  delaying a client), by one conditional write: the first node wins.
- Removing a URL (all its variants) or a prefix removes it from both tiers
  and tells the other nodes (``on_remove``: the purge log); removing one
  variant (its body went missing) is local.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse, Usage
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.fleet import layout
from cachingproxy.fleet.s3 import S3Error
from cachingproxy.fleet.shared import SharedTier
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IPartialReader

_log = Logger()

_DONE = Failure(ResponseDone())

IDLE_TIMEOUT = 30.0
"""Seconds of silence from the store, mid-body, before a read gives up."""

BACKLOG = 10_000
"""Entries remembered for upload after an outage (the oldest forgotten)."""

UPLOADS = 4
"""Uploads at a time; the others queue (each holds its lease until done)."""

SEEN = 10_000
"""URLs whose last lookup is remembered (:meth:`TieredStore.seen`)."""


@implementer(ICacheStore)
class TieredStore:
    """``local`` (bounded by --max-size) in front of ``shared``."""

    def __init__(self, local: ICacheStore, shared: SharedTier, clock: Any) -> None:
        self._clock = clock
        self._writing: Counter[str] = Counter()
        """Local writers open, by URL."""
        self.local = local
        self.shared = shared
        self.should_upload: Callable[[str], bool] = lambda url: True
        """Whether a body of this URL committed here goes up (not when it came
        from another node or from the shared tier itself)."""
        self.on_remove: Callable[[dict[str, str]], object] = lambda record: None
        """Tells the fleet about a removal (the purge log)."""
        self.uploads: dict[tuple[str, str], defer.Deferred[None]] = {}
        """Uploads in progress, by (url, variant)."""
        self._copying: set[tuple[str, str]] = set()
        self._upload_slots = defer.DeferredSemaphore(UPLOADS)
        self._backlog: OrderedDict[tuple[str, str], None] = OrderedDict()
        """Entries committed while the store was unusable, to upload later."""
        self._purges: OrderedDict[tuple[str, str], float] = OrderedDict()
        """Recent purges (``("url"|"prefix", value)`` -> when), here or in
        the fleet: a body whose writer opened before one is not kept."""
        self._seen: OrderedDict[str, float] = OrderedDict()
        """The newest ``stored_at`` the last lookup of a URL returned."""

    # -- lookups and reads ---------------------------------------------------

    async def _lookup(self, url: str) -> list[StoredResponse]:
        found = await self.local.lookup(url)
        if not found:
            found = await self.shared.lookup(url)
        self._seen[url] = max((e.stored_at for e in found), default=-math.inf)
        self._seen.move_to_end(url)
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        return found

    def seen(self, url: str) -> float:
        """The newest ``stored_at`` among the entries the last lookup of
        ``url`` returned (-inf: none): a shared object stored later is news
        to whoever acted on that lookup."""
        return self._seen.get(url, -math.inf)

    def lookup(self, url: str) -> defer.Deferred[list[StoredResponse]]:
        return defer.Deferred.fromCoroutine(self._lookup(url))

    def read(
        self,
        entry: StoredResponse,
        consumer: IConsumer,
        start: int = 0,
        end: int | None = None,
    ) -> defer.Deferred[None]:
        if layout.parse_shared_ref(entry.body_ref) is None:
            return self.local.read(entry, consumer, start, end)
        return defer.Deferred.fromCoroutine(
            self._read_shared(
                entry, consumer, start, entry.size if end is None else end
            )
        )

    async def _read_shared(
        self, entry: StoredResponse, consumer: IConsumer, start: int, end: int
    ) -> None:
        key = (entry.url, entry.variant)
        copy = start == 0 and end == entry.size and key not in self._copying
        try:
            response = await self.shared.body(entry, start, end)
        except S3Error as e:
            raise BodyMissing(f"the shared copy of {entry.url}: {e}") from e
        writer = None
        if copy:
            try:
                writer = await self.local.open_writer(entry.url)
            except StoreFull:
                writer = None
        if writer is not None:
            self._copying.add(key)
            self._writing[entry.url] += 1
        whole = start == 0 and end == entry.size
        pipe = _Pipe(
            consumer, writer, end - start, entry.digest if whole else "", self._clock
        )
        response.deliverBody(pipe)
        pipe.finished.addCallback(self._drop_if_corrupt, pipe, entry)
        try:
            await pipe.served
        finally:
            if writer is not None:
                pipe.finished.addBoth(lambda ok: self._copied(entry, writer, ok, key))

    def _drop_if_corrupt(self, ok: bool, pipe: _Pipe, entry: StoredResponse) -> bool:
        """An object whose body does not match its own sha256 is deleted, so
        no node tries it again."""
        if pipe.corrupt:
            d = defer.Deferred.fromCoroutine(
                self.shared.remove(entry.url, entry.variant)
            )
            d.addErrback(lambda f: None)
        return ok

    def _copied(
        self, entry: StoredResponse, writer: IBodyWriter, ok: object, key: Any
    ) -> defer.Deferred[Any]:
        """The object was read: commit the copy if it checked out."""
        self._copying.discard(key)
        d: defer.Deferred[Any]
        if ok is not True:
            d = writer.abort()
        else:
            d = writer.commit(entry.replace(body_ref="", size=0, digest=""))
            d.addErrback(lambda f: _log.failure("copy of {url}", f, url=entry.url))
        return d.addBoth(lambda _: self._closed(entry.url))

    # -- writes --------------------------------------------------------------

    def open_writer(self, url: str) -> defer.Deferred[IBodyWriter]:
        def opened(writer: IBodyWriter) -> IBodyWriter:
            self._writing[url] += 1
            return _UploadingWriter(writer, self, url)

        return self.local.open_writer(url).addCallback(opened)

    def _closed(self, url: str) -> None:
        self._writing[url] -= 1
        if not self._writing[url]:
            del self._writing[url]

    async def _settled(self, url: str) -> None:
        while self._writing[url] or any(u == url for u, _ in self.uploads):
            await task.deferLater(self._clock, 0.1)

    def settled(self, url: str) -> defer.Deferred[None]:
        """Fires once no body of ``url`` is being written or uploaded here."""
        return defer.Deferred.fromCoroutine(self._settled(url))

    def _committed(self, entry: StoredResponse) -> None:
        """After a local commit: upload in the background."""
        key = (entry.url, entry.variant)
        if not self.should_upload(entry.url) or key in self.uploads:
            return
        if not self.shared.available:
            self._later(key)
            return
        d = self._upload_slots.run(
            lambda: defer.Deferred.fromCoroutine(self.shared.upload(self.local, entry))
        )

        def done(result: object) -> None:
            self.uploads.pop(key, None)
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, S3Error) and error.store_unusable:
                    self._later(key)
                _log.warn(
                    "upload of {url} to the shared store failed: {e}",
                    url=entry.url,
                    e=result.getErrorMessage(),
                )
            waiter.callback(None)

        waiter: defer.Deferred[None] = defer.Deferred()
        self.uploads[key] = waiter
        d.addBoth(done)

    def _later(self, key: tuple[str, str]) -> None:
        """Upload this entry once the store is back (bounded backlog)."""
        self._backlog[key] = None
        self._backlog.move_to_end(key)
        while len(self._backlog) > BACKLOG:
            self._backlog.popitem(last=False)

    def store_back(self) -> defer.Deferred[None]:
        """The store answers again: upload what was committed meanwhile."""
        return defer.Deferred.fromCoroutine(self._upload_backlog())

    async def _upload_backlog(self) -> None:
        backlog, self._backlog = self._backlog, OrderedDict()
        if backlog:
            _log.info("uploading {n} entries stored during the outage", n=len(backlog))
        for url, variant in backlog:
            try:
                entries = await self.local.lookup(url)
            except Exception:
                continue
            for entry in entries:
                if entry.variant == variant:
                    self._committed(entry)

    def purged(self, record: dict[str, str]) -> None:
        """A purge happened (here or on another node): downloads in progress
        of what it names commit nothing (SPEC 5's rule, across the fleet)."""
        for kind in ("url", "prefix"):
            if kind in record:
                self._purges[(kind, str(record[kind]))] = self._clock.seconds()
        while len(self._purges) > SEEN:
            self._purges.popitem(last=False)

    def purged_since(self, url: str, since: float) -> bool:
        return any(
            when >= since and (value == url if kind == "url" else url.startswith(value))
            for (kind, value), when in reversed(self._purges.items())
        )

    def update(self, entry: StoredResponse) -> defer.Deferred[StoredResponse]:
        if layout.parse_shared_ref(entry.body_ref) is not None:
            # The shared object keeps its metadata (objects are immutable);
            # this node uses the refreshed entry until it is copied.
            return defer.succeed(entry)
        return self.local.update(entry)

    # -- removal -------------------------------------------------------------

    async def _remove(self, url: str, variant: str | None) -> int:
        removed = await self.local.remove(url, variant)
        if variant is not None:
            # One variant goes when its body went missing here (or a purge
            # raced a download, and the purge itself removes every variant):
            # a local matter, never a reason to purge the fleet.
            return removed
        shared = await self._remove_shared(
            lambda: self.shared.remove(url), {"url": url}
        )
        return max(removed, shared)

    def remove(self, url: str, variant: str | None = None) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self._remove(url, variant))

    async def _remove_prefix(self, prefix: str) -> int:
        removed = await self.local.remove_prefix(prefix)
        shared = await self._remove_shared(
            lambda: self.shared.remove_prefix(prefix), {"prefix": prefix}
        )
        return max(removed, shared)

    def remove_prefix(self, prefix: str) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self._remove_prefix(prefix))

    async def _remove_shared(self, remove: Any, record: dict[str, str]) -> int:
        self.purged(record)
        self.on_remove(record)  # even while the store seems down: it may not be
        if not self.shared.available:
            return 0
        try:
            return int(await remove())
        except S3Error as e:
            self.shared.health.failed(e)
            return 0

    # -- the rest ------------------------------------------------------------

    def touch(self, entry: StoredResponse) -> None:
        if layout.parse_shared_ref(entry.body_ref) is None:
            self.local.touch(entry)

    def usage(self) -> Usage:
        return self.local.usage()

    async def _close(self) -> None:
        await self.local.close()
        await self.shared.client.close()

    def close(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._close())


@implementer(IBodyWriter)
class _UploadingWriter:
    """A local writer whose commit also starts the upload."""

    def __init__(self, writer: IBodyWriter, store: TieredStore, url: str) -> None:
        self._writer = writer
        self._store = store
        self._url = url
        self._open = True
        self._opened_at = store._clock.seconds()

    def _close(self, result: Any) -> Any:
        if self._open:
            self._open = False
            self._store._closed(self._url)
        return result

    @property
    def bytes_written(self) -> int:
        return int(self._writer.bytes_written)

    @property
    def name(self) -> str | None:
        """The local writer's file, which other workers follow (SPEC 11)."""
        name = getattr(self._writer, "name", None)
        return name if isinstance(name, str) else None

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def open_reader(self) -> IPartialReader:
        return self._writer.open_reader()

    def commit(self, entry: StoredResponse) -> defer.Deferred[StoredResponse]:
        def committed(stored: StoredResponse) -> StoredResponse:
            if self._store.purged_since(stored.url, self._opened_at):
                # Purged while it was downloading: keep nothing, upload nothing.
                d = self._store.local.remove(stored.url, stored.variant)
                d.addErrback(lambda f: _log.failure("dropping a purged body", f))
            else:
                self._store._committed(stored)
            return stored

        return self._writer.commit(entry).addCallback(committed).addBoth(self._close)

    def abort(self) -> defer.Deferred[None]:
        return self._writer.abort().addBoth(self._close)


@implementer(IPushProducer)
class _Pipe(Protocol):
    """An object body to a client and, at the same time, into a local writer.

    ``served`` fires when the client has every byte (or errbacks:
    ConnectionDone when it went away, BodyMissing when the object broke off);
    ``finished`` fires with True when the whole body arrived, after which the
    copy may be committed.  A client that goes away does not stop the copy.
    """

    def __init__(
        self,
        consumer: IConsumer,
        writer: IBodyWriter | None,
        expected: int,
        digest: str,
        clock: Any,
    ) -> None:
        self._consumer: IConsumer | None = consumer
        self._writer = writer
        self._expected = expected
        self._digest = digest
        self._held = b""
        """The last byte of a whole body, sent only once its sha256 matched
        (so a client never gets a corrupt object whole)."""
        self._clock = clock
        self._timer: Any = None
        self._timed_out = False
        self.corrupt = False
        self._size = 0
        self._sha = hashlib.sha256()
        self.served: defer.Deferred[None] = defer.Deferred()
        self.finished: defer.Deferred[bool] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        assert self._consumer is not None
        self._consumer.registerProducer(self, True)
        self._timer = self._clock.callLater(IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        """The store went silent mid-body: give up on it."""
        self._timer = None
        self._timed_out = True
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._timer is not None:
            self._timer.reset(IDLE_TIMEOUT)
        self._size += len(data)
        if self._digest:
            self._sha.update(data)
        if self._writer is not None:
            try:
                self._writer.write(data)
            except StoreFull:
                self._writer.abort()
                self._writer = None
        if self._consumer is not None:
            if self._digest and self._size >= self._expected:
                data, self._held = data[:-1], data[-1:]
            if data:
                self._consumer.write(data)
        elif self._writer is None:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        complete = (
            bool(reason.check(ResponseDone))
            and self._size == self._expected
            and not self._timed_out
        )
        verified = complete and (
            not self._digest or self._sha.hexdigest() == self._digest
        )
        self.corrupt = complete and not verified
        if self.corrupt:
            _log.error(
                "a shared object does not match its sha256 {digest}; not served"
                " whole, not copied",
                digest=self._digest,
            )
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            if verified and self._held:
                consumer.write(self._held)
            consumer.unregisterProducer()
            if verified:
                self.served.callback(None)
            else:
                self.served.errback(
                    BodyMissing(f"shared object broke off after {self._size} bytes")
                )
        self.finished.callback(
            verified and bool(self._digest) and self._writer is not None
        )

    # IPushProducer, for the client
    def pauseProducing(self) -> None:  # noqa: N802
        if self._consumer is not None and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:  # noqa: N802
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:  # noqa: N802
        """The client went away: keep copying (at full speed) if there is a
        copy, else stop reading."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        self.served.errback(ConnectionDone("the consumer stopped reading"))
        if self._writer is None:
            self.transport.stopProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]


__all__ = ["TieredStore"]
