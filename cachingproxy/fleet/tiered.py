"""Two tiers behind one ICacheStore: the node's disk first, the fleet's
bucket second (SPEC 12).

- A lookup asks the local tier; when it has no variant of the URL, it asks
  the shared tier (one LIST of the URL's objects and a ranged GET of each
  object's header), whose entries carry a ``body_ref`` naming their object
  (``layout.shared_ref``).  A local entry without ``Vary`` is the whole
  answer: hits on package files never touch the bucket.
- When the local entries of a URL vary, the variant a client wants may be
  only in the bucket (another node fetched it), and the lookup cannot tell:
  ``lookup(url)`` does not see the request's headers (the cached path picks
  the variant from what it returns).  So the lookup also returns the shared
  entries of the variants the local tier lacks (a local copy wins), from a
  listing of the URL remembered for :data:`LISTING_TTL` seconds; objects of
  variants held locally are listed, never read.  A hot varying URL (an
  index page with ``Vary: Accept``) thus costs a node at most one LIST per
  five seconds, however many requests, instead of one per hit.  A variant
  stored elsewhere within those seconds is missed by the lookup only: the
  download that follows finds it in the bucket when it takes the URL's
  lease (coordinate.py), so the origin is still spared.  A purge, here or
  heard from the fleet (:meth:`TieredStore.purged`), and any removal of the
  URL drop its listing at once, and a listing made while a purge of the URL
  came in is not kept, so a purged variant is not served from memory.
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

import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse, Usage
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.fleet import layout
from cachingproxy.fleet.pipe import CopyPipe
from cachingproxy.fleet.s3 import S3Error
from cachingproxy.fleet.shared import SharedTier
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IPartialReader

_log = Logger()

BACKLOG = 10_000
"""Entries remembered for upload after an outage (the oldest forgotten)."""

UPLOADS = 4
"""Uploads at a time; the others queue (each holds its lease until done)."""

SEEN = 10_000
"""URLs whose last lookup is remembered (:meth:`TieredStore.seen`), and
varying URLs whose shared listing is."""

LISTING_TTL = 5.0
"""Seconds a varying URL's shared listing is reused (see the module
docstring)."""


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
        self._listings: OrderedDict[str, tuple[float, list[StoredResponse]]] = (
            OrderedDict()
        )
        """Varying URLs -> (when listed, the shared entries of the variants
        the local tier lacked then)."""

    # -- lookups and reads ---------------------------------------------------

    async def _lookup(self, url: str) -> list[StoredResponse]:
        found = await self.local.lookup(url)
        if not found:
            found = await self.shared.lookup(url)
        elif any(e.vary for e in found):
            found = found + await self._shared_variants(url, found)
        self._seen[url] = max((e.stored_at for e in found), default=-math.inf)
        self._seen.move_to_end(url)
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        return found

    async def _shared_variants(
        self, url: str, local: list[StoredResponse]
    ) -> list[StoredResponse]:
        """The shared entries of the variants of ``url`` that ``local`` lacks,
        from a listing at most :data:`LISTING_TTL` old."""
        have = {e.variant for e in local}
        now = self._clock.seconds()
        listed = self._listings.get(url)
        if listed is None or listed[0] + LISTING_TTL <= now:
            entries = await self.shared.lookup(url, skip=have)
            if self.purged_since(url, now):
                return []  # what was listed may be gone already
            self._listings[url] = listed = (now, entries)
            self._listings.move_to_end(url)
            if len(self._listings) > SEEN:
                self._listings.popitem(last=False)
        return [e for e in listed[1] if e.variant not in have]

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
        pipe = CopyPipe(
            consumer, writer, end - start, entry.digest if whole else "", self._clock
        )
        response.deliverBody(pipe)
        pipe.finished.addCallback(self._drop_if_corrupt, pipe, entry)
        try:
            await pipe.served
        finally:
            if writer is not None:
                pipe.finished.addBoth(lambda ok: self._copied(entry, writer, ok, key))

    def _drop_if_corrupt(self, ok: bool, pipe: CopyPipe, entry: StoredResponse) -> bool:
        """An object whose body does not match its own sha256 is deleted, so
        no node tries it again."""
        if pipe.corrupt:
            self._listings.pop(entry.url, None)
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
                value = str(record[kind])
                self._purges[(kind, value)] = self._clock.seconds()
                for url in [u for u in self._listings if u.startswith(value)]:
                    if kind == "prefix" or url == value:
                        del self._listings[url]
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
        self._listings.pop(url, None)  # (a remembered shared body went missing)
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


__all__ = ["TieredStore"]
