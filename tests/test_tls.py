"""Upstream HTTPS verification (SPEC 7): certificates and host names are
checked against the system store plus --upstream-ca; failures are 502 and
never cached; a TLS failure on revalidation serves the stale entry.

A test CA and server certificates are minted at test time; the HTTPS origin
runs in-process on 127.0.0.1.  Clients use the proxy like ``http_proxy``
for an https URL: an absolute-form ``GET https://…`` over plain HTTP.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from .support import (
    Origin,
    TrackingSite,
    cert_pem,
    client,
    fake_resolver,
    fetch,
    header,
    key_pem,
    parse_raw_response,
    raw_exchange,
    run,
    self_signed,
    start_proxy_with,
    stored,
)

RESOLVE = fake_resolver({"localhost": ["127.0.0.1"]})


class Authority:
    """A throw-away CA that signs server certificates."""

    def __init__(self, name: str = "cachingproxy test CA") -> None:
        self.cert, self.key = self_signed(name)

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def write(self, path: str) -> str:
        with open(path, "wb") as f:
            f.write(self.pem)
        return path

    def server_options(
        self,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
    ) -> CertificateOptions:
        """TLS server options with a certificate for ``dns`` names and ``ips``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ips)[0])])
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        pem = cert_pem(cert) + key_pem(key)
        return PrivateCertificate.loadPEM(pem).options()


