"""CONNECT (SPEC 7): tunnels byte for byte, and TLS interception with a local CA.

A test CA plays the public PKI: the HTTPS origin's certificate comes from it
and the proxy trusts it through --upstream-ca.  curl is the client.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.ca import CA_CERT_FILE

from .support import ProcessResult, run_process, start_proxy
from .test_tls import Authority, HTTPSOrigin

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BODY = b"wheel bytes " * 4096


def run(coroutine: Any) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(coroutine)


class ConnectTests(TestCase):
    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed (.ci/run installs it)")
        self.public = Authority("test public CA")
        self.public_pem = self.public.write(self.mktemp())
        self.https = HTTPSOrigin(self, self.public.server_options())
        self.https.origin.static("/pkg-1.0-py3-none-any.whl", BODY)

    def proxy(self, **overrides: Any) -> tuple[Any, int]:
        values: dict[str, Any] = {
            "allow_upstream": (LOOPBACK,),
            "upstream_ca": self.public_pem,
            "connect_ports": frozenset({self.https.port}),
        }
        values.update(overrides)
        return start_proxy(self, **values)

    async def curl(self, pport: int, url: str, *options: str) -> ProcessResult:
        out = self.mktemp()
        self.out = out
        return await run_process(
            [
                "curl",
                "-s",
                "-S",
                "-D",
                "-",
                "-o",
                out,
                "--noproxy",
                "",
                "--proxy",
                f"http://127.0.0.1:{pport}",
                *options,
                url,
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            timeout=30,
        )

    def body(self) -> bytes:
        with open(self.out, "rb") as f:
            return f.read()

    def test_tunnel_byte_for_byte(self) -> defer.Deferred[None]:
        """A host that is not intercepted is tunnelled: the client does TLS
        with the origin itself (it trusts the origin's CA, not the proxy's),
        nothing is cached, and each request reaches the origin."""
        return run(self._tunnel())

    async def _tunnel(self) -> None:
        _, pport = self.proxy()
        url = self.https.url("/pkg-1.0-py3-none-any.whl")
        for _ in range(2):
            result = await self.curl(pport, url, "--cacert", self.public_pem)
            self.assertEqual(result.code, 0, result.output)
            self.assertEqual(self.body(), BODY)
            self.assertNotIn("x-cache", result.output.lower().split("\r\n\r\n")[-2])
        self.assertEqual(self.https.origin.count("/pkg-1.0-py3-none-any.whl"), 2)

    def test_intercepted_miss_then_hit(self) -> defer.Deferred[None]:
        """An intercepted host is served from the cache inside the tunnel:
        MISS then HIT, one origin request, the client trusting the proxy's CA."""
        return run(self._intercepted())

    async def _intercepted(self) -> None:
        service, pport = self.proxy(intercept=("localhost",))
        proxy_ca = os.path.join(service.config.cache_dir, CA_CERT_FILE)
        url = self.https.url("/pkg-1.0-py3-none-any.whl")
        caches = []
        for _ in range(2):
            result = await self.curl(pport, url, "--cacert", proxy_ca)
            self.assertEqual(result.code, 0, result.output)
            self.assertEqual(self.body(), BODY)
            caches.append(
                [
                    line.split(":", 1)[1].strip()
                    for line in result.output.splitlines()
                    if line.lower().startswith("x-cache:")
                ]
            )
        self.assertEqual(caches, [["MISS"], ["HIT"]])
        self.assertEqual(self.https.origin.count("/pkg-1.0-py3-none-any.whl"), 1)

    def test_untrusted_proxy_ca_fails(self) -> defer.Deferred[None]:
        """A client that does not trust the proxy's CA fails the handshake
        (curl exit 60) instead of getting the file."""
        return run(self._untrusted())

    async def _untrusted(self) -> None:
        _, pport = self.proxy(intercept=("localhost",))
        url = self.https.url("/pkg-1.0-py3-none-any.whl")
        result = await self.curl(pport, url, "--cacert", self.public_pem)
        self.assertEqual(result.code, 60, result.output)
        self.assertEqual(self.https.origin.count(), 0)

    def test_bad_upstream_certificate_is_502(self) -> defer.Deferred[None]:
        """Inside an intercepted tunnel, an origin whose certificate the proxy
        cannot verify gives 502 and nothing is cached."""
        return run(self._bad_upstream())

    async def _bad_upstream(self) -> None:
        service, pport = self.proxy(intercept=("localhost",), upstream_ca=None)
        proxy_ca = os.path.join(service.config.cache_dir, CA_CERT_FILE)
        url = self.https.url("/pkg-1.0-py3-none-any.whl")
        result = await self.curl(pport, url, "--cacert", proxy_ca)
        self.assertIn("HTTP/1.1 502", result.output)
        assert service.store is not None
        self.assertEqual(service.store.usage().entries, 0)

    def test_connect_refusals(self) -> defer.Deferred[None]:
        """CONNECT to a port outside --connect-ports, or to a private address
        --allow-upstream does not cover, is 403."""
        return run(self._refusals())

    async def _refusals(self) -> None:
        _, pport = self.proxy(allow_upstream=())
        url = self.https.url("/pkg-1.0-py3-none-any.whl")
        result = await self.curl(pport, url, "--cacert", self.public_pem)
        self.assertIn("HTTP/1.1 403", result.output)
        result = await self.curl(
            pport, "https://127.0.0.1:22/", "--cacert", self.public_pem
        )
        self.assertIn("HTTP/1.1 403", result.output)
        self.assertEqual(self.https.origin.count(), 0)
