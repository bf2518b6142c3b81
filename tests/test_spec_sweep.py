"""Black-box checks of SPEC 3-5 that no other test pins end to end: redirects
and 410s stored with their TTLs, the cache key's normalisation on the wire,
credentials under the ``origin`` rule, stale-on-error refused for origin
entries that must be revalidated, and hop-by-hop headers on the paths other
tests do not take (responses relayed unstored, mirrors, request bodies).

A real in-process proxy, a real twisted.web origin on 127.0.0.1, raw
requests; assertions on what the origin saw and what the client got.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from cachingproxy import __version__
from cachingproxy.config import Mirror

from .support import (
    Origin,
    downloads_done,
    fake_resolver,
    parse_raw_response,
    raw_exchange,
    start_origin,
    start_proxy,
    start_proxy_with,
    stored,
)

VIA = f"1.1 localhost (cachingproxy/{__version__})"


async def _get(
    test: TestCase, pport: int, target: str, host: str, *headers: str
) -> tuple[int, dict[str, list[str]], bytes]:
    """One raw GET (``target`` as sent, ``Host: host``) on its own connection."""
    head = "".join(f"{h}\r\n" for h in headers)
    data = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{head}Connection: close\r\n\r\n"
    return parse_raw_response(await raw_exchange(test, pport, data.encode("latin-1")))


def _redirect(status: int, to: str) -> Any:
    def handler(request: Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Location", to.encode())
        request.setHeader(b"Content-Length", b"5")
        return b"moved"

    return handler


class StoredStatusTests(TestCase):
    """SPEC 3: 301/308 stored with the index TTL, 404/410 with
    --negative-ttl, other statuses passed through unstored."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        for status in (301, 302, 307, 308):
            path = f"/r{status}/pkg-1.0.tar.gz"
            self.origin.route(path, _redirect(status, "/elsewhere/pkg-1.0.tar.gz"))

        def gone(request: Request) -> bytes:
            request.setResponseCode(410)
            return b"gone"

        self.origin.route("/gone-1.0.tar.gz", gone)

    async def _twice(self, pport: int, service: Any, path: str) -> list[Any]:
        url = f"http://127.0.0.1:{self.oport}{path}"
        seen = []
        for _ in range(2):
            status, headers, body = await _get(
                self, pport, url, f"127.0.0.1:{self.oport}"
            )
            seen.append((status, headers["x-cache"], headers.get("location"), body))
            await downloads_done(service)
        return seen

    async def test_permanent_redirects_stored_for_the_index_ttl(self) -> None:
        """A 301 or 308 for a package file is a HIT the second time (with its
        Location); with --index-ttl 0 it is asked for again; a 302 or 307 is
        never stored."""
        service, pport = start_proxy(self)
        short, sport = start_proxy(self, index_ttl=0.0)
        where = ["/elsewhere/pkg-1.0.tar.gz"]
        for status in (301, 308):
            path = f"/r{status}/pkg-1.0.tar.gz"
            self.assertEqual(
                await self._twice(pport, service, path),
                [
                    (status, ["MISS"], where, b"moved"),
                    (status, ["HIT"], where, b"moved"),
                ],
            )
            self.assertEqual(self.origin.count(path), 1)
            second = await self._twice(sport, short, path)
            self.assertNotIn(["HIT"], [cache for _, cache, _, _ in second])
            self.assertEqual(self.origin.count(path), 3)
        for status in (302, 307):
            path = f"/r{status}/pkg-1.0.tar.gz"
            self.assertEqual(
                await self._twice(pport, service, path),
                [(status, ["MISS"], where, b"moved")] * 2,
            )
            self.assertEqual(self.origin.count(path), 2)

    async def test_410_stored_for_the_negative_ttl(self) -> None:
        """A 410 is a HIT within --negative-ttl; --negative-ttl 0 stores
        none."""
        service, pport = start_proxy(self)
        self.assertEqual(
            await self._twice(pport, service, "/gone-1.0.tar.gz"),
            [(410, ["MISS"], None, b"gone"), (410, ["HIT"], None, b"gone")],
        )
        off, oport = start_proxy(self, negative_ttl=0.0)
        self.assertEqual(
            await self._twice(oport, off, "/gone-1.0.tar.gz"),
            [(410, ["MISS"], None, b"gone")] * 2,
        )
        self.assertEqual(self.origin.count("/gone-1.0.tar.gz"), 3)


