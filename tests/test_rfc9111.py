"""RFC 9111/9110 behaviour of the cached path (issue 10, correctness 2-6 and
the protocol items of D4, D10, D11): invalidation by unsafe methods, Age on a
miss, strict HTTP-dates, relayed 5xx, read timeout, HEAD on a miss, TRACE and
Max-Forwards, only-if-cached, trailing-dot hosts.

Loopback only: a real twisted.web origin on 127.0.0.1 and an in-process
proxy; the timeout tests drive ``Upstream`` on a MemoryReactorClock.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from cachingproxy.cache import age, invalidation, policy
from cachingproxy.cache import headers as H
from cachingproxy.config import Rule
from cachingproxy.errors import UpstreamTimeout
from cachingproxy.fetch.upstream import DestinationPolicy, Upstream

from .support import (
    client,
    fake_resolver,
    fetch,
    header,
    start_origin,
    start_proxy,
    start_proxy_with,
    stored,
)


def _cacheable(body: bytes, *extra: tuple[str, str]) -> Callable[[Request], bytes]:
    """An origin handler: ``body``, fresh for an hour, plus ``extra`` headers
    (a Cache-Control among them replaces the hour)."""

    def handler(request: Request) -> bytes:
        if not any(name.lower() == "cache-control" for name, _ in extra):
            request.setHeader(b"Cache-Control", b"max-age=3600")
        for name, value in extra:
            request.responseHeaders.addRawHeader(name, value)
        return body

    return handler


class InvalidationTests(TestCase):
    """RFC 9111 4.4, SPEC 3: a successful unsafe method invalidates."""

    async def test_post_invalidates_url_location_and_content_location(self) -> None:
        """After a 201 to a POST, the target URL and the same-host Location
        and Content-Location are fetched again; another host's URL named in
        Location is left alone; a failed POST (4xx) invalidates nothing."""
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}"
        for path in ("/res", "/created", "/described"):
            origin.route(path, _cacheable(path.encode()))

        def post(request: Request) -> bytes:
            if request.getHeader(b"x-fail"):
                request.setResponseCode(409)
                return b"conflict"
            request.setResponseCode(201)
            request.setHeader(b"Location", b"/created")
            request.setHeader(b"Content-Location", f"{base}/described".encode())
            return b"made"

        origin.route("/res?post", post)
        service, pport = start_proxy(self)
        http = client(self, pport)
        for path in ("/res", "/created", "/described"):
            await fetch(http, base + path)
            await stored(service, base + path)
            r, _ = await fetch(http, base + path)
            self.assertEqual(header(r, "x-cache"), "HIT")
        # A refused POST leaves everything in place.
        r, _ = await fetch(http, base + "/res?post", {"X-Fail": "1"}, "POST")
        self.assertEqual(r.code, 409)
        r, _ = await fetch(http, base + "/res")
        self.assertEqual(header(r, "x-cache"), "HIT")
        # The POST goes to /res?post: a different URL than /res; PUT /res is
        # the one that invalidates /res itself.
        origin.route("/res", _cacheable(b"new"))

        def put(request: Request) -> bytes:
            request.setResponseCode(201)
            request.setHeader(b"Location", b"/created")
            request.setHeader(b"Content-Location", f"{base}/described".encode())
            return b""

        cached = origin.routes["/res"]

        def res(request: Request) -> bytes:
            return put(request) if request.method == b"PUT" else cached(request)

        origin.route("/res", res)
        r, _ = await fetch(http, base + "/res", method="PUT")
        self.assertEqual(r.code, 201)
        for path in ("/res", "/created", "/described"):
            r, body = await fetch(http, base + path)
            self.assertEqual(header(r, "x-cache"), "MISS", path)
            self.assertEqual(origin.count(path), 2 + (path == "/res"), path)
        self.assertEqual(body, b"/described")

    def test_invalidated_urls(self) -> None:
        """The pure rule: unsafe methods with 2xx/3xx only, same host only."""
        url = "http://a.test/x"
        headers = [
            ("Location", "/y?z"),
            ("Content-Location", "http://other.test/z"),
        ]
        self.assertEqual(
            invalidation.invalidated_urls("DELETE", 204, url, headers),
            [url, "http://a.test/y?z"],
        )
        self.assertEqual(
            invalidation.invalidated_urls(
                "PATCH", 303, url, [("Location", "HTTP://A.test:80/q")]
            ),
            [url, "http://a.test/q"],
        )
        self.assertEqual(invalidation.invalidated_urls("POST", 500, url, headers), [])
        self.assertEqual(invalidation.invalidated_urls("GET", 200, url, headers), [])
        self.assertEqual(
            invalidation.invalidated_urls(
                "POST", 200, url, [("Location", "https://a.test/y")]
            ),
            [url],
        )


class AgeTests(TestCase):
    async def test_upstream_age_carried_on_a_miss(self) -> None:
        """The origin's Age: 7200 reaches the client on the MISS, and the HIT
        that follows is at least as old (SPEC 5)."""
        origin, oport = start_origin(self)
        origin.route(
            "/aged",
            _cacheable(
                b"x" * 1000, ("Age", "7200"), ("Cache-Control", "max-age=86400")
            ),
        )
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/aged"
        r1, _ = await fetch(http, url)
        self.assertEqual(header(r1, "x-cache"), "MISS")
        self.assertGreaterEqual(int(header(r1, "age") or "0"), 7200)
        await stored(service, url)
        r2, _ = await fetch(http, url)
        self.assertEqual(header(r2, "x-cache"), "HIT")
        self.assertGreaterEqual(int(header(r2, "age") or "0"), 7200)

    def test_corrected_age(self) -> None:
        self.assertEqual(age.corrected_age([("Age", "10")], 100.0, 103.0), 13.0)
        self.assertEqual(age.corrected_age([], 100.0, 99.0), 0.0)
        self.assertIsNone(age.relayed_age([], 100.0, 103.0))
        self.assertEqual(age.relayed_age([("age", "5")], 100.0, 101.0), 6.0)


# The caching test suite's Expires vectors (cache-tests.fyi, expires-parse).
_VALID = {
    "Tue, 19 Jan 2038 14:14:08 GMT": 2147523248,
    "Sun, 21 Nov 2286 04:46:39 GMT": 10000039599,
    "Thursday, 18-Aug-50 02:01:18 GMT": 2544400878,
    "Thu Aug  8 02:01:18 2050": 2543536878,
    "THU, 18 Aug 2050 02:01:18 GMT": 2544400878,
    "Thu, 18 AUG 2050 02:01:18 GMT": 2544400878,
    "Thu, 18 Aug 2050 02:01:18 gMT": 2544400878,
    "Sun, 06 Nov 1994 08:49:37 GMT": 784111777,
    "Sunday, 06-Nov-94 08:49:37 GMT": 784111777,
    "Sun Nov  6 08:49:37 1994": 784111777,
}
_INVALID = [
    "Thu, 18 Aug 2050 02:01:18 UTC",
    "Thu, 18 Aug 2050 02:01:18 AEST",
    "Thu, 18 Aug 50 02:01:18 GMT",
    "Thu 18 Aug 2050 02:01:18 GMT",
    "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT",
    "Thu, 18 Aug 2050 02.01.18 GMT",
    "Thu, 18 Aug 2050 2:01:18 GMT",
    "Thu, 18 Aug 2050 02:01:18 GMT, Thu, 18 Aug 2050 02:01:19 GMT",
    "Thu, 31 Feb 2050 02:01:18 GMT",
    "Thu, 18 Aug 2050 24:01:18 GMT",
    "0",
    "-1",
    "",
]


class HTTPDateTests(SynchronousTestCase):
    def test_valid_forms(self) -> None:
        """IMF-fixdate, RFC 850 and asctime, names in any case (RFC 9110 5.6.7)."""
        for value, expected in _VALID.items():
            self.assertEqual(H.parse_http_date(value), expected, value)

    def test_invalid_forms(self) -> None:
        """Two-digit years, dashes, missing commas, odd zones, several values."""
        for value in _INVALID:
            self.assertIsNone(H.parse_http_date(value), value)

    def test_rfc850_century(self) -> None:
        """A two-digit year more than 50 years ahead is in the past century."""
        now = 1_780_000_000.0  # 2026
        self.assertEqual(
            time.gmtime(
                H.parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", now)
            ).tm_year,
            1994,
        )
        self.assertEqual(
            time.gmtime(
                H.parse_http_date("Friday, 06-Nov-76 08:49:37 GMT", now)
            ).tm_year,
            2076,
        )

    def test_invalid_expires_is_already_expired(self) -> None:
        """RFC 9111 5.3: an invalid Expires means stale at once."""
        from cachingproxy.cache.entry import StoredResponse

        rule = Rule(__import__("re").compile(""), None, name="origin")
        date = datetimeToString(1_780_000_000).decode()
        for value in _INVALID:
            entry = StoredResponse(
                url="http://a.test/",
                variant="",
                vary=(),
                status=200,
                headers=(("Date", date), ("Expires", value)),
                stored_at=0.0,
                initial_age=0.0,
            )
            self.assertEqual(
                policy.freshness_lifetime(rule, entry, 300, 60), 0.0, value
            )


class MissingDateTests(SynchronousTestCase):
    def test_expires_without_a_valid_date_counts_from_arrival(self) -> None:
        """RFC 9111 4.2.1: with no (valid) Date, the time the response was
        received stands in for it; the response is storable and fresh until
        its Expires."""
        import re

        from cachingproxy.cache.entry import StoredResponse

        rule = Rule(re.compile(""), None, name="origin")
        arrived = 1_780_000_000.0
        expires = datetimeToString(arrived + 3600).decode()
        for date in ((), (("Date", "yesterday"),)):
            headers = (("Expires", expires), *date)
            self.assertTrue(policy.is_storable(rule, 200, headers, 60, arrived))
            entry = StoredResponse(
                url="http://a.test/",
                variant="",
                vary=(),
                status=200,
                headers=headers,
                stored_at=arrived,
            )
            self.assertEqual(policy.freshness_lifetime(rule, entry, 300, 60), 3600.0)
            self.assertTrue(policy.is_fresh(rule, entry, arrived + 3599, 300, 60))
            self.assertFalse(policy.is_fresh(rule, entry, arrived + 3601, 300, 60))


class ExpiresTests(TestCase):
    async def test_invalid_expires_not_served_from_cache(self) -> None:
        """A response whose Expires is a two-digit-year date far in the
        future is not reused (before: a HIT for 24 years)."""
        origin, oport = start_origin(self)
        calls = []

        def handler(request: Request) -> bytes:
            calls.append(1)
            request.setHeader(b"Expires", b"Thu, 18 Aug 50 02:01:18 GMT")
            request.setHeader(b"Last-Modified", datetimeToString(time.time() - 86400))
            return b"page"

        origin.route("/page.html", handler)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/page.html"
        await fetch(http, url)
        await stored(service, url)
        r, _ = await fetch(http, url)
        self.assertNotEqual(header(r, "x-cache"), "HIT")
        self.assertEqual(len(calls), 2)


class Relayed5xxTests(TestCase):
    async def test_origin_5xx_body_and_headers_reach_the_client(self) -> None:
        """No stale copy, no other upstream: the registry's JSON error and
        its headers come through, with its status."""
        origin, oport = start_origin(self)
        error = json.dumps({"error": "registry is read-only"}).encode()

        def handler(request: Request) -> bytes:
            request.setResponseCode(503, b"Read Only")
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Retry-After", b"120")
            return error

        origin.route("/pkg/json", handler)
        service, pport = start_proxy(self)
        http = client(self, pport)
        r, body = await fetch(http, f"http://127.0.0.1:{oport}/pkg/json")
        self.assertEqual(r.code, 503)
        self.assertEqual(body, error)
        self.assertEqual(header(r, "content-type"), "application/json")
        self.assertEqual(header(r, "retry-after"), "120")
        assert service.proxy is not None
        self.assertEqual(
            service.proxy.stats.snapshot()["upstream_errors"].get("http_5xx"), 1
        )


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        pass


class _Connected:
    """The one connection a MemoryReactorClock was asked to make, made."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        _, _, factory, timeout, _ = reactor.tcpClients[-1]
        self.connect_timeout = timeout
        self.transport = _TCPTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)


