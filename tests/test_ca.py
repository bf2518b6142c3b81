"""The interception CA and host policy (SPEC 7): which hosts are intercepted,
the CA generated into the cache dir, leaf certificates minted per host, and
real TLS handshakes over loopback with the contexts it hands out."""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL
from service_identity import VerificationError as NameMismatch
from twisted.internet import defer, reactor
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLContextFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cachingproxy.ops.cachetool import main as cachetool
from cachingproxy.tls.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from cachingproxy.tls.intercept import PACKAGES, InterceptPolicy, parse_pattern

from .support import cert_pem, key_pem, self_signed

DAY = 86400.0
PYPI = ("*.pythonhosted.org", "pypi.org")
SUBTREES = ("pypi.org", "pythonhosted.org")


def verify(
    ca: CertificateAuthority, leaf: x509.Certificate, host: str, at: float | None = None
) -> None:
    """Verify ``leaf`` for ``host`` with ``ca`` as the only trust anchor
    (cryptography's web-PKI verifier) at time ``at`` (default: now);
    VerificationError if it fails."""
    try:
        subject: Any = x509.verification.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.verification.DNSName(host)
    store = Store([ca.cert])
    builder = PolicyBuilder().store(store)
    if at is not None:
        builder = builder.time(datetime.datetime.fromtimestamp(at, datetime.UTC))
    builder.build_server_verifier(subject).verify(leaf, [])


def self_signed_pem(ca: bool) -> tuple[bytes, bytes]:
    """A self-signed certificate (a CA or not) and its key, as PEM."""
    cert, key = self_signed(ca=ca)
    return cert_pem(cert), key_pem(key)