class CacheKeyTests(TestCase):
    """SPEC 3: the key is the normalised URL, whichever way a client spells
    it and whichever route the request took."""

    async def test_spellings_share_one_entry(self) -> None:
        """Upper-case scheme and host, a fragment, and a transparent request
        whose Host is spelt in capitals all hit the entry the first request
        stored: one origin request."""
        origin, oport = start_origin(self)
        origin.static("/p-1.0.whl", b"w" * 700)
        names = {"files.test": ["127.0.0.1"]}
        service, pport = start_proxy_with(self, resolve=fake_resolver(names))
        host = f"files.test:{oport}"
        status, headers, body = await _get(
            self, pport, f"http://{host}/p-1.0.whl", host
        )
        self.assertEqual(
            (status, headers["x-cache"], body), (200, ["MISS"], b"w" * 700)
        )
        await stored(service, f"http://{host}/p-1.0.whl")
        spellings = [
            (f"HTTP://FILES.TEST:{oport}/p-1.0.whl", host.upper()),
            (f"http://Files.Test:{oport}/p-1.0.whl#section", host),
            ("/p-1.0.whl", f"Files.TEST:{oport}"),  # transparent
        ]
        for target, host_header in spellings:
            status, headers, body = await _get(self, pport, target, host_header)
            self.assertEqual(
                (status, headers["x-cache"], body),
                (200, ["HIT"], b"w" * 700),
                target,
            )
        self.assertEqual(origin.count(), 1)
        self.assertEqual(origin.requests[0].path, "/p-1.0.whl")


class CredentialsTests(TestCase):
    async def test_never_stored_under_the_origin_rule(self) -> None:
        """A request with Authorization or Cookie is never stored, even for
        a page the origin calls ``public, max-age=600`` (RFC 9111 would let
        a shared cache keep it; SPEC 3 does not)."""
        origin, oport = start_origin(self)
        origin.static(
            "/page.html", b"public page", [("Cache-Control", "public, max-age=600")]
        )
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/page.html"
        host = f"127.0.0.1:{oport}"
        for credential in ("Authorization: Bearer t", "Cookie: s=1"):
            for _ in range(2):
                status, headers, body = await _get(self, pport, url, host, credential)
                self.assertEqual(
                    (status, headers["x-cache"], body),
                    (200, ["BYPASS"], b"public page"),
                )
                await downloads_done(service)
            assert service.store is not None
            self.assertEqual(await service.store.lookup(url), [], credential)
        self.assertEqual(origin.count(), 4)
        self.assertEqual(
            [r.header("authorization") or r.header("cookie") for r in origin.requests],
            ["Bearer t", "Bearer t", "s=1", "s=1"],
        )


