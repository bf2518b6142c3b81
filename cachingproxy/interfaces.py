"""The seams of cachingproxy: where one implementation can be swapped for another.

Every method that may do I/O returns a Deferred so that a backend that keeps
bodies somewhere remote (S3-compatible object storage) fits the same seam.
Bodies are never handed out as paths: they are read through producers
(:meth:`ICacheStore.read`) or, while being written, through
:class:`IPartialReader`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import (
        IConsumer,
        IProtocol,
        IProtocolFactory,
        IPushProducer,
    )
    from twisted.python.failure import Failure
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer, IResponse

    from cachingproxy.cache.entry import Header, StoredResponse, Usage


class IPartialReader(Interface):
    """Random access to the bytes a writer has written so far."""

    def read(offset: int, length: int) -> bytes:
        """
        Return up to ``length`` bytes starting at ``offset``.

        Only bytes below the writer's ``bytes_written`` at the time of the
        call are returned; reading never blocks on the network.  Keeps working
        after the writer commits (the body moved into place) or aborts.
        """

    def close() -> None:
        """Release the reader's resources.  Idempotent."""


class IBodySource(Interface):
    """A body that a pump streams to a client: one stored whole, or one still
    arriving that the client follows at its own pace."""

    readable = Attribute("int: bytes from the body's start that may be read now.")
    complete = Attribute("bool: no more bytes will come (``readable`` is final).")
    failure = Attribute("Failure | None: the body broke off; readers stop with it.")

    def read(offset: int, length: int) -> bytes:
        """
        Up to ``length`` bytes at ``offset`` (below ``readable``); never blocks.

        @raise BodyMissing: the bytes are gone.
        @raise OSError: they cannot be read.
        """

    def consumed(offset: int) -> None:
        """The reader has used every byte below ``offset``; the source may
        release what no reader needs any more."""

    def close() -> None:
        """The reader is done with the source (called once)."""


class IBodyWriter(Interface):
    """A body being written to the store; invisible to lookups until committed."""

    bytes_written = Attribute("int: bytes accepted by write() so far.")

    def write(data: bytes) -> None:
        """
        Append ``data``.  Synchronous.

        @raise StoreFull: the backend has no room (e.g. ENOSPC); the writer is
            then unusable except for ``abort``.
        """

    def open_reader() -> IPartialReader:
        """A new independent reader of the bytes written so far (and later)."""

    def commit(entry: StoredResponse) -> Deferred[StoredResponse]:
        """
        Make the body and ``entry`` visible atomically.

        ``entry.size``, ``entry.digest`` and ``entry.body_ref`` are filled in by
        the writer; a previous entry with the same ``(url, variant)`` is
        replaced.  Fires with the stored entry.  After a crash at any point
        nothing partial is ever visible.
        """

    def abort() -> Deferred[None]:
        """Discard everything written.  Idempotent; no-op after commit."""


