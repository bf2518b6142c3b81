"""The service tree ``twistd cachingproxy`` runs: store, upstream, listeners."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from .accesslog import AccessLog
from .auth import HtpasswdError, ProxyAuth
from .ca import CertificateAuthority
from .config import ProxyConfig
from .intercept import InterceptPolicy
from .interfaces import ICacheStore
from .limits import ConnectionLimiter, RateLimitedLog, client_key, held_back
from .proxy import Proxy, ProxyResource
from .sni import SNIFactory
from .store import DiskStore
from .upstream import DestinationPolicy, Resolver, Upstream

_log = Logger()


_DONE = Failure(ConnectionDone())


HEAD_TIMEOUT = 30.0
"""Seconds a client has to send a whole request head, from its first byte
(or from the connection's start): a trickle of bytes does not extend it."""

IDLE_TIMEOUT = 60.0
"""Seconds a keep-alive connection may sit idle between requests."""

MAX_HEADERS = 100
"""Header fields a request may have."""

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


class _Channel(HTTPChannel):
    """An HTTP/1.1 channel that tells its site when it is gone, and that
    holds the line against hostile clients (SPEC 8): a deadline for the
    request head, limits on its size and header count answered with a clear
    4xx, no obs-fold, bare LF or Transfer-Encoding other than chunked, and at
    most ``--max-client-connections`` connections per client address.

    Twisted's own idle timeout (``timeOut``) runs between requests; it is off
    while a response is being sent, however slowly the client reads.
    """

    site: _QuietSite
    maxHeaders = MAX_HEADERS
    taken_over: Any = None
    """The protocol that gets this connection's bytes after a CONNECT."""
    intercept: tuple[str, int] | None = None
    """For a channel inside an intercepted tunnel: the CONNECT authority."""
    _client: str | None = None
    """The address counted in the site's ConnectionLimiter, if any."""
    _refused = False
    """An error was answered; every later byte is ignored."""
    _head_lines = 0
    """Lines of the request head so far (0: waiting for a request line)."""
    _head_size = 0
    _head_timer: IDelayedCall | None = None
    _receiving = 0
    """dataReceived calls in progress (requestDone re-enters it)."""

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.site.channels.add(self)
        # The channel inside an intercepted tunnel is the same connection,
        # counted already.
        if self.intercept is None:
            client = client_key(self.transport.getPeer())  # type: ignore[union-attr]
            if client is not None:
                if not self.site.limiter.acquire(client):
                    self.site.refused(client)
                    self._reject(429, "too many connections from your address")
                    return
                self._client = client
        self._start_head_timer()

    def take_over(self, protocol: Any) -> None:
        """Hand the connection to ``protocol`` (after a CONNECT's 200): no
        more HTTP parsing, no HTTP idle timeout."""
        self.taken_over = protocol
        self.setTimeout(None)
        # requestDone would restore the idle timeout saved for the CONNECT.
        self._savedTimeOut = None
        self._stop_head_timer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.taken_over is not None:
            self.taken_over.dataReceived(data)
            return
        if self._refused:
            return
        if self.line_mode and not self._handlingRequest and self._head_timer is None:
            self._start_head_timer()  # the first byte of the next request
        self._receiving += 1
        try:
            super().dataReceived(data)
        finally:
            self._receiving -= 1
        if (
            self._receiving == 0
            and self.line_mode
            and not self._refused
            and self.taken_over is None
            and b"\n" in self._buffer
        ):
            # Lines end with CRLF: an LF left in an unfinished line is bare
            # (and would leave the client waiting for the head's end).  Only
            # the outermost call looks: a nested one (pipelined bytes given
            # back by requestDone) just queues them for the running loop.
            self._reject(400, "bare LF in the request head")

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if b"\n" in line:
            return self._reject(400, "bare LF in the request head")
        self._head_size += len(line)
        if self._head_size > self.totalHeadersSize:
            return self._reject(431, "request head larger than 16 KiB")
        if self._head_lines == 0:
            self._head_lines = 1 if line else 0
        elif not line:
            self._head_lines = 0  # the end of the head
            self._head_size = 0
        elif line[:1] in (b" ", b"\t"):
            return self._reject(400, "header continuation line (obs-fold)")
        else:
            self._head_lines += 1
            if self._head_lines - 1 > self.maxHeaders:
                return self._reject(431, f"more than {self.maxHeaders} header fields")
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:  # noqa: N802
        name, sep, value = line.partition(b":")
        if (
            sep
            and name.strip().lower() == b"transfer-encoding"
            and value.strip(b" \t").lower() != b"chunked"
        ):
            # Twisted takes "identity" as no body at all: a smuggling shape.
            self._reject(400, "Transfer-Encoding other than chunked")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._stop_head_timer()
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        # LineReceiver's default drops the connection without a word.
        if self._head_lines == 0:
            self._reject(414, "request line longer than 16 KiB")
        else:
            self._reject(431, "header line longer than 16 KiB")

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        # Twisted's own rejections (malformed request line or header,
        # conflicting Content-Length/Transfer-Encoding, bad chunks).
        self._reject(400, "malformed request")

    def timeoutConnection(self) -> None:  # noqa: N802
        if self.taken_over is None:
            super().timeoutConnection()

    def _reject(self, status: int, message: str) -> None:
        """Answer ``status`` (and ``message`` as the body), then close."""
        if self._refused:
            return
        self._refused = True
        self._stop_head_timer()
        # No idle timeout any more, but a client that does not read its
        # answer is cut off as after one (HTTPChannel.timeoutConnection).
        self.setTimeout(None)
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(
                self.abortTimeout, self.forceAbortClient
            )
        body = f"{status} {message}\n".encode()
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body)
        )
        self.loseConnection()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.callLater(self.site.head_timeout, self._head_late)

    def _stop_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_late(self) -> None:
        self._head_timer = None
        if self.taken_over is not None or self._handlingRequest or not self.line_mode:
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        self.site.refused(client_key(peer) or "-", "slow request head")
        self._reject(408, "request head not received in time")

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.site.channels.discard(self)
        self._stop_head_timer()
        client, self._client = self._client, None
        if client is not None:
            self.site.limiter.release(client)
        try:
            if self.taken_over is not None:
                self.taken_over.connectionLost(reason)
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class _Request(Request):
    """A Request whose ``*`` target goes to the proxy like any other, and
    whose 400 closes the connection.

    twisted.web answers ``OPTIONS *`` itself with 200 before any resource
    runs, which would bypass --allow-client; the proxy refuses or 400s it.
    """

    def _handleStar(self) -> None:  # noqa: N802
        site = self.site
        assert site is not None
        self.render(site.getResourceFor(self))

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.code == 400 and self.channel is not None:
            # The bytes behind a request the proxy could not make sense of
            # (a Host contradicting the URL …) are not served either.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        super().write(data)


