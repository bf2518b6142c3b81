"""Fetching from origins: one pooled Agent behind the destination policy.

The policy (SPEC 8) is enforced on the *resolved* address, and the connection
is made to exactly the address that was checked, so a name cannot be
re-resolved to somewhere else between the check and the connect.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from OpenSSL import crypto
from twisted.internet import defer, threads
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.client import ClientProtocol, QuietClientFactory, with_timeout
from cachingproxy.fetch.destination import DestinationPolicy, embedded_ipv4
from cachingproxy.fetch.parent import (
    TunnelEndpoint,
    TunnelEndpointFactory,
    parent_endpoint,
)
from cachingproxy.interfaces import IUpstream

Resolver = Callable[[str, int], "defer.Deferred[list[str]]"]
"""Resolves a host name to IP address strings."""

_log = Logger()


def getaddrinfo_resolver(reactor: Any) -> Resolver:
    """A resolver that runs ``getaddrinfo`` in the reactor's thread pool."""

    def resolve(host: str, port: int) -> defer.Deferred[list[str]]:
        def lookup() -> list[str]:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            return [str(info[4][0]) for info in infos]

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), lookup)

    return resolve


@implementer(IOpenSSLTrustRoot)
class _TrustRoot:
    """The system trust store plus extra PEM certificates (``--upstream-ca``)."""

    def __init__(self, extra: Sequence[crypto.X509]) -> None:
        self._extra = list(extra)

    def _addCACertsToContext(self, context: Any) -> None:  # noqa: N802
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for cert in self._extra:
            store.add_cert(cert)


def load_pem_certificates(path: str) -> list[crypto.X509]:
    """Every certificate in a PEM bundle."""
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for chunk in data.split(marker)[:-1]:
        certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, chunk + marker))
    return certs