class InterceptPolicyTests(TestCase):
    """--intercept patterns: parsing, matching, name-constraint subtrees."""

    def test_matches_table(self) -> None:
        """Globs match host names case-insensitively, without port or
        trailing dot; an IP address matches only an identical pattern."""
        policy = InterceptPolicy(["*.pythonhosted.org", "PyPI.org", "10.0.0.7", "::1"])
        cases = {
            "pypi.org": True,
            "PYPI.ORG": True,
            "pypi.org.": True,
            "pypi.org:443": True,
            "files.pythonhosted.org": True,
            "a.b.pythonhosted.org:8443": True,
            "pythonhosted.org": False,
            "evilpypi.org": False,
            "pypi.org.evil.example": False,
            "10.0.0.7": True,
            "10.0.0.7:443": True,
            "10.0.0.8": False,
            "[::1]:443": True,
            "0:0::1": True,
            "pypi.org:https": False,
            "": False,
            "bad host": False,
        }
        got = {host: policy.matches(host) for host in cases}
        self.assertEqual(got, cases)

    def test_wildcard_never_matches_addresses(self) -> None:
        """``*`` matches any host name but no IP address literal."""
        policy = InterceptPolicy(["*"])
        got = [policy.matches(h) for h in ("a.example", "127.0.0.1", "[::1]:443")]
        self.assertEqual(got, [True, False, False])

    def test_preset_expands(self) -> None:
        """``packages`` stands for the public package hosts, which match
        the registries' real names."""
        self.assertEqual(parse_pattern(" Packages "), PACKAGES)
        policy = InterceptPolicy(["packages", "pypi.org"])
        self.assertEqual(policy.patterns, PACKAGES)
        hosts = [
            "files.pythonhosted.org",
            "registry.npmjs.org",
            "ftp.de.debian.org",
            "de.archive.ubuntu.com",
            "dl-cdn.alpinelinux.org",
            "repo1.maven.org",
            "static.crates.io",
            "index.rubygems.org",
            "proxy.golang.org",
        ]
        self.assertEqual([h for h in hosts if not policy.matches(h)], [])
        self.assertFalse(policy.matches("github.com"))

    def test_parse_pattern_rejects_junk(self) -> None:
        """Junk is a ValueError saying what is wrong."""
        cases = {
            "": "not a host pattern",
            "https://pypi.org/": "not a URL",
            "pypi.org:443": "no port",
            ".example.org": "did you mean '*.example.org'",
            "a..b": "empty label",
            "pypi org": "letters, digits",
            "[a-z].org": "letters, digits",
            "bücher.example": "xn--",
            "-bad.example": "not a valid host name label",
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_pattern(text)
            self.assertIn(message, str(caught.exception), text)

    def test_parse_pattern_normalizes(self) -> None:
        """Patterns are lower-cased, lose a trailing dot, and IP addresses
        take their canonical form."""
        got = [parse_pattern(t) for t in ("*.Example.ORG.", "[0:0::1]", "10.0.0.1")]
        self.assertEqual(got, [("*.example.org",), ("::1",), ("10.0.0.1",)])

    def test_permitted_subtrees(self) -> None:
        """Exact hosts and ``*.domain`` give subtrees (nested ones merged);
        a pattern without a fixed domain, an IP, or no pattern gives None."""
        cases: dict[tuple[str, ...], tuple[str, ...] | None] = {
            PYPI: ("pypi.org", "pythonhosted.org"),
            ("pypi.org", "*.pypi.org", "a.pypi.org"): ("pypi.org",),
            ("ftp.*.debian.org", "deb.debian.org"): ("debian.org",),
            ("pypi*",): None,
            ("*",): None,
            ("pypi.org", "*.example.*"): None,
            ("pypi.org", "10.0.0.1"): None,
            (): None,
        }
        got = {p: InterceptPolicy(p).permitted_subtrees() for p in cases}
        self.assertEqual(got, cases)
        self.assertIn("debian.org", InterceptPolicy(["packages"]).permitted_subtrees())


@implementer(ILogObserver)
class _Warnings(list[str]):
    """Collects the text of warning-level log events."""

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") == LogLevel.warn:
            self.append(formatEvent(event))


class GeneratedCATests(TestCase):
    """The CA generated into the cache dir on first use."""

    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_generated_once_with_private_key(self) -> None:
        """The key file is mode 0600 whatever the umask, and a second start
        reuses the CA (same serial) rather than making a new one."""
        old = os.umask(0)
        try:
            first = CertificateAuthority.load_or_create(self.dir, SUBTREES)
        finally:
            os.umask(old)
        mode = os.stat(os.path.join(self.dir, CA_KEY_FILE)).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), [CA_KEY_FILE, CA_CERT_FILE])
        second = CertificateAuthority.load_or_create(self.dir, SUBTREES)
        self.assertEqual(second.cert.serial_number, first.cert.serial_number)
        self.assertEqual(second.pem(), first.pem())

    def test_extensions_constrained(self) -> None:
        """A constrained CA: CA:TRUE pathlen 0, keyCertSign+cRLSign, a key
        identifier, and critical name constraints to the patterns' DNS
        subtrees with every IP address excluded; valid ten years."""
        ca = CertificateAuthority.load_or_create(self.dir, SUBTREES[::-1])
        ext = ca.cert.extensions
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        self.assertEqual(
            (bc.critical, bc.value.ca, bc.value.path_length), (True, True, 0)
        )
        ku = ext.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ku.critical)
        self.assertEqual(
            (ku.value.key_cert_sign, ku.value.crl_sign, ku.value.digital_signature),
            (True, True, False),
        )
        ext.get_extension_for_class(x509.SubjectKeyIdentifier)
        nc = ext.get_extension_for_class(x509.NameConstraints)
        self.assertTrue(nc.critical)
        permitted = {n.value for n in nc.value.permitted_subtrees or ()}
        self.assertEqual(permitted, {"pypi.org", "pythonhosted.org"})
        excluded = {n.value for n in nc.value.excluded_subtrees or ()}
        self.assertEqual({str(n) for n in excluded}, {"0.0.0.0/0", "::/0"})
        cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertTrue(str(cn).startswith("cachingproxy local CA ("), cn)
        life = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
        self.assertGreaterEqual(life.days, 3650)

    def test_unconstrained_for_star(self) -> None:
        """Patterns without a fixed domain (``*``) give a CA without name
        constraints, which may sign any host or address."""
        permitted = InterceptPolicy(["*"]).permitted_subtrees()
        ca = CertificateAuthority.load_or_create(self.dir, permitted)
        with self.assertRaises(x509.ExtensionNotFound):
            ca.cert.extensions.get_extension_for_class(x509.NameConstraints)
        self.assertTrue(ca.permits("anything.example"))
        self.assertTrue(ca.permits("192.0.2.1"))

    def test_constraints_bite(self) -> None:
        """A constrained CA refuses names outside its subtrees and every IP;
        and clients would reject such a leaf even if it were minted."""
        ca = CertificateAuthority.load_or_create(self.dir, PYPI[1:])
        self.assertEqual(
            [ca.permits(h) for h in ("pypi.org", "x.pypi.org", "evil.org", "10.0.0.1")],
            [True, True, False, False],
        )
        self.assertRaises(ValueError, ca.server_context, "evil.org")
        ca.permits = lambda host: True  # type: ignore[method-assign]
        for host in ("evil.org", "10.0.0.1"):
            with self.assertRaises(VerificationError, msg=host):
                verify(ca, ca.issue(host), host)

    def test_changed_patterns_keep_ca_and_warn(self) -> None:
        """When the patterns now need other constraints, the existing CA
        (which clients trust) is kept and a warning says how to renew it."""
        first = CertificateAuthority.load_or_create(self.dir, PYPI[1:])
        warnings = _Warnings()
        globalLogPublisher.addObserver(warnings)
        self.addCleanup(globalLogPublisher.removeObserver, warnings)
        again = CertificateAuthority.load_or_create(self.dir, PYPI[1:])
        self.assertEqual(warnings, [])
        second = CertificateAuthority.load_or_create(self.dir, None)
        self.assertEqual(
            {first.cert.serial_number},
            {again.cert.serial_number, second.cert.serial_number},
        )
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("pypi.org", warnings[0])
        self.assertIn(CA_KEY_FILE, warnings[0])

    def test_certificate_without_key(self) -> None:
        """A ca.pem whose key file is gone is an error, not silently
        replaced by a new CA."""
        CertificateAuthority.load_or_create(self.dir, None)
        os.unlink(os.path.join(self.dir, CA_KEY_FILE))
        with self.assertRaises(ValueError) as caught:
            CertificateAuthority.load_or_create(self.dir, None)
        self.assertIn("without ca-key.pem", str(caught.exception))


