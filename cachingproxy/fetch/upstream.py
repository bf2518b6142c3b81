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
from attrs import frozen
from OpenSSL import crypto
from twisted.internet import defer, threads
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from cachingproxy.config import Network
from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.parent import (
    TunnelEndpoint,
    TunnelEndpointFactory,
    parent_endpoint,
)
from cachingproxy.interfaces import IUpstream

Resolver = Callable[[str, int], "defer.Deferred[list[str]]"]
"""Resolves a host name to IP address strings."""

_log = Logger()

_LOST = Failure(ConnectionDone())


_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (SPEC 8): IPv4-mapped
    ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 (the well-known
    ``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48``, last 32 bits),
    6to4 ``2002::/16`` and Teredo ``2001::/32`` (server and client)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if any(ip in net for net in _NAT64) or (
        ip in _IPV4_COMPATIBLE and int(ip) > 1  # not :: or ::1
    ):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


@frozen
class DestinationPolicy:
    """Which upstream addresses and ports may be reached (SPEC 8)."""

    allow_upstream: tuple[Network, ...] = ()
    upstream_ports: frozenset[int] = frozenset({80, 443})
    own_addresses: frozenset[str] = frozenset()
    own_listeners: set[tuple[str, int]] = attrs.field(factory=set)
    """(address, port) the proxy listens on, ``""`` for any address; filled in
    once listening.  Never reached, whatever --allow-upstream says (a loop)."""

    def refusal(self, address: str, port: int, mirrored: bool = False) -> str | None:
        """Why connecting to ``address:port`` is refused, or None if allowed.

        An IPv6 address that embeds IPv4 addresses is refused when any of
        them is (a NAT64 gateway would lead to the metadata service).
        """
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_ipv4(ip)
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            else:
                for v4 in inner:
                    reason = self._refusal(v4, port, mirrored)
                    if reason is not None:
                        return f"{address} embeds {reason}"
        return self._refusal(ip, port, mirrored)

    def _refusal(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        mirrored: bool,
    ) -> str | None:
        if (str(ip), port) in self.own_listeners or (
            ("", port) in self.own_listeners
            and (ip.is_loopback or str(ip) in self.own_addresses)
        ):
            return f"{ip}:{port} is the proxy itself"
        if any(ip in net for net in self.allow_upstream):
            return None
        if str(ip) in self.own_addresses:
            return f"{ip} is one of the proxy's own addresses"
        if not ip.is_global or ip.is_multicast:
            return f"{ip} is not a public address (see --allow-upstream)"
        if not mirrored and port not in self.upstream_ports:
            return f"port {port} is not an allowed upstream port (see --upstream-ports)"
        return None


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
                addresses = await _with_timeout(
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
        if self._tls and isinstance(protocol, _ClientProtocol):
            # --connect-timeout covers the TLS handshake too.
            left = f.connect_timeout - (f.reactor.seconds() - started)
            try:
                await _with_timeout(f.reactor, protocol.handshake_done(), left)
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


async def _with_timeout(reactor: Any, d: defer.Deferred[Any], seconds: float) -> Any:
    """Await ``d``, cancelling it and raising UpstreamTimeout after ``seconds``."""
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    call = reactor.callLater(seconds, expire)
    try:
        return await d
    except Exception:
        # Cancellation surfaces as CancelledError or wrapped in
        # ResponseNeverReceived, depending on when it happened.
        if timed_out:
            raise UpstreamTimeout(f"no answer within {seconds:g}s") from None
        raise
    finally:
        if call.active():
            call.cancel()


@implementer(IHandshakeListener)
class _ClientProtocol(HTTP11ClientProtocol):
    """Also shows the response's ``Connection`` header to the proxy, and
    enforces ``--read-timeout`` for the response head.

    Twisted keeps ``Connection`` among the connection-control headers, out of
    ``response.headers``, so the header names it lists (hop-by-hop, never to
    be forwarded) would otherwise reach the client.

    The head must arrive within ``read_timeout`` seconds of the request
    being sent (SPEC 5); the time the request body takes to go out does
    not count.  Between body bytes the reader of the body times out.
    """

    def __init__(
        self,
        quiescent_callback: Any,
        clock: Any = None,
        read_timeout: float | None = None,
    ) -> None:
        super().__init__(quiescent_callback)
        self._clock = clock
        self._read_timeout = read_timeout
        self._handshake: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        if not self._handshake.called:
            self._handshake.callback(None)

    def handshake_done(self) -> defer.Deferred[None]:
        """Fires once TLS is established, or the connection is gone."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: None) -> None:
            d.callback(None)
            return result

        self._handshake.addBoth(fire)
        return d

    def connectionLost(self, reason: Failure = _LOST) -> None:  # noqa: N802
        self.handshakeCompleted()
        super().connectionLost(reason)

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        d: defer.Deferred[IResponse] = super().request(request)
        if self._clock is not None and self._read_timeout is not None:
            self._time_head(d, self._clock, self._read_timeout)
        parser = self._parser
        if parser is not None:
            original = parser.headerReceived

            def header_received(name: bytes, value: bytes) -> None:
                original(name, value)
                if name.lower() == b"connection":
                    parser.headers.addRawHeader(b"connection", value)

            parser.headerReceived = header_received  # type: ignore[method-assign]
        return d

    def _time_head(
        self, d: defer.Deferred[IResponse], clock: Any, seconds: float
    ) -> None:
        timed_out: list[bool] = []
        calls: list[Any] = []

        def expire() -> None:
            if self.state == "TRANSMITTING":  # still sending the request body
                calls.append(clock.callLater(seconds, expire))
                return
            timed_out.append(True)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

        def done(result: Any) -> Any:
            if calls[-1].active():
                calls[-1].cancel()
            if timed_out and isinstance(result, Failure):
                return Failure(UpstreamTimeout(f"no response head within {seconds:g}s"))
            return result

        calls.append(clock.callLater(seconds, expire))
        d.addBoth(done)


class _QuietClientFactory(_HTTP11ClientFactory):
    """Does not log every new upstream connection; uses ``_ClientProtocol``."""

    noisy = False

    def __init__(
        self,
        quiescent_callback: Any,
        metadata: Any,
        *,
        clock: Any = None,
        read_timeout: float | None = None,
    ) -> None:
        super().__init__(quiescent_callback, metadata)
        self._clock = clock
        self._read_timeout = read_timeout

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:  # noqa: N802
        return _ClientProtocol(self._quiescentCallback, self._clock, self._read_timeout)


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
            _QuietClientFactory,
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
                _with_timeout(
                    self._reactor, d, self._connect_timeout * 2 + self._read_timeout
                )
            )
        # Resolving, connecting and TLS have the connect timeout; the head
        # must follow the request within the read timeout (_ClientProtocol).
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
