"""Loopback integration tests of the caching path: real origin, proxy, client."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    HTTPConnectionPool,
    ProxyAgent,
    ResponseFailed,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from cachingproxy import __version__

from .support import (
    Origin,
    StoppableOrigin,
    client,
    downloads_done,
    fetch,
    header,
    parse_raw_response,
    raw_connect,
    raw_get,
    start_origin,
    start_proxy,
    stored,
    streaming,
    wait_for,
)

MiB = 1024 * 1024
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def _body(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes: any lost, repeated or misplaced chunk shows."""
    return random.Random(seed).randbytes(size)


class MissThenHitTests(TestCase):
    def test_miss_then_hit(self) -> defer.Deferred[None]:
        """A second request is served from cache: one origin request, same bytes."""
        return defer.Deferred.fromCoroutine(self._miss_then_hit())

    async def _miss_then_hit(self) -> None:
        origin, oport = start_origin(self)
        body = bytes(range(256)) * 4000
        origin.static("/pkg-1.0.tar.gz", body)
        _, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/pkg-1.0.tar.gz"
        r1, b1 = await fetch(http, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((r1.code, header(r1, "x-cache")), (200, "MISS"))
        self.assertEqual((r2.code, header(r2, "x-cache")), (200, "HIT"))
        self.assertEqual(b1, body)
        self.assertEqual(b2, body)
        self.assertEqual(origin.count("/pkg-1.0.tar.gz"), 1)


class CoalescingTests(TestCase):
    async def test_concurrent_cold_clients_share_one_download(self) -> None:
        """20 clients asking at once for an uncached file cause one upstream
        request, and every one of them gets the origin's exact bytes."""
        origin, oport = start_origin(self)
        body = _body(3 * MiB)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.route("/big-1.0.tar.gz", streaming(body, gate=gate))
        _, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/big-1.0.tar.gz"
        requests = [http.get(url) for _ in range(20)]
        # Every client has its response head before the origin sends more
        # than its first chunk: all 20 are attached to the same download.
        responses = await defer.gatherResults(requests)
        self.assertEqual(origin.count(), 1)
        gate.callback(None)
        bodies = await defer.gatherResults([readBody(r) for r in responses])
        self.assertEqual([r.code for r in responses], [200] * 20)
        self.assertEqual({header(r, "x-cache") for r in responses}, {"MISS"})
        self.assertEqual(len(bodies), 20)
        for got in bodies:
            self.assertEqual(got, body)
        self.assertEqual(origin.count("/big-1.0.tar.gz"), 1)

    async def test_stalled_client_does_not_hold_back_others(self) -> None:
        """A client that stops reading does not hold back the download or a
        fast client on the same file; it still gets every byte later."""
        origin, oport = start_origin(self)
        body = _body(16 * MiB, seed=3)
        origin.route("/slow-1.0.tar.gz", streaming(body, chunk=256 * 1024))
        service, pport = start_proxy(self)
        assert service.proxy is not None
        url = f"http://127.0.0.1:{oport}/slow-1.0.tar.gz"
        stalled = await raw_connect(
            self,
            pport,
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode(),
            stalled=True,
        )
        in_flight = service.proxy.downloads.in_flight
        await wait_for(lambda: url in in_flight and in_flight[url].clients == 1)
        download = in_flight[url]
        response, got = await fetch(client(self, pport), url)
        self.assertEqual(response.code, 200)
        self.assertEqual(got, body)
        await stored(service, url)
        # The stalled client is still connected and still attached, short
        # of the end of the body.
        self.assertFalse(stalled.closed)
        self.assertEqual(download.clients, 1)
        self.assertEqual(origin.count("/slow-1.0.tar.gz"), 1)
        stalled.resume()
        await wait_for(
            lambda: (
                len(parse_raw_response(bytes(stalled.received))[2]) >= len(body)
                if b"\r\n\r\n" in stalled.received
                else False
            )
        )
        status, _, raw_body = parse_raw_response(bytes(stalled.received))
        self.assertEqual(status, 200)
        self.assertEqual(raw_body, body)


class BrokenDownloadTests(TestCase):
    async def test_origin_breaks_off_mid_body(self) -> None:
        """An upstream that closes half way through its declared length gives
        the client an error, stores nothing and leaves no temporary file."""
        origin, oport = start_origin(self)
        body = _body(512 * 1024)

        def half(request: Request) -> Any:
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body[: len(body) // 2])
            transport: Any = request.channel.transport
            # Without the channel registered as its producer, the transport
            # closes as soon as the half body is flushed.
            transport.unregisterProducer()
            transport.loseConnection()
            return NOT_DONE_YET

        origin.route("/broken-1.0.tar.gz", half)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/broken-1.0.tar.gz"
        with self.assertRaises(ResponseFailed):
            await fetch(http, url)
        await downloads_done(service)
        tmp = os.path.join(service.config.cache_dir, "tmp")
        self.assertEqual(os.listdir(tmp), [])
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        with self.assertRaises(ResponseFailed):
            await fetch(http, url)
        self.assertEqual(origin.count("/broken-1.0.tar.gz"), 2)
        await downloads_done(service)
        self.assertEqual(os.listdir(tmp), [])


class StaleOnErrorTests(TestCase):
    """Index entries that are stale at once (``index_ttl=0``) are served when
    upstream fails, within ``max_stale``."""

    INDEX = b"<html><body><a href='pkg-1.0.tar.gz'>pkg</a></body></html>"

    async def _prime(
        self, origin: Origin, oport: int, **config: Any
    ) -> tuple[Any, Any, str]:
        service, pport = start_proxy(self, index_ttl=0.0, **config)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/simple/pkg/"
        response, got = await fetch(http, url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "MISS"))
        self.assertEqual(got, self.INDEX)
        await stored(service, url)
        return service, http, url

    async def test_connection_refused(self) -> None:
        """Upstream refuses connections: the stale entry is served as STALE."""
        running = StoppableOrigin(self)
        running.origin.static("/simple/pkg/", self.INDEX)
        _, http, url = await self._prime(running.origin, running.port)
        await running.stop()
        response, got = await fetch(http, url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "STALE"))
        self.assertEqual(got, self.INDEX)
        self.assertIsNotNone(header(response, "age"))
        self.assertEqual(running.origin.count(), 1)

    async def test_timeout(self) -> None:
        """Upstream accepts the request but never answers: after the timeouts
        the stale entry is served as STALE."""
        origin, oport = start_origin(self)
        hung: list[Request] = []

        def index(request: Request) -> Any:
            if not hung and origin.count() == 1:
                request.setHeader(b"Content-Length", b"%d" % len(self.INDEX))
                return self.INDEX
            hung.append(request)
            return NOT_DONE_YET

        origin.route("/simple/pkg/", index)
        _, http, url = await self._prime(
            origin, oport, read_timeout=0.5, connect_timeout=0.5
        )
        response, got = await fetch(http, url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "STALE"))
        self.assertEqual(got, self.INDEX)
        self.assertEqual(len(hung), 1)
        # The proxy gave up on the hung request and closed its connection.
        await wait_for(lambda: hung[0]._disconnected)

    async def test_upstream_5xx(self) -> None:
        """Upstream answers 503: the stale entry is served as STALE."""
        origin, oport = start_origin(self)
        origin.static("/simple/pkg/", self.INDEX)
        _, http, url = await self._prime(origin, oport)
        origin.static("/simple/pkg/", b"down for maintenance", status=503)
        response, got = await fetch(http, url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "STALE"))
        self.assertEqual(got, self.INDEX)
        self.assertEqual(origin.count(), 2)

    async def test_max_stale_exceeded(self) -> None:
        """An entry stale for longer than ``max_stale`` is not served on error:
        the client gets the upstream error instead."""
        origin, oport = start_origin(self)
        # Age: 100 makes the entry 100 s stale the moment it is stored.
        origin.static("/simple/pkg/", self.INDEX, headers=[("Age", "100")])
        _, http, url = await self._prime(origin, oport, max_stale=10.0)
        origin.static("/simple/pkg/", b"down", status=503)
        response, got = await fetch(http, url)
        self.assertIn(response.code, (502, 503, 504))
        self.assertNotEqual(header(response, "x-cache"), "STALE")
        self.assertNotEqual(got, self.INDEX)

    async def test_refused_without_stale_entry(self) -> None:
        """Nothing cached and upstream refuses connections: 502."""
        running = StoppableOrigin(self)
        await running.stop()
        _, pport = start_proxy(self)
        response, _ = await fetch(
            client(self, pport), f"http://127.0.0.1:{running.port}/simple/pkg/"
        )
        self.assertEqual(response.code, 502)
        self.assertNotEqual(header(response, "x-cache"), "STALE")


