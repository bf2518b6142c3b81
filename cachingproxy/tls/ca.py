"""The local certificate authority for TLS interception (SPEC 7).

A CA (``--ca-cert``/``--ca-key``, or one generated into the cache dir on
first use) mints a short-lived leaf certificate per intercepted host, and
hands out pyOpenSSL server contexts that present it: one per host for a
CONNECT turned into TLS with ``startTLS``, or one that picks the host from
SNI for transparent port-443 interception.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from ipaddress import ip_address, ip_network
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from cachingproxy.tls.intercept import normalize_host

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

_log = Logger()
_HOUR = datetime.timedelta(hours=1)
_DAY = datetime.timedelta(days=1)
_CA_LIFETIME = datetime.timedelta(days=3650)
_LEAF_LIFETIME = datetime.timedelta(days=7)
_RENEW_BEFORE = 86400.0
_ALPN = b"http/1.1"
_ALL_IPS = (ip_network("0.0.0.0/0"), ip_network("::/0"))
_ISSUER_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
_E = TypeVar("_E", bound=x509.ExtensionType)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror}") from None


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """The signature hash for ``key`` (Ed25519/Ed448 sign without one)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _subtrees(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The permitted DNS subtrees of ``cert``'s name constraints, or None."""
    nc = _extension(cert, x509.NameConstraints)
    if nc is None:
        return None
    names = (
        n.value for n in nc.permitted_subtrees or () if isinstance(n, x509.DNSName)
    )
    return tuple(sorted(n.lower().lstrip(".") for n in names))


def _name_constraints(permitted: Sequence[str]) -> x509.NameConstraints:
    """Constraints to the DNS ``permitted`` subtrees and no IP address at
    all (DNS-only constraints would leave every address open)."""
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(name) for name in permitted],
        excluded_subtrees=[x509.IPAddress(net) for net in _ALL_IPS],
    )


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A keyUsage extension allowing exactly ``allowed``."""
    return x509.KeyUsage(**{name: name in allowed for name in _USAGES})


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    """The value of ``cert``'s extension of class ``kind``, if it has one."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    return _ALPN if _ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _base_context() -> SSL.Context:
    """A server context with our protocol settings and no certificate."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_alpn_select_callback(_select_alpn)
    return context


@implementer(IOpenSSLContextFactory)
class _FixedContextFactory:
    """A Twisted server context factory that always gives one context."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def getContext(self) -> SSL.Context:  # noqa: N802
        return self._context