class StaleOnErrorOriginTests(TestCase):
    """SPEC 4: stale-on-error for ``origin`` entries, unless the origin said
    must-revalidate or no-cache."""

    async def _stale_then_down(self, cache_control: str) -> tuple[int, str, bytes]:
        origin, oport = start_origin(self)
        # Age makes the entry stale the moment it is stored; the ETag makes
        # it storable whatever its freshness.
        origin.static(
            "/doc.html",
            b"the document",
            [("Cache-Control", cache_control), ("Age", "100")],
            etag='"d1"',
        )
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/doc.html"
        host = f"127.0.0.1:{oport}"
        status, headers, body = await _get(self, pport, url, host)
        self.assertEqual(
            (status, headers["x-cache"], body), (200, ["MISS"], b"the document")
        )
        await stored(service, url)
        origin.static("/doc.html", b"down for maintenance", status=503)
        status, headers, body = await _get(self, pport, url, host)
        self.assertEqual(origin.count(), 2)
        self.assertEqual(origin.requests[1].header("if-none-match"), '"d1"')
        return status, headers["x-cache"][0], body

    async def test_served_stale(self) -> None:
        """A plain ``max-age`` entry is served STALE when the origin fails."""
        self.assertEqual(
            await self._stale_then_down("max-age=10"), (200, "STALE", b"the document")
        )

    async def test_not_for_must_revalidate_or_no_cache(self) -> None:
        """``must-revalidate``, ``proxy-revalidate`` and ``no-cache`` entries
        are not served stale: the client gets the origin's 503 and body."""
        for cache_control in (
            "max-age=10, must-revalidate",
            "max-age=10, proxy-revalidate",
            "no-cache",
        ):
            got = await self._stale_then_down(cache_control)
            self.assertEqual(got, (503, "MISS", b"down for maintenance"), cache_control)