class RevalidationTests(TestCase):
    async def test_304_refreshes_without_download(self) -> None:
        """A stale entry with an ETag is revalidated with If-None-Match; the
        origin's 304 (no body) refreshes it and the client gets the stored
        bytes as REVALIDATED."""
        origin, oport = start_origin(self)
        body = b"<html>index of pkg</html>" * 100
        codes: list[int] = []
        sent: list[int] = []

        def index(request: Request) -> bytes:
            request.setHeader(b"ETag", b'"v1"')
            if request.getHeader(b"if-none-match") == b'"v1"':
                request.setResponseCode(304)
                codes.append(304)
                sent.append(0)
                return b""
            codes.append(200)
            sent.append(len(body))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body

        origin.route("/simple/pkg/", index)
        service, pport = start_proxy(self, index_ttl=0.0)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/simple/pkg/"
        r1, b1 = await fetch(http, url)
        await stored(service, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual(header(r1, "x-cache"), "MISS")
        self.assertEqual((r2.code, header(r2, "x-cache")), (200, "REVALIDATED"))
        self.assertEqual(b1, body)
        self.assertEqual(b2, body)
        self.assertEqual(r2.length, len(body))
        self.assertEqual(origin.count(), 2)
        self.assertIsNone(origin.requests[0].header("if-none-match"))
        self.assertEqual(origin.requests[1].header("if-none-match"), '"v1"')
        self.assertEqual(codes, [200, 304])
        self.assertEqual(sent, [len(body), 0])

    async def test_changed_upstream_replaces_entry(self) -> None:
        """A revalidation answered with a new 200 replaces the stored bytes."""
        origin, oport = start_origin(self)
        origin.static("/simple/pkg/", b"old index", etag='"old"')
        service, pport = start_proxy(self, index_ttl=0.0)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/simple/pkg/"
        await fetch(http, url)
        await stored(service, url)
        origin.static("/simple/pkg/", b"new index", etag='"new"')
        response, got = await fetch(http, url)
        self.assertEqual((header(response, "x-cache"), got), ("MISS", b"new index"))
        self.assertEqual(origin.requests[1].header("if-none-match"), '"old"')
        await downloads_done(service)
        assert service.store is not None
        (entry,) = await service.store.lookup(url)
        self.assertEqual(entry.header("etag"), '"new"')

    async def test_client_conditional_answered_from_cache(self) -> None:
        """A client's If-None-Match that matches a fresh entry gets 304 from
        the cache without a body or an upstream request."""
        origin, oport = start_origin(self)
        origin.static("/cond-1.0.tar.gz", b"conditional", etag='"c1"')
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/cond-1.0.tar.gz"
        await fetch(http, url)
        await stored(service, url)
        response, got = await fetch(http, url, {"If-None-Match": '"c1"'})
        self.assertEqual((response.code, got), (304, b""))
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(header(response, "etag"), '"c1"')
        response, got = await fetch(http, url, {"If-None-Match": '"other"'})
        self.assertEqual((response.code, got), (200, b"conditional"))
        self.assertEqual(origin.count(), 1)


class VaryTests(TestCase):
    async def test_html_and_json_variants_kept_apart(self) -> None:
        """PyPI's HTML and PEP 691 JSON answers for one URL (``Vary: Accept``)
        are both cached, and each client gets the variant it asked for."""
        origin, oport = start_origin(self)
        html = b"<html><a href='/pkg-1.0.tar.gz'>pkg-1.0.tar.gz</a></html>"
        json = b'{"meta": {"api-version": "1.0"}, "files": []}'

        def index(request: Request) -> bytes:
            request.setHeader(b"Vary", b"Accept")
            accept = (request.getHeader(b"accept") or b"").decode()
            if JSON_TYPE in accept:
                request.setHeader(b"Content-Type", JSON_TYPE.encode())
                return json
            request.setHeader(b"Content-Type", b"text/html")
            return html

        origin.route("/simple/pkg/", index)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/simple/pkg/"
        as_json = {"Accept": JSON_TYPE}
        as_html = {"Accept": "text/html"}
        expected = {JSON_TYPE: json, "text/html": html}
        seen = []
        for accept in (as_json, as_html, as_json, as_html):
            response, got = await fetch(http, url, accept)
            want = accept["Accept"]
            self.assertEqual(response.code, 200)
            self.assertEqual(header(response, "content-type"), want)
            self.assertEqual(got, expected[want])
            seen.append(header(response, "x-cache"))
            await stored(service, url, variants=min(len(seen), 2))
        self.assertEqual(seen, ["MISS", "MISS", "HIT", "HIT"])
        self.assertEqual(origin.count(), 2)

    async def test_concurrent_variants_share_downloads(self) -> None:
        """Clients asking at once for two variants of one URL cause one
        upstream request per variant, and each gets its own bytes."""
        origin, oport = start_origin(self)
        gate: defer.Deferred[None] = defer.Deferred()
        bodies = {JSON_TYPE: _body(200000, seed=7), "text/html": _body(150000, seed=8)}

        def index(request: Request) -> Any:
            accept = (request.getHeader(b"accept") or b"").decode()
            kind = JSON_TYPE if JSON_TYPE in accept else "text/html"
            headers = [("Vary", "Accept"), ("Content-Type", kind)]
            return streaming(bodies[kind], headers=headers, gate=gate)(request)

        origin.route("/simple/pkg/", index)
        _, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/simple/pkg/"
        kinds = [JSON_TYPE, "text/html"] * 5
        responses = await defer.gatherResults(
            [http.get(url, headers=Headers({"Accept": [kind]})) for kind in kinds]
        )
        gate.callback(None)
        got = await defer.gatherResults([readBody(r) for r in responses])
        for kind, response, body in zip(kinds, responses, got, strict=True):
            self.assertEqual(header(response, "content-type"), kind)
            self.assertEqual(body, bodies[kind])
        self.assertEqual(origin.count(), 2)


class RangeTests(TestCase):
    def setUp(self) -> None:
        self.origin, oport = start_origin(self)
        self.body = _body(300 * 1024, seed=5)
        self.origin.static("/r-1.0.tar.gz", self.body)
        self.url = f"http://127.0.0.1:{oport}/r-1.0.tar.gz"
        self.service, pport = start_proxy(self)
        self.http = client(self, pport)

    async def test_ranges_from_a_stored_entry(self) -> None:
        """Single byte ranges on a stored entry are 206 with the exact bytes and
        Content-Range; one past the end is 416; several ranges get the whole."""
        await fetch(self.http, self.url)
        await stored(self.service, self.url)
        size = len(self.body)
        cases = [
            ("bytes=10-99", 10, 100),
            ("bytes=-100", size - 100, size),
            ("bytes=5-", 5, size),
        ]
        for spec, start, end in cases:
            response, got = await fetch(self.http, self.url, {"Range": spec})
            self.assertEqual(response.code, 206, spec)
            self.assertEqual(got, self.body[start:end], spec)
            self.assertEqual(
                header(response, "content-range"), f"bytes {start}-{end - 1}/{size}"
            )
            self.assertEqual(response.length, end - start)
            self.assertEqual(header(response, "x-cache"), "HIT")
        response, got = await fetch(self.http, self.url, {"Range": "bytes=999999999-"})
        self.assertEqual(response.code, 416)
        self.assertEqual(header(response, "content-range"), f"bytes */{size}")
        self.assertEqual(got, b"")
        response, got = await fetch(self.http, self.url, {"Range": "bytes=0-1,5-6"})
        self.assertEqual(response.code, 200)
        self.assertEqual(got, self.body)
        self.assertEqual(self.origin.count(), 1)

    async def test_range_on_a_miss_caches_the_whole_file(self) -> None:
        """A range request for an uncached file gets its exact range while the
        whole file is fetched (without Range) and stored for later hits."""
        response, got = await fetch(self.http, self.url, {"Range": "bytes=100-199"})
        self.assertEqual(response.code, 206)
        self.assertEqual(got, self.body[100:200])
        self.assertEqual(
            header(response, "content-range"), f"bytes 100-199/{len(self.body)}"
        )
        await stored(self.service, self.url)
        response, got = await fetch(self.http, self.url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "HIT"))
        self.assertEqual(got, self.body)
        self.assertEqual(self.origin.count(), 1)
        self.assertIsNone(self.origin.requests[0].header("range"))


