"""Test harness: real twisted.web origins and real proxies on 127.0.0.1.

Every server and client made here is cleaned up with ``addCleanup`` so that
trial never reports a dirty reactor.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
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
    http: HTTPClient,
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[Any, bytes]:
    """Request ``url``; returns the response and its whole body."""
    response = await http.request(
        method, url, headers={k: [v] for k, v in (headers or {}).items()}
    )
    body = await treq.content(response)
    return response, body


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return (
        None
        if values is None
        else ", ".join(v.decode() if isinstance(v, bytes) else v for v in values)
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


# -- helpers for the integration tests of the caching path -----------------


class StoppableOrigin:
    """An origin whose listening port can be closed in the middle of a test."""

    def __init__(self, test: TestCase, origin: Origin | None = None) -> None:
        self.origin = origin or Origin()
        self.site = TrackingSite(self.origin)
        self._port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.port: int = self._port.getHost().port  # type: ignore[attr-defined]
        self._stopped = False
        test.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop()))

    async def stop(self) -> None:
        """Stop listening and drop every connection (connections are refused)."""
        if not self._stopped:
            self._stopped = True
            await defer.maybeDeferred(self._port.stopListening)
        await self.site.close_all()


def streaming(
    body: bytes,
    *,
    chunk: int = 64 * 1024,
    length: bool = True,
    headers: Iterable[tuple[str, str]] = (),
    gate: defer.Deferred[None] | None = None,
) -> Handler:
    """A handler that sends ``body`` a chunk per reactor turn.

    Without ``length`` the response is chunked.  With a ``gate`` the head and
    the first chunk go out at once and the rest waits until the gate fires.
    """

    def handler(request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        for k, v in headers:
            request.responseHeaders.addRawHeader(k, v)
        if length:
            request.setHeader(b"Content-Length", b"%d" % len(body))

        async def send() -> None:
            for offset in range(0, len(body), chunk):
                if gone:
                    return
                request.write(body[offset : offset + chunk])
                if offset == 0 and gate is not None:
                    await gate
                else:
                    await pause()
            if not gone:
                request.finish()

        defer.Deferred.fromCoroutine(send())
        return NOT_DONE_YET

    return handler


_CLOSED = Failure(ConnectionDone())


class RawClient(Protocol):
    """A raw HTTP client connection that records every byte it receives."""

    def __init__(self, data: bytes, stalled: bool) -> None:
        self._data = data
        self._stalled = stalled
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.closed = False

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self._data)  # type: ignore[union-attr]
        if self._stalled:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        """Start reading after a stall."""
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure = _CLOSED) -> None:  # noqa: N802
        self.closed = True
        self.lost.callback(None)


async def raw_connect(
    test: TestCase, port: int, data: bytes, *, stalled: bool = False
) -> RawClient:
    """Connect to ``port`` on 127.0.0.1 and send ``data``; ``stalled`` never
    reads (its transport is paused) until resumed."""
    protocol = RawClient(data, stalled)
    factory = ClientFactory.forProtocol(lambda: protocol)
    factory.noisy = False
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    def close() -> defer.Deferred[None] | None:
        if protocol.closed:
            return None
        protocol.transport.abortConnection()  # type: ignore[union-attr]
        return protocol.lost

    test.addCleanup(close)
    return protocol


def parse_raw_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, lower-cased headers and the (de-chunked) body of one response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get("transfer-encoding") == ["chunked"]:
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return status, headers, bytes(body)
    if "content-length" in headers:
        rest = rest[: int(headers["content-length"][0])]
    return status, headers, rest


async def raw_get(
    test: TestCase, proxy_port: int, url: str, headers: str = ""
) -> tuple[int, dict[str, list[str]], bytes]:
    """GET ``url`` through the proxy on a raw connection (``headers``: extra
    CRLF-terminated lines); returns status, every header the proxy sent (even
    hop-by-hop ones) and the body."""
    authority = url.split("/", 3)[2]
    request = (
        f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n{headers}Connection: close\r\n\r\n"
    )
    protocol = await raw_connect(test, proxy_port, request.encode("latin-1"))
    await protocol.lost
    return parse_raw_response(bytes(protocol.received))


async def stored(service: ProxyService, url: str, variants: int = 1) -> None:
    """Wait until ``variants`` entries for ``url`` are committed to the store."""
    store = service.store
    assert store is not None
    found: list[int] = [0]

    async def count() -> bool:
        found[0] = len(await store.lookup(url))
        return found[0] >= variants

    waited = 0.0
    while not await count():
        if waited > 10:
            raise AssertionError(f"{url} not stored ({found[0]} of {variants})")
        await pause(0.01)
        waited += 0.01


async def downloads_done(service: ProxyService) -> None:
    """Wait until the proxy has no download in flight."""
    proxy = service.proxy
    assert proxy is not None
    await wait_for(lambda: not proxy.downloads.in_flight)


__all__ += [
    "RawClient",
    "StoppableOrigin",
    "downloads_done",
    "parse_raw_response",
    "raw_connect",
    "raw_get",
    "stored",
    "streaming",
]


# -- subprocesses (process-level tests) ----------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The checkout holding ``cachingproxy`` and the twistd dropin."""

TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
"""Runs this Python's twistd (``python -m twisted`` is ``twist``, not twistd)."""


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a child that must import this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT, *filter(None, [env.get("PYTHONPATH")])]
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.frozen
class ProcessResult:
    """How a child process ended and what it printed."""

    argv: tuple[str, ...]
    out: bytes
    err: bytes
    code: int | None
    """Exit status, or None when a signal ended it."""
    signal: int | None

    @property
    def output(self) -> str:
        """stdout and stderr, decoded, for assertions and failure messages."""
        return (self.out + self.err).decode("utf-8", "replace")


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: defer.Deferred[BaseException] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        assert reason.value is not None
        self.ended.callback(reason.value)


def run_process(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    path: str | None = None,
) -> defer.Deferred[ProcessResult]:
    """Run ``argv`` without blocking the reactor; fires when it has exited.

    A child still running after ``timeout`` seconds is killed, reaped, and
    the Deferred fails with AssertionError showing what it printed.
    """
    executable = shutil.which(argv[0]) or argv[0]
    protocol = _Collect()
    transport = reactor.spawnProcess(
        protocol,
        executable,
        argv,
        env=os.environ if env is None else env,
        path=path,
    )
    timed_out: list[bool] = []

    def kill() -> None:
        timed_out.append(True)
        transport.signalProcess("KILL")

    timer = reactor.callLater(timeout, kill)

    def ended(reason: BaseException) -> ProcessResult:
        if timer.active():
            timer.cancel()
        result = ProcessResult(
            tuple(argv),
            b"".join(protocol.out),
            b"".join(protocol.err),
            getattr(reason, "exitCode", None),
            getattr(reason, "signal", None),
        )
        if timed_out:
            raise AssertionError(
                f"{argv!r} still running after {timeout}s; killed. "
                f"Output:\n{result.output}"
            )
        return result

    return protocol.ended.addCallback(ended)


__all__ += [
    "REPO_ROOT",
    "TWISTD",
    "ProcessResult",
    "checkout_env",
    "free_port",
    "run_process",
]


# -- helpers for hostile-input, destination-policy and TLS tests ---------------


def fake_resolver(
    mapping: dict[str, list[str]],
) -> Callable[[str, int], defer.Deferred[list[str]]]:
    """A resolver for ``ProxyService(resolve=…)``: names map to fixed addresses;
    any other name fails as a DNS error, so no test ever asks real DNS."""
    from twisted.internet.error import DNSLookupError

    def resolve(host: str, port: int) -> defer.Deferred[list[str]]:
        if host in mapping:
            return defer.succeed(list(mapping[host]))
        return defer.fail(DNSLookupError(host))

    return resolve


class GuardedReactor:
    """The global reactor, except that outgoing TCP connections are recorded
    and anything outside 127.0.0.0/8 is refused before it leaves the process.

    Hand it to ``ProxyService`` so a test can assert that the proxy did not
    even try to connect, and so a broken destination policy can never reach
    a real outside address.
    """

    def __init__(self) -> None:
        from zope.interface import directlyProvides, providedBy

        directlyProvides(self, providedBy(reactor))
        self.connects: list[tuple[str, int]] = []

    def connectTCP(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        self.connects.append((host, port))
        if not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test guard: no connections to {host}")
        return reactor.connectTCP(host, port, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def start_proxy_with(
    test: TestCase,
    *,
    reactor_: Any = None,
    resolve: Callable[[str, int], defer.Deferred[list[str]]] | None = None,
    **overrides: Any,
) -> tuple[ProxyService, int]:
    """``start_proxy`` with an injected reactor and/or upstream resolver."""
    service = ProxyService(
        proxy_config(test, **overrides), reactor_ or reactor, resolve=resolve
    )
    service.startService()
    test.addCleanup(service.stopService)
    return service, service.ports[0].getHost().port


def _response_complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole response with a Content-Length."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False


async def raw_exchange(
    test: TestCase, port: int, data: bytes, timeout: float = 5.0
) -> bytes:
    """Send ``data`` over a fresh connection to ``port``; return what came back
    once the server closed or one response with a Content-Length is complete.

    Fails the test if neither happens within ``timeout`` seconds.
    """
    protocol = await raw_connect(test, port, data)
    waited = 0.0
    while not protocol.closed and not _response_complete(bytes(protocol.received)):
        if waited > timeout:
            raise AssertionError(
                f"no complete response within {timeout}s: {bytes(protocol.received)!r}"
            )
        await pause(0.005)
        waited += 0.005
    return bytes(protocol.received)


__all__ += [
    "GuardedReactor",
    "fake_resolver",
    "raw_exchange",
    "start_proxy_with",
]
