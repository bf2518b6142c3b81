"""Hostile clients (SPEC 8): head size and header count limits, connections
per client, slow heads and idle connections (without ever cutting a slow
download or a tunnel), request smuggling shapes, and no connection to the
proxy's own listeners.  Malformed requests in general are in test_hostile.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cachingproxy.front.channel import HEAD_TIMEOUT, IDLE_TIMEOUT, MAX_HEADERS
from cachingproxy.front.channel import ProxySite as _QuietSite
from cachingproxy.front.limits import ConnectionLimiter, RateLimitedLog, client_key
from cachingproxy.front.routing import BadRequest, Listener, Route, RouteKind, classify
from cachingproxy.service import ProxyService

from .support import (
    GuardedReactor,
    Origin,
    RawClient,
    raw_connect,
    raw_exchange,
    run,
    start_origin,
    start_proxy,
    start_proxy_with,
    streaming,
    wait_for,
)
from .test_auth import LogCapture


def status_of(raw: bytes) -> int:
    """The status code of the first response in ``raw`` (0 when none)."""
    parts = raw.split(b" ", 2)
    return int(parts[1]) if raw.startswith(b"HTTP/1.1 ") and len(parts) > 2 else 0


async def connect(
    test: TestCase, port: int, data: bytes = b"", source: str = "127.0.0.1"
) -> RawClient:
    """A raw connection to 127.0.0.1:``port`` from address ``source``."""
    return await raw_connect(test, port, data, source=source)


async def closed(protocol: RawClient, timeout: float = 5.0) -> None:
    """Wait (bounded) until the server closed ``protocol``."""
    await wait_for(lambda: protocol.closed, timeout=timeout)


def channels_on(site: Any, clock: Clock) -> None:
    """Make the HTTP timers of ``site``'s future channels (head deadline,
    idle timeout, abort) run on ``clock``: real sockets, test-driven time."""
    build = site.buildProtocol

    def build_on_clock(addr: Any) -> Any:
        channel = build(addr)
        channel.callLater = clock.callLater
        return channel

    site.buildProtocol = build_on_clock


class HeadLimitTests(TestCase):
    """Limits on the request head, each with its own clear 4xx; the origin
    sees none of them."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        _, self.pport = start_proxy(self)
        self.url = f"http://127.0.0.1:{self.oport}/pkg-1.0.whl"
        self.host = f"127.0.0.1:{self.oport}"

    async def answer(self, head: str) -> tuple[int, bytes]:
        raw = await raw_exchange(self, self.pport, head.encode("latin-1"))
        return status_of(raw), raw

    def test_limits(self) -> defer.Deferred[None]:
        """A request line over 16 KiB is 414, a header line over 16 KiB or a
        head over 16 KiB in all is 431, and so are more than 100 header
        fields; each answer says why and closes the connection."""
        return run(self._limits())

    async def _limits(self) -> None:
        wide = "".join(f"X-W{i}: {'w' * 1000}\r\n" for i in range(17))
        many = "".join(f"X-N{i}: n\r\n" for i in range(MAX_HEADERS))
        cases = [
            (f"GET {self.url}?{'q' * 16400} HTTP/1.1\r\n\r\n", 414, b"request line"),
            (
                f"GET {self.url} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"X-Big: {'b' * 16400}\r\n\r\n",
                431,
                b"header line",
            ),
            (
                f"GET {self.url} HTTP/1.1\r\nHost: {self.host}\r\n{wide}\r\n",
                431,
                b"larger than 16 KiB",
            ),
            (
                f"GET {self.url} HTTP/1.1\r\nHost: {self.host}\r\n{many}\r\n",
                431,
                b"more than 100 header fields",
            ),
        ]
        for head, status, why in cases:
            got, raw = await self.answer(head)
            self.assertEqual(got, status, raw[:200])
            self.assertIn(why, raw)
            self.assertIn(b"\r\nConnection: close\r\n", raw)
        self.assertEqual(self.origin.count(), 0)

    def test_limits_are_not_too_tight(self) -> defer.Deferred[None]:
        """Exactly 100 header fields and a 15 KiB URL are forwarded."""
        return run(self._limits_are_not_too_tight())

    async def _limits_are_not_too_tight(self) -> None:
        many = "".join(f"X-N{i}: n\r\n" for i in range(MAX_HEADERS - 1))
        got, raw = await self.answer(
            f"GET {self.url} HTTP/1.1\r\nHost: {self.host}\r\n{many}\r\n"
        )
        self.assertEqual(got, 200, raw[:200])
        got, raw = await self.answer(
            f"GET {self.url}?{'q' * 15000} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        )
        self.assertNotIn(got, (414, 431), raw[:200])
        self.assertEqual(self.origin.count(), 2)


class SmugglingTests(TestCase):
    """Request smuggling shapes are 400, the connection is closed, and
    neither the request nor the one piggy-backed behind it reaches the
    origin."""

    def setUp(self) -> None:
        self.origin: Origin
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        self.origin.route("/upload", lambda request: request.content.read())
        _, self.pport = start_proxy(self)

    def shapes(self) -> list[tuple[str, str]]:
        url = f"http://127.0.0.1:{self.oport}/upload"
        host = f"Host: 127.0.0.1:{self.oport}\r\n"
        post = f"POST {url} HTTP/1.1\r\n{host}"
        return [
            # What Twisted 26.10 already rejects:
            (
                "two Content-Lengths",
                f"{post}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            ),
            (
                "two equal Content-Lengths",
                f"{post}Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            ),
            ("Content-Length: 4, 4", f"{post}Content-Length: 4, 4\r\n\r\nabcd"),
            (
                "Content-Length and chunked",
                f"{post}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "chunked and Content-Length",
                f"{post}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            ),
            (
                "chunked twice",
                f"{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "gzip, chunked",
                f"{post}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            ),
            ("space before the colon", f"{post}Content-Length : 4\r\n\r\nabcd"),
            ("LF inside a header line", f"{post}Content-Length: 4\nX: y\r\n\r\nabcd"),
            (
                "bad chunk size",
                f"{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
            ),
            # What cachingproxy adds:
            (
                "identity with Content-Length",
                f"{post}Transfer-Encoding: identity\r\nContent-Length: 4\r\n\r\nabcd",
            ),
            ("identity alone", f"{post}Transfer-Encoding: identity\r\n\r\n"),
            ("obs-fold", f"{post}X-A: one\r\n two\r\nContent-Length: 4\r\n\r\nabcd"),
            (
                "obs-fold of Transfer-Encoding",
                f"{post}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "bare LF line ends",
                f"POST {url} HTTP/1.1\n{host.strip()}\nContent-Length: 4\n\nabcd",
            ),
            ("bare LF ending the head", f"{post}Content-Length: 4\r\n\nabcd"),
            (
                "absolute-form with another Host",
                f"POST {url} HTTP/1.1\r\nHost: other.test\r\nContent-Length: 4\r\n\r\nabcd",
            ),
            (
                "absolute-form with another port",
                f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:1\r\nContent-Length: 4\r\n\r\nabcd",
            ),
        ]

    def test_smuggling_shapes(self) -> defer.Deferred[None]:
        """Every shape is answered 400 and closed; the origin sees nothing,
        not even the GET sent right behind it on the same connection."""
        return run(self._smuggling_shapes())

    async def _smuggling_shapes(self) -> None:
        behind = (
            f"GET http://127.0.0.1:{self.oport}/pkg-1.0.whl HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\n\r\n"
        )
        for name, request in self.shapes():
            client = await raw_connect(
                self, self.pport, (request + behind).encode("latin-1")
            )
            await closed(client)
            raw = bytes(client.received)
            self.assertEqual(status_of(raw), 400, f"{name}: {raw[:200]!r}")
            self.assertEqual(raw.count(b"HTTP/1.1 "), 1, name)
            self.assertEqual(self.origin.count(), 0, name)

    def test_control_is_forwarded(self) -> defer.Deferred[None]:
        """Without a smuggling shape the same POST and the GET behind it are
        both served: the origin sees both (so the test above can see
        forwarding)."""
        return run(self._control_is_forwarded())

    async def _control_is_forwarded(self) -> None:
        url = f"http://127.0.0.1:{self.oport}"
        host = f"Host: 127.0.0.1:{self.oport}\r\n"
        data = (
            f"POST {url}/upload HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
            f"4\r\nabcd\r\n0\r\n\r\n"
            f"GET {url}/pkg-1.0.whl HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
        )
        client = await raw_connect(self, self.pport, data.encode())
        await closed(client)
        self.assertEqual(bytes(client.received).count(b"HTTP/1.1 200"), 2)
        self.assertEqual(
            [(r.method, r.path) for r in self.origin.requests],
            [("POST", "/upload"), ("GET", "/pkg-1.0.whl")],
        )

    def test_host_must_match_absolute_form(self) -> None:
        """``routing.classify``: an absolute-form target's Host header may
        differ only in case and an explicit default port; another host or
        port is BadRequest; no Host at all (HTTP/1.0) is fine."""
        listener = Listener("127.0.0.1", 3128, frozenset({"localhost"}))
        same = [
            ("http://example.com/x", "EXAMPLE.com"),
            ("http://example.com/x", "example.com:80"),
            ("http://example.com:80/x", "example.com"),
            ("https://example.com/x", "example.com:443"),
            ("https://example.com/x", "example.com"),
            ("http://[::1]:8080/x", "[::1]:8080"),
            ("http://example.com./x", "example.com"),
            ("http://example.com/x", None),
        ]
        for target, host in same:
            route = classify("GET", target, host, listener)
            self.assertEqual(route.kind, RouteKind.FORWARD, (target, host))
        self.assertEqual(
            classify("GET", "http://localhost:3128/", "localhost:3128", listener),
            Route(RouteKind.SELF, path="/"),
        )
        for target, host in [
            ("http://example.com/x", "other.example"),
            ("http://example.com/x", "example.com:8080"),
            ("https://example.com/x", "example.com:80"),
            ("http://example.com/x", "example.com.evil"),
            ("http://[::1]/x", "[::2]"),
            ("http://example.com/x", ""),
            ("http://example.com/x", "example.com, other.example"),
        ]:
            self.assertRaises(BadRequest, classify, "GET", target, host, listener)


class ConnectionLimitTests(TestCase):
    """--max-client-connections 3."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        self.service, self.pport = start_proxy(self, max_client_connections=3)
        self.get = (
            f"GET http://127.0.0.1:{self.oport}/pkg-1.0.whl HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\nConnection: close\r\n\r\n"
        ).encode()

    def test_fourth_connection_refused(self) -> defer.Deferred[None]:
        """With three idle connections open from 127.0.0.1 a fourth is
        answered 429 and closed at once, with a log line naming the client;
        127.0.0.2 is still served; once one of the three closes, 127.0.0.1
        is served again."""
        return run(self._fourth_connection_refused())

    async def _fourth_connection_refused(self) -> None:
        logs = LogCapture(self)
        idle = [await connect(self, self.pport) for _ in range(3)]
        await wait_for(lambda: len(self.service.site.channels) == 3)  # type: ignore[union-attr]
        fourth = await connect(self, self.pport)
        # Refused, not timed out: the head deadline is 30 s.
        await closed(fourth)
        self.assertEqual(status_of(bytes(fourth.received)), 429)
        [line] = logs.lines("--max-client-connections")
        self.assertIn("127.0.0.1", line)
        other = await connect(self, self.pport, self.get, source="127.0.0.2")
        await closed(other)
        self.assertTrue(bytes(other.received).startswith(b"HTTP/1.1 200"))
        self.assertTrue(bytes(other.received).endswith(b"wheel"))
        self.assertFalse(any(c.closed for c in idle))
        assert idle[0].transport is not None
        idle[0].transport.loseConnection()
        await idle[0].lost
        await wait_for(lambda: len(self.service.site.channels) == 2)  # type: ignore[union-attr]
        again = await connect(self, self.pport, self.get)
        await closed(again)
        self.assertTrue(bytes(again.received).startswith(b"HTTP/1.1 200"))

    def test_refusal_with_a_request_waiting(self) -> defer.Deferred[None]:
        """A client over the limit that sent its request at once still reads
        the 429 (it is not lost to a reset)."""
        return run(self._refusal_with_a_request_waiting())

    async def _refusal_with_a_request_waiting(self) -> None:
        for _ in range(3):
            await connect(self, self.pport)
        await wait_for(lambda: len(self.service.site.channels) == 3)  # type: ignore[union-attr]
        for _ in range(5):
            over = await connect(self, self.pport, self.get)
            await closed(over)
            self.assertEqual(status_of(bytes(over.received)), 429)
        self.assertEqual(self.origin.count(), 0)


class LimitsUnitTests(TestCase):
    def test_limiter(self) -> None:
        """Counts per client; over the limit is refused and not counted; a
        release makes room again."""
        limiter = ConnectionLimiter(2)
        self.assertTrue(limiter.acquire("a"))
        self.assertTrue(limiter.acquire("a"))
        self.assertFalse(limiter.acquire("a"))
        self.assertTrue(limiter.acquire("b"))
        self.assertEqual(limiter.open("a"), 2)
        limiter.release("a")
        self.assertTrue(limiter.acquire("a"))
        for _ in range(5):
            limiter.release("b")
        self.assertEqual(limiter.open("b"), 0)

    def test_client_key(self) -> None:
        """Connections are counted by IP; IPv4-mapped IPv6 is its IPv4; UNIX
        sockets are not counted."""
        from twisted.internet.address import IPv6Address, UNIXAddress

        self.assertEqual(client_key(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1")
        self.assertEqual(
            client_key(IPv6Address("TCP", "::ffff:10.0.0.1", 5)), "10.0.0.1"
        )
        self.assertEqual(client_key(IPv6Address("TCP", "fe80::1%eth0", 5)), "fe80::1")
        self.assertIsNone(client_key(UNIXAddress(b"/tmp/x")))

    def test_rate_limited_log(self) -> None:
        """Five messages per key per interval; the next one after the
        interval says how many were held back; keys are independent."""
        clock = Clock()
        log = RateLimitedLog(clock, interval=10, burst=5)
        self.assertEqual([log.allow("a") for _ in range(5)], [0] * 5)
        self.assertEqual([log.allow("a") for _ in range(7)], [None] * 7)
        self.assertEqual(log.allow("b"), 0)
        clock.advance(10)
        self.assertEqual(log.allow("a"), 7)
        self.assertEqual(log.allow("a"), 0)


class SlowClientUnitTests(TestCase):
    """The head deadline on a Clock: a channel of the real site on a
    StringTransport."""

    def channel(
        self, resource: Resource | None = None
    ) -> tuple[Any, StringTransport, Clock]:
        clock = Clock()
        site = _QuietSite(resource)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 5))
        channel: Any = site.buildProtocol(transport.getPeer())
        channel.callLater = clock.callLater
        channel.makeConnection(transport)
        self.addCleanup(lambda: transport.disconnected or channel.connectionLost(None))
        return channel, transport, clock

    def test_trickled_head_times_out(self) -> None:
        """A head trickled a byte every second is answered 408 when
        HEAD_TIMEOUT (30 s) has passed since the connection began, although
        every gap is far below the idle timeout."""
        channel, transport, clock = self.channel()
        head = (
            b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nX: " + b"x" * 40
        )
        for i in range(int(HEAD_TIMEOUT) - 1):
            channel.dataReceived(head[i : i + 1])
            clock.advance(1)
        self.assertEqual(transport.value(), b"")
        clock.advance(1.5)
        self.assertTrue(
            transport.value().startswith(b"HTTP/1.1 408 "), transport.value()
        )
        self.assertTrue(transport.disconnecting)
        self.assertLess(HEAD_TIMEOUT, IDLE_TIMEOUT)

    def test_silent_connection_times_out(self) -> None:
        """A connection that never sends a byte gets 408 after HEAD_TIMEOUT."""
        _, transport, clock = self.channel()
        clock.advance(HEAD_TIMEOUT - 0.1)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_idle_keep_alive_closed(self) -> None:
        """After a response, a keep-alive connection that sends nothing more
        is closed once IDLE_TIMEOUT has passed, without a second answer."""
        resource = _Answer()
        channel, transport, clock = self.channel(resource)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        resource.finish(b"wheel")
        self.assertTrue(transport.value().endswith(b"wheel\r\n0\r\n\r\n"))
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_slow_response_is_not_cut_off(self) -> None:
        """While a response is being sent, however long the client takes to
        read it, neither the idle timeout nor the head deadline closes the
        connection; the idle timeout runs again after it."""
        resource = _Answer()
        channel, transport, clock = self.channel(resource)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        resource.write(b"part")
        channel.pauseProducing()  # the client stopped reading
        clock.advance(10 * max(IDLE_TIMEOUT, HEAD_TIMEOUT))
        self.assertFalse(transport.disconnecting)
        channel.resumeProducing()
        resource.finish(b" and the rest")
        self.assertTrue(transport.value().endswith(b" and the rest\r\n0\r\n\r\n"))
        self.assertIn(b"part", transport.value())
        clock.advance(IDLE_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)

    def test_tunnel_has_no_http_timeouts(self) -> None:
        """A connection taken over (CONNECT tunnel) keeps no HTTP timer:
        idle for far longer than both timeouts it stays open, and its bytes
        go to the tunnel."""
        channel, transport, clock = self.channel()
        channel.dataReceived(b"CONNECT origin.test:443 HTTP/1.1\r\n")
        tunnel = _Echo()
        channel.take_over(tunnel)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10 * max(IDLE_TIMEOUT, HEAD_TIMEOUT))
        self.assertFalse(transport.disconnecting)
        received: list[bytes] = []
        tunnel.dataReceived = received.append  # type: ignore[method-assign]
        channel.dataReceived(b"ping")
        self.assertEqual(received, [b"ping"])


class _Answer(Resource):
    """Answers every request as the test says, when it says."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        self.requests.append(request)
        return NOT_DONE_YET

    def write(self, data: bytes) -> None:
        self.requests[-1].write(data)

    def finish(self, data: bytes) -> None:
        self.requests[-1].write(data)
        self.requests[-1].finish()


class SlowClientTests(TestCase):
    """Real connections: the smoke tests of the head deadline and the idle
    timeout run with both at 0.3 s; the others drive the channels' timers
    with a Clock (see SlowClientUnitTests for the timings)."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        self.service, self.pport = self.proxy()

    def proxy(self, **overrides: Any) -> tuple[ProxyService, int]:
        service, port = start_proxy(self, **overrides)
        assert service.site is not None
        service.site.head_timeout = 0.3
        service.site.timeOut = 0.3  # copied to each channel as it is made
        return service, port

    def test_slowloris(self) -> defer.Deferred[None]:
        """Smoke test of the head deadline: a client that sends part of a
        head and then nothing gets 408 and is closed; the origin sees
        nothing."""
        return run(self._slowloris())

    async def _slowloris(self) -> None:
        client = await raw_connect(
            self, self.pport, f"GET http://127.0.0.1:{self.oport}/".encode()
        )
        await closed(client)
        self.assertTrue(bytes(client.received).startswith(b"HTTP/1.1 408 "))
        self.assertEqual(self.origin.count(), 0)

    def test_idle_keep_alive_closed(self) -> defer.Deferred[None]:
        """Smoke test of the idle timeout: after a response, an idle
        keep-alive connection is closed, with no second answer."""
        return run(self._idle_keep_alive_closed())

    async def _idle_keep_alive_closed(self) -> None:
        client = await raw_connect(
            self,
            self.pport,
            f"GET http://127.0.0.1:{self.oport}/pkg-1.0.whl HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\n\r\n".encode(),
        )
        await wait_for(lambda: bytes(client.received).endswith(b"wheel"))
        await closed(client)
        self.assertEqual(bytes(client.received).count(b"HTTP/1.1 "), 1)

    def test_slow_reader_is_not_cut_off(self) -> defer.Deferred[None]:
        """A client that stops reading in the middle of a large download for
        well over both timeouts (on the channels' Clock) still gets every
        byte afterwards."""
        return run(self._slow_reader_is_not_cut_off())

    async def _slow_reader_is_not_cut_off(self) -> None:
        site = self.service.site
        assert site is not None
        clock = Clock()
        channels_on(site, clock)
        body = bytes(range(256)) * (96 * 1024)  # 24 MiB, more than socket buffers
        self.origin.route("/big.tar.gz", streaming(body))
        client = await raw_connect(
            self,
            self.pport,
            f"GET http://127.0.0.1:{self.oport}/big.tar.gz HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\nConnection: close\r\n\r\n".encode(),
            stalled=True,
        )
        await wait_for(lambda: any(c.requests for c in site.channels))
        [channel] = site.channels
        clock.advance(10 * max(IDLE_TIMEOUT, HEAD_TIMEOUT))
        # The response is still being written when the client resumes.
        self.assertTrue(channel.requests)
        self.assertFalse(channel.transport.disconnecting)  # type: ignore[union-attr]
        client.resume()
        await wait_for(lambda: client.closed, timeout=20)
        received = bytes(client.received)
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:100])
        self.assertEqual(received.partition(b"\r\n\r\n")[2], body)

    def test_tunnel_is_not_timed_out(self) -> defer.Deferred[None]:
        """A CONNECT tunnel idle for well over the HTTP timeouts (on the
        channels' Clock) still carries bytes both ways (the tunnel has its
        own, longer idle timeout)."""
        return run(self._tunnel_is_not_timed_out())

    async def _tunnel_is_not_timed_out(self) -> None:
        echo = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        eport = echo.getHost().port  # type: ignore[attr-defined]
        service, pport = self.proxy(connect_ports=frozenset({eport}))
        assert service.site is not None
        clock = Clock()
        channels_on(service.site, clock)
        client = await raw_connect(
            self,
            pport,
            f"CONNECT 127.0.0.1:{eport} HTTP/1.1\r\nHost: 127.0.0.1:{eport}\r\n\r\n".encode(),
        )
        await wait_for(lambda: b"\r\n\r\n" in client.received)
        self.assertTrue(bytes(client.received).startswith(b"HTTP/1.1 200"))
        [channel] = service.site.channels
        clock.advance(10 * max(IDLE_TIMEOUT, HEAD_TIMEOUT))
        self.assertFalse(channel.transport.disconnecting)  # type: ignore[union-attr]
        self.assertFalse(client.closed)
        del client.received[:]
        assert client.transport is not None
        client.transport.write(b"ping")
        await wait_for(lambda: bytes(client.received) == b"ping")


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(data)


class OwnListenerTests(TestCase):
    def test_connect_to_itself_refused(self) -> defer.Deferred[None]:
        """CONNECT to the proxy's own listening address and port is refused
        (403) without a connection attempt, even with that port among
        --connect-ports and loopback in --allow-upstream."""
        return run(self._connect_to_itself_refused())

    async def _connect_to_itself_refused(self) -> None:
        guard = GuardedReactor()
        service, pport = start_proxy_with(self, reactor_=guard)
        # The port is known only now.
        assert service.proxy is not None
        service.proxy.config = attrs.evolve(
            service.proxy.config, connect_ports=frozenset({pport})
        )
        raw = await raw_exchange(
            self,
            pport,
            f"CONNECT 127.0.0.1:{pport} HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n\r\n".encode(),
        )
        self.assertEqual(status_of(raw), 403, raw[:200])
        self.assertIn(b"the proxy itself", raw)
        self.assertEqual(guard.connects, [])