class LoadTests(TestCase):
    """--ca-cert and --ca-key given by the operator."""

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_loads_a_ca(self) -> None:
        """A CA certificate with its key loads and signs leaves that verify."""
        cert, key = self_signed_pem(ca=True)
        ca = CertificateAuthority.load(self.write(cert), self.write(key))
        verify(ca, ca.issue("pkg.test"), "pkg.test")

    def test_errors(self) -> None:
        """A non-CA certificate, a key of another CA, a file without a
        certificate and a missing file are each a ValueError saying so."""
        leaf, leaf_key = self_signed_pem(ca=False)
        cert, _ = self_signed_pem(ca=True)
        _, other_key = self_signed_pem(ca=True)
        cases = [
            (leaf, leaf_key, "is not a CA certificate"),
            (cert, other_key, "does not match"),
            (b"junk", other_key, "holds no PEM certificate"),
            (cert, b"junk", "holds no PEM private key"),
        ]
        for pem, key, message in cases:
            with self.assertRaises(ValueError) as caught:
                CertificateAuthority.load(self.write(pem), self.write(key))
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            CertificateAuthority.load(self.mktemp(), self.write(leaf_key))
        self.assertIn("cannot read CA certificate", str(caught.exception))


class LeafTests(TestCase):
    """Leaf certificates and the contexts that present them."""

    def setUp(self) -> None:
        self.now = [1_900_000_000.0]
        self.ca = CertificateAuthority.load_or_create(
            self.mktemp(), None, clock=lambda: self.now[0]
        )

    def test_leaf_for_name(self) -> None:
        """A leaf has the host as DNS SAN and CN, serverAuth, CA:FALSE, the
        CA's key identifier, and chains to the CA for that host only."""
        subtrees = InterceptPolicy(PYPI).permitted_subtrees()
        ca = CertificateAuthority.load_or_create(self.mktemp(), subtrees)
        leaf = ca.issue("Files.PythonHosted.org.")
        ext = leaf.extensions
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["files.pythonhosted.org"]
        )
        cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "files.pythonhosted.org")
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(ext.get_extension_for_class(x509.BasicConstraints).value.ca)
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertEqual(aki.key_identifier, ski.value.digest)
        verify(ca, leaf, "files.pythonhosted.org")
        self.assertRaises(VerificationError, verify, ca, leaf, "pypi.org")

    def test_leaf_for_address(self) -> None:
        """An IP literal gets an IP SAN (no DNS SAN) that verifies."""
        leaf = self.ca.issue("[::1]")
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("::1")]
        )
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), [])
        verify(self.ca, self.ca.issue("127.0.0.1"), "127.0.0.1", self.now[0])

    def test_leaf_short_lived(self) -> None:
        """A leaf is valid from an hour before the clock's now, for at most
        eight days; serials differ; all leaves share one key."""
        a, b = self.ca.issue("pkg.test"), self.ca.issue("pkg.test")
        start = a.not_valid_before_utc.timestamp()
        self.assertEqual(start, self.now[0] - 3600)
        self.assertLessEqual(a.not_valid_after_utc.timestamp() - start, 8 * DAY)
        self.assertNotEqual(a.serial_number, b.serial_number)
        self.assertEqual(a.public_key(), b.public_key())

    def test_contexts_cached(self) -> None:
        """The same host (any spelling) gets the same context until a day
        before its leaf expires; other hosts get their own; the cache is
        bounded, least recently used first out."""
        ca = self.ca
        first = ca.server_context("pkg.test")
        same = [ca.server_context(h) for h in ("PKG.test.", "pkg.test:443")]
        self.assertEqual(same, [first, first])
        self.assertIsNot(ca.server_context("other.test"), first)
        self.now[0] += 5 * DAY
        self.assertIs(ca.server_context("pkg.test"), first)
        self.now[0] += 1.5 * DAY
        renewed = ca.server_context("pkg.test")
        self.assertIsNot(renewed, first)
        small = CertificateAuthority(
            ca.cert, ca._key, clock=lambda: self.now[0], cache_size=2
        )
        a = small.server_context("a.test")
        small.server_context("b.test")
        small.server_context("a.test")
        small.server_context("c.test")  # evicts b, the least recently used
        self.assertIs(small.server_context("a.test"), a)
        self.assertEqual(list(small._contexts), ["c.test", "a.test"])