class OriginRuleTests(TestCase):
    """URLs that are not package traffic follow RFC 9111 (the ``origin`` rule)."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.service, pport = start_proxy(self)
        self.http = client(self, pport)

    async def _twice(
        self, path: str, cache_control: str, headers: dict[str, str] | None = None
    ) -> list[str | None]:
        self.origin.static(
            path, b"page " + path.encode(), [("Cache-Control", cache_control)]
        )
        url = f"http://127.0.0.1:{self.oport}{path}"
        seen = []
        for _ in range(2):
            response, got = await fetch(self.http, url, headers)
            self.assertEqual((response.code, got), (200, b"page " + path.encode()))
            seen.append(header(response, "x-cache"))
            await downloads_done(self.service)
        return seen

    async def test_no_store(self) -> None:
        """``Cache-Control: no-store`` from the origin: never stored."""
        self.assertEqual(await self._twice("/page.html", "no-store"), ["MISS", "MISS"])
        self.assertEqual(self.origin.count(), 2)

    async def test_private(self) -> None:
        """``Cache-Control: private`` from the origin: never stored (shared cache)."""
        self.assertEqual(
            await self._twice("/private.html", "private"), ["MISS", "MISS"]
        )
        self.assertEqual(self.origin.count(), 2)

    async def test_max_age(self) -> None:
        """``Cache-Control: max-age=60``: stored and served as a HIT."""
        self.assertEqual(
            await self._twice("/fresh.html", "max-age=60"), ["MISS", "HIT"]
        )
        self.assertEqual(self.origin.count(), 1)

    async def test_client_no_cache_revalidates_under_origin(self) -> None:
        """A client's ``Cache-Control: no-cache`` forces a revalidation of a
        fresh ``origin`` entry."""
        path = "/etag.html"
        self.origin.static(
            path, b"tagged page", [("Cache-Control", "max-age=60")], etag='"e1"'
        )
        url = f"http://127.0.0.1:{self.oport}{path}"
        await fetch(self.http, url)
        await stored(self.service, url)
        response, got = await fetch(self.http, url, {"Cache-Control": "no-cache"})
        self.assertEqual((response.code, got), (200, b"tagged page"))
        self.assertEqual(header(response, "x-cache"), "REVALIDATED")
        self.assertEqual(self.origin.count(), 2)
        self.assertEqual(self.origin.requests[1].header("if-none-match"), '"e1"')

    async def test_client_no_cache_ignored_for_packages(self) -> None:
        """A client's ``Cache-Control: no-cache`` does not touch an immutable
        package file: it is a HIT."""
        seen = await self._twice(
            "/pkg-1.0-py3-none-any.whl", "no-cache", {"Cache-Control": "no-cache"}
        )
        self.assertEqual(seen, ["MISS", "HIT"])
        self.assertEqual(self.origin.count(), 1)


class NegativeCacheTests(TestCase):
    async def _twice(self, **config: Any) -> tuple[list[str | None], Origin]:
        origin, oport = start_origin(self)
        service, pport = start_proxy(self, **config)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/missing-1.0-py3-none-any.whl"
        seen = []
        for _ in range(2):
            response, got = await fetch(http, url)
            self.assertEqual((response.code, got), (404, b"not found"))
            seen.append(header(response, "x-cache"))
            await downloads_done(service)
        return seen, origin

    async def test_404_is_cached(self) -> None:
        """A 404 is stored for ``negative_ttl``: the second request is a HIT."""
        seen, origin = await self._twice()
        self.assertEqual(seen, ["MISS", "HIT"])
        self.assertEqual(origin.count(), 1)

    async def test_negative_ttl_zero(self) -> None:
        """With ``negative_ttl=0`` a 404 is not stored."""
        seen, origin = await self._twice(negative_ttl=0.0)
        self.assertEqual(seen, ["MISS", "MISS"])
        self.assertEqual(origin.count(), 2)


class OfflineTests(TestCase):
    async def test_offline(self) -> None:
        """``offline`` serves what is cached without contacting upstream (a
        stale entry as OFFLINE, a fresh one as HIT); a miss is 504."""
        origin, oport = start_origin(self)
        origin.static("/simple/pkg/", b"index")
        origin.static("/pkg-1.0.tar.gz", b"package")
        cache_dir = self.mktemp()
        online, pport = start_proxy(self, cache_dir=cache_dir, index_ttl=0.0)
        http = client(self, pport)
        base = f"http://127.0.0.1:{oport}"
        for path in ("/simple/pkg/", "/pkg-1.0.tar.gz"):
            await fetch(http, base + path)
            await stored(online, base + path)
        await online.stopService()
        _, pport = start_proxy(self, cache_dir=cache_dir, index_ttl=0.0, offline=True)
        http = client(self, pport)
        response, got = await fetch(http, base + "/simple/pkg/")
        self.assertEqual((response.code, got), (200, b"index"))
        self.assertEqual(header(response, "x-cache"), "OFFLINE")
        response, got = await fetch(http, base + "/pkg-1.0.tar.gz")
        self.assertEqual((response.code, got), (200, b"package"))
        self.assertEqual(header(response, "x-cache"), "HIT")
        response, _ = await fetch(http, base + "/other-1.0.tar.gz")
        self.assertEqual(response.code, 504)
        self.assertEqual(origin.count(), 2)


class HeadTests(TestCase):
    async def test_head_from_stored_get(self) -> None:
        """HEAD is answered from a stored GET: no upstream request, the stored
        Content-Length, no body."""
        origin, oport = start_origin(self)
        body = _body(70000)
        origin.static("/h-1.0.tar.gz", body)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/h-1.0.tar.gz"
        await fetch(http, url)
        await stored(service, url)
        response, got = await fetch(http, url, method="HEAD")
        self.assertEqual((response.code, header(response, "x-cache")), (200, "HIT"))
        self.assertEqual(header(response, "content-length"), str(len(body)))
        self.assertEqual(got, b"")
        self.assertEqual(origin.count(), 1)


class HeaderTests(TestCase):
    VIA = f"1.1 localhost (cachingproxy/{__version__})"

    def setUp(self) -> None:
        self.origin, oport = start_origin(self)

        def page(request: Request) -> bytes:
            request.setHeader(b"Connection", b"X-Bar")
            request.setHeader(b"X-Bar", b"1")
            request.setHeader(b"Keep-Alive", b"timeout=5")
            request.setHeader(b"X-End", b"kept")
            request.setHeader(b"Content-Length", b"4")
            return b"page"

        self.origin.route("/hop-1.0.tar.gz", page)
        self.service, self.pport = start_proxy(self)
        self.url = f"http://127.0.0.1:{oport}/hop-1.0.tar.gz"

    async def test_hop_by_hop_request_headers_dropped(self) -> None:
        """Hop-by-hop request headers (and those named by Connection) do not
        reach the origin; Via does, X-Forwarded-For is not added."""
        sent = {
            "Connection": "X-Foo",
            "X-Foo": "1",
            "Keep-Alive": "300",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        }
        response, got = await fetch(client(self, self.pport), self.url, sent)
        self.assertEqual((response.code, got), (200, b"page"))
        (seen,) = self.origin.requests
        for name in ("x-foo", "keep-alive", "proxy-authorization", "proxy-connection"):
            self.assertIsNone(seen.header(name), name)
        for name in ("te", "upgrade"):
            self.assertIsNone(seen.header(name), name)
        self.assertNotIn("x-foo", (seen.header("connection") or "").lower())
        self.assertEqual(seen.header("x-kept"), "yes")
        self.assertIsNone(seen.header("x-forwarded-for"))
        self.assertEqual(seen.header("via"), self.VIA)

    async def test_hop_by_hop_response_headers_dropped(self) -> None:
        """The origin's Keep-Alive does not reach the client, on a miss or a
        hit; end-to-end headers do, with Via, and hits carry Age."""
        for cache in ("MISS", "HIT"):
            status, headers, body = await raw_get(self, self.pport, self.url)
            self.assertEqual((status, body), (200, b"page"))
            self.assertEqual(headers["x-cache"], [cache])
            self.assertNotIn("keep-alive", headers)
            self.assertIn(headers.get("connection"), (None, ["close"]))
            self.assertEqual(headers["x-end"], ["kept"])
            self.assertEqual(headers["via"], [self.VIA])
            await stored(self.service, self.url)
        self.assertIn("age", headers)
        self.assertEqual(self.origin.count(), 1)

    async def test_connection_named_response_header_dropped(self) -> None:
        """A response header the origin names in Connection (X-Bar) does not
        reach the client."""
        for _ in range(2):
            _, headers, _ = await raw_get(self, self.pport, self.url)
            self.assertNotIn("x-bar", headers)
            await stored(self.service, self.url)


class BypassTests(TestCase):
    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.service, pport = start_proxy(self)
        self.http = client(self, pport)

    async def test_post_and_put_forwarded_uncached(self) -> None:
        """POST and PUT bodies reach the origin intact and are not cached."""

        def echo(request: Request) -> bytes:
            assert request.content is not None
            data = request.content.read()
            return (
                f"{request.method.decode()} {hashlib.sha256(data).hexdigest()}".encode()
            )

        self.origin.route("/upload", echo)
        url = f"http://127.0.0.1:{self.oport}/upload"
        big = _body(MiB, seed=9)
        for method, payload in (("POST", big), ("PUT", big), ("POST", b"tiny")):
            response = await self.http.request(method, url, data=payload)
            got = await response.content()
            digest = hashlib.sha256(payload).hexdigest()
            self.assertEqual(response.code, 200)
            self.assertEqual(got, f"{method} {digest}".encode())
            self.assertEqual(header(response, "x-cache"), "BYPASS")
        self.assertEqual(self.origin.count(), 3)
        (seen,) = {r.header("content-length") for r in self.origin.requests[:2]}
        self.assertEqual(seen, str(MiB))

    async def test_credentials_bypass(self) -> None:
        """Requests with Authorization or Cookie bypass the cache and what they
        fetch is not stored."""
        for name, value in (("Authorization", "Bearer x"), ("Cookie", "s=1")):
            path = f"/secret-{name}-1.0.tar.gz"
            self.origin.static(path, b"secret")
            url = f"http://127.0.0.1:{self.oport}{path}"
            for _ in range(2):
                response, got = await fetch(self.http, url, {name: value})
                self.assertEqual((response.code, got), (200, b"secret"))
                self.assertEqual(header(response, "x-cache"), "BYPASS")
            self.assertEqual(self.origin.requests[-1].header(name), value)
            response, _ = await fetch(self.http, url)
            self.assertEqual(header(response, "x-cache"), "MISS")
            self.assertEqual(self.origin.count(path), 3)


class NotStoredTests(TestCase):
    """Responses that must pass through unstored (SPEC 3)."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.service, self.pport = start_proxy(self, max_object_size=10000)

    async def _twice(self, path: str, body: bytes) -> list[str | None]:
        url = f"http://127.0.0.1:{self.oport}{path}"
        seen = []
        for _ in range(2):
            # A new client each time: treq's would send the cookie back.
            response, got = await fetch(client(self, self.pport), url)
            self.assertEqual((response.code, got), (200, body))
            seen.append(header(response, "x-cache"))
            await downloads_done(self.service)
        assert self.service.store is not None
        self.assertEqual(await self.service.store.lookup(url), [])
        self.assertEqual(self.origin.count(path), 2)
        return seen

    async def test_set_cookie(self) -> None:
        """A response with Set-Cookie is not stored."""
        self.origin.static("/c-1.0.tar.gz", b"cookie", [("Set-Cookie", "a=b")])
        self.assertEqual(await self._twice("/c-1.0.tar.gz", b"cookie"), ["MISS"] * 2)

    async def test_vary_star(self) -> None:
        """A response with ``Vary: *`` is not stored."""
        self.origin.static("/simple/star/", b"star", [("Vary", "*")])
        self.assertEqual(await self._twice("/simple/star/", b"star"), ["MISS"] * 2)

    async def test_over_max_object_size(self) -> None:
        """A body over ``max_object_size`` is streamed through, not stored,
        whether its length is declared or not."""
        body = _body(50000)
        self.origin.static("/large-1.0.tar.gz", body)
        self.assertEqual(await self._twice("/large-1.0.tar.gz", body), ["MISS"] * 2)
        self.origin.route(
            "/chunked-1.0.tar.gz", streaming(body, chunk=8000, length=False)
        )
        await self._twice("/chunked-1.0.tar.gz", body)
        tmp = os.path.join(self.service.config.cache_dir, "tmp")
        self.assertEqual(os.listdir(tmp), [])


