"""The uncached path: a request sent upstream as it is, its answer relayed."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from cachingproxy.cache import headers as H
from cachingproxy.cache import invalidation
from cachingproxy.cache.entry import Header
from cachingproxy.cache.status import CacheStatus
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind, error_status
from cachingproxy.fetch.upstream import headers_from_pairs, pairs_from_headers
from cachingproxy.front import methods
from cachingproxy.handler.plan import Fail, PassResponse, Plan
from cachingproxy.interfaces import IUpstream
from cachingproxy.ops.stats import Stats, upstream_error_kind


def upstream_via(via: str, client_headers: list[Header]) -> str:
    """The ``Via`` sent upstream: the client's, then ours."""
    previous = H.get(client_headers, "via")
    return f"{previous}, {via}" if previous else via


def request_body(request: Request) -> IBodyProducer | None:
    """The body a client sent with ``request`` (None when it sent none):
    streamed as it arrives when the channel started the request at its head
    (front/upload.py), else read from twisted.web's spool."""
    streamed: IBodyProducer | None = getattr(request, "body_stream", None)
    if streamed is not None:
        return streamed
    content = request.content
    if content is None or not (
        request.requestHeaders.hasHeader(b"content-length")
        or request.requestHeaders.hasHeader(b"transfer-encoding")
    ):
        return None
    content.seek(0)
    return FileBodyProducer(content)


class Forwarder:
    """Sends requests the cache does not answer straight upstream."""

    def __init__(
        self,
        upstream: IUpstream,
        stats: Stats,
        *,
        via: str,
        offline: bool,
        purge: Callable[[str], Deferred[int]],
    ) -> None:
        self._upstream = upstream
        self._purge = purge
        self._stats = stats
        self._via = via
        self._offline = offline

    async def forward(
        self,
        url: str,
        method: str,
        client_headers: list[Header],
        body: IBodyProducer | None,
        cache: CacheStatus = CacheStatus.BYPASS,
    ) -> Plan:
        """Send ``method url`` upstream with the client's end-to-end headers;
        the response (or the failure) as a plan for the sender."""
        if self._offline:
            return Fail(504, "--offline", CacheStatus.OFFLINE)
        headers = [
            (k, v)
            for k, v in methods.forwarded(method, H.end_to_end(client_headers))
            if k.lower() not in ("host", "via", "content-length")
        ]
        headers.append(("Via", upstream_via(self._via, client_headers)))
        try:
            response = await self._upstream.request(
                method.encode("latin-1"),
                url.encode("ascii"),
                headers_from_pairs(headers),
                body,
            )
        except Exception:
            failure = Failure()
            self._stats.record_upstream_error(upstream_error_kind(failure))
            status, message = error_status(Outcome(OutcomeKind.ERROR, failure=failure))
            return Fail(status, message, cache)
        if response.code >= 500:
            self._stats.record_upstream_error("http_5xx")
        plan = PassResponse(
            response,
            response.code,
            response.phrase.decode("latin-1", "replace"),
            tuple(H.received(pairs_from_headers(response.headers))),
            cache,
        )
        # A successful unsafe method makes what is stored of it stale (SPEC 3).
        for stale_url in invalidation.invalidated_urls(
            method, plan.status, url, plan.headers
        ):
            await self._purge(stale_url)
        return plan


__all__ = ["Forwarder", "request_body", "upstream_via"]