@implementer(IOpenSSLContextFactory)
class _SwitchableContext:
    """An old-style context factory whose certificate can be changed between
    connections (every new connection asks for a context)."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> SSL.Context:  # noqa: N802
        return self.options.getContext()


class HTTPSOrigin:
    """An in-process HTTPS origin on 127.0.0.1 with a switchable certificate."""

    def __init__(self, test: TestCase, options: CertificateOptions) -> None:
        self.origin = Origin()
        self.site = TrackingSite(self.origin)
        self.context = _SwitchableContext(options)
        self._port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, self.site, self.context, interface="127.0.0.1"
        )
        self.port: int = self._port.getHost().port

        async def stop() -> None:
            await self._port.stopListening()
            await self.site.close_all()

        test.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    async def switch(self, options: CertificateOptions) -> None:
        """Serve a different certificate from the next connection on."""
        self.context.options = options
        await self.site.close_all()


class UpstreamTLSTests(TestCase):
    def setUp(self) -> None:
        self.ca = Authority()
        self.ca_file = self.ca.write(self.mktemp())
        self.body = b"wheel bytes " * 1000

    def https_origin(self, **names: Any) -> HTTPSOrigin:
        origin = HTTPSOrigin(self, self.ca.server_options(**names))
        origin.origin.static("/pkg-1.0.whl", self.body)
        return origin

    def test_trusted_via_upstream_ca(self) -> defer.Deferred[None]:
        """With --upstream-ca naming the test CA, an https URL through the
        proxy is 200 MISS, then HIT from the cache; the origin saw one
        request."""
        return run(self._trusted_via_upstream_ca())

    async def _trusted_via_upstream_ca(self) -> None:
        origin = self.https_origin()
        _, pport = start_proxy_with(self, upstream_ca=self.ca_file, resolve=RESOLVE)
        http = client(self, pport)
        r1, b1 = await fetch(http, origin.url("/pkg-1.0.whl"))
        r2, b2 = await fetch(http, origin.url("/pkg-1.0.whl"))
        self.assertEqual((r1.code, header(r1, "x-cache"), b1), (200, "MISS", self.body))
        self.assertEqual((r2.code, header(r2, "x-cache"), b2), (200, "HIT", self.body))
        self.assertEqual(origin.origin.count("/pkg-1.0.whl"), 1)

    def test_raw_absolute_https_request(self) -> defer.Deferred[None]:
        """A plain-HTTP client sending ``GET https://host/…`` (http_proxy
        style, no CONNECT) is fetched over verified TLS and answered."""
        return run(self._raw_absolute_https_request())

    async def _raw_absolute_https_request(self) -> None:
        origin = self.https_origin()
        _, pport = start_proxy_with(self, upstream_ca=self.ca_file, resolve=RESOLVE)
        raw = await raw_exchange(
            self,
            pport,
            f"GET {origin.url('/pkg-1.0.whl')} HTTP/1.1\r\n"
            f"Host: localhost:{origin.port}\r\nConnection: close\r\n\r\n".encode(),
        )
        status, headers, body = parse_raw_response(raw)
        self.assertEqual((status, headers["x-cache"], body), (200, ["MISS"], self.body))
        self.assertEqual(origin.origin.count("/pkg-1.0.whl"), 1)

    def test_ip_address_certificate(self) -> defer.Deferred[None]:
        """An https URL with an IP literal is verified against the IP address
        in the certificate's subjectAltName."""
        return run(self._ip_address_certificate())

    async def _ip_address_certificate(self) -> None:
        origin = self.https_origin()
        _, pport = start_proxy_with(self, upstream_ca=self.ca_file, resolve=RESOLVE)
        response, body = await fetch(
            client(self, pport), origin.url("/pkg-1.0.whl", host="127.0.0.1")
        )
        self.assertEqual((response.code, body), (200, self.body))

    def test_ip_address_not_in_certificate(self) -> defer.Deferred[None]:
        """An https URL with an IP literal the certificate does not list is 502."""
        return run(self._ip_address_not_in_certificate())

    async def _ip_address_not_in_certificate(self) -> None:
        origin = self.https_origin(dns=("localhost",), ips=())
        _, pport = start_proxy_with(self, upstream_ca=self.ca_file, resolve=RESOLVE)
        response, body = await fetch(
            client(self, pport), origin.url("/pkg-1.0.whl", host="127.0.0.1")
        )
        self.assertEqual(response.code, 502)
        self.assertIn(b"Mismatch", body)
        self.assertEqual(origin.origin.count(), 0)

    def test_untrusted_ca(self) -> defer.Deferred[None]:
        """Without --upstream-ca the test CA is not trusted: 502, nothing is
        cached, and a second request fails again rather than being served."""
        return run(self._untrusted_ca())

    async def _untrusted_ca(self) -> None:
        origin = self.https_origin()
        service, pport = start_proxy_with(self, resolve=RESOLVE)
        http = client(self, pport)
        url = origin.url("/pkg-1.0.whl")
        for _ in range(2):
            response, body = await fetch(http, url)
            self.assertEqual(response.code, 502)
            self.assertIn(b"certificate verify failed", body)
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        self.assertEqual(origin.origin.count(), 0)

    def test_other_ca(self) -> defer.Deferred[None]:
        """A certificate from a CA other than the --upstream-ca one is 502."""
        return run(self._other_ca())

    async def _other_ca(self) -> None:
        origin = self.https_origin()
        other_ca_file = Authority("another CA").write(self.mktemp())
        _, pport = start_proxy_with(self, upstream_ca=other_ca_file, resolve=RESOLVE)
        response, body = await fetch(client(self, pport), origin.url("/pkg-1.0.whl"))
        self.assertEqual(response.code, 502)
        self.assertIn(b"certificate verify failed", body)
        self.assertEqual(origin.origin.count(), 0)

    def test_wrong_host_name(self) -> defer.Deferred[None]:
        """A trusted certificate for another name (other.example) is 502 and
        nothing is cached."""
        return run(self._wrong_host_name())

    async def _wrong_host_name(self) -> None:
        origin = self.https_origin(dns=("other.example",), ips=())
        service, pport = start_proxy_with(
            self, upstream_ca=self.ca_file, resolve=RESOLVE
        )
        url = origin.url("/pkg-1.0.whl")
        response, body = await fetch(client(self, pport), url)
        self.assertEqual(response.code, 502)
        self.assertIn(b"Mismatch", body)
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        self.assertEqual(origin.origin.count(), 0)

    def test_stale_on_tls_failure(self) -> defer.Deferred[None]:
        """A cached index whose revalidation fails TLS (the origin now shows a
        certificate for another name) is served STALE with its old bytes."""
        return run(self._stale_on_tls_failure())

    async def _stale_on_tls_failure(self) -> None:
        origin = self.https_origin()
        origin.origin.static("/simple/pkg/", b"<a href='pkg-1.0.whl'>", etag='"v1"')
        service, pport = start_proxy_with(
            self, upstream_ca=self.ca_file, resolve=RESOLVE, index_ttl=0
        )
        http = client(self, pport)
        url = origin.url("/simple/pkg/")
        r1, b1 = await fetch(http, url)
        self.assertEqual((r1.code, header(r1, "x-cache")), (200, "MISS"))
        await stored(service, url)
        assert service.upstream is not None
        await origin.switch(self.ca.server_options(dns=("other.example",), ips=()))
        await service.upstream.close()
        r2, b2 = await fetch(http, url)
        self.assertEqual((r2.code, header(r2, "x-cache"), b2), (200, "STALE", b1))
        self.assertEqual(origin.origin.count("/simple/pkg/"), 1)
