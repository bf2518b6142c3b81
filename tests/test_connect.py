"""CONNECT (SPEC 7): tunnels byte for byte, and TLS interception with a local CA.

A test CA plays the public PKI: the HTTPS origin's certificate comes from it
and the proxy trusts it through --upstream-ca.  curl is the client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.tls.ca import CA_CERT_FILE

from .support import (
    Curl,
    Origin,
    TrackingSite,
    curl,
    fake_resolver,
    free_port,
    need,
    run,
    start_proxy,
    start_proxy_with,
)
from .test_tls import Authority, HTTPSOrigin

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BODY = b"wheel bytes " * 4096


class ConnectTests(TestCase):
    def setUp(self) -> None:
        need("curl")
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

    async def curl(self, pport: int, url: str, *options: str) -> Curl:
        self.out = self.mktemp()
        return await curl(url, *options, proxy=pport, out=self.out)

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


class TransparentTLSTests(TestCase):
    """--listen-tls: port-443 connections routed by their SNI name."""

    def setUp(self) -> None:
        need("curl")
        from twisted.internet import reactor

        self.public = Authority("test public CA")
        self.public_pem = self.public.write(self.mktemp())
        origin = Origin()
        origin.static("/pkg-1.0-py3-none-any.whl", BODY)
        self.origin = origin
        site = TrackingSite(origin)
        options = self.public.server_options(dns=("pkg.test", "other.test"), ips=())
        try:
            port = reactor.listenSSL(443, site, options, interface="127.0.0.5")  # type: ignore[attr-defined]
        except CannotListenError as e:
            raise SkipTest(f"cannot listen on 127.0.0.5:443 ({e})") from None

        async def stop() -> None:
            await port.stopListening()
            await site.close_all()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))

    async def curl(self, tls_port: int, host: str, cacert: str) -> Curl:
        self.out = self.mktemp()
        return await curl(
            f"https://{host}/pkg-1.0-py3-none-any.whl",
            *("--connect-to", f"{host}:443:127.0.0.1:{tls_port}"),
            *("--cacert", cacert),
            out=self.out,
        )

    def test_sni_intercepted_and_tunnelled(self) -> defer.Deferred[None]:
        """An intercepted SNI name is cached (MISS, HIT, one origin request);
        another name is tunnelled to the origin untouched (the client
        verifies the origin's own certificate)."""
        return run(self._sni())

    async def _sni(self) -> None:
        tls_port = free_port()
        service, _ = start_proxy_with(
            self,
            resolve=fake_resolver(
                {"pkg.test": ["127.0.0.5"], "other.test": ["127.0.0.5"]}
            ),
            allow_upstream=(LOOPBACK,),
            upstream_ca=self.public_pem,
            intercept=("pkg.test",),
            listen_tls=(f"tcp:{tls_port}:interface=127.0.0.1",),
        )
        proxy_ca = os.path.join(service.config.cache_dir, CA_CERT_FILE)
        seen = []
        for _ in range(2):
            result = await self.curl(tls_port, "pkg.test", proxy_ca)
            self.assertEqual(result.code, 0, result.output)
            with open(self.out, "rb") as f:
                self.assertEqual(f.read(), BODY)
            seen += [
                line.split(":", 1)[1].strip()
                for line in result.output.splitlines()
                if line.lower().startswith("x-cache:")
            ]
        self.assertEqual(seen, ["MISS", "HIT"])
        self.assertEqual(self.origin.count(), 1)
        result = await self.curl(tls_port, "other.test", self.public_pem)
        self.assertEqual(result.code, 0, result.output)
        self.assertNotIn("x-cache", result.output.lower())
        self.assertEqual(self.origin.count(), 2)


class ServerNameTests(TestCase):
    def test_parse_client_hello(self) -> None:
        """The SNI name is read from a real ClientHello; a partial hello asks
        for more bytes; plain HTTP is not TLS."""
        from OpenSSL import SSL

        from cachingproxy.tls.sni import NotTLS, server_name

        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        connection.set_tlsext_host_name(b"Files.PythonHosted.org")
        connection.set_connect_state()
        with contextlib.suppress(SSL.WantReadError):
            connection.do_handshake()
        hello = connection.bio_read(65536)
        self.assertEqual(server_name(hello), "files.pythonhosted.org")
        self.assertIsNone(server_name(hello[:20]))
        self.assertRaises(NotTLS, server_name, b"GET / HTTP/1.1\r\n\r\n")
