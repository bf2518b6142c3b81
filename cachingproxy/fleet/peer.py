"""Node to node: the internal endpoint that streams a download live to the
other nodes of the fleet, and the client side of it (SPEC 12).

``GET /_fleet/object?url=URL`` on a node's ``--advertise`` URL, with the
fleet secret in ``X-Fleet-Secret``, answers with the upstream's status and
end-to-end headers and the body of the download of URL that this node is
running (followed live, like any local client follows it) or, once it is
over, of its stored entry.  The endpoint never contacts upstream, so it is
no way around the destination policy; it sits behind the ``--allow-client``
check like every request; without the secret it is ``403``.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.fetch.outcomes import Discard, OutcomeKind
from cachingproxy.fetch.upstream import headers_from_pairs, pairs_from_headers
from cachingproxy.front.responses import abort, send_error
from cachingproxy.interfaces import IDownload

if TYPE_CHECKING:
    from cachingproxy.proxy import Proxy

PATH = "/_fleet/object"
SECRET_HEADER = b"X-Fleet-Secret"
_DROP = frozenset({"content-length", "x-cache", "via", "age"})


def _head(
    request: Request, status: int, headers: tuple[Header, ...] | list[Header]
) -> None:
    request.setResponseCode(status)
    out = Headers()
    for name, value in H.end_to_end(list(headers)):
        if name.lower() not in _DROP:
            out.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    request.responseHeaders = out


class Endpoint:
    """Serves :data:`PATH` for ``proxy`` to nodes that know ``secret``."""

    def __init__(self, proxy: Proxy, secret: bytes) -> None:
        self._proxy = proxy
        self._secret = secret

    def authorised(self, request: Request) -> bool:
        supplied = request.getHeader(SECRET_HEADER) or b""
        return bool(self._secret) and hmac.compare_digest(
            supplied.strip(), self._secret
        )

    async def render(self, request: Request, path: str) -> None:
        proxy = self._proxy
        bare, _, query = path.partition("?")
        if not self.authorised(request):
            send_error(request, 403, "fleet secret required", via=proxy.via)
            return
        urls = parse_qs(query).get("url", [])
        if bare != PATH or request.method != b"GET" or len(urls) != 1:
            send_error(request, 404, "no such fleet resource", via=proxy.via)
            return
        url = urls[0]
        client_headers = [
            (k, v)
            for k, v in pairs_from_headers(request.requestHeaders)
            if k.lower() not in ("x-fleet-secret", "host")
        ]
        for download in proxy.downloads.matching(lambda u: u == url):
            outcome = await proxy.downloads.wait(download, client_headers)
            if outcome.kind is OutcomeKind.STREAM:
                return await self._follow(
                    request, download, outcome.status, outcome.headers
                )
            if outcome.kind is OutcomeKind.NOT_MODIFIED and outcome.entry is not None:
                return await self._entry(request, outcome.entry)
            if outcome.kind is OutcomeKind.PASSTHROUGH and outcome.response is not None:
                outcome.response.deliverBody(Discard())
            break
        else:
            # With --workers, the download may run in another worker.
            across = proxy.downloads.across
            remote = across.running(url) if across is not None else None
            if remote is not None:
                outcome = await proxy.downloads.wait(remote, client_headers)
                if outcome.kind is OutcomeKind.STREAM:
                    return await self._follow(
                        request, remote, outcome.status, outcome.headers
                    )
        entry = policy.select_variant(await proxy.store.lookup(url), client_headers)
        if entry is None or entry.status != 200:
            send_error(request, 404, "not here", via=proxy.via)
            return
        await self._entry(request, entry)

    async def _follow(
        self,
        request: Request,
        download: IDownload,
        status: int,
        headers: tuple[Header, ...],
    ) -> None:
        _head(request, status, headers)
        if download.total is not None:
            request.responseHeaders.setRawHeaders(
                b"content-length", [b"%d" % download.total]
            )
        done: defer.Deferred[list[Failure | None]] = defer.Deferred()
        follower = download.follow(request, lambda f: done.callback([f]))
        gone: list[bool] = []

        def went_away(_: object) -> None:
            gone.append(True)
            follower.stopProducing()

        request.notifyFinish().addErrback(went_away)
        (failure,) = await done
        if gone or request.finished:
            return
        if failure is None:
            request.finish()
        else:
            abort(request)

    async def _entry(self, request: Request, entry: StoredResponse) -> None:
        _head(request, entry.status, entry.headers)
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % entry.size])
        age = policy.current_age(entry, self._proxy.clock.seconds())
        request.responseHeaders.setRawHeaders(b"age", [b"%d" % int(age)])
        try:
            await self._proxy.store.read(entry, request)
        except Exception:
            abort(request)
            return
        if not request.finished:
            request.finish()


class PeerClient:
    """Asks other nodes' endpoints for a URL."""

    def __init__(self, reactor: Any, secret: bytes, timeout: float) -> None:
        # A new connection each time: with --workers the holder's socket is
        # shared by its workers, and a retry may reach the one downloading.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._pool = pool
        self._agent = Agent(reactor, connectTimeout=5, pool=pool)
        self._secret = secret
        self._timeout = timeout
        self._reactor = reactor

    async def fetch(
        self, advertise: str, url: str, headers: list[Header]
    ) -> IResponse | None:
        """The holder's response for ``url`` (None when it has nothing or
        cannot be reached)."""
        target = f"{advertise.rstrip('/')}{PATH}?url={quote(url, safe='')}"
        send = [(k, v) for k, v in headers if k.lower() not in ("via", "host")]
        request_headers = headers_from_pairs(send)
        request_headers.setRawHeaders(SECRET_HEADER, [self._secret])
        d = self._agent.request(b"GET", target.encode("ascii"), request_headers)
        d.addTimeout(self._timeout, self._reactor)
        try:
            response: IResponse = await d
        except Exception:
            return None
        if response.code >= 400:
            response.deliverBody(Discard())
            return None
        return response

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


__all__ = ["PATH", "SECRET_HEADER", "Endpoint", "PeerClient"]
