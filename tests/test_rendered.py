"""Index documents rewritten once (issue 11): the rewritten form of a stored
document is kept in the store and sent like any stored body; a purge or a
refresh of the entry drops it; the digests it publishes survive a restart."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from cachingproxy.config import Mirror
from cachingproxy.mirror import filter as mirror_filter
from cachingproxy.mirror.mirrors import MirrorTable
from cachingproxy.mirror.rendered import FROM, keys_of
from cachingproxy.mirror.rewrite import rewrite

from .support import (
    client,
    fetch,
    free_port,
    header,
    run,
    start_origin,
    start_proxy,
)

TARBALL = b"\x1f\x8b a tarball " * 300


def packument(base: str, versions: int, tarball: bytes = TARBALL) -> bytes:
    """An npm packument whose every version publishes ``tarball``'s sha1."""
    sha1 = hashlib.sha1(tarball).hexdigest()
    return json.dumps(
        {
            "name": "pkg",
            "versions": {
                f"1.0.{i}": {
                    "version": f"1.0.{i}",
                    "dist": {"tarball": f"{base}pkg/-/pkg-1.0.{i}.tgz", "shasum": sha1},
                }
                for i in range(versions)
            },
        }
    ).encode()


def simple_page(base: str, files: int) -> bytes:
    links = "".join(
        f'<a href="{base}packages/demo-{i}.whl#sha256={i:064x}">demo-{i}.whl</a>\n'
        for i in range(files)
    )
    return f"<!DOCTYPE html><html><body>{links}</body></html>".encode()


