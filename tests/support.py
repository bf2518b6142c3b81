"""Test harness: real twisted.web origins and real proxies on 127.0.0.1.

Every server and client made here is cleaned up with ``addCleanup`` so that
trial never reports a dirty reactor.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import attrs
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
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


def run(coroutine: Coroutine[Any, Any, None]) -> defer.Deferred[None]:
    """A test's coroutine as the Deferred trial waits for
    (``return run(self._scenario())``)."""
    return defer.Deferred.fromCoroutine(coroutine)


def pause(seconds: float = 0.0) -> defer.Deferred[None]:
    """Let the reactor run (for waiting on the other side of a socket)."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, step: float = 0.01
) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds.

    ``condition`` may also return an awaitable (a Deferred or a coroutine)
    whose result is the answer: a check that asks a server."""

    async def holds() -> bool:
        answer = condition()
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    waited = 0.0
    while not await holds():
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
    "run",
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
    test: TestCase,
    port: int,
    data: bytes,
    *,
    stalled: bool = False,
    source: str | None = None,
) -> RawClient:
    """Connect to ``port`` on 127.0.0.1 (from address ``source``: any 127/8
    address is this host) and send ``data``; ``stalled`` never reads (its
    transport is paused) until resumed."""
    protocol = RawClient(data, stalled)
    factory = ClientFactory.forProtocol(lambda: protocol)
    factory.noisy = False
    bind = None if source is None else (source, 0)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind)
    await endpoint.connect(factory)

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


_handed_out: set[int] = set()
"""Ports :func:`free_port` gave in this process (never given twice)."""


def _below_ephemeral() -> range:
    """Ports below the kernel's ephemeral range: no ``bind(0)`` (an origin
    of a test running in parallel) and no outgoing connection takes one."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10_000, low) if low - 10_000 >= 4_096 else range(0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child to
    listen on: chosen at random below the ephemeral range, so that nothing
    else takes it before the child binds it (a port from ``bind(0)`` could
    be handed to a parallel test's ``bind(0)`` meanwhile)."""
    import random

    ports = _below_ephemeral()
    chance = random.SystemRandom()
    for _ in range(1000 if ports else 0):
        port = chance.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


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
    "Curl",
    "ProcessResult",
    "checkout_env",
    "curl",
    "free_port",
    "need",
    "run_process",
]