class HopByHopTests(TestCase):
    """SPEC 5: hop-by-hop headers (and those named by Connection) cross the
    proxy in neither direction on any path; no X-Forwarded-For is added;
    Content-Encoding is neither added nor stripped."""

    HOP_REQUEST = (
        "Connection: X-Foo",
        "X-Foo: 1",
        "Keep-Alive: 300",
        "Proxy-Connection: keep-alive",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "TE: trailers",
        "Upgrade: websocket",
        "X-Kept: yes",
    )
    HOP_RESPONSE = (
        ("Connection", "X-Bar"),
        ("X-Bar", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Agent", "origin"),
        ("Upgrade", "h2c"),
        ("Trailer", "X-Sum"),
        ("X-End", "kept"),
        ("Content-Encoding", "gzip"),
    )
    DROPPED_REQUEST = (
        "x-foo",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
        "x-forwarded-for",
    )
    DROPPED_RESPONSE = (
        "x-bar",
        "keep-alive",
        "proxy-authenticate",
        "proxy-agent",
        "upgrade",
        "trailer",
    )

    def setUp(self) -> None:
        self.origin = Origin()
        self.origin, self.oport = start_origin(self, self.origin)
        self.gz = bytes.fromhex("1f8b0800000000000003") + b"tarball" * 50

        def reply(request: Request) -> bytes:
            for name, value in self.HOP_RESPONSE:
                request.setHeader(name.encode(), value.encode())
            request.setHeader(b"Content-Length", b"%d" % len(self.gz))
            return self.gz

        for path in ("/h-1.0.tar.gz", "/m/h-2.0.tar.gz", "/upload"):
            self.origin.route(path, reply)
        self.service, self.pport = start_proxy(
            self, mirrors=(Mirror("/m/", (f"http://127.0.0.1:{self.oport}/m/",)),)
        )

    def _check_response(self, what: str, headers: dict[str, list[str]]) -> None:
        for name in self.DROPPED_RESPONSE:
            self.assertNotIn(name, headers, what)
        self.assertNotIn("x-bar", " ".join(headers.get("connection", [])).lower())
        self.assertEqual(headers["x-end"], ["kept"], what)
        self.assertEqual(headers["content-encoding"], ["gzip"], what)
        self.assertEqual(headers["via"], [VIA], what)

    def _check_requests(self) -> None:
        for seen in self.origin.requests:
            for name in self.DROPPED_REQUEST:
                self.assertIsNone(seen.header(name), (seen.method, seen.path, name))
            self.assertNotIn("x-foo", (seen.header("connection") or "").lower())
            self.assertEqual(seen.header("x-kept"), "yes", seen.path)
            self.assertEqual(seen.header("via"), VIA, seen.path)
            self.assertIsNone(seen.header("accept-encoding"), seen.path)

    async def test_forward_and_mirror_miss_and_hit(self) -> None:
        """A forward and a mirrored package: on the MISS and on the HIT the
        client gets the end-to-end headers only, the gzip body byte for byte
        with its Content-Encoding; the origin saw no hop-by-hop header."""
        host = f"127.0.0.1:{self.oport}"
        requests = [
            (f"http://{host}/h-1.0.tar.gz", host, f"http://{host}/h-1.0.tar.gz"),
            (
                "/m/h-2.0.tar.gz",
                f"127.0.0.1:{self.pport}",
                f"http://{host}/m/h-2.0.tar.gz",
            ),
        ]
        for target, host_header, key in requests:
            for cache in ("MISS", "HIT"):
                status, headers, body = await _get(
                    self, self.pport, target, host_header, *self.HOP_REQUEST
                )
                self.assertEqual(
                    (status, headers["x-cache"], body), (200, [cache], self.gz)
                )
                self._check_response(f"{target} {cache}", headers)
                await stored(self.service, key)
        self.assertEqual(self.origin.count(), 2)
        self._check_requests()

    async def test_request_with_a_body_relayed(self) -> None:
        """A POST passed through unstored: its body arrives, the origin sees
        no hop-by-hop header, the client none of the origin's."""
        head = "".join(f"{h}\r\n" for h in self.HOP_REQUEST)
        data = (
            f"POST http://127.0.0.1:{self.oport}/upload HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\n{head}Content-Length: 4\r\n"
            "Connection: close\r\n\r\nbody"
        )
        status, headers, body = parse_raw_response(
            await raw_exchange(self, self.pport, data.encode())
        )
        self.assertEqual((status, headers["x-cache"], body), (200, ["BYPASS"], self.gz))
        self._check_response("POST", headers)
        self.assertEqual(self.origin.count(), 1)
        self.assertEqual(self.origin.requests[0].header("content-length"), "4")
        self._check_requests()


class MirrorInvalidationTests(TestCase):
    async def test_publish_through_a_mirror_is_seen_at_once(self) -> None:
        """``npm publish`` through a mirror prefix (a PUT, then a DELETE of a
        version as ``npm unpublish`` does) invalidates the stored packument:
        the next GET -- even one that would be a repeat hit answered from
        memory -- fetches the new one (SPEC 3, RFC 9111 4.4)."""
        origin, oport = start_origin(self)
        versions: list[str] = []

        def packument(request: Request) -> bytes:
            if request.method in (b"PUT", b"DELETE"):
                if request.method == b"PUT":
                    versions.append(f"1.{len(versions)}.0")
                else:
                    versions.pop()
                request.setResponseCode(201 if request.method == b"PUT" else 200)
                return b'{"ok":true}'
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"name": "pkg", "versions": versions}).encode()

        origin.route("/npm/pkg", packument)
        service, pport = start_proxy(
            self, mirrors=(Mirror("/m/", (f"http://127.0.0.1:{oport}/npm/",)),)
        )
        key = f"http://127.0.0.1:{oport}/npm/pkg"
        get = f"GET /m/pkg HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n\r\n".encode()

        async def install() -> tuple[str, list[str]]:
            _, headers, body = parse_raw_response(await raw_exchange(self, pport, get))
            await stored(service, key)
            return headers["x-cache"][0], json.loads(body)["versions"]

        async def send(method: str) -> int:
            data = (
                f"{method} /m/pkg HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            status, _, _ = parse_raw_response(
                await raw_exchange(self, pport, data.encode())
            )
            return status

        seen = [await install() for _ in range(3)]
        self.assertEqual(seen, [("MISS", []), ("HIT", []), ("HIT", [])])
        self.assertEqual(await send("PUT"), 201)
        self.assertEqual(await install(), ("MISS", ["1.0.0"]))
        self.assertEqual(await install(), ("HIT", ["1.0.0"]))
        self.assertEqual(await send("DELETE"), 200)
        self.assertEqual(await install(), ("MISS", []))
        self.assertEqual(origin.count("/npm/pkg"), 5)
