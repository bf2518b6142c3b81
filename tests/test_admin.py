"""The operator's view, end to end: ``/status.json``, ``/metrics``, the status
page, purge and its access rules, and the access log (SPEC 9).

A real origin, a real proxy and real clients on 127.0.0.1; the proxy's own
pages are requested self-addressed (origin-form, ``Host`` = the address the
proxy listens on).  The log-rotation test runs a real ``twistd`` process.
"""

from __future__ import annotations

import calendar
import functools
import ipaddress
import json
import os
import random
import signal
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import readBody
from twisted.web.server import Request

from cachingproxy.ops import admin
from cachingproxy.service import ProxyService

from .support import (
    Twistd,
    client,
    downloads_done,
    fetch,
    from_peer,
    header,
    own_page,
    start_origin,
    start_proxy,
    stored,
    streaming,
    wait_for,
)

KiB = 1024
MiB = 1024 * KiB
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
TOKEN = "s3cret-admin-token"


def _body(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def _status(test: TestCase, pport: int) -> dict[str, Any]:
    response, body = await own_page(test, pport, "/status.json")
    test.assertEqual(response.code, 200)
    test.assertEqual(header(response, "content-type"), "application/json")
    result: dict[str, Any] = json.loads(body)
    return result


async def _metrics(
    test: TestCase, pport: int
) -> dict[tuple[str, frozenset[Any]], float]:
    """``/metrics`` parsed by prometheus_client: {(sample, labels): value}."""
    response, body = await own_page(test, pport, "/metrics")
    test.assertEqual(response.code, 200)
    test.assertTrue(str(header(response, "content-type")).startswith("text/plain"))
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _sample(
    samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def _parse_page(test: TestCase, html: bytes) -> ET.Element:
    """The status page parsed strictly as XML (after its HTML5 doctype)."""
    text = html.decode("utf-8")
    doctype = "<!DOCTYPE html>"
    test.assertTrue(text.startswith(doctype), text[:50])
    return ET.fromstring(text[len(doctype) :])


def _in_flight_urls(page: ET.Element) -> list[str]:
    """The URLs in the table that follows the "Downloads in flight" heading."""
    body = page.find("body")
    assert body is not None
    children = list(body)
    for i, element in enumerate(children):
        if element.tag == "h2" and element.text == "Downloads in flight":
            section = children[i + 1]
            return [
                "".join(span.itertext())
                for span in section.iter("span")
                if span.get("class") == "url"
            ]
    raise AssertionError("no 'Downloads in flight' section")


def _purge_path(what: str, value: str) -> str:
    return f"/cache?{what}={quote(value, safe='')}"


# -- the figures -----------------------------------------------------------------


class _Traffic:
    """A known sequence of proxied requests: a MISS and two HITs of ``a``, a
    MISS and a HIT of ``b``."""

    A = _body(300_000, seed=1)
    B = _body(120_000, seed=2)
    MAX_SIZE = 64 * MiB

    def __init__(self, test: TestCase) -> None:
        self.test = test
        origin, oport = start_origin(test)
        origin.static("/a-1.0.tar.gz", self.A)
        origin.static("/b-1.0.whl", self.B)
        self.origin = origin
        self.url_a = f"http://127.0.0.1:{oport}/a-1.0.tar.gz"
        self.url_b = f"http://127.0.0.1:{oport}/b-1.0.whl"
        self.service, self.pport = start_proxy(test, max_size=self.MAX_SIZE)

    async def run(self) -> list[str | None]:
        http = client(self.test, self.pport)
        seen = []
        for url, body in [(self.url_a, self.A)] * 3 + [(self.url_b, self.B)] * 2:
            response, got = await fetch(http, url)
            self.test.assertEqual((response.code, got), (200, body))
            seen.append(header(response, "x-cache"))
            await stored(self.service, url)
        return seen


class StatusJsonTests(TestCase):
    async def test_figures_match_the_traffic(self) -> None:
        """After 5 proxied requests (3 hits, 2 misses) ``/status.json`` shows
        exactly those counts, the bytes served from cache and fetched
        upstream, the entries and disk bytes stored and the budget."""
        traffic = _Traffic(self)
        self.assertEqual(await traffic.run(), ["MISS", "HIT", "HIT", "MISS", "HIT"])
        a, b = len(traffic.A), len(traffic.B)
        status = await _status(self, traffic.pport)
        expected = {
            "requests": 5,
            "hits": 3,
            "misses": 2,
            "stale": 0,
            "revalidated": 0,
            "bytes_from_cache": 2 * a + b,
            "bytes_from_upstream": a + b,
            "bytes_served": 3 * a + 2 * b,
            "entries": 2,
            "disk_bytes": a + b,
            "max_size": traffic.MAX_SIZE,
            "in_flight": [],
        }
        self.assertEqual({k: status[k] for k in expected}, expected)
        self.assertAlmostEqual(status["hit_ratio"], 3 / 5)
        self.assertEqual(
            [(o["url"], o["hits"]) for o in status["top_objects"]],
            [(traffic.url_a, 2), (traffic.url_b, 1)],
        )
        self.assertEqual(traffic.origin.count(), 2)

    async def test_own_pages_are_not_counted(self) -> None:
        """Requests for the proxy's own pages (status, metrics, purge) are not
        proxied requests: the counters stay at zero until one is made."""
        origin, oport = start_origin(self)
        origin.static("/c-1.0.whl", b"c" * 1000)
        _, pport = start_proxy(self)
        for path in ("/", "/status.json", "/metrics", "/no-such-page"):
            await own_page(self, pport, path)
        response, _ = await own_page(
            self, pport, _purge_path("prefix", "http://x.test/"), "DELETE"
        )
        self.assertEqual(response.code, 200)
        status = await _status(self, pport)
        self.assertEqual((status["requests"], status["bytes_served"]), (0, 0))
        await fetch(client(self, pport), f"http://127.0.0.1:{oport}/c-1.0.whl")
        status = await _status(self, pport)
        self.assertEqual((status["requests"], status["misses"]), (1, 1))


class MetricsTests(TestCase):
    async def test_metrics_parse_and_match_the_traffic(self) -> None:
        """``/metrics`` parses as Prometheus text and its counters and gauges
        equal what the test did (and what ``/status.json`` says)."""
        traffic = _Traffic(self)
        await traffic.run()
        a, b = len(traffic.A), len(traffic.B)
        samples = await _metrics(self, traffic.pport)
        requests = "cachingproxy_requests_total"
        self.assertEqual(_sample(samples, requests, cache="HIT"), 3)
        self.assertEqual(_sample(samples, requests, cache="MISS"), 2)
        for other in ("STALE", "REVALIDATED", "BYPASS", "OFFLINE", "-"):
            self.assertEqual(_sample(samples, requests, cache=other), 0)
        total = "cachingproxy_bytes_total"
        self.assertEqual(_sample(samples, total, source="cache"), 2 * a + b)
        self.assertEqual(_sample(samples, total, source="upstream"), a + b)
        self.assertEqual(_sample(samples, "cachingproxy_disk_bytes"), a + b)
        self.assertEqual(_sample(samples, "cachingproxy_entries"), 2)
        self.assertEqual(_sample(samples, "cachingproxy_inflight_downloads"), 0)
        self.assertEqual(
            _sample(samples, "cachingproxy_max_size_bytes"), traffic.MAX_SIZE
        )
        histogram = "cachingproxy_response_seconds_count"
        self.assertEqual(_sample(samples, histogram, cache="HIT"), 3)
        self.assertEqual(_sample(samples, histogram, cache="MISS"), 2)
        status = await _status(self, traffic.pport)
        self.assertEqual(
            (status["hits"], status["misses"], status["bytes_from_cache"]),
            (3, 2, 2 * a + b),
        )


# -- the status page and downloads in flight ---------------------------------------


class InFlightTests(TestCase):
    async def test_page_and_json_show_a_download_in_flight(self) -> None:
        """While a download is held back by its origin, the well-formed status
        page lists its URL, ``/status.json`` lists it with bytes so far,
        total and clients, and ``/metrics`` counts it; once it ends it is
        gone from all three and the client got every byte."""
        origin, oport = start_origin(self)
        body = _body(1 * MiB, seed=3)
        gate: defer.Deferred[None] = defer.Deferred()
        path = "/in-flight-1.0.tar.gz?a=1&b=2"
        origin.route(path, streaming(body, chunk=64 * KiB, gate=gate))
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}{path}"
        response = await client(self, pport).get(url)
        assert service.proxy is not None
        in_flight = service.proxy.downloads.in_flight
        await wait_for(lambda: url in in_flight and in_flight[url].bytes_written > 0)

        page, html = await own_page(self, pport, "/")
        self.assertEqual(page.code, 200)
        self.assertEqual(header(page, "content-type"), "text/html; charset=utf-8")
        self.assertEqual(_in_flight_urls(_parse_page(self, html)), [url])
        status = await _status(self, pport)
        self.assertEqual(
            [
                (d["url"], d["bytes"], d["total"], d["clients"])
                for d in status["in_flight"]
            ],
            [(url, 64 * KiB, len(body), 1)],
        )
        samples = await _metrics(self, pport)
        self.assertEqual(_sample(samples, "cachingproxy_inflight_downloads"), 1)

        gate.callback(None)
        self.assertEqual(await readBody(response), body)
        await downloads_done(service)
        _, html = await own_page(self, pport, "/")
        self.assertEqual(_in_flight_urls(_parse_page(self, html)), [])
        self.assertEqual((await _status(self, pport))["in_flight"], [])

    async def test_pass_through_download_shown(self) -> None:
        """A response streamed through unstored (here: over
        ``max_object_size``) is a download in flight too, for the operator."""
        origin, oport = start_origin(self)
        body = _body(1 * MiB, seed=6)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.route("/through-1.0.whl", streaming(body, gate=gate))
        _, pport = start_proxy(self, max_object_size=100 * KiB)
        url = f"http://127.0.0.1:{oport}/through-1.0.whl"
        response = await client(self, pport).get(url)
        try:
            status = await _status(self, pport)
            self.assertEqual([d["url"] for d in status["in_flight"]], [url])
        finally:
            gate.callback(None)
            self.assertEqual(await readBody(response), body)


# -- purge ------------------------------------------------------------------------


class _FakeRequest:
    """Just what ``admin.is_authorised`` reads from a request."""

    def __init__(self, address: Any, authorization: str | None = None) -> None:
        self._address = address
        self._authorization = authorization

    def getClientAddress(self) -> Any:  # noqa: N802
        return self._address

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        if name.lower() == b"authorization" and self._authorization is not None:
            return self._authorization.encode("latin-1")
        return None


class IsAuthorisedTests(SynchronousTestCase):
    def test_rules(self) -> None:
        """Loopback (IPv4, IPv6, v4-mapped) and UNIX-socket clients may purge
        whatever they send; any other client only with ``Bearer TOKEN`` when
        a token is configured: no header, a wrong token, another scheme or
        no configured token all refuse."""
        v4 = functools.partial(IPv4Address, "TCP", port=1234)
        v6 = functools.partial(IPv6Address, "TCP", port=1234)
        cases = [
            # (address, Authorization, configured token, allowed)
            (v4("127.0.0.1"), None, None, True),
            (v4("127.5.6.7"), None, TOKEN, True),
            (v4("127.0.0.1"), "Bearer wrong", TOKEN, True),
            (v6("::1"), None, None, True),
            (v6("::ffff:127.0.0.1"), None, None, True),
            (UNIXAddress(b"/run/cachingproxy.sock"), None, None, True),
            (v4("10.0.0.5"), None, None, False),
            (v4("10.0.0.5"), f"Bearer {TOKEN}", None, False),
            (v4("10.0.0.5"), None, TOKEN, False),
            (v4("10.0.0.5"), "Bearer wrong", TOKEN, False),
            (v4("10.0.0.5"), f"Bearer {TOKEN}x", TOKEN, False),
            (v4("10.0.0.5"), f"Basic {TOKEN}", TOKEN, False),
            (v4("10.0.0.5"), TOKEN, TOKEN, False),
            (v4("10.0.0.5"), f"Bearer {TOKEN}", TOKEN, True),
            (v4("10.0.0.5"), f"bearer  {TOKEN} ", TOKEN, True),
            (v6("fd00::5"), f"Bearer {TOKEN}", TOKEN, True),
            (v6("fd00::5"), "Bearer nope", TOKEN, False),
            (v6("::ffff:10.0.0.5"), None, TOKEN, False),
        ]
        for address, authorization, token, allowed in cases:
            request: Any = _FakeRequest(address, authorization)
            self.assertEqual(
                admin.is_authorised(request, token),
                allowed,
                (address, authorization, token),
            )


class PurgeTests(TestCase):
    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.oport}{path}"

    async def prime(self, service: ProxyService, pport: int, *paths: str) -> None:
        """Serve and store each of ``paths`` (one variant each)."""
        http = client(self, pport)
        for path in paths:
            self.origin.static(path, path.encode() * 100)
            response, _ = await fetch(http, self.url(path))
            self.assertEqual(header(response, "x-cache"), "MISS")
            await stored(service, self.url(path))

    async def x_cache(self, pport: int, path: str) -> str | None:
        response, got = await fetch(client(self, pport), self.url(path))
        self.assertEqual((response.code, got), (200, path.encode() * 100))
        return header(response, "x-cache")

    async def purge(
        self, pport: int, what: str, value: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        response, body = await own_page(
            self, pport, _purge_path(what, value), "DELETE", headers
        )
        if response.code == 200:
            self.assertEqual(header(response, "content-type"), "application/json")
            return 200, json.loads(body)
        return response.code, body

    async def test_purge_url_drops_every_variant(self) -> None:
        """``DELETE /cache?url=URL`` from loopback drops both variants of a
        ``Vary: Accept`` URL and answers ``{"removed": 2}``; the URL is a MISS
        next time, and other entries stay."""

        def index(request: Request) -> bytes:
            request.setHeader(b"Vary", b"Accept")
            accept = (request.getHeader(b"accept") or b"text/html").decode()
            request.setHeader(b"Content-Type", accept.encode())
            return accept.encode() * 10

        self.origin.route("/simple/pkg/", index)
        service, pport = start_proxy(self)
        await self.prime(service, pport, "/other-1.0.whl")
        http = client(self, pport)
        url = self.url("/simple/pkg/")
        for accept in (JSON_TYPE, "text/html"):
            await fetch(http, url, {"Accept": accept})
        await stored(service, url, variants=2)
        # The scheme is normalised like a cache key.
        self.assertEqual(
            await self.purge(pport, "url", "HTTP" + url[4:]), (200, {"removed": 2})
        )
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        response, got = await fetch(http, url, {"Accept": JSON_TYPE})
        self.assertEqual(header(response, "x-cache"), "MISS")
        self.assertEqual(got, JSON_TYPE.encode() * 10)
        self.assertEqual(self.origin.count("/simple/pkg/"), 3)
        self.assertEqual(await self.x_cache(pport, "/other-1.0.whl"), "HIT")
        self.assertEqual(
            await self.purge(pport, "url", url[:-1]), (200, {"removed": 0})
        )

    async def test_purge_prefix(self) -> None:
        """``DELETE /cache?prefix=URL`` drops every entry whose URL starts
        with it, and only those; scheme and host match in any case."""
        service, pport = start_proxy(self)
        paths = ("/pkgs/a-1.0.whl", "/pkgs/b-1.0.whl", "/pkgsx/c-1.0.whl")
        await self.prime(service, pport, *paths)
        self.assertEqual(
            await self.purge(pport, "prefix", self.url("/pkgs/")),
            (200, {"removed": 2}),
        )
        self.assertEqual(
            [await self.x_cache(pport, p) for p in paths], ["MISS", "MISS", "HIT"]
        )
        await stored(service, self.url(paths[0]))
        await stored(service, self.url(paths[1]))
        assert service.store is not None
        self.assertEqual(service.store.usage().entries, 3)
        # A prefix of only scheme and host matches whatever its case.
        self.assertEqual(
            await self.purge(pport, "prefix", f"HTTP://127.0.0.1:{self.oport}"),
            (200, {"removed": 3}),
        )
        self.assertEqual(service.store.usage().entries, 0)

    async def test_bad_purge_requests(self) -> None:
        """A purge without exactly one ``url`` or ``prefix``, with a bad URL,
        or with another method than DELETE is refused with a 4xx and
        removes nothing."""
        service, pport = start_proxy(self)
        await self.prime(service, pport, "/keep-1.0.whl")
        url = quote(self.url("/keep-1.0.whl"), safe="")
        cases = [
            ("DELETE", "/cache", 400),
            ("DELETE", "/cache?", 400),
            ("DELETE", f"/cache?url={url}&prefix={url}", 400),
            ("DELETE", f"/cache?url={url}&url={url}", 400),
            ("DELETE", "/cache?url=not-a-url", 400),
            ("DELETE", "/cache?url=ftp%3A%2F%2Fx.test%2F", 400),
            ("DELETE", f"/cache?path={url}", 400),
            ("GET", f"/cache?url={url}", 405),
            ("POST", f"/cache?url={url}", 405),
            ("PUT", f"/cache?prefix={url}", 405),
            ("DELETE", "/status.json", 405),
        ]
        for method, path, code in cases:
            response, _ = await own_page(self, pport, path, method)
            self.assertEqual(response.code, code, (method, path))
        assert service.store is not None
        self.assertEqual(service.store.usage().entries, 1)
        self.assertEqual(await self.x_cache(pport, "/keep-1.0.whl"), "HIT")

    async def _purge_in_flight(self, what: str, value: str) -> None:
        body = _body(1 * MiB, seed=4)
        gate: defer.Deferred[None] = defer.Deferred()
        self.origin.route("/held/x-1.0.tar.gz", streaming(body, gate=gate))
        service, pport = start_proxy(self)
        url = self.url("/held/x-1.0.tar.gz")
        response = await client(self, pport).get(url)
        assert service.proxy is not None
        self.assertIn(url, service.proxy.downloads.in_flight)
        self.assertEqual(await self.purge(pport, what, value), (200, {"removed": 0}))
        gate.callback(None)
        self.assertEqual(await readBody(response), body)
        await downloads_done(service)
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        self.assertEqual(service.store.usage().entries, 0)
        self.assertEqual(os.listdir(os.path.join(service.config.cache_dir, "tmp")), [])
        again, got = await fetch(client(self, pport), url)
        self.assertEqual((header(again, "x-cache"), got), ("MISS", body))
        self.assertEqual(self.origin.count("/held/x-1.0.tar.gz"), 2)

    async def test_purge_url_during_download(self) -> None:
        """A purge of a URL whose download is in flight leaves no entry once
        the download ends; its client still gets the whole body."""
        await self._purge_in_flight("url", self.url("/held/x-1.0.tar.gz"))

    async def test_purge_prefix_during_download(self) -> None:
        """Likewise for a prefix purge covering the URL being downloaded."""
        await self._purge_in_flight("prefix", self.url("/held/"))


class PurgeAccessTests(TestCase):
    """Who may purge.  A loopback test cannot open a connection from a
    non-loopback address, so those requests are fed to the proxy's real site
    through an in-memory transport whose peer is 10.0.0.5 (``from_peer``)."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/p-1.0.whl", b"p" * 5000)
        self.url = f"http://127.0.0.1:{self.oport}/p-1.0.whl"

    async def start(self, **config: Any) -> tuple[ProxyService, int]:
        service, pport = start_proxy(
            self,
            allow_client=(
                ipaddress.ip_network("127.0.0.0/8"),
                ipaddress.ip_network("10.0.0.0/8"),
            ),
            **config,
        )
        await fetch(client(self, pport), self.url)
        await stored(service, self.url)
        return service, pport

    async def remote_purge(
        self,
        service: ProxyService,
        pport: int,
        authorization: str | None = None,
        peer: str = "10.0.0.5",
    ) -> tuple[int, bytes]:
        auth = f"Authorization: {authorization}\r\n" if authorization else ""
        request = (
            f"DELETE {_purge_path('url', self.url)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{pport}\r\n{auth}Connection: close\r\n\r\n"
        )
        status, _, body = await from_peer(self, service, request.encode(), peer)
        return status, body

    def entries(self, service: ProxyService) -> int:
        assert service.store is not None
        return service.store.usage().entries

    async def test_remote_refused_without_token(self) -> None:
        """Without ``--admin-token`` a non-loopback client gets 403 for a
        purge, whatever it sends, and nothing is removed; it may still read
        the status page."""
        service, pport = await self.start()
        for authorization in (None, f"Bearer {TOKEN}"):
            status, _ = await self.remote_purge(service, pport, authorization)
            self.assertEqual(status, 403)
        self.assertEqual(self.entries(service), 1)
        request = (
            f"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, _, body = await from_peer(self, service, request, "10.0.0.5")
        self.assertEqual((status, json.loads(body)["entries"]), (200, 1))

    async def test_remote_needs_the_right_token(self) -> None:
        """With ``--admin-token`` a non-loopback client gets 403 without the
        header, with a wrong token or another scheme, and purges with
        ``Authorization: Bearer TOKEN``."""
        service, pport = await self.start(admin_token=TOKEN)
        for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", TOKEN):
            status, _ = await self.remote_purge(service, pport, authorization)
            self.assertEqual(status, 403, authorization)
        self.assertEqual(self.entries(service), 1)
        status, body = await self.remote_purge(service, pport, f"Bearer {TOKEN}")
        self.assertEqual((status, json.loads(body)), (200, {"removed": 1}))
        self.assertEqual(self.entries(service), 0)

    async def test_client_outside_allow_client_refused_even_with_token(self) -> None:
        """The token does not open the proxy to clients outside
        ``--allow-client``: they get 403 before any admin check."""
        service, pport = await self.start(admin_token=TOKEN)
        status, body = await self.remote_purge(
            service, pport, f"Bearer {TOKEN}", peer="203.0.113.9"
        )
        self.assertEqual(status, 403)
        self.assertIn(b"client not allowed", body)
        self.assertEqual(self.entries(service), 1)

    async def test_loopback_always_allowed(self) -> None:
        """A real loopback connection may purge even with ``--admin-token``
        set and a wrong bearer token sent."""
        service, pport = await self.start(admin_token=TOKEN)
        response, body = await own_page(
            self,
            pport,
            _purge_path("url", self.url),
            "DELETE",
            {"Authorization": "Bearer wrong"},
        )
        self.assertEqual((response.code, json.loads(body)), (200, {"removed": 1}))
        self.assertEqual(self.entries(service), 0)


# -- the access log -----------------------------------------------------------------


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


class AccessLogTests(TestCase):
    async def test_one_line_per_request_in_order(self) -> None:
        """Every request, proxied or for the proxy's own pages, gets one line:
        time, client, method, URL, status, bytes, duration ms, cache status,
        upstream host."""
        origin, oport = start_origin(self)
        body = _body(12_345, seed=5)
        origin.static("/log-1.0.whl", body)
        log = os.path.abspath(self.mktemp())
        _, pport = start_proxy(self, access_log=log)
        url = f"http://127.0.0.1:{oport}/log-1.0.whl"
        http = client(self, pport)

        async def logged(count: int) -> None:
            # A line is written once its response is over (a body sent from
            # the disk may still be finishing when the client has it): wait
            # for it before the next request, so the lines keep their order.
            await wait_for(lambda: len(_lines(log)) >= count, timeout=30)

        started = time.time()
        await fetch(http, url)
        await logged(1)
        await fetch(http, url)
        await logged(2)
        missing = f"http://127.0.0.1:{oport}/missing.whl"
        await fetch(http, missing)
        await logged(3)
        _, status_body = await own_page(self, pport, "/status.json")
        await logged(4)
        page_bytes = str(len(status_body))
        purge = _purge_path("url", url)
        await own_page(self, pport, purge, "DELETE")
        await logged(5)
        rows = [line.split(" ") for line in _lines(log)]
        upstream = f"127.0.0.1:{oport}"
        self.assertEqual(
            [row[1:6] + row[7:] for row in rows],
            [
                ["127.0.0.1", "GET", url, "200", str(len(body)), "MISS", upstream],
                ["127.0.0.1", "GET", url, "200", str(len(body)), "HIT", upstream],
                ["127.0.0.1", "GET", missing, "404", "9", "MISS", upstream],
                ["127.0.0.1", "GET", "/status.json", "200", page_bytes, "-", "-"],
                ["127.0.0.1", "DELETE", purge, "200", "14", "-", "-"],
            ],
        )
        for row in rows:
            stamp = calendar.timegm(time.strptime(row[0], "%Y-%m-%dT%H:%M:%S"))
            self.assertTrue(started - 2 <= stamp <= time.time() + 1, row)
            self.assertTrue(row[6].isdigit(), row)


class LogRotationTests(TestCase):
    def test_sighup_reopens_the_access_log(self) -> defer.Deferred[None]:
        """logrotate: after the log is renamed and ``twistd`` gets SIGHUP, the
        next request is logged to a new file at the original path (twice in a
        row), and the process keeps running."""
        return defer.Deferred.fromCoroutine(self._rotate())

    async def _rotate(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/rot-1.0.whl", b"r" * 4321)
        log = os.path.abspath(self.mktemp())
        # One process: with several workers the one that answers may not have
        # reopened yet (tests/test_workers.py covers SIGHUP across workers).
        proxy = Twistd(self, self.mktemp(), "--access-log", log, "--workers", "1")
        await proxy.wait_listening()
        http = client(self, proxy.port)
        url = f"http://127.0.0.1:{oport}/rot-1.0.whl"
        for rotation in range(3):
            response, _ = await fetch(http, url)
            self.assertEqual(response.code, 200)
            await wait_for(lambda: len(_lines(log)) >= 1)
            self.assertEqual(len(_lines(log)), 1, _lines(log))
            if rotation == 2:
                break
            os.rename(log, f"{log}.{rotation + 1}")
            os.kill(proxy.process.pid, signal.SIGHUP)
            await wait_for(lambda: os.path.exists(log) or not proxy.running)
            self.assertTrue(proxy.running, proxy.log())
        rotated = [_lines(f"{log}.{n}") for n in (1, 2)] + [_lines(log)]
        self.assertEqual(
            [[line.split(" ")[7] for line in lines] for lines in rotated],
            [["MISS"], ["HIT"], ["HIT"]],
        )
        self.assertTrue(proxy.running, proxy.log())