def need(*tools: str) -> None:
    """Skip the test unless each of ``tools`` is on PATH (.ci/run installs
    what the tests use)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SkipTest(f"{', '.join(missing)} not installed (.ci/run installs it)")


@attrs.frozen
class Curl:
    """What one curl run did: the process, the last response head it
    printed (after a CONNECT's own head) and the body it saved."""

    process: ProcessResult
    status_line: str
    """The last head's status line ("" if none came)."""
    headers: dict[str, str]
    """The last head's fields, names lower-cased (the last of a repeated one)."""
    body: bytes

    @property
    def code(self) -> int | None:
        return self.process.code

    @property
    def output(self) -> str:
        return self.process.output

    @property
    def status(self) -> int:
        """The last head's status code (0 if none came)."""
        parts = self.status_line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def curl(
    url: str,
    *options: str,
    out: str,
    proxy: int | None = None,
    max_time: float = 30.0,
    inside: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Curl:
    """``curl`` for ``url``: through the proxy on 127.0.0.1:``proxy``, or
    (None) straight, ignoring any proxy variable; the body goes to ``out``,
    the heads to stdout.  ``inside`` comes before the command (``ip netns
    exec NAME``)."""
    argv = [*inside, "curl", "-s", "-S", "-D", "-", "-o", out]
    if proxy is None:
        argv += ["--noproxy", "*"]
    else:
        argv += ["--noproxy", "", "--proxy", f"http://127.0.0.1:{proxy}"]
    argv += ["--max-time", f"{max_time:g}", *options, url]
    result = await run_process(
        argv, env=no_proxy_env() if env is None else env, timeout=max_time + 10
    )
    heads = [h for h in result.out.decode("latin-1").split("\r\n\r\n") if h]
    lines = heads[-1].split("\r\n") if heads else [""]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = b""
    if os.path.exists(out):
        with open(out, "rb") as f:
            body = f.read()
    return Curl(result, lines[0], headers, body)


# -- certificates --------------------------------------------------------------


def self_signed(
    name: str = "cachingproxy test CA", *, ca: bool = True, days: int = 30
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throw-away self-signed certificate and its key: a CA (which may sign
    certificates), or with ``ca=False`` a leaf that may not."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


__all__ += ["cert_pem", "key_pem", "self_signed"]


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


# -- helpers for the operator's surface: own pages, purge, budget --------------


def start_proxy_with_store(
    test: TestCase, store: Any, **overrides: Any
) -> tuple[ProxyService, int]:
    """``start_proxy`` with an injected ``ICacheStore`` (e.g. a MemoryStore
    with a ``capacity``, to provoke StoreFull)."""
    service = ProxyService(proxy_config(test, **overrides), reactor, store=store)
    service.startService()
    test.addCleanup(service.stopService)
    address: Any = service.ports[0].getHost()
    return service, address.port


async def own_page(
    test: TestCase,
    proxy_port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[Any, bytes]:
    """Request one of the proxy's own pages, self-addressed in origin-form
    (``Host: 127.0.0.1:PORT``, the address it listens on)."""
    return await fetch(
        client(test), f"http://127.0.0.1:{proxy_port}{path}", headers, method
    )


async def from_peer(
    test: TestCase,
    service: ProxyService,
    data: bytes,
    peer: str,
    timeout: float = 5.0,
) -> tuple[int, dict[str, list[str]], bytes]:
    """Send the raw request ``data`` to the running proxy's site as if it came
    from ``peer`` (e.g. a non-loopback ``10.0.0.5``), to the address the proxy
    listens on; returns status, headers and body of the answer.

    The connection is an in-memory ``StringTransport``: every byte goes
    through the real HTTP parser, routing and handlers, only the socket is
    simulated, since a loopback test cannot make a non-loopback peer.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    assert service.site is not None
    local = service.ports[0].getHost()
    transport = StringTransport(
        hostAddress=local, peerAddress=IPv4Address("TCP", peer, 40000)
    )
    protocol = service.site.buildProtocol(transport.getPeer())
    assert protocol is not None
    protocol.makeConnection(transport)
    try:
        protocol.dataReceived(data)
        waited = 0.0
        while not (transport.disconnecting or _response_complete(transport.value())):
            if waited > timeout:
                raise AssertionError(f"no complete response: {transport.value()!r}")
            await pause(0.005)
            waited += 0.005
    finally:
        # Also cancels the channel's idle timeout (no dirty reactor).
        protocol.connectionLost(_CLOSED)
    return parse_raw_response(transport.value())


__all__ += ["from_peer", "own_page", "start_proxy_with_store"]


# -- helpers for the real-client mirror tests (pip, npm, pypiserver) -----------


def build_wheel(
    name: str,
    version: str,
    requires: Iterable[str] = (),
    files: dict[str, bytes] | None = None,
) -> tuple[str, bytes]:
    """A minimal valid pure-Python wheel (PEP 427, with a RECORD); returns its
    file name and bytes.  ``requires`` become ``Requires-Dist`` lines;
    ``files`` (paths inside the wheel) default to an ``__init__.py`` whose
    ``VALUE`` is ``"NAME VERSION"``."""
    import base64
    import hashlib
    import io
    import zipfile

    dist = name.replace("-", "_").replace(".", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    contents = dict(
        files
        if files is not None
        else {f"{dist}/__init__.py": f"VALUE = {name + ' ' + version!r}\n".encode()}
    )
    contents[f"{info}/METADATA"] = metadata.encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: cachingproxy-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )

    def record_hash(data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
        return "sha256=" + digest.rstrip(b"=").decode()

    record = "".join(
        f"{path},{record_hash(data)},{len(data)}\n" for path, data in contents.items()
    )
    contents[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in contents.items():
            archive.writestr(zipfile.ZipInfo(path, (2024, 1, 1, 0, 0, 0)), data)
    return f"{dist}-{version}-py3-none-any.whl", buffer.getvalue()


def client_env(home: str | None = None, **extra: str) -> dict[str, str]:
    """This environment with every proxy variable and every pip/npm setting
    of the machine shut out (``PIP_CONFIG_FILE=/dev/null``, no ``PIP_*``,
    no ``npm_config_*``), so a package client talks only to the URLs its
    command line names.  ``home`` replaces ``HOME`` (npm reads ``~/.npmrc``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("PIP_", "NPM_CONFIG_", "UV_", "YARN_"))
        and "proxy" not in k.lower()
        # requests (inside pip) lets these override --cert
        and k.upper() not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
    }
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_NO_COLOR="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if home is not None:
        env["HOME"] = home
    env.update(extra)
    return env


class Child(ProcessProtocol):
    """A long-running child process (a server) whose output is collected.

    Stopped (SIGTERM, then SIGKILL) and reaped in a cleanup of ``test``.
    """

    def __init__(
        self,
        test: TestCase,
        argv: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        self.argv = argv
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.process = reactor.spawnProcess(
            self,
            shutil.which(argv[0]) or argv[0],
            argv,
            env=os.environ if env is None else env,
            path=path,
        )
        test.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop()))

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802
        self.output += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.reason = reason
        self.ended.callback(None)

    @property
    def running(self) -> bool:
        return self.reason is None

    def text(self) -> str:
        """Everything it printed so far (stdout and stderr), decoded."""
        return self.output.decode("utf-8", "replace")

    log = text

    async def wait_for_text(self, text: str, timeout: float = 20.0) -> None:
        """Poll until ``text`` appears in the output (bounded); fail if the
        child exits first."""
        waited = 0.0
        while text not in self.text():
            if not self.running:
                raise AssertionError(f"{self.argv!r} exited:\n{self.text()}")
            if waited > timeout:
                raise AssertionError(
                    f"no {text!r} from {self.argv!r} after {timeout}s:\n{self.text()}"
                )
            await pause(0.02)
            waited += 0.02

    async def kill(self, signal: str = "KILL") -> None:
        """Send ``signal`` and wait until the child is reaped."""
        from twisted.internet.error import ProcessExitedAlready

        if self.running:
            with contextlib.suppress(ProcessExitedAlready):
                self.process.signalProcess(signal)
        await self.ended

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps it."""
        from twisted.internet.error import ProcessExitedAlready

        if not self.running:
            return
        with contextlib.suppress(ProcessExitedAlready):
            self.process.signalProcess("TERM")
        for _ in range(int(grace / 0.02)):
            if not self.running:
                return
            await pause(0.02)
        await self.kill()


class ChildServer(Child):
    """A server child process listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        test: TestCase,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        self.port = port
        super().__init__(test, argv, env, path)

    ready: str | None = None
    """A line the child prints once it has bound its port (then what
    accepts connections there is certainly this child)."""

    async def wait_listening(self, timeout: float = 60.0) -> None:
        """Poll until the port accepts connections (bounded)."""
        waited = 0.0
        while True:
            if not self.running:
                raise AssertionError(f"server exited during start-up:\n{self.log()}")
            if self.ready is None or self.ready in self.text():
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            if waited > timeout:
                raise AssertionError(f"not listening after {timeout}s:\n{self.log()}")
            await pause(0.05)
            waited += 0.05


class Twistd(ChildServer):
    """A ``twistd -n cachingproxy`` child on 127.0.0.1:``port``."""

    ready = "cachingproxy listening on"

    def __init__(self, test: TestCase, cache_dir: str, *options: str) -> None:
        self.cache_dir = cache_dir = os.path.abspath(cache_dir)
        port = free_port()
        cwd = test.mktemp()
        os.makedirs(cwd)
        argv = [
            *TWISTD,
            "-n",
            "--pidfile=",
            "cachingproxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--cache-dir",
            cache_dir,
            "--allow-upstream",
            "127.0.0.1",
            "--allow-client",
            "127.0.0.1",
            *options,
        ]
        super().__init__(test, argv, port, env=checkout_env(), path=cwd)


__all__ += ["ChildServer", "Twistd", "build_wheel", "client_env"]


# -- long-running children and network namespaces (etc/, netns, apt tests) -----


def no_proxy_env(**extra: str) -> dict[str, str]:
    """This environment without any proxy variable (``http_proxy`` …)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no ``ip``, …)."""


@attrs.frozen
class Netns:
    """Three network namespaces made for one test: client — router — origin.

    ``client`` (eth0, CLIENT_IP) reaches the world only through ``router``
    (lan0 = ROUTER_LAN_IP, up0 = ROUTER_UP_IP), which forwards to ``origin``
    (eth0 = ORIGIN_IP and ORIGIN_IP2). Nothing else is routed: every address
    is inside these namespaces. Each namespace also gets its own
    ``/etc/netns/NAME/`` files (hosts, and a resolv.conf naming 127.0.0.1, so
    no DNS query can leave it).
    """

    client: str
    router: str
    origin: str

    CLIENT_IP = "10.200.1.2"
    ROUTER_LAN_IP = "10.200.1.1"
    LAN_NET = "10.200.1.0/24"
    ROUTER_UP_IP = "10.200.2.1"
    ORIGIN_IP = "10.200.2.2"
    ORIGIN_IP2 = "10.200.2.3"
    UP_NET = "10.200.2.0/24"
    LAN_IF = "lan0"

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.client, self.router, self.origin)

    def exec(self, namespace: str, *argv: str) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def setup_script(self) -> str:
        """The ``sh -e`` script that wires the namespaces together."""
        c, r, o = self.names
        return "\n".join(
            [
                f"ip -n {r} link add lan0 type veth peer name eth0 netns {c}",
                f"ip -n {r} link add up0 type veth peer name eth0 netns {o}",
                f"ip -n {c} addr add {self.CLIENT_IP}/24 dev eth0",
                f"ip -n {r} addr add {self.ROUTER_LAN_IP}/24 dev lan0",
                f"ip -n {r} addr add {self.ROUTER_UP_IP}/24 dev up0",
                f"ip -n {o} addr add {self.ORIGIN_IP}/24 dev eth0",
                f"ip -n {o} addr add {self.ORIGIN_IP2}/24 dev eth0",
                *(f"ip -n {ns} link set lo up" for ns in self.names),
                f"ip -n {c} link set eth0 up",
                f"ip -n {r} link set lan0 up",
                f"ip -n {r} link set up0 up",
                f"ip -n {o} link set eth0 up",
                f"ip -n {c} route add default via {self.ROUTER_LAN_IP}",
                f"ip -n {o} route add default via {self.ROUTER_UP_IP}",
                # Forwarding inside the router namespace only.
                f"ip netns exec {r} sysctl -q -w net.ipv4.ip_forward=1",
            ]
        )


def unique_name(role: str) -> str:
    """A namespace name no other test run uses at the same time."""
    return f"cpt{os.getpid() % 100000}{os.urandom(3).hex()}{role}"


async def add_namespace(test: TestCase, role: str = "", hosts: str = "") -> str:
    """A fresh, empty network namespace with loopback up, removed (with every
    process still in it) by a cleanup of ``test``; ``hosts`` is appended to
    its ``/etc/hosts``.

    @raise NetnsUnavailable: not root, or ``ip netns add`` failed.
    """
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("ip (iproute2) is not installed (.ci/run installs it)")
    name = unique_name(role)
    etc = os.path.join("/etc/netns", name)
    os.makedirs(etc)
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
    with open(os.path.join(etc, "resolv.conf"), "w") as f:
        f.write("nameserver 127.0.0.1\n")
    added = await run_process(["ip", "netns", "add", name], timeout=10)
    if added.code != 0:
        shutil.rmtree(etc, ignore_errors=True)
        raise NetnsUnavailable(f"ip netns add failed: {added.output.strip()}")
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(remove_namespace(name)))
    up = await run_process(["ip", "-n", name, "link", "set", "lo", "up"], timeout=10)
    if up.code != 0:
        raise AssertionError(up.output)
    return name