class ClientGoneTests(TestCase):
    async def test_client_leaving_does_not_abort_download(self) -> None:
        """A client that disconnects mid-download does not stop the download:
        the file is still stored and the next request is a HIT."""
        origin, oport = start_origin(self)
        body = _body(2 * MiB, seed=6)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.route("/gone-1.0.tar.gz", streaming(body, gate=gate))
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/gone-1.0.tar.gz"
        leaving = await raw_connect(
            self,
            pport,
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode(),
        )
        await wait_for(lambda: b"\r\n\r\n" in leaving.received)
        leaving.transport.abortConnection()  # type: ignore[union-attr]
        await leaving.lost
        gate.callback(None)
        await stored(service, url)
        response, got = await fetch(client(self, pport), url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "HIT"))
        self.assertEqual(got, body)
        self.assertEqual(origin.count(), 1)


class ContentEncodingTests(TestCase):
    async def test_gzip_tarball_passed_through_untouched(self) -> None:
        """A ``.tar.gz`` sent with ``Content-Encoding: gzip`` is stored and
        served byte for byte with the header kept."""
        origin, oport = start_origin(self)
        gz = bytes.fromhex("1f8b0800000000000003") + _body(5000, seed=1)
        origin.static("/z-1.0.tar.gz", gz, [("Content-Encoding", "gzip")])
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/z-1.0.tar.gz"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", pport), reactor=reactor, pool=pool
        )
        seen = []
        for _ in range(2):
            response = await agent.request(b"GET", url.encode(), Headers())
            got = await readBody(response)
            self.assertEqual(got, gz)
            self.assertEqual(header(response, "content-encoding"), "gzip")
            seen.append(header(response, "x-cache"))
            await stored(service, url)
        self.assertEqual(seen, ["MISS", "HIT"])
        assert service.store is not None
        (entry,) = await service.store.lookup(url)
        self.assertEqual(entry.digest, hashlib.sha256(gz).hexdigest())
        self.assertEqual(origin.count(), 1)


