"""Test harness: real twisted.web origins and real proxies on 127.0.0.1.

Every server and client made here is cleaned up with ``addCleanup`` so that
trial never reports a dirty reactor.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cachingproxy.config import ProxyConfig
from cachingproxy.service import ProxyService

Handler = Callable[[Request], Any]


@attrs.frozen
class Seen:
    """One request as the origin saw it."""

    method: str
    path: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None


class Origin(Resource):
    """A scriptable origin server that records every request it gets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Seen] = []
        self.routes: dict[str, Handler] = {}

    def count(self, path: str | None = None) -> int:
        """Requests seen, for ``path`` (with query) or in all."""
        return sum(1 for r in self.requests if path is None or r.path == path)

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def static(
        self,
        path: str,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        status: int = 200,
        etag: str | None = None,
        last_modified: float | None = None,
    ) -> None:
        """Serve ``body`` at ``path``; answer conditionals with 304."""

        def handler(request: Request) -> bytes:
            request.setResponseCode(status)
            for k, v in headers:
                request.responseHeaders.addRawHeader(k, v)
            if etag is not None:
                request.setHeader(b"ETag", etag.encode())
                if request.getHeader(b"if-none-match") == etag.encode():
                    request.setResponseCode(304)
                    return b""
            if last_modified is not None:
                request.setHeader(b"Last-Modified", datetimeToString(last_modified))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body

        self.route(path, handler)

    def render(self, request: Request) -> Any:
        path = request.uri.decode()
        self.requests.append(
            Seen(
                request.method.decode(),
                path,
                {
                    k.decode().lower(): [v.decode("latin-1") for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
            )
        )
        handler = self.routes.get(path)
        if handler is None:
            request.setResponseCode(404)
            return b"not found"
        return handler(request)


class _Channel(HTTPChannel):
    site: TrackingSite

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.site.channels.add(self)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.site.channels.discard(self)
        try:
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class TrackingSite(Site):
    """A Site that can drop all its connections and wait until they are gone."""

    noisy = False
    protocol = _Channel

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: set[_Channel] = set()

    def log(self, request: Any) -> None:
        pass

    def close_all(self) -> defer.Deferred[None]:
        channels = list(self.channels)
        for channel in channels:
            channel.transport.abortConnection()
        return defer.DeferredList([c.lost for c in channels]).addCallback(
            lambda _: None
        )


def start_origin(test: TestCase, origin: Origin | None = None) -> tuple[Origin, int]:
    """Listen with ``origin`` on 127.0.0.1; returns it and its port."""
    origin = origin or Origin()
    site = TrackingSite(origin)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        await site.close_all()

    test.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return origin, port.getHost().port


def proxy_config(test: TestCase, **overrides: Any) -> ProxyConfig:
    """A config for an in-process proxy on a free loopback port."""
    values: dict[str, Any] = {
        "listen": ("tcp:0:interface=127.0.0.1",),
        "cache_dir": test.mktemp(),
        "allow_client": (ipaddress.ip_network("127.0.0.0/8"),),
        "allow_upstream": (ipaddress.ip_network("127.0.0.0/8"),),
        "names": ("localhost", "cachingproxy.test"),
        "connect_timeout": 5.0,
        "read_timeout": 5.0,
    }
    values.update(overrides)
    return ProxyConfig(**values)


def start_proxy(test: TestCase, **overrides: Any) -> tuple[ProxyService, int]:
    """Start an in-process proxy; returns the service and its port."""
    service = ProxyService(proxy_config(test, **overrides), reactor)
    service.startService()
    test.addCleanup(service.stopService)
    return service, service.ports[0].getHost().port


def client(test: TestCase, proxy_port: int | None = None) -> HTTPClient:
    """A treq client, through the proxy at ``proxy_port`` when given."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    test.addCleanup(pool.closeCachedConnections)
    if proxy_port is None:
        agent: Any = Agent(reactor, pool=pool)
    else:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port)
        agent = ProxyAgent(endpoint, reactor=reactor, pool=pool)
    return HTTPClient(agent)


async def fetch(
    http: HTTPClient, url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[Any, bytes]:
    """Request ``url``; returns the response and its whole body."""
    response = await http.request(
        method, url, headers={k: [v] for k, v in (headers or {}).items()}
    )
    body = await treq.content(response)
    return response, body


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else ", ".join(
        v.decode() if isinstance(v, bytes) else v for v in values
    )


def pause(seconds: float = 0.0) -> defer.Deferred[None]:
    """Let the reactor run (for waiting on the other side of a socket)."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.01
) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await pause(step)
        waited += step


__all__ = [
    "NOT_DONE_YET",
    "Origin",
    "Seen",
    "TrackingSite",
    "client",
    "fetch",
    "header",
    "pause",
    "proxy_config",
    "start_origin",
    "start_proxy",
    "wait_for",
]
