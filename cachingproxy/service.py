"""The service tree ``twistd cachingproxy`` runs: store, upstream, listeners."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachingproxy.cache.store import DiskStore
from cachingproxy.config import ProxyConfig
from cachingproxy.fetch.upstream import DestinationPolicy, Resolver, Upstream
from cachingproxy.front.auth import HtpasswdError, ProxyAuth
from cachingproxy.front.backlog import with_backlog
from cachingproxy.front.channel import ProxySite
from cachingproxy.front.gate import HeadGate
from cachingproxy.interfaces import ICacheStore
from cachingproxy.ops.accesslog import AccessLog
from cachingproxy.ops.stats import Stats
from cachingproxy.proxy import Proxy, ProxyResource
from cachingproxy.tls.ca import CertificateAuthority
from cachingproxy.tls.intercept import InterceptPolicy
from cachingproxy.tls.sni import SNIFactory

if TYPE_CHECKING:
    from cachingproxy.fleet.node import Fleet

_log = Logger()


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
        self.site: ProxySite | None = None
        self.policy = DestinationPolicy(
            allow_upstream=config.allow_upstream,
            upstream_ports=config.upstream_ports,
            own_addresses=_own_addresses(),
        )
        self._previous_sighup: Any = None
        self.auth: ProxyAuth | None = None
        self.fleet: Fleet | None = None

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind the listening ports while still root (twistd --uid/--gid
        drops privileges between this and startService)."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        # The resource is set by startService; no request arrives before
        # the reactor runs.
        site = self.site = ProxySite(None, self.config.max_client_connections)
        failures: list[str] = []
        sni = SNIFactory(
            lambda: None if self.proxy is None else self.proxy.surface, site
        )
        listeners: list[tuple[str, Any, str]]
        listeners = [(d, site, "--listen") for d in self.config.listen]
        listeners += [(d, sni, "--listen-tls") for d in self.config.listen_tls]
        for description, factory, option in listeners:
            d = self.endpoint(description).listen(factory)
            d.addCallback(self._listening, description)
            d.addErrback(self._listen_failed, f"{option} {description}", failures)
        if failures:
            # TCP and UNIX endpoints fail synchronously; stop start-up here,
            # outside the Deferred, so twistd exits with the message.
            for port in self.ports:
                port.stopListening()
            _fatal("; ".join(failures))

    def endpoint(self, description: str) -> IStreamServerEndpoint:
        """The endpoint ``description`` is listened on (a worker process
        adopts the socket its supervisor bound instead)."""
        return serverFromString(self.reactor, with_backlog(description))

    def open_store(self) -> ICacheStore:
        """The disk store in --cache-dir (a worker opens it without the
        start-up sweep, which its supervisor did)."""
        config = self.config
        return DiskStore.open(
            config.cache_dir, reactor=self.reactor, max_size=config.max_size
        )

    def make_stats(self) -> Stats | None:
        """The statistics of the proxy (made before it); None: its own."""
        return None

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
                self.store = self.open_store()
            except Exception as e:
                _fatal(f"--cache-dir {config.cache_dir}: cannot open the cache: {e}")
        if config.shared_store is not None and self.fleet is None:
            from cachingproxy.fleet.node import Fleet
            from cachingproxy.fleet.settings import with_advertised_name

            self.config = config = with_advertised_name(config)

            assert self.store is not None
            self.fleet = Fleet(config, self.reactor, self.store)
            self.store = self.fleet.store
            self.fleet.start()
        self.upstream = Upstream(
            self.reactor,
            self.policy,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            upstream_ca=config.upstream_ca,
            resolve=self.resolve,
            upstream_proxy=config.upstream_proxy,
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
            stats=self.make_stats(),
            fleet=self.fleet,
        )
        assert self.site is not None
        self.site.resource = ProxyResource(self.proxy)
        self.site.quick = self.proxy.quick
        self.site.via = self.proxy.via
        self.site.gate = HeadGate(
            config.allow_client, self.auth, frozenset(n.lower() for n in config.names)
        )

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
        _log.critical("{text}", text=message)
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
        if self.fleet is not None:
            await self.fleet.stop()
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