class ICacheStore(Interface):
    """Cached responses: metadata in an index, bodies read through producers."""

    def lookup(url: str) -> Deferred[list[StoredResponse]]:
        """All stored variants of normalised ``url`` (possibly empty)."""

    def read(
        entry: StoredResponse,
        consumer: IConsumer,
        start: int = 0,
        end: int | None = None,
    ) -> Deferred[None]:
        """
        Write bytes ``[start, end)`` of ``entry``'s body to ``consumer``.

        Registers a streaming producer with ``consumer`` (and unregisters it
        when done), honouring backpressure.  Fires with None once every byte
        was written.

        @raise BodyMissing: (as a failure) the body is gone; nothing was
            written in that case.
        @raise ConnectionDone: (as a failure) the consumer stopped the
            producer before the end.
        """

    def open_writer(url: str) -> Deferred[IBodyWriter]:
        """
        Begin storing a new body for ``url``.

        The writer's commit fails with StoreFull (and stores nothing) if the
        body is larger than the store's whole ``max_size``; otherwise it may
        evict least recently used entries to make room.
        """

    def update(entry: StoredResponse) -> Deferred[StoredResponse]:
        """
        Replace the metadata of an existing entry, keeping its body.

        Used after a 304 refresh.  Identified by ``(url, variant)``; the
        ``body_ref``, ``size`` and ``digest`` of ``entry`` must be the stored
        ones.

        @raise BodyMissing: (as a failure) the entry is no longer stored.
        """

    def remove(url: str, variant: str | None = None) -> Deferred[int]:
        """Drop the variants of ``url`` (only ``variant`` when given); fires
        with the number of entries removed."""

    def remove_prefix(prefix: str) -> Deferred[int]:
        """Drop every entry whose normalised URL starts with ``prefix`` (all
        variants); fires with the number of entries removed."""

    def touch(entry: StoredResponse) -> None:
        """
        Record that ``entry`` was used now (served from the cache).

        Synchronous and cheap: the store may batch uses and write them later.
        Least recently used entries are evicted first when the store is over
        its ``max_size``.  Unknown or removed entries are ignored.
        """

    def usage() -> Usage:
        """
        The bytes and entries stored now, and the budget.  Synchronous.

        Kept as counters; a store shared with another process (the
        ``cachingproxy-cache`` tool) picks up that process's changes within
        a few seconds.
        """

    def close() -> Deferred[None]:
        """Flush and release resources."""


class IUpstream(Interface):
    """Sends requests to origin servers."""

    def request(
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
        *,
        mirrored: bool = False,
    ) -> Deferred[IResponse]:
        """
        Send one request and fire with the response once its head arrived.

        ``mirrored`` requests (configured by the operator) may use any port;
        others only the allowed upstream ports.

        @raise DestinationRefused: the resolved address or port is not allowed.
        @raise UpstreamTimeout: no connection or no response head in time.
        """

    def connect_tcp(
        host: str, port: int, factory: IProtocolFactory, ports: frozenset[int]
    ) -> Deferred[IProtocol]:
        """
        A plain TCP connection for a CONNECT tunnel, checked by the same
        destination policy but against ``ports``.

        @raise DestinationRefused: the resolved address or port is not allowed.
        @raise UpstreamTimeout: no connection in time.
        """


class IDocumentFilter(Interface):
    """What a response's sender lets a feature change (the mirror's URL
    rewriting, SPEC 6): the ``Location`` of any response, and the body of a
    document, which it then reads whole (bounded) before sending."""

    def location(headers: list[Header]) -> list[Header]:
        """``headers`` as the client must see them: ``Location`` changed,
        ``X-Cache-Upstream`` added where it is missing."""

    def is_document(headers: list[Header]) -> bool:
        """Whether a response with these headers is a document to filter."""

    def document(status: int, headers: list[Header], body: bytes) -> bytes:
        """The body to send for a document (rewritten when it needs to be)."""

    def stored(
        entry: StoredResponse, body: bytes | None
    ) -> Deferred[StoredResponse | bytes]:
        """
        What to send for the stored document ``entry`` (``body``: its body,
        when the caller has read it already): a stored body to send as it
        is (the entry itself, or its rewritten form kept in the store), or
        the bytes when no stored form can be had.

        @raise BodyMissing: (as a failure) the entry's body is gone.
        """


