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
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from .accesslog import AccessLog
from .config import ProxyConfig
from .interfaces import ICacheStore
from .proxy import Proxy, ProxyResource
from .store import DiskStore
from .upstream import DestinationPolicy, Resolver, Upstream

_log = Logger()


_DONE = Failure(ConnectionDone())


class _Channel(HTTPChannel):
    """An HTTP/1.1 channel that tells its site when it is gone."""

    site: _QuietSite
    taken_over: Any = None
    """The protocol that gets this connection's bytes after a CONNECT."""
    intercept: tuple[str, int] | None = None
    """For a channel inside an intercepted tunnel: the CONNECT authority."""

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.site.channels.add(self)

    def take_over(self, protocol: Any) -> None:
        """Hand the connection to ``protocol`` (after a CONNECT's 200): no
        more HTTP parsing, no HTTP idle timeout."""
        self.taken_over = protocol
        self.setTimeout(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.taken_over is not None:
            self.taken_over.dataReceived(data)
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        # LineReceiver's default drops the connection without a word; a request
        # line or header over 16 KiB gets a clear 400 instead (SPEC 8).
        self._respondToBadRequestAndDisconnect()

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.site.channels.discard(self)
        try:
            if self.taken_over is not None:
                self.taken_over.connectionLost(reason)
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class _Request(Request):
    """A Request whose ``*`` target goes to the proxy like any other.

    twisted.web answers ``OPTIONS *`` itself with 200 before any resource
    runs, which would bypass --allow-client; the proxy refuses or 400s it.
    """

    def _handleStar(self) -> None:  # noqa: N802
        site = self.site
        assert site is not None
        self.render(site.getResourceFor(self))


class _QuietSite(Site):
    """A Site that leaves access logging to cachingproxy's own access log and
    keeps track of its connections so that shutdown can close them."""

    displayTracebacks = False
    noisy = False
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.channels: set[_Channel] = set()

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

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind the listening ports while still root (twistd --uid/--gid
        drops privileges between this and startService)."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        # The resource is set by startService; no request arrives before
        # the reactor runs.
        site = self.site = _QuietSite(None)
        failures: list[str] = []
        for description in self.config.listen:
            d = serverFromString(self.reactor, description).listen(site)
            d.addCallback(self._listening, description)
            d.addErrback(self._listen_failed, description, failures)
        if failures:
            # TCP and UNIX endpoints fail synchronously; stop start-up here,
            # outside the Deferred, so twistd exits with the message.
            for port in self.ports:
                port.stopListening()
            _fatal("; ".join(failures))

    def startService(self) -> None:  # noqa: N802
        super().startService()
        config = self.config
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
        self.proxy = Proxy(
            config, self.store, self.upstream, self.reactor, access_log=self.access_log
        )
        assert self.site is not None
        self.site.resource = ProxyResource(self.proxy)

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
        message = f"--listen {description}: {failure.getErrorMessage()}"
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
