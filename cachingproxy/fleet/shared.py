"""The shared tier: cache entries as objects under a bucket prefix.

Every call reports to :class:`~cachingproxy.fleet.health.Health`; while the
store is down, :attr:`SharedTier.available` is false and callers skip it.
"""

from __future__ import annotations

from collections.abc import Collection

from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.fleet import layout
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.layout import Location
from cachingproxy.fleet.s3 import PreconditionFailed, S3Client, S3Error
from cachingproxy.interfaces import ICacheStore

_log = Logger()


QUICK = 1
"""Retries of the requests a client waits on (lookups, reads): a store that
does not answer is soon skipped rather than waited for."""


class SharedTier:
    """Entries in ``location`` through ``client``."""

    def __init__(self, client: S3Client, location: Location, health: Health) -> None:
        self.client = client
        self.prefix = location.prefix
        self.health = health

    @property
    def available(self) -> bool:
        return self.health.ok

    async def lookup(
        self, url: str, skip: Collection[str] = ()
    ) -> list[StoredResponse]:
        """Every variant of ``url`` in the shared tier ([] when unreachable)
        but those in ``skip``, whose objects are listed but not read."""
        if not self.available:
            return []
        skipped = {layout.object_key(self.prefix, url, v) for v in skip}
        try:
            listed = await self.client.list(
                layout.variants_prefix(self.prefix, url), retries=QUICK
            )
            entries = []
            for item in listed:
                if item.key in skipped:
                    continue
                entry = await self._entry(item.key)
                if entry is not None and entry.url == url:
                    entries.append(entry)
        except S3Error as e:
            if e.store_unusable:
                self.health.failed(e)
            else:
                _log.warn("shared lookup of {url} failed: {e}", url=url, e=e)
            return []
        self.health.succeeded()
        return entries

    async def _entry(self, key: str) -> StoredResponse | None:
        """The entry stored as object ``key`` (None if gone or not an entry)."""
        try:
            data = await self.client.get_bytes(
                key, 0, layout.HEADER_PROBE, retries=QUICK
            )
            length = layout.header_length(data)
            if length is not None and length > len(data):
                data = await self.client.get_bytes(key, 0, length)
            return layout.decode_header(data, key)
        except (ValueError, KeyError, TypeError) as e:
            _log.warn("ignoring shared object {key}: {e}", key=key, e=e)
            return None
        except S3Error as e:
            if e.status == 404 or e.status == 416:
                return None
            raise

    async def body(self, entry: StoredResponse, start: int, end: int) -> IResponse:
        """A response streaming body bytes ``[start, end)`` of a shared entry."""
        where = layout.parse_shared_ref(entry.body_ref)
        assert where is not None
        key, offset = where
        try:
            response = await self.client.get(
                key, offset + start, offset + end, retries=QUICK
            )
        except S3Error as e:
            if e.store_unusable:
                self.health.failed(e)
            raise
        self.health.succeeded()
        return response

    async def exists(self, entry: StoredResponse) -> bool:
        key = layout.object_key(self.prefix, entry.url, entry.variant)
        return await self.client.head(key) is not None

    async def upload(self, local: ICacheStore, entry: StoredResponse) -> bool:
        """Copy a committed local ``entry`` into the shared tier, streaming its
        body from the local store; True if this node's copy is the one kept
        (first writer wins, so False when an object was already there)."""
        key = layout.object_key(self.prefix, entry.url, entry.variant)
        header = layout.encode_header(entry)
        total = len(header) + entry.size
        try:
            if await self.client.head(key) is not None:
                return False
            await self.client.put(
                key,
                lambda start, end: StoredRange(local, entry, header, start, end),
                total,
                if_none_match=True,
            )
        except PreconditionFailed:
            return False
        except S3Error as e:
            if e.store_unusable:
                self.health.failed(e)
            raise
        self.health.succeeded()
        return True

    async def remove(self, url: str, variant: str | None = None) -> int:
        """Delete the objects of ``url`` (one variant when given)."""
        if variant is not None:
            keys = [layout.object_key(self.prefix, url, variant)]
        else:
            listed = await self.client.list(layout.variants_prefix(self.prefix, url))
            keys = [item.key for item in listed]
        for key in keys:
            await self.client.delete(key)
        return len(keys)

    async def remove_prefix(self, url_prefix: str) -> int:
        """Delete the objects of every URL starting with ``url_prefix``."""
        listed = await self.client.list(layout.url_prefix_key(self.prefix, url_prefix))
        keys = [item.key for item in listed]
        maybe = layout.long_keys(self.prefix, url_prefix)
        if maybe is not None:
            for item in await self.client.list(maybe):
                entry = await self._entry(item.key)
                if entry is not None and entry.url.startswith(url_prefix):
                    keys.append(item.key)
        for key in keys:
            await self.client.delete(key)
        return len(keys)


@implementer(IBodyProducer, IConsumer)
class StoredRange:
    """Bytes ``[start, end)`` of (``header`` + a stored body), produced from the
    local store for an upload: a body producer to the HTTP client, a consumer
    of the store's streaming producer in between (pauses pass through)."""

    def __init__(
        self,
        store: ICacheStore,
        entry: StoredResponse,
        header: bytes,
        start: int,
        end: int,
    ) -> None:
        self._store = store
        self._entry = entry
        self._header = header
        self._start = start
        self._end = end
        self.length = end - start
        self._consumer: IConsumer | None = None
        self._producer: object = None

    def startProducing(self, consumer: IConsumer) -> object:  # noqa: N802
        from twisted.internet import defer

        self._consumer = consumer
        hl = len(self._header)
        if self._start < hl:
            consumer.write(self._header[self._start : min(self._end, hl)])
        body_start, body_end = max(self._start - hl, 0), self._end - hl
        if body_end <= body_start:
            return defer.succeed(None)
        return self._store.read(self._entry, self, body_start, body_end)

    # IConsumer, for the store's producer
    def registerProducer(self, producer: object, streaming: bool) -> None:  # noqa: N802
        self._producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self._producer = None

    def write(self, data: bytes) -> None:
        assert self._consumer is not None
        self._consumer.write(data)

    # IBodyProducer, for the HTTP client
    def pauseProducing(self) -> None:  # noqa: N802
        if self._producer is not None:
            self._producer.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:  # noqa: N802
        if self._producer is not None:
            self._producer.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:  # noqa: N802
        if self._producer is not None:
            self._producer.stopProducing()  # type: ignore[attr-defined]


__all__ = ["QUICK", "SharedTier", "StoredRange"]