class RestartTests(TestCase):
    async def test_entries_survive_restart(self) -> None:
        """A new proxy on the same cache directory serves what the old one
        stored, without asking upstream."""
        origin, oport = start_origin(self)
        body = _body(100000, seed=2)
        origin.static("/keep-1.0.tar.gz", body)
        cache_dir = self.mktemp()
        first, pport = start_proxy(self, cache_dir=cache_dir)
        url = f"http://127.0.0.1:{oport}/keep-1.0.tar.gz"
        await fetch(client(self, pport), url)
        await stored(first, url)
        await first.stopService()
        _, pport = start_proxy(self, cache_dir=cache_dir)
        response, got = await fetch(client(self, pport), url)
        self.assertEqual((response.code, header(response, "x-cache")), (200, "HIT"))
        self.assertEqual(got, body)
        self.assertEqual(origin.count(), 1)


class ChunkedTests(TestCase):
    async def test_chunked_response_stored(self) -> None:
        """A response without Content-Length (chunked) is stored when complete
        and then served as a HIT with the right Content-Length."""
        origin, oport = start_origin(self)
        body = _body(200000, seed=4)
        origin.route("/c-1.0.tar.gz", streaming(body, chunk=30000, length=False))
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/c-1.0.tar.gz"
        r1, b1 = await fetch(http, url)
        self.assertEqual((r1.code, header(r1, "x-cache"), b1), (200, "MISS", body))
        await stored(service, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((r2.code, header(r2, "x-cache"), b2), (200, "HIT", body))
        self.assertEqual(r2.length, len(body))
        self.assertEqual(origin.count(), 1)