def tls_policy(upstream_ca: str | None) -> BrowserLikePolicyForHTTPS:
    """Certificate and host-name verification, with optional extra CAs."""
    if upstream_ca is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(
        trustRoot=_TrustRoot(load_pem_certificates(upstream_ca))
    )


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolve, check every address against the policy, connect to an allowed one."""

    def __init__(self, factory: _CheckedEndpointFactory, uri: URI) -> None:
        self._factory = factory
        self._host = uri.host.decode("ascii")
        self._port = uri.port
        self._tls = uri.scheme == b"https"

    def connect(self, protocol_factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.Deferred.fromCoroutine(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: IProtocolFactory) -> IProtocol:
        f = self._factory
        host = self._host.strip("[]")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await with_timeout(
                    f.reactor, f.resolve(host, self._port), f.connect_timeout
                )
            except UpstreamTimeout:
                raise
            except Exception as e:
                raise DNSLookupFailed(f"cannot resolve {host}: {e}") from e
        allowed: list[str] = []
        refusals: list[str] = []
        for address in dict.fromkeys(addresses):
            reason = f.policy.refusal(address, self._port, f.mirrored)
            if reason is None:
                allowed.append(address)
            else:
                refusals.append(reason)
        if not allowed:
            raise DestinationRefused(f"{host}:{self._port}: {'; '.join(refusals)}")
        # A name often has an IPv6 and an IPv4 address and only one of them
        # may work here: on a connect error try the next allowed address.
        for address in allowed[:-1]:
            try:
                return await self._connect_to(address, protocol_factory)
            except (ConnectError, UpstreamTimeout) as e:
                _log.debug(
                    "{host}: {address} failed ({e}); trying the next address",
                    host=host,
                    address=address,
                    e=e,
                )
        return await self._connect_to(allowed[-1], protocol_factory)

    async def _connect_to(
        self, address: str, protocol_factory: IProtocolFactory
    ) -> IProtocol:
        """Connect (and start TLS) to one checked ``address``."""
        f = self._factory
        host = self._host.strip("[]")
        started = f.reactor.seconds()
        cls = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = cls(
            f.reactor, address, self._port, timeout=f.connect_timeout
        )
        if self._tls:
            creator = f.tls.creatorForNetloc(self._host.encode("ascii"), self._port)
            endpoint = wrapClientTLS(creator, endpoint)
        try:
            protocol: IProtocol = await endpoint.connect(protocol_factory)
        except ConnectTimeoutError as e:
            raise UpstreamTimeout(f"connect to {host}:{self._port} timed out") from e
        if self._tls and isinstance(protocol, ClientProtocol):
            # --connect-timeout covers the TLS handshake too.
            left = f.connect_timeout - (f.reactor.seconds() - started)
            try:
                await with_timeout(f.reactor, protocol.handshake_done(), left)
            except UpstreamTimeout:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                raise UpstreamTimeout(
                    f"TLS handshake with {host}:{self._port} timed out"
                ) from None
        return protocol


class DNSLookupFailed(Exception):
    """The upstream host name did not resolve."""


@implementer(IAgentEndpointFactory)
class _CheckedEndpointFactory:
    def __init__(
        self,
        reactor: Any,
        policy: DestinationPolicy,
        resolve: Resolver,
        tls: BrowserLikePolicyForHTTPS,
        connect_timeout: float,
        mirrored: bool,
    ) -> None:
        self.reactor = reactor
        self.policy = policy
        self.resolve = resolve
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.mirrored = mirrored

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802
        return _CheckedEndpoint(self, uri)


@implementer(IUpstream)
class Upstream:
    """HTTP(S) to origins over persistent pooled connections, policy-checked."""

    def __init__(
        self,
        reactor: Any,
        policy: DestinationPolicy,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        upstream_ca: str | None = None,
        resolve: Resolver | None = None,
        upstream_proxy: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._pools: list[HTTPConnectionPool] = []
        resolve = resolve or getaddrinfo_resolver(reactor)
        tls = tls_policy(upstream_ca)
        self._policy, self._resolve, self._tls = policy, resolve, tls
        self._parent: IStreamClientEndpoint | None = None
        if upstream_proxy is not None:
            self._parent = parent_endpoint(reactor, upstream_proxy, connect_timeout)
            self._parent_http = ProxyAgent(self._parent, reactor, pool=self._new_pool())
            self._parent_https = Agent.usingEndpointFactory(
                reactor,
                TunnelEndpointFactory(self._parent, tls),
                pool=self._new_pool(),
            )
        self._agents = {
            mirrored: self._make_agent(
                _CheckedEndpointFactory(
                    reactor, policy, resolve, tls, connect_timeout, mirrored
                )
            )
            for mirrored in (False, True)
        }

    def _new_pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool._factory = functools.partial(  # type: ignore[assignment]
            QuietClientFactory,
            clock=self._reactor,
            read_timeout=self._read_timeout,
        )
        pool.maxPersistentPerHost = 8
        pool.cachedConnectionTimeout = 60
        self._pools.append(pool)
        return pool

    def _make_agent(self, factory: _CheckedEndpointFactory) -> Agent:
        return Agent.usingEndpointFactory(self._reactor, factory, pool=self._new_pool())

    def _parent_refusal(
        self, host: str, port: int, mirrored: bool, ports: frozenset[int]
    ) -> str | None:
        """Through a parent proxy names are resolved by the parent: only IP
        literals and ports can be checked here."""
        try:
            address = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if not mirrored and port not in ports:
                return f"port {port} is not an allowed upstream port"
            return None
        policy = attrs.evolve(self._policy, upstream_ports=ports)
        return policy.refusal(address, port, mirrored)

    def connect_tcp(
        self,
        host: str,
        port: int,
        factory: IProtocolFactory,
        ports: frozenset[int],
    ) -> defer.Deferred[IProtocol]:
        """A plain TCP connection to ``host:port`` for a CONNECT tunnel,
        checked like any upstream but against ``ports`` (--connect-ports)."""
        if self._parent is not None:
            refusal = self._parent_refusal(host, port, False, ports)
            if refusal is not None:
                return defer.fail(DestinationRefused(f"{host}:{port}: {refusal}"))
            return TunnelEndpoint(self._parent, host, port, None).connect(factory)
        policy = attrs.evolve(self._policy, upstream_ports=ports)
        endpoints = _CheckedEndpointFactory(
            self._reactor,
            policy,
            self._resolve,
            self._tls,
            self._connect_timeout,
            mirrored=False,
        )
        netloc = f"[{host}]" if ":" in host else host
        uri = URI.fromBytes(f"http://{netloc}:{port}/".encode("ascii"))
        return endpoints.endpointForURI(uri).connect(factory)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
        *,
        mirrored: bool = False,
    ) -> defer.Deferred[IResponse]:
        if self._parent is not None:
            parsed = URI.fromBytes(url)
            refusal = self._parent_refusal(
                parsed.host.decode("ascii"),
                parsed.port,
                mirrored,
                self._policy.upstream_ports,
            )
            if refusal is not None:
                return defer.fail(DestinationRefused(refusal))
            https = url.startswith(b"https:")
            agent = self._parent_https if https else self._parent_http
            d = agent.request(method, url, headers, body)
            # A parent's CONNECT answer has no timeout of its own.
            return defer.Deferred.fromCoroutine(
                with_timeout(
                    self._reactor, d, self._connect_timeout * 2 + self._read_timeout
                )
            )
        # Resolving, connecting and TLS have the connect timeout; the head
        # must follow the request within the read timeout (ClientProtocol).
        return self._agents[mirrored].request(method, url, headers, body)

    def close(self) -> defer.Deferred[None]:
        """Close every pooled connection."""
        return defer.gatherResults(
            [p.closeCachedConnections() for p in self._pools]
        ).addCallback(lambda _: None)


def headers_from_pairs(pairs: Iterable[tuple[str, str]]) -> Headers:
    """A twisted Headers object from (name, value) pairs."""
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    return result


def pairs_from_headers(headers: Headers) -> list[tuple[str, str]]:
    """(name, value) pairs from a twisted Headers object, latin-1 decoded."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, values in headers.getAllRawHeaders()
        for value in values
    ]


__all__ = [
    "DNSLookupFailed",
    "DestinationPolicy",
    "Resolver",
    "Upstream",
    "embedded_ipv4",
    "getaddrinfo_resolver",
    "headers_from_pairs",
    "load_pem_certificates",
    "pairs_from_headers",
    "tls_policy",
]