class ReadTimeoutTests(SynchronousTestCase):
    """--read-timeout counts from the request until the head (SPEC 5)."""

    def _upstream(self, reactor: MemoryReactorClock) -> Upstream:
        policy_ = DestinationPolicy(
            allow_upstream=(ipaddress.ip_network("10.0.0.0/8"),)
        )
        return Upstream(
            reactor,
            policy_,
            connect_timeout=30.0,
            read_timeout=2.0,
            resolve=fake_resolver({}),
        )

    def test_head_within_read_timeout(self) -> None:
        """A connected upstream that stays silent fails after read-timeout
        seconds, not after 2 x connect-timeout + read-timeout."""
        reactor = MemoryReactorClock()
        d = self._upstream(reactor).request(b"GET", b"http://10.1.2.3/x", Headers())
        connection = _Connected(reactor)
        self.assertEqual(connection.connect_timeout, 30.0)
        self.assertIn(b"GET /x HTTP/1.1", connection.transport.value())
        reactor.advance(1.9)
        self.assertNoResult(d)
        reactor.advance(0.2)
        connection.protocol.connectionLost(Failure(Exception("aborted")))
        self.failureResultOf(d, UpstreamTimeout)

    def test_head_in_time_then_no_timeout(self) -> None:
        """A head that arrives in time cancels the timer."""
        reactor = MemoryReactorClock()
        d = self._upstream(reactor).request(b"GET", b"http://10.1.2.3/x", Headers())
        connection = _Connected(reactor)
        reactor.advance(1.5)
        connection.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
        )
        response: Any = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        reactor.advance(10)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_tls_handshake_within_connect_timeout(self) -> None:
        """--connect-timeout covers the TLS handshake: a server that accepts
        TCP and never answers the ClientHello fails after connect-timeout."""
        reactor = MemoryReactorClock()
        d = self._upstream(reactor).request(b"GET", b"https://10.1.2.3/x", Headers())
        connection = _Connected(reactor)
        self.assertTrue(connection.transport.value())  # the ClientHello
        reactor.advance(29)
        self.assertNoResult(d)
        reactor.advance(1.5)
        failure = self.failureResultOf(d, UpstreamTimeout)
        self.assertIn("TLS", failure.getErrorMessage())


