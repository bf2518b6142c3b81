"""--upstream-proxy: upstream requests through a parent HTTP proxy."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import client, fetch, header, run, start_origin, start_proxy
from .test_tls import Authority, HTTPSOrigin

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BODY = b"a wheel " * 2048


class ParentProxyTests(TestCase):
    def parent(self, **overrides: Any) -> int:
        """Another cachingproxy playing the parent."""
        values: dict[str, Any] = {
            "names": ("parent.test",),
            "allow_upstream": (LOOPBACK,),
        }
        values.update(overrides)
        self.parent_service, port = start_proxy(self, **values)
        return port

    def test_http_through_parent(self) -> defer.Deferred[None]:
        """Plain HTTP goes through the parent (both proxies in Via at the
        origin) and is cached by the child: MISS, then HIT without the
        parent or the origin."""
        return run(self._http())

    async def _http(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", BODY)
        parent = self.parent()
        _, cport = start_proxy(
            self,
            names=("child.test",),
            allow_upstream=(LOOPBACK,),
            upstream_proxy=f"http://127.0.0.1:{parent}",
        )
        http = client(self, cport)
        url = f"http://127.0.0.1:{oport}/pkg-1.0.whl"
        r1, b1 = await fetch(http, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((b1, b2), (BODY, BODY))
        self.assertEqual([header(r1, "x-cache"), header(r2, "x-cache")][1], "HIT")
        self.assertEqual(origin.count("/pkg-1.0.whl"), 1)
        via = origin.requests[0].header("via") or ""
        self.assertIn("child.test", via)
        self.assertIn("parent.test", via)

    def test_https_through_parent_tunnel(self) -> defer.Deferred[None]:
        """HTTPS goes through a CONNECT to the parent, with the origin's
        certificate verified by the child (which then caches the file)."""
        return run(self._https())

    async def _https(self) -> None:
        public = Authority("test public CA")
        https = HTTPSOrigin(self, public.server_options())
        https.origin.static("/pkg-1.0.whl", BODY)
        parent = self.parent(connect_ports=frozenset({https.port}))
        _, cport = start_proxy(
            self,
            names=("child.test",),
            allow_upstream=(LOOPBACK,),
            upstream_ca=public.write(self.mktemp()),
            upstream_proxy=f"http://127.0.0.1:{parent}",
            upstream_ports=frozenset({80, 443, https.port}),
        )
        http = client(self, cport)
        url = https.url("/pkg-1.0.whl")
        r1, b1 = await fetch(http, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((r1.code, b1, b2), (200, BODY, BODY))
        self.assertEqual(header(r2, "x-cache"), "HIT")
        self.assertEqual(https.origin.count("/pkg-1.0.whl"), 1)
        site = self.parent_service.site
        assert site is not None
        tunnels = [c for c in site.channels if c.taken_over is not None]
        self.assertEqual(len(tunnels), 1, "the child did not CONNECT via the parent")

    def test_ip_literals_still_checked(self) -> defer.Deferred[None]:
        """With a parent proxy, an IP literal outside the policy is refused
        (403) before anything is sent to the parent."""
        return run(self._literal())

    async def _literal(self) -> None:
        parent_origin, pport = start_origin(self)
        _, cport = start_proxy(
            self,
            names=("child.test",),
            allow_upstream=(),
            upstream_proxy=f"http://127.0.0.1:{pport}",
        )
        response, _ = await fetch(
            client(self, cport), "http://169.254.169.254/latest/meta-data/"
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(parent_origin.count(), 0)
