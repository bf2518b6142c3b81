"""Mirrors (SPEC 6): prefixes, fallback, rewriting, digests, merging."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from cachingproxy.config import Mirror

from .support import (
    client,
    fetch,
    header,
    parse_raw_response,
    raw_exchange,
    run,
    start_origin,
    start_proxy,
    stored,
)

WHEEL = b"PK\x03\x04 a wheel body " * 500


def simple_page(base: str, name: str, wheel: bytes, digest: str | None = None) -> bytes:
    digest = digest or hashlib.sha256(wheel).hexdigest()
    return (
        f'<!DOCTYPE html><html><body><a href="{base}packages/{name}-1.0-py3-none-any.whl'
        f'#sha256={digest}">{name}-1.0-py3-none-any.whl</a></body></html>'
    ).encode()


def demo_mirror(test: TestCase, served: bytes) -> tuple[Any, str, Any, int]:
    """An origin whose PEP 503 page for ``demo`` publishes WHEEL's digest but
    which serves ``served`` as the wheel, mounted at ``/pypi/`` of an
    in-process proxy: the origin, its base URL, the proxy service and its port."""
    origin, oport = start_origin(test)
    base = f"http://127.0.0.1:{oport}/"
    origin.static(
        "/simple/demo/",
        simple_page(base, "demo", WHEEL),
        headers=[("Content-Type", "text/html")],
    )
    origin.static("/packages/demo-1.0-py3-none-any.whl", served)
    service, pport = start_proxy(test, mirrors=(Mirror("/pypi/", (base,)),))
    return origin, base, service, pport


class MirrorTests(TestCase):
    def test_index_rewritten_and_files_cached(self) -> defer.Deferred[None]:
        """A project page under /pypi/ has its absolute upstream links
        rewritten to the proxy (with the Host the client used); the file
        then comes through the cache: MISS, HIT, one origin request, and
        X-Cache-Upstream names the upstream."""
        return run(self._index_rewritten())

    async def _index_rewritten(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        origin.static(
            "/simple/demo/",
            simple_page(base, "demo", WHEEL),
            headers=[("Content-Type", "text/html")],
        )
        origin.static("/packages/demo-1.0-py3-none-any.whl", WHEEL)
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", (base,)),))
        http = client(self)
        local = f"http://127.0.0.1:{pport}"
        response, body = await fetch(http, f"{local}/pypi/simple/demo/")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "x-cache-upstream"), base)
        self.assertNotIn(base.encode(), body)
        link = f"{local}/pypi/packages/demo-1.0-py3-none-any.whl"
        self.assertIn(link.encode(), body)
        self.assertEqual(response.length, len(body))
        r1, b1 = await fetch(http, link)
        r2, b2 = await fetch(http, link)
        self.assertEqual((b1, b2), (WHEEL, WHEEL))
        self.assertEqual(header(r1, "x-cache"), "MISS")
        self.assertEqual(header(r2, "x-cache"), "HIT")
        self.assertEqual(header(r2, "x-cache-upstream"), base)
        self.assertEqual(origin.count("/packages/demo-1.0-py3-none-any.whl"), 1)

    def test_upstream_named_on_hits_cached_by_forward(self) -> defer.Deferred[None]:
        """A file first cached through the forward path (no mirror involved)
        and then fetched under a mirror prefix is a HIT that still names the
        mirror's upstream in X-Cache-Upstream (SPEC 5), also on the repeat
        hits answered from memory (handler/quick.py)."""
        return run(self._forward_then_mirror())

    async def _forward_then_mirror(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        origin.static("/pkg-1.0.tar.gz", WHEEL)
        service, pport = start_proxy(self, mirrors=(Mirror("/m/", (base,)),))
        forward = (
            f"GET {base}pkg-1.0.tar.gz HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n"
        )
        _, headers, body = parse_raw_response(
            await raw_exchange(self, pport, forward.encode())
        )
        self.assertEqual((headers["x-cache"], body), (["MISS"], WHEEL))
        self.assertNotIn("x-cache-upstream", headers)
        await stored(service, f"{base}pkg-1.0.tar.gz")
        mirrored = f"GET /m/pkg-1.0.tar.gz HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n\r\n"
        seen = []
        for _ in range(3):
            _, headers, body = parse_raw_response(
                await raw_exchange(self, pport, mirrored.encode())
            )
            self.assertEqual(body, WHEEL)
            seen.append((headers["x-cache"], headers.get("x-cache-upstream")))
        self.assertEqual(seen, [(["HIT"], [base])] * 3)
        assert service.proxy is not None and service.proxy.quick is not None
        self.assertEqual(service.proxy.quick.answered, 2)
        self.assertEqual(origin.count("/pkg-1.0.tar.gz"), 1)

    def test_upstream_cache_names_its_own_upstream(self) -> defer.Deferred[None]:
        """Behind another cache (which says ``X-Cache-Upstream`` of its own
        upstream), the mirror names only its own upstream, on a MISS, a HIT
        and a redirect it rewrites (SPEC 5, 6)."""
        return run(self._chained())

    async def _chained(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        theirs = [("X-Cache-Upstream", "https://elsewhere.example/")]
        origin.static("/pkg-1.0.tar.gz", WHEEL, theirs)
        origin.static(
            "/old/pkg.tar.gz", b"", [*theirs, ("Location", "/pkg-1.0.tar.gz")], 301
        )
        _, pport = start_proxy(self, mirrors=(Mirror("/m/", (base,)),))
        seen = []
        for path in ("/m/pkg-1.0.tar.gz", "/m/pkg-1.0.tar.gz", "/m/old/pkg.tar.gz"):
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{pport}\r\n\r\n"
            status, headers, _ = parse_raw_response(
                await raw_exchange(self, pport, request.encode())
            )
            seen.append((status, headers["x-cache"], headers["x-cache-upstream"]))
            if status == 301:
                self.assertEqual(
                    headers["location"], [f"http://127.0.0.1:{pport}/m/pkg-1.0.tar.gz"]
                )
        self.assertEqual(
            seen,
            [(200, ["MISS"], [base]), (200, ["HIT"], [base]), (301, ["MISS"], [base])],
        )

    def test_fallback_on_404_and_refused(self) -> defer.Deferred[None]:
        """The first upstream answering 404 (or refusing connections) makes
        the proxy try the next one."""
        return run(self._fallback())

    async def _fallback(self) -> None:
        first, fport = start_origin(self)
        second, sport = start_origin(self)
        second.static("/packages/x-1.0.tar.gz", b"from second")
        dead = "http://127.0.0.1:1/"
        bases = (dead, f"http://127.0.0.1:{fport}/", f"http://127.0.0.1:{sport}/")
        _, pport = start_proxy(self, mirrors=(Mirror("/m/", bases),))
        response, body = await fetch(
            client(self), f"http://127.0.0.1:{pport}/m/packages/x-1.0.tar.gz"
        )
        self.assertEqual((response.code, body), (200, b"from second"))
        self.assertEqual(header(response, "x-cache-upstream"), bases[2])
        self.assertEqual(first.count("/packages/x-1.0.tar.gz"), 1)

    def test_private_project_wins(self) -> defer.Deferred[None]:
        """Dependency confusion: a project the private (first) index has is
        served from it only, never from the public one."""
        return run(self._private_wins())

    async def _private_wins(self) -> None:
        private, pvport = start_origin(self)
        public, pbport = start_origin(self)
        pv, pb = f"http://127.0.0.1:{pvport}/", f"http://127.0.0.1:{pbport}/"
        private.static(
            "/simple/corp/",
            simple_page(pv, "corp", b"private"),
            headers=[("Content-Type", "text/html")],
        )
        public.static(
            "/simple/corp/",
            simple_page(pb, "corp", b"evil"),
            headers=[("Content-Type", "text/html")],
        )
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", (pv, pb)),))
        _, body = await fetch(
            client(self), f"http://127.0.0.1:{pport}/pypi/simple/corp/"
        )
        self.assertIn(hashlib.sha256(b"private").hexdigest().encode(), body)
        self.assertEqual(public.count("/simple/corp/"), 0)

    def test_root_index_is_the_union(self) -> defer.Deferred[None]:
        """/simple/ lists the projects of every upstream once."""
        return run(self._root_union())

    async def _root_union(self) -> None:
        a, aport = start_origin(self)
        b, bport = start_origin(self)
        a.static(
            "/simple/",
            b'<html><body><a href="/simple/one/">one</a></body></html>',
            headers=[("Content-Type", "text/html")],
        )
        b.static(
            "/simple/",
            b'<html><body><a href="/simple/one/">one</a>'
            b'<a href="/simple/two/">two</a></body></html>',
            headers=[("Content-Type", "text/html")],
        )
        bases = (f"http://127.0.0.1:{aport}/", f"http://127.0.0.1:{bport}/")
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", bases),))
        _, body = await fetch(client(self), f"http://127.0.0.1:{pport}/pypi/simple/")
        self.assertEqual(body.count(b">one</a>"), 1)
        self.assertEqual(body.count(b">two</a>"), 1)
        self.assertIn(f"http://127.0.0.1:{pport}/pypi/simple/two/".encode(), body)

    def test_tampered_artifact_refused(self) -> defer.Deferred[None]:
        """A file whose bytes do not match the digest its index published is
        not stored, and the client never gets it whole."""
        return run(self._tampered())

    async def _tampered(self) -> None:
        _origin, base, service, pport = demo_mirror(self, WHEEL[:-1] + b"X")
        http = client(self)
        local = f"http://127.0.0.1:{pport}"
        await fetch(http, f"{local}/pypi/simple/demo/")
        link = f"{local}/pypi/packages/demo-1.0-py3-none-any.whl"
        with self.assertRaises(ResponseFailed):
            await fetch(http, link)
        assert service.store is not None
        key = f"{base}packages/demo-1.0-py3-none-any.whl"
        self.assertEqual(await service.store.lookup(key), [])
        self.flushLoggedErrors()

    def test_json_and_npm_rewritten(self) -> defer.Deferred[None]:
        """PEP 691 JSON file URLs and npm dist.tarball URLs point at the proxy."""
        return run(self._json())

    async def _json(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        packument = {
            "name": "left-pad",
            "versions": {
                "1.0.0": {
                    "dist": {
                        "tarball": f"{base}left-pad/-/left-pad-1.0.0.tgz",
                        "shasum": "00",
                    }
                }
            },
        }
        origin.static(
            "/left-pad",
            json.dumps(packument).encode(),
            headers=[("Content-Type", "application/json")],
        )
        _, pport = start_proxy(self, mirrors=(Mirror("/npm/", (base,)),))
        _, body = await fetch(client(self), f"http://127.0.0.1:{pport}/npm/left-pad")
        doc = json.loads(body)
        self.assertEqual(
            doc["versions"]["1.0.0"]["dist"]["tarball"],
            f"http://127.0.0.1:{pport}/npm/left-pad/-/left-pad-1.0.0.tgz",
        )