class HeadMissTests(TestCase):
    async def test_head_on_a_miss_carries_the_origin_length(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/big.tar.gz", b"z" * 123_456)
        _, pport = start_proxy(self)
        r, body = await fetch(
            client(self, pport), f"http://127.0.0.1:{oport}/big.tar.gz", method="HEAD"
        )
        self.assertEqual((r.code, body), (200, b""))
        self.assertEqual(header(r, "content-length"), "123456")


class LocalMethodTests(TestCase):
    async def test_trace_refused_and_max_forwards_zero_answered(self) -> None:
        """TRACE is refused with 405 without reaching the origin; OPTIONS
        with Max-Forwards: 0 is answered by the proxy; with Max-Forwards: 3
        it reaches the origin as 2 (RFC 9110 7.6.2)."""
        origin, oport = start_origin(self)
        origin.route("/x", lambda request: b"options")
        _, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/x"
        r, _ = await fetch(http, url, method="TRACE")
        self.assertEqual(r.code, 405)
        self.assertIn("GET", header(r, "allow") or "")
        r, _ = await fetch(http, url, {"Max-Forwards": "0"}, "OPTIONS")
        self.assertEqual(r.code, 200)
        self.assertIn("OPTIONS", header(r, "allow") or "")
        self.assertEqual(origin.count(), 0)
        r, _ = await fetch(http, url, {"Max-Forwards": "3"}, "OPTIONS")
        self.assertEqual(origin.count(), 1)
        self.assertEqual(origin.requests[0].header("max-forwards"), "2")


class OnlyIfCachedTests(TestCase):
    async def test_only_if_cached_miss_is_504(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/a-1.0.tar.gz", b"a" * 100)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/a-1.0.tar.gz"
        only = {"Cache-Control": "only-if-cached"}
        r, _ = await fetch(http, url, only)
        self.assertEqual(r.code, 504)
        self.assertEqual(origin.count(), 0)
        await fetch(http, url)
        await stored(service, url)
        r, body = await fetch(http, url, only)
        self.assertEqual((r.code, header(r, "x-cache"), body), (200, "HIT", b"a" * 100))
        self.assertEqual(origin.count(), 1)


class TrailingDotTests(TestCase):
    def test_trailing_dot_keyed_as_without(self) -> None:
        self.assertEqual(
            policy.normalize_url("http://Files.Example.ORG.:80/a"),
            "http://files.example.org/a",
        )

    async def test_one_entry_for_both_spellings(self) -> None:
        """``files.test.`` and ``files.test`` are one host: the second is a
        HIT (names resolve through a fake resolver: no DNS)."""
        origin, oport = start_origin(self)
        origin.static("/p-1.0.whl", b"w" * 500)
        names = {"files.test": ["127.0.0.1"], "files.test.": ["127.0.0.1"]}
        _, pport = start_proxy_with(self, resolve=fake_resolver(names))
        http = client(self, pport)
        r1, _ = await fetch(http, f"http://files.test.:{oport}/p-1.0.whl")
        r2, _ = await fetch(http, f"http://files.test:{oport}/p-1.0.whl")
        self.assertEqual(header(r1, "x-cache"), "MISS")
        self.assertIn(header(r2, "x-cache"), ("HIT",))
        self.assertEqual(origin.count(), 1)


class _Response:
    length = None


def _client_request() -> Any:
    """A DummyRequest that takes a push producer (its own loops a pull one)."""
    from twisted.web.test.requesthelper import DummyRequest

    class Client(DummyRequest):
        channel = None

        def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
            self.producer = producer

    return Client([b""])


class PassThroughSilenceTests(SynchronousTestCase):
    """--read-timeout between body bytes of a response passed through
    unstored; a client holding the body back does not count (SPEC 5)."""

    def test_silent_upstream_cut_off_unless_the_client_holds_back(self) -> None:
        from twisted.internet.task import Clock

        from cachingproxy.front.responses import PassThrough

        clock = Clock()
        request = _client_request()
        errors: list[str] = []
        relay = PassThrough(
            request,
            _Response(),  # type: ignore[arg-type]
            on_error=errors.append,
            clock=clock,
            read_timeout=5.0,
        )
        upstream = StringTransport()
        relay.makeConnection(upstream)
        clock.advance(4)
        relay.dataReceived(b"abc")
        clock.advance(4)  # 8 s in all, 4 s of silence
        self.assertEqual(upstream.producerState, "producing")
        request.producer.pauseProducing()  # a slow client
        clock.advance(60)
        self.assertEqual(upstream.producerState, "paused")
        request.producer.resumeProducing()
        clock.advance(4.9)
        self.assertEqual(upstream.producerState, "producing")
        clock.advance(0.2)
        self.assertEqual(upstream.producerState, "stopped")
        relay.connectionLost(Failure(Exception("stopped")))
        self.assertEqual(errors, ["timeout"])
        self.assertEqual(request.written, [b"abc"])
        self.assertEqual(request.finished, 0)