class IDownload(Interface):
    """A download in flight that clients follow, as the code that holds one
    sees it (the sharing of downloads, the plans and the sender, the mirror's
    documents, the status page, a fleet peer): one this process runs
    (:class:`cachingproxy.fetch.download.Download`) or one another worker
    runs, followed here (:class:`cachingproxy.workers.remote.RemoteDownload`).
    """

    url = Attribute("str: the normalised URL (the cache key) downloaded.")
    vary = Attribute("tuple[str, ...]: the response's Vary field names.")
    variant = Attribute("str: the variant the response is stored as.")
    total = Attribute("int | None: the body's announced length, if any.")
    started_at = Attribute("float: when the download started (clock seconds).")
    body_complete = Attribute("bool: every byte of the body has arrived.")
    failure = Attribute("Failure | None: why the download broke off.")
    entry = Attribute(
        "StoredResponse | None: the entry the download stored or refreshed "
        "here, once committed (never for one followed in another worker)."
    )
    purged = Attribute("bool: purged while running; it leaves nothing stored.")
    spilled = Attribute(
        "bool: the store refused part of the body; only the clients already "
        "following get it, nobody may join."
    )
    bytes_written = Attribute("int: body bytes received so far.")
    clients = Attribute("int: the clients following the body now.")

    def wait() -> Deferred[Any]:
        """
        Fires with the :class:`cachingproxy.fetch.outcomes.Outcome` (typed
        ``Any`` here: this module stays below :mod:`cachingproxy.fetch`) once
        the head is in.  Whether a given client may use it is the sharing
        code's decision.
        """

    def finished() -> Deferred[None]:
        """Fires once the download is over (stored, dropped or failed)."""

    def head_entry() -> StoredResponse | None:
        """The entry the response would make if stored now (None before a
        storable head): what a client that wants to join is checked against."""

    def take_passthrough() -> bool:
        """Claim an unstorable response for one client (the first to ask)."""

    def purge_waiting() -> Deferred[None] | None:
        """
        Make sure the download leaves no entry behind (admin purge).  When
        its body is complete and its commit may be under way, the Deferred
        returned fires once it is over, and the caller then removes what was
        stored; None otherwise.
        """

    def open_reader() -> IPartialReader:
        """A reader of the body bytes, for :meth:`read`."""

    def read(reader: IPartialReader, offset: int, length: int) -> bytes:
        """Up to ``length`` body bytes at ``offset``, through ``reader``."""

    def follow(
        consumer: IConsumer,
        on_finish: Callable[[Failure | None], None],
        start: int = 0,
        end: int | None = None,
    ) -> IPushProducer:
        """
        Attach a client that reads the body ``[start, end)`` into
        ``consumer`` as it arrives, at its own pace; ``on_finish`` is called
        with None at the end or with the failure that cut it off.  Returns
        the producer that feeds it (stop it when the client goes away).
        """


class IFleet(Interface):
    """The node's part in a fleet sharing one cache (SPEC 12).

    Only a node started with ``--shared-store`` has one; without it the
    proxy behaves exactly as a lone cache.
    """

    def upstream(inner: IUpstream) -> IUpstream:
        """The upstream that shared downloads go through (one upstream GET
        per URL in the fleet); ``inner`` does the real requests."""

    def internal(request: Any, path: str, proxy: Any) -> Deferred[None]:
        """Serve a node-to-node request to ``path`` (under ``/_fleet/``)."""

    def status() -> dict[str, Any]:
        """``shared_store`` in ``/status.json`` (at least ``ok``)."""


class IKnownLookups(Interface):
    """A store that can say, without I/O, what it last answered for a URL
    (a store whose lookups are remembered and kept correct across
    writers)."""

    def known(url: str) -> list[StoredResponse] | None:
        """The entries of ``url`` as the store would answer a lookup now,
        the same objects as before while nothing changed; None when that
        would need I/O."""


class IQuickHits(Interface):
    """Repeat hits answered without building a twisted.web request: the
    channel offers the plain ``GET`` heads it recognises
    (:func:`cachingproxy.front.quick.simple_get`)."""

    def answer(
        target: bytes,
        host: bytes,
        client: str | None,
        local: tuple[str, int],
        conditions: tuple[tuple[str, str], ...] = (),
    ) -> tuple[bytes, bytes] | None:
        """The response's head (an ``HTTP/1.1`` status line and its fields,
        each ending in CRLF, without ``Connection``) and body for ``GET
        target`` with ``Host: host`` from ``client`` on the ``local`` address and port,
        logged and counted as the request path would: ``304`` and no body
        when the entry satisfies ``conditions`` (``If-None-Match``,
        ``If-Modified-Since``); None: let the request path serve it."""


__all__ = [
    "IBodyWriter",
    "ICacheStore",
    "IDocumentFilter",
    "IDownload",
    "IFleet",
    "IKnownLookups",
    "IPartialReader",
    "IQuickHits",
    "IUpstream",
]
