"""Reading whole index documents (bounded) for rewriting and merging."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.pump import CHUNK_SIZE
from cachingproxy.cache.status import CacheStatus
from cachingproxy.handler.plan import (
    FollowDownload,
    PassResponse,
    Plan,
    ServeBody,
    ServeEntry,
)
from cachingproxy.interfaces import ICacheStore, IDownload, IPartialReader


class TooBig(Exception):
    """The document is larger than the limit for rewriting."""


@implementer(IConsumer)
class _Buffer:
    """A consumer that keeps what it is given, up to a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self._producer: IPushProducer | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self._producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self._producer = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if self._producer is not None:
                self._producer.stopProducing()
            return
        self.parts.append(data)


async def read_entry(store: ICacheStore, entry: StoredResponse, limit: int) -> bytes:
    """The whole body of ``entry``.  @raise TooBig, BodyMissing."""
    if entry.size > limit:
        raise TooBig(entry.url)
    buffer = _Buffer(limit)
    await store.read(entry, buffer)
    return b"".join(buffer.parts)


async def read_download(
    download: IDownload, reader: IPartialReader, limit: int
) -> bytes:
    """The whole body of ``download`` once it is over (``reader`` was opened
    while it ran).  @raise TooBig; the download's failure if it failed."""
    try:
        await download.finished()
        if download.failure is not None:
            download.failure.raiseException()
        if download.bytes_written > limit:
            raise TooBig(download.url)
        parts = []
        offset = 0
        while offset < download.bytes_written:
            data = download.read(reader, offset, CHUNK_SIZE)
            if not data:
                break
            parts.append(data)
            offset += len(data)
        return b"".join(parts)
    finally:
        reader.close()


class _Collect(Protocol):
    def __init__(self, limit: int, length: int | None) -> None:
        self.limit = limit
        self.length = length
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802,B008
        if self.size > self.limit:
            self.done.errback(TooBig("response"))
        elif reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and self.length is None
        ):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


async def collect(response: IResponse, limit: int) -> bytes:
    """The whole body of an upstream response.  @raise TooBig, ResponseFailed."""
    length = response.length if isinstance(response.length, int) else None
    if length is not None and length > limit:
        raise TooBig("response")
    protocol = _Collect(limit, length)
    response.deliverBody(protocol)
    return await protocol.done


async def read_plan(
    store: ICacheStore, plan: Plan, limit: int
) -> tuple[int, list[Header], bytes, CacheStatus] | None:
    """(status, headers, whole body, cache status) of what ``plan`` serves;
    None for an error.  @raise TooBig, BodyMissing, a download's failure."""
    if isinstance(plan, ServeEntry):
        entry = plan.entry
        body = await read_entry(store, entry, limit)
        return entry.status, list(entry.headers), body, plan.cache
    if isinstance(plan, FollowDownload):
        download = plan.download
        body = await read_download(download, download.open_reader(), limit)
        return plan.status, list(plan.headers), body, plan.cache
    if isinstance(plan, PassResponse):
        body = await collect(plan.response, limit)
        return plan.status, list(plan.headers), body, plan.cache
    if isinstance(plan, ServeBody):
        return plan.status, list(plan.headers), plan.body, plan.cache
    return None


__all__ = ["TooBig", "collect", "read_download", "read_entry", "read_plan"]