@implementer(IOpenSSLContextFactory)
class _SNIContextFactory:
    """A Twisted server context factory that presents a certificate for the
    name the client asks for with SNI.

    The default context has no certificate: a handshake without a usable
    server name (and no ``default_host``) fails rather than showing a
    certificate for some other name.
    """

    def __init__(self, ca: CertificateAuthority, default_host: str | None) -> None:
        self._ca = ca
        self._default_host = default_host
        self._context = _base_context()
        self._context.set_tlsext_servername_callback(self._switch)

    def getContext(self) -> SSL.Context:  # noqa: N802
        return self._context

    def _switch(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        host = raw.decode("ascii", "replace") if raw else self._default_host
        if host is None:
            return
        try:
            connection.set_context(self._ca.server_context(host))
        except ValueError as e:
            _log.info("TLS handshake refused: {error}", error=str(e))


class CertificateAuthority:
    """A CA certificate and key that mint leaf certificates for hosts.

    ``clock`` (seconds since the epoch) is read only for certificate
    validity; contexts are cached per host, ``cache_size`` at most, and
    re-minted a day before their certificate expires.
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
        chain: Sequence[x509.Certificate] = (),
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 1024,
    ) -> None:
        self.cert = cert
        self._key = key
        self._chain = tuple(chain)
        self._clock = clock
        self._cache_size = cache_size
        self._contexts: OrderedDict[str, tuple[SSL.Context, float]] = OrderedDict()
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        ski = _extension(cert, x509.SubjectKeyIdentifier)
        self._aki = (
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
            if ski is None
            else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        )
        self._constraints = _extension(cert, x509.NameConstraints)

    @classmethod
    def load(
        cls, cert_path: str, key_path: str, *, clock: Callable[[], float] = time.time
    ) -> CertificateAuthority:
        """The CA in PEM files ``cert_path`` (the CA certificate first, then
        any intermediates to send after it) and ``key_path`` (unencrypted).
        ValueError, saying why, when they cannot be used to issue
        certificates."""
        cert_pem = _read(cert_path, "CA certificate")
        key_pem = _read(key_path, "CA key")
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            raise ValueError(f"{cert_path!r} holds no PEM certificate") from None
        cert = certs[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise ValueError(
                f"CA key {key_path!r} is encrypted; give it unencrypted"
            ) from None
        except ValueError:
            raise ValueError(f"{key_path!r} holds no PEM private key") from None
        if not isinstance(key, _ISSUER_KEYS):
            raise ValueError(f"{key_path!r}: a {type(key).__name__} cannot sign")
        bc = _extension(cert, x509.BasicConstraints)
        if bc is None or not bc.ca:
            raise ValueError(
                f"{cert_path!r} is not a CA certificate (needs basicConstraints CA:TRUE)"
            )
        usage = _extension(cert, x509.KeyUsage)
        if usage is not None and not usage.key_cert_sign:
            raise ValueError(f"{cert_path!r} may not sign certificates (keyUsage)")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise ValueError(f"CA key {key_path!r} does not match {cert_path!r}")
        if cert.not_valid_after_utc <= _utc(clock()):
            raise ValueError(
                f"CA certificate {cert_path!r} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        return cls(cert, key, certs[1:], clock=clock)

    @classmethod
    def load_or_create(
        cls,
        cache_dir: str,
        permitted: Sequence[str] | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        """The CA in ``cache_dir`` (``ca.pem``, ``ca-key.pem``), generated
        there if missing: name-constrained to the DNS subtrees ``permitted``
        unless that is None or empty.  An existing CA is kept even when its
        constraints differ (clients trust it), with a warning."""
        cert_path = os.path.join(cache_dir, CA_CERT_FILE)
        key_path = os.path.join(cache_dir, CA_KEY_FILE)
        wanted = tuple(sorted({p.lower() for p in permitted or ()})) or None
        if not os.path.exists(cert_path):
            _create(cert_path, key_path, wanted, clock())
            _log.info("Generated CA {path}", path=cert_path)
            return cls.load(cert_path, key_path, clock=clock)
        if not os.path.exists(key_path):
            raise ValueError(
                f"{cert_path!r} exists without {CA_KEY_FILE}; remove it to"
                " generate a new CA (and have clients trust the new one)"
            )
        ca = cls.load(cert_path, key_path, clock=clock)
        if os.stat(key_path).st_mode & 0o077:
            _log.warn("CA key {path} is readable by others: chmod 600", path=key_path)
        have = _subtrees(ca.cert)
        if have != wanted:
            _log.warn(
                "CA {path} is {have}, but --intercept now calls for {wanted};"
                " keeping it, as clients trust it (hosts outside its"
                " constraints cannot be intercepted). Remove {path} and {key}"
                " to generate a new one.",
                path=cert_path,
                key=key_path,
                have=f"name-constrained to {', '.join(have)}"
                if have
                else "not name-constrained",
                wanted=f"constraints to {', '.join(wanted)}"
                if wanted
                else "no name constraints",
            )
        return ca

    def pem(self) -> bytes:
        """The CA certificate, PEM-encoded: what clients are told to trust."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def permits(self, host: str) -> bool:
        """Whether this CA's name constraints allow a certificate for
        ``host`` (always, for an unconstrained CA)."""
        name = normalize_host(host)
        if name is None:
            return False
        if self._constraints is None:
            return True
        try:
            address = ip_address(name)
        except ValueError:
            return _allowed(self._constraints, x509.DNSName, lambda v: _in_dns(name, v))
        return _allowed(self._constraints, x509.IPAddress, lambda v: address in v)

    def issue(self, host: str) -> x509.Certificate:
        """A new leaf certificate for ``host`` (a DNS name or IP address),
        valid from an hour ago for seven days (never past the CA's end).
        ValueError when ``host`` is not a host or the CA may not sign it."""
        name = normalize_host(host)
        if name is None:
            raise ValueError(f"not a host name: {host!r}")
        if not self.permits(name):
            raise ValueError(f"{name} is outside the CA's name constraints")
        try:
            san: x509.GeneralName = x509.IPAddress(ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        now = _utc(self._clock())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64 else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - _HOUR, self.cert.not_valid_before_utc))
            .not_valid_after(min(now + _LEAF_LIFETIME, self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_key_usage("digital_signature"), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self._key, _hash_for(self._key))

    def server_context(self, host: str) -> SSL.Context:
        """A TLS 1.2+ server context presenting a certificate for ``host``
        and the CA; cached per host.  ValueError as for :meth:`issue`."""
        name = normalize_host(host)
        if name is None:
            raise ValueError(f"not a host name: {host!r}")
        cached = self._contexts.get(name)
        if cached is not None and self._clock() < cached[1] - _RENEW_BEFORE:
            self._contexts.move_to_end(name)
            return cached[0]
        leaf = self.issue(name)
        context = _base_context()
        context.use_certificate(leaf)
        context.use_privatekey(self._leaf_key)
        for cert in (self.cert, *self._chain):
            context.add_extra_chain_cert(cert)
        self._contexts[name] = (context, leaf.not_valid_after_utc.timestamp())
        self._contexts.move_to_end(name)
        while len(self._contexts) > self._cache_size:
            self._contexts.popitem(last=False)
        return context

    def context_factory(self, host: str) -> IOpenSSLContextFactory:
        """A Twisted server context factory for ``host``, for
        ``transport.startTLS`` on an intercepted CONNECT."""
        return _FixedContextFactory(self.server_context(host))

    def sni_context_factory(
        self, default_host: str | None = None
    ) -> IOpenSSLContextFactory:
        """A Twisted server context factory that presents a certificate for
        the client's SNI name, for transparent interception.  Without SNI it
        uses ``default_host``, or (None) fails the handshake."""
        return _SNIContextFactory(self, default_host)


def _in_dns(name: str, subtree: str) -> bool:
    subtree = subtree.lower().lstrip(".")
    return not subtree or name == subtree or name.endswith("." + subtree)


def _allowed(
    nc: x509.NameConstraints, kind: type, inside: Callable[[Any], bool]
) -> bool:
    """RFC 5280 for one name: in no excluded subtree of its ``kind``, and in
    a permitted one if any of that kind is given."""
    excluded = [n.value for n in nc.excluded_subtrees or () if isinstance(n, kind)]
    permitted = [n.value for n in nc.permitted_subtrees or () if isinstance(n, kind)]
    if any(inside(v) for v in excluded):
        return False
    return not permitted or any(inside(v) for v in permitted)


def _create(
    cert_path: str, key_path: str, permitted: Sequence[str] | None, now: float
) -> None:
    """Generate a CA into ``cert_path`` and ``key_path``.  The key is
    written with mode 0600 from the start; both files are written under
    temporary names and renamed, the certificate last, so a CA is never
    half there."""
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()[:40] or "localhost"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cachingproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cachingproxy local CA ({host})"),
        ]
    )
    start = _utc(now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _DAY)
        .not_valid_after(start + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    if permitted:
        builder = builder.add_extension(_name_constraints(permitted), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    os.makedirs(os.path.dirname(cert_path), exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    for path in (key_path + suffix, cert_path + suffix):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a crash
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(key_path + suffix, flags, 0o600), "wb") as f:
        f.write(key_pem)
        os.fsync(f.fileno())
    with open(cert_path + suffix, "xb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.fsync(f.fileno())
    os.replace(key_path + suffix, key_path)
    os.replace(cert_path + suffix, cert_path)


__all__ = ["CA_CERT_FILE", "CA_KEY_FILE", "CertificateAuthority"]