class _QuietSite(Site):
    """A Site that leaves access logging to cachingproxy's own access log,
    keeps track of its connections so that shutdown can close them, and
    counts them per client address (``--max-client-connections``)."""

    displayTracebacks = False
    noisy = False
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    head_timeout = HEAD_TIMEOUT
    """Seconds for a request head (tests make it short)."""

    def __init__(self, resource: Any, max_client_connections: int = 256) -> None:
        super().__init__(resource, timeout=IDLE_TIMEOUT)
        self.channels: set[_Channel] = set()
        self.limiter = ConnectionLimiter(max_client_connections)
        self._refusals = RateLimitedLog(self.reactor)

    def refused(self, client: str, why: str = "") -> None:
        """Log a refused connection (rate-limited per client address)."""
        suppressed = self._refusals.allow(client)
        if suppressed is None:
            return
        if why:
            _log.info(
                "closed {client}: {why}{more}",
                client=client,
                why=why,
                more=held_back(suppressed),
            )
        else:
            _log.warn(
                "refused a connection from {client}: it holds {n} already"
                " (--max-client-connections){more}",
                client=client,
                n=self.limiter.open(client),
                more=held_back(suppressed),
            )

    def log(self, request: Any) -> None:
        pass

    def close_connections(self) -> defer.Deferred[None]:
        """Drop every client connection; fires when all are gone."""
        channels = list(self.channels)
        for channel in channels:
            channel.transport.abortConnection()  # type: ignore[union-attr]
        return defer.DeferredList([c.lost for c in channels]).addCallback(
            lambda _: None
        )