async def remove_namespace(name: str) -> None:
    """Kill what still runs in namespace ``name`` (only processes the test
    started there), delete it and its ``/etc/netns`` files."""
    pids = await run_process(["ip", "netns", "pids", name], timeout=10)
    for pid in pids.out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    if pids.out.split():
        await pause(0.1)
    await run_process(["ip", "netns", "del", name], timeout=10)
    shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


async def make_netns(test: TestCase, router_hosts: str = "") -> Netns:
    """Client, router and origin namespaces wired as described by ``Netns``;
    all removed by cleanups. ``router_hosts`` goes into the router's hosts.

    @raise NetnsUnavailable: namespaces cannot be made here.
    """
    client = await add_namespace(test, "c")
    router = await add_namespace(test, "r", router_hosts)
    origin = await add_namespace(test, "o")
    netns = Netns(client, router, origin)
    result = await run_process(["sh", "-ec", netns.setup_script()], timeout=30)
    if result.code != 0:
        raise AssertionError(f"namespace set-up failed:\n{result.output}")
    return netns


__all__ += [
    "Child",
    "Netns",
    "NetnsUnavailable",
    "add_namespace",
    "make_netns",
    "no_proxy_env",
    "remove_namespace",
    "unique_name",
]


def with_defines(text: str, **values: str) -> str:
    """``text`` (an nft file) with the value of each ``define NAME = …`` line
    named in ``values`` replaced: what an operator edits before loading it.

    @raise KeyError: a name has no define line in ``text``.
    """
    lines = text.splitlines(keepends=True)
    for name, value in values.items():
        prefix = f"define {name} = "
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} 'define {name}' lines")
        lines[found[0]] = f"{prefix}{value}\n"
    return "".join(lines)


def etc_path(*parts: str) -> str:
    """A file under the checkout's ``etc/``."""
    return os.path.join(REPO_ROOT, "etc", *parts)


__all__ += ["etc_path", "with_defines"]