class _Echo(Protocol):
    """Echoes; starts TLS at once when given a context factory (as the
    proxy does after answering a CONNECT)."""

    def __init__(self, start_tls: IOpenSSLContextFactory | None) -> None:
        self.start_tls = start_tls
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        if self.start_tls is not None:
            transport: Any = self.transport
            transport.startTLS(self.start_tls)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: N802, B008
        self.closed.callback(None)


class _EchoFactory(Factory):
    def __init__(self, start_tls: IOpenSSLContextFactory | None) -> None:
        self.start_tls = start_tls
        self.built: list[_Echo] = []

    def buildProtocol(self, addr: IAddress | None) -> _Echo:  # noqa: N802
        protocol = _Echo(self.start_tls)
        self.built.append(protocol)
        return protocol

    def all_closed(self) -> defer.Deferred[Any]:
        return defer.gatherResults([p.closed for p in self.built])


class _Client(Protocol):
    """Sends ``ping``, waits for the echo, notes the peer's certificate."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: x509.Certificate | None = None
        self.alpn: bytes | None = None
        self.reason: Failure | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if self.received == b"ping":
            transport: Any = self.transport
            self.peer = transport.getPeerCertificate().to_cryptography()
            self.alpn = transport.negotiatedProtocol
            transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: N802, B008
        self.reason = reason
        self.done.callback(None)


class HandshakeTests(TestCase):
    """Real TLS over loopback with the CA's contexts and Twisted clients."""

    def setUp(self) -> None:
        self.ca = CertificateAuthority.load_or_create(self.mktemp(), None)
        self.trust = Certificate.loadPEM(self.ca.pem())

    async def serve(
        self,
        endpoint: IStreamServerEndpoint,
        start_tls: IOpenSSLContextFactory | None = None,
    ) -> int:
        """Listen with an echo server; cleaned up, its connections closed."""
        factory = _EchoFactory(start_tls)
        port = await endpoint.listen(factory)
        self.addCleanup(factory.all_closed)
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        return int(address.port)

    async def talk(self, port: int, options: Any) -> _Client:
        client = _Client()
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(wrapClientTLS(options, tcp), client)
        await client.done
        return client

    def test_intercepted_connect(self) -> defer.Deferred[None]:
        """startTLS with ``context_factory(host)`` on a plain connection:
        a client trusting the CA completes the handshake for that name,
        exchanges bytes, and gets ALPN http/1.1 when offering h2 too."""
        return defer.Deferred.fromCoroutine(self._intercepted_connect())

    async def _intercepted_connect(self) -> None:
        factory = self.ca.context_factory("pkg.test")
        self.assertTrue(IOpenSSLContextFactory.providedBy(factory))
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await self.serve(endpoint, start_tls=factory)
        options = optionsForClientTLS(
            "pkg.test", trustRoot=self.trust, acceptableProtocols=[b"h2", b"http/1.1"]
        )
        client = await self.talk(port, options)
        self.assertEqual(client.received, b"ping")
        self.assertEqual(client.alpn, b"http/1.1")
        assert client.peer is not None
        self.assertEqual(client.peer.issuer, self.ca.cert.subject)

    def test_untrusting_client_fails(self) -> defer.Deferred[None]:
        """A client that trusts another CA, or asks for another name, fails
        the handshake: no bytes, an SSL error."""
        return defer.Deferred.fromCoroutine(self._untrusting_client_fails())

    async def _untrusting_client_fails(self) -> None:
        other = CertificateAuthority.load_or_create(self.mktemp(), None)
        factory = self.ca.context_factory("pkg.test")
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await self.serve(endpoint, start_tls=factory)
        clients = [
            (
                optionsForClientTLS("pkg.test", Certificate.loadPEM(other.pem())),
                SSL.Error,
            ),
            (optionsForClientTLS("other.test", self.trust), NameMismatch),
        ]
        for options, error in clients:
            client = await self.talk(port, options)
            self.assertEqual(client.received, b"")
            assert client.reason is not None
            self.assertTrue(client.reason.check(error), client.reason)

    def test_sni(self) -> defer.Deferred[None]:
        """The SNI factory presents a certificate for each client's server
        name; a client sending no name is refused unless a default host is
        given."""
        return defer.Deferred.fromCoroutine(self._sni())

    async def _sni(self) -> None:
        endpoint = SSL4ServerEndpoint(
            reactor, 0, self.ca.sni_context_factory(), interface="127.0.0.1"
        )
        port = await self.serve(endpoint)
        for name in ("a.pkg.test", "b.pkg.test"):
            client = await self.talk(port, optionsForClientTLS(name, self.trust))
            self.assertEqual(client.received, b"ping")
            assert client.peer is not None
            san = client.peer.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            self.assertEqual(san.value.get_values_for_type(x509.DNSName), [name])
        no_sni = CertificateOptions()  # verifies nothing, sends no server name
        refused = await self.talk(port, no_sni)
        self.assertEqual(refused.received, b"")
        assert refused.reason is not None
        self.assertTrue(refused.reason.check(SSL.Error), refused.reason)
        fallback = SSL4ServerEndpoint(
            reactor, 0, self.ca.sni_context_factory("localhost"), interface="127.0.0.1"
        )
        port = await self.serve(fallback)
        client = await self.talk(port, no_sni)
        self.assertEqual(client.received, b"ping")
        assert client.peer is not None
        cn = client.peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "localhost")


class CacheToolTests(TestCase):
    """``cachingproxy-cache ca-cert``."""

    def run_tool(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cachetool(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_prints_ca(self) -> None:
        """It prints the PEM of the CA generated into the cache dir."""
        path = self.mktemp()
        ca = CertificateAuthority.load_or_create(path, None)
        self.assertEqual(
            self.run_tool("--cache-dir", path, "ca-cert"), (0, ca.pem().decode(), "")
        )

    def test_no_ca_yet(self) -> None:
        """Before the proxy generated a CA it exits 2 saying so."""
        status, out, err = self.run_tool("--cache-dir", self.mktemp(), "ca-cert")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("no CA in", err)
