"""The one place that writes responses to clients: heads, bodies from the
store, from a download or from upstream, 304, 416 and ``Range``, errors.

A feature that changes what is sent (the mirror's rewriting) hands the
sender an :class:`~cachingproxy.interfaces.IDocumentFilter`; documents pass
through exactly one hook, :meth:`Sender._document`.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.age import corrected_age, relayed_age
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.errors import BodyMissing
from cachingproxy.fetch.outcomes import Discard
from cachingproxy.fetch.sharing import Downloads, PassingThrough
from cachingproxy.front.exchange import Exchange
from cachingproxy.front.responses import (
    PassThrough,
    abort,
    client_gone,
    send_error,
    set_head,
)
from cachingproxy.handler.plan import (
    Fail,
    FollowDownload,
    PassResponse,
    Plan,
    ServeBody,
    ServeEntry,
)
from cachingproxy.interfaces import ICacheStore, IDocumentFilter
from cachingproxy.mirror import documents as bodies
from cachingproxy.mirror.rewrite import MAX_DOCUMENT
from cachingproxy.ops.stats import Stats

_log = Logger()


def plan_range(
    status: int, client_headers: list[Header], size: int
) -> tuple[int, int, int, list[Header]] | None:
    """(status, start, end, extra headers) for a body of ``size`` bytes: 206
    for a satisfiable single Range on a 200, else the whole body; None when
    the range is unsatisfiable (416)."""
    range_value = H.get(client_headers, "range")
    if status != 200 or not range_value:
        return status, 0, size, []
    byte_range = policy.parse_range(range_value, size)
    if byte_range is policy.Unsatisfiable.RANGE:
        return None
    if byte_range is None:
        return status, 0, size, []
    start, end = byte_range.start, byte_range.end
    return 206, start, end, [("Content-Range", f"bytes {start}-{end - 1}/{size}")]


class Sender:
    """Turns a :mod:`~cachingproxy.handler.plan` into a response."""

    def __init__(
        self,
        store: ICacheStore,
        clock: IReactorTime,
        *,
        downloads: Downloads,
        stats: Stats,
        via: str,
        read_timeout: float | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._read_timeout = read_timeout
        """Longest upstream silence in a body passed through (SPEC 5)."""
        self._downloads = downloads
        self._stats = stats
        self.via = via

    async def send(
        self,
        request: Request,
        plan: Plan,
        info: Exchange,
        client_headers: list[Header],
        documents: IDocumentFilter | None = None,
    ) -> None:
        """Answer ``request`` as ``plan`` says, filtered by ``documents``."""
        info.cache = plan.cache
        if isinstance(plan, Fail):
            return self.fail(request, plan.status, plan.message, info, plan.cache)
        if isinstance(plan, ServeEntry):
            self._store.touch(plan.entry)
        if documents is not None and await self._document(
            request, plan, info, documents
        ):
            return
        if isinstance(plan, ServeEntry):
            info.served = plan.entry
            await self._entry(
                request, plan.entry, plan.cache, client_headers, documents
            )
        elif isinstance(plan, FollowDownload):
            await self._follow(request, plan, client_headers, documents)
        elif isinstance(plan, PassResponse):
            self._relay(request, plan, info, documents)
        else:  # a ServeBody without a filter: sent as it is
            self._write_whole(request, plan.status, plan.headers, plan.body, plan.cache)

    def fail(
        self,
        request: Request,
        status: int,
        message: str,
        info: Exchange,
        cache: CacheStatus = CacheStatus.NONE,
    ) -> None:
        """The proxy's own error page (unless the client has gone)."""
        info.cache = cache
        if not client_gone(request) and not request.finished:
            send_error(request, status, message, cache=cache, via=self.via)

    # -- the document hook -----------------------------------------------------

    async def _document(
        self,
        request: Request,
        plan: ServeEntry | FollowDownload | PassResponse | ServeBody,
        info: Exchange,
        documents: IDocumentFilter,
    ) -> bool:
        """Send ``plan`` whole through ``documents`` when it is a document;
        False when it is not (the caller streams it as usual)."""
        head = request.method == b"HEAD"
        age: float | None = None
        if isinstance(plan, ServeBody):
            status, headers, body = plan.status, list(plan.headers), plan.body
        elif isinstance(plan, ServeEntry):
            entry = plan.entry
            status, headers = entry.status, list(entry.headers)
            if entry.size > MAX_DOCUMENT or not documents.is_document(headers):
                return False
            age = policy.current_age(entry, self._clock.seconds())
            return await self._stored_document(
                request, entry, None, info, documents, plan.cache, age
            )
        elif isinstance(plan, FollowDownload):
            status, headers, age = plan.status, list(plan.headers), 0
            if not documents.is_document(headers):
                return False
            download = plan.download
            try:
                body = await bodies.read_download(
                    download, download.open_reader(), MAX_DOCUMENT
                )
            except Exception as e:
                self.fail(request, 502, f"index document: {e}", info, plan.cache)
                return True
            if download.entry is not None:  # stored: rewritten once, kept
                return await self._stored_document(
                    request, download.entry, body, info, documents, plan.cache, age
                )
        else:
            status, headers = plan.status, list(plan.headers)
            if head or not documents.is_document(headers):
                return False
            try:
                body = await bodies.collect(plan.response, MAX_DOCUMENT)
            except Exception as e:
                self.fail(request, 502, f"index document: {e}", info, plan.cache)
                return True
        body = documents.document(status, headers, body)
        self._write_whole(
            request, status, documents.location(headers), body, plan.cache, age
        )
        return True

    async def _stored_document(
        self,
        request: Request,
        entry: StoredResponse,
        body: bytes | None,
        info: Exchange,
        documents: IDocumentFilter,
        cache: CacheStatus,
        age: float | None,
    ) -> bool:
        """A stored document as ``documents`` has it sent: its form kept in
        the store (sent like any stored body), or bytes made for this one
        response."""
        headers = documents.location(list(entry.headers))
        try:
            form = await documents.stored(entry, body)
        except BodyMissing:
            await self._store.remove(entry.url, entry.variant)
            self.fail(request, 502, "stored document vanished", info)
            return True
        if isinstance(form, bytes):
            self._write_whole(request, entry.status, headers, form, cache, age)
            return True
        if client_gone(request) or request.finished:
            return True
        set_head(
            request,
            entry.status,
            headers,
            cache=cache,
            via=self.via,
            age=age,
            length=form.size,
        )
        if request.method == b"HEAD" or not form.size:
            request.finish()
            return True
        try:
            await self._store.read(form, request)
        except BodyMissing:
            _log.warn("stored form of {url} vanished; dropping it", url=form.url)
            await self._store.remove(form.url, form.variant)
            abort(request)
            return True
        except ConnectionDone:
            return True
        if not client_gone(request):
            request.finish()
        return True

    def _write_whole(
        self,
        request: Request,
        status: int,
        headers: Iterable[Header],
        body: bytes,
        cache: CacheStatus,
        age: float | None = None,
    ) -> None:
        if client_gone(request) or request.finished:
            return
        set_head(
            request,
            status,
            headers,
            cache=cache,
            via=self.via,
            age=age,
            length=len(body),
        )
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _head(
        self,
        request: Request,
        status: int,
        headers: Iterable[Header],
        documents: IDocumentFilter | None,
        *,
        cache: CacheStatus,
        age: float | None = None,
        length: int | None = None,
        phrase: str | None = None,
    ) -> None:
        # A stored entry's headers stay a tuple: set_head remembers those.
        items = headers if isinstance(headers, tuple) else tuple(headers)
        if documents is not None:
            items = tuple(documents.location(list(items)))
        set_head(
            request,
            status,
            items,
            cache=cache,
            via=self.via,
            age=age,
            length=length,
            phrase=phrase,
        )

    # -- bodies ----------------------------------------------------------------

    async def _entry(
        self,
        request: Request,
        entry: StoredResponse,
        cache: CacheStatus,
        client_headers: list[Header],
        documents: IDocumentFilter | None,
    ) -> None:
        """A stored entry: 304, 416, a 206 range or the whole body."""
        age = policy.current_age(entry, self._clock.seconds())
        if policy.not_modified(entry, client_headers):
            self._head(request, 304, entry.headers, documents, cache=cache, age=age)
            request.responseHeaders.removeHeader(b"content-length")
            request.finish()
            return
        planned = plan_range(
            entry.status,
            client_headers if policy.if_range_matches(entry, client_headers) else [],
            entry.size,
        )
        if planned is None:
            self._head(
                request,
                416,
                [("Content-Range", f"bytes */{entry.size}")],
                documents,
                cache=cache,
                age=age,
                length=0,
            )
            request.finish()
            return
        status, start, end, extra = planned
        self._head(
            request,
            status,
            [*entry.headers, *extra],
            documents,
            cache=cache,
            age=age,
            length=end - start,
        )
        if request.method == b"HEAD" or end == start:
            request.finish()
            return
        try:
            await self._store.read(entry, request, start, end)
        except BodyMissing:
            _log.warn("body of {url} vanished; dropping the entry", url=entry.url)
            await self._store.remove(entry.url, entry.variant)
            abort(request)
            return
        except ConnectionDone:
            return
        if not client_gone(request):
            request.finish()

    async def _follow(
        self,
        request: Request,
        plan: FollowDownload,
        client_headers: list[Header],
        documents: IDocumentFilter | None,
    ) -> None:
        """A download's body, read as it arrives."""
        if client_gone(request):
            return  # the client left while the head was on its way
        download = plan.download
        status, start, end = plan.status, 0, download.total
        extra: list[Header] = []
        if download.total is not None:
            # A range past the end of a file not yet stored: the whole file.
            status, start, end, extra = plan_range(
                status, client_headers, download.total
            ) or (status, 0, download.total, [])
        self._head(
            request,
            status,
            [*plan.headers, *extra],
            documents,
            cache=plan.cache,
            age=corrected_age(plan.headers, download.started_at, self._clock.seconds()),
            length=None if end is None else end - start,
            phrase=plan.phrase if status == plan.status else None,
        )
        # Boxed: a Failure given to callback() would errback the Deferred.
        done: defer.Deferred[list[Failure | None]] = defer.Deferred()
        follower = download.follow(request, lambda f: done.callback([f]), start, end)
        request.notifyFinish().addErrback(lambda _: follower.stopProducing())
        (failure,) = await done
        if client_gone(request) or request.finished:
            return
        if failure is None:
            request.finish()
        else:
            abort(request)

    def _relay(
        self,
        request: Request,
        plan: PassResponse,
        info: Exchange,
        documents: IDocumentFilter | None,
    ) -> None:
        """An upstream response streamed through unstored."""
        response = plan.response
        length = response.length if isinstance(response.length, int) else None
        if request.method == b"HEAD":  # no body: the origin's length (SPEC 3)
            length = H.content_length(plan.headers)
        self._head(
            request,
            plan.status,
            plan.headers,
            documents,
            cache=plan.cache,
            length=length,
            phrase=plan.phrase,
            age=relayed_age(plan.headers, info.started, self._clock.seconds()),
        )
        if (
            request.method == b"HEAD"
            or plan.status in (204, 304)
            or client_gone(request)
        ):
            response.deliverBody(Discard())
            if not client_gone(request):
                request.finish()
            return
        flight = PassingThrough(info.url, length, self._clock.seconds())
        passing = self._downloads.passing
        passing.add(flight)

        def received(n: int) -> None:
            flight.received(n)
            self._stats.record_upstream_bytes(n)

        response.deliverBody(
            PassThrough(
                request,
                response,
                on_data=received,
                on_error=self._stats.record_upstream_error,
                on_done=lambda: passing.discard(flight),
                clock=self._clock,
                read_timeout=self._read_timeout,
            )
        )


__all__ = ["Sender", "plan_range"]