class ProxyService(Service):
    """Opens the cache, builds the proxy and listens on every endpoint."""

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        store: ICacheStore | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        """``resolve`` replaces the getaddrinfo resolver of the upstream (tests
        use it to make names resolve to chosen addresses)."""
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        self.store = store
        self.resolve = resolve
        self.proxy: Proxy | None = None
        self.upstream: Upstream | None = None
        self.ports: list[IListeningPort] = []
        self.access_log: AccessLog | None = None
        self.site: _QuietSite | None = None
        self.policy = DestinationPolicy(
            allow_upstream=config.allow_upstream,
            upstream_ports=config.upstream_ports,
            own_addresses=_own_addresses(),
        )
        self._previous_sighup: Any = None
        self.auth: ProxyAuth | None = None

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind the listening ports while still root (twistd --uid/--gid
        drops privileges between this and startService)."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        # The resource is set by startService; no request arrives before
        # the reactor runs.
        site = self.site = _QuietSite(None, self.config.max_client_connections)
        failures: list[str] = []
        sni = SNIFactory(lambda: self.proxy, site)
        listeners: list[tuple[str, Any, str]]
        listeners = [(d, site, "--listen") for d in self.config.listen]
        listeners += [(d, sni, "--listen-tls") for d in self.config.listen_tls]
        for description, factory, option in listeners:
            d = serverFromString(self.reactor, description).listen(factory)
            d.addCallback(self._listening, description)
            d.addErrback(self._listen_failed, f"{option} {description}", failures)
        if failures:
            # TCP and UNIX endpoints fail synchronously; stop start-up here,
            # outside the Deferred, so twistd exits with the message.
            for port in self.ports:
                port.stopListening()
            _fatal("; ".join(failures))

    def startService(self) -> None:  # noqa: N802
        super().startService()
        config = self.config
        if config.proxy_auth is not None:
            try:
                self.auth = ProxyAuth(config.proxy_auth, self.reactor, self.reactor)
            except HtpasswdError as e:
                _fatal(f"--proxy-auth {config.proxy_auth}: {e}")
        if self.site is None:
            self._listen()
        if self.store is None:
            try:
                self.store = DiskStore.open(
                    config.cache_dir, reactor=self.reactor, max_size=config.max_size
                )
            except Exception as e:
                _fatal(f"--cache-dir {config.cache_dir}: cannot open the cache: {e}")
        self.upstream = Upstream(
            self.reactor,
            self.policy,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            upstream_ca=config.upstream_ca,
            resolve=self.resolve,
        )
        if config.access_log is not None:
            self.access_log = AccessLog(config.access_log)
            self._reopen_on_sighup(self.access_log)
        assert self.store is not None
        intercept, ca = self._interception()
        self.proxy = Proxy(
            config,
            self.store,
            self.upstream,
            self.reactor,
            access_log=self.access_log,
            intercept=intercept,
            ca=ca,
            auth=self.auth,
        )
        assert self.site is not None
        self.site.resource = ProxyResource(self.proxy)

    def _interception(
        self,
    ) -> tuple[InterceptPolicy | None, CertificateAuthority | None]:
        """The --intercept policy and its CA (given, or made in the cache dir)."""
        config = self.config
        if not config.intercept:
            return None, None
        policy = InterceptPolicy(config.intercept)
        try:
            if config.ca_cert is not None or config.ca_key is not None:
                if config.ca_cert is None or config.ca_key is None:
                    raise ValueError("--ca-cert and --ca-key go together")
                ca = CertificateAuthority.load(config.ca_cert, config.ca_key)
            else:
                ca = CertificateAuthority.load_or_create(
                    config.cache_dir, policy.permitted_subtrees()
                )
        except ValueError as e:
            _fatal(f"--ca-cert/--ca-key: {e}")
        return policy, ca

    def _listening(self, port: IListeningPort, description: str) -> None:
        self.ports.append(port)
        address = port.getHost()
        if isinstance(address, IPv4Address | IPv6Address):
            host = address.host
            unspecified = host in ("0.0.0.0", "::", "")
            self.policy.own_listeners.add(("" if unspecified else host, address.port))
        _log.info("cachingproxy listening on {where}", where=description)

    def _listen_failed(
        self, failure: Failure, description: str, failures: list[str]
    ) -> None:
        message = f"{description}: {failure.getErrorMessage()}"
        if not self.reactor.running:
            failures.append(message)
            return
        _log.critical("{message}", message=message)
        self.reactor.stop()

    def _reopen_on_sighup(self, access_log: AccessLog) -> None:
        """logrotate: SIGHUP reopens the access log (in the reactor thread)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: object) -> None:
            self.reactor.callFromThread(access_log.reopen)

        self._previous_sighup = signal.signal(signal.SIGHUP, handler)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            await defer.maybeDeferred(port.stopListening)
        if self.site is not None:
            await self.site.close_connections()
        if self.auth is not None:
            self.auth.close()
        if self.upstream is not None:
            await self.upstream.close()
        if self.store is not None:
            await self.store.close()
        if self.access_log is not None:
            if self._previous_sighup is not None:
                signal.signal(signal.SIGHUP, self._previous_sighup)
                self._previous_sighup = None
            self.access_log.close()


def _own_addresses() -> frozenset[str]:
    """The addresses this host's name resolves to (best effort)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def _fatal(message: str) -> None:
    """Stop start-up with an error line, not a traceback."""
    print(f"cachingproxy: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def make_service(config: ProxyConfig, reactor: object | None = None) -> IService:
    """The service ``twistd cachingproxy`` runs."""
    return ProxyService(config, reactor)


__all__ = ["ProxyService", "make_service"]