class RewrittenOnceTests(TestCase):
    def setUp(self) -> None:
        self.rewrites = 0
        original = mirror_filter.rewrite

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.rewrites += 1
            return original(*args, **kwargs)

        self.patch(mirror_filter, "rewrite", counting)
        self.origin, oport = start_origin(self)
        self.base = f"http://127.0.0.1:{oport}/"
        self.mirrors = (Mirror("/m/", (self.base,)),)

    def expected(self, body: bytes, kind: str, path: str, local: str) -> bytes:
        out, _ = rewrite(body, kind, self.base + path, MirrorTable(self.mirrors), local)
        return out

    def test_packument_and_page(self) -> defer.Deferred[None]:
        """An npm packument and a PEP 503 page: the origin sees one request
        each, the rewrite runs once per document and client base URL, and
        every hit sends exactly the rewritten bytes (HEAD its length)."""
        return run(self._both())

    async def _both(self) -> None:
        documents = [
            ("pkg", packument(self.base, 300), "application/json", "json"),
            ("simple/demo/", simple_page(self.base, 500), "text/html", "html"),
        ]
        for path, body, content_type, _ in documents:
            self.origin.static(
                "/" + path, body, headers=[("Content-Type", content_type)]
            )
        service, pport = start_proxy(self, mirrors=self.mirrors)
        http = client(self)
        for n, (path, body, _, kind) in enumerate(documents):
            for local in (f"http://127.0.0.1:{pport}", f"http://localhost:{pport}"):
                want = self.expected(body, kind, path, local)
                self.assertIn(f"{local}/m/".encode(), want)
                caches = []
                for _ in range(3):
                    response, got = await fetch(http, f"{local}/m/{path}")
                    self.assertEqual(response.code, 200)
                    self.assertEqual(got, want)
                    self.assertEqual(response.length, len(want))
                    caches.append(header(response, "x-cache"))
                response, got = await fetch(http, f"{local}/m/{path}", method="HEAD")
                self.assertEqual(header(response, "content-length"), str(len(want)))
                self.assertEqual(got, b"")
                self.assertIn(caches, (["MISS", "HIT", "HIT"], ["HIT"] * 3))
            self.assertEqual(self.origin.count("/" + path), 1)
            # One rewrite per client base URL, whatever the number of hits.
            self.assertEqual(self.rewrites, 2 * (n + 1))
        assert service.store is not None
        rewritten, _ = keys_of(self.base + "pkg")
        self.assertEqual(len(await service.store.lookup(rewritten)), 2)

    def test_purge_drops_the_rewritten_form(self) -> defer.Deferred[None]:
        return run(self._purge())

    async def _purge(self) -> None:
        body = packument(self.base, 50)
        self.origin.static("/pkg", body, headers=[("Content-Type", "application/json")])
        service, pport = start_proxy(self, mirrors=self.mirrors)
        assert service.store is not None and service.proxy is not None
        http = client(self)
        url = f"http://127.0.0.1:{pport}/m/pkg"
        for _ in range(2):
            await fetch(http, url)
        rewritten, digests = keys_of(self.base + "pkg")
        self.assertEqual(len(await service.store.lookup(rewritten)), 1)
        self.assertEqual(len(await service.store.lookup(digests)), 1)
        await service.proxy.purge_url(self.base + "pkg")
        self.assertEqual(await service.store.lookup(rewritten), [])
        self.assertEqual(await service.store.lookup(digests), [])
        response, got = await fetch(http, url)
        self.assertEqual(header(response, "x-cache"), "MISS")
        self.assertEqual(got, self.expected(body, "json", "pkg", url[: -len("/m/pkg")]))
        self.assertEqual(self.origin.count("/pkg"), 2)
        self.assertEqual(self.rewrites, 2)

    def test_refresh_replaces_the_rewritten_form(self) -> defer.Deferred[None]:
        """The upstream publishes a new document: once the entry is
        refreshed, hits send the new document rewritten (never the stale
        form), and one form is kept, made from the new body."""
        return run(self._refresh())

    async def _refresh(self) -> None:
        old, new = packument(self.base, 20), packument(self.base, 30)
        current = [old]
        self.origin.route(
            "/pkg",
            lambda request: (
                request.setHeader(b"Content-Type", b"application/json"),
                current[0],
            )[1],
        )
        service, pport = start_proxy(self, mirrors=self.mirrors, index_ttl=0.0)
        assert service.store is not None
        local = f"http://127.0.0.1:{pport}"
        http = client(self)
        _, got = await fetch(http, f"{local}/m/pkg")
        self.assertEqual(got, self.expected(old, "json", "pkg", local))
        current[0] = new
        _, got = await fetch(http, f"{local}/m/pkg")
        self.assertEqual(got, self.expected(new, "json", "pkg", local))
        (entry,) = await service.store.lookup(self.base + "pkg")
        rewritten, _ = keys_of(self.base + "pkg")
        (form,) = await service.store.lookup(rewritten)
        self.assertEqual(form.header(FROM), entry.digest)
        self.assertEqual(self.origin.count("/pkg"), 2)

    def test_digests_survive_a_restart(self) -> defer.Deferred[None]:
        """A process that sends a stored form without rewriting it still
        knows the digests the document published: a tampered tarball is
        refused."""
        return run(self._restart())

    async def _restart(self) -> None:
        self.origin.static(
            "/pkg",
            packument(self.base, 5),
            headers=[("Content-Type", "application/json")],
        )
        self.origin.static("/pkg/-/pkg-1.0.3.tgz", TARBALL[:-1] + b"X")
        # The same address after the restart: the same client base URL.
        listen = (f"tcp:{free_port()}:interface=127.0.0.1",)
        first, pport = start_proxy(self, mirrors=self.mirrors, listen=listen)
        cache_dir = first.config.cache_dir
        await fetch(client(self), f"http://127.0.0.1:{pport}/m/pkg")
        await first.stopService()
        self.assertEqual(self.rewrites, 1)
        second, pport = start_proxy(
            self, mirrors=self.mirrors, cache_dir=cache_dir, listen=listen
        )
        http = client(self)
        local = f"http://127.0.0.1:{pport}"
        response, _ = await fetch(http, f"{local}/m/pkg")
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(self.rewrites, 1)  # sent as stored, not rewritten
        with self.assertRaises(ResponseFailed):
            await fetch(http, f"{local}/m/pkg/-/pkg-1.0.3.tgz")
        assert second.store is not None
        self.assertEqual(
            await second.store.lookup(self.base + "pkg/-/pkg-1.0.3.tgz"), []
        )
        self.flushLoggedErrors()
