"""The request handler's front: checks a request, routes it (SPEC 2) and
hands it to the cached path, the uncached path, a mirror, the proxy's own
pages or CONNECT; logs it when it is over."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cachingproxy import __version__
from cachingproxy.cache import policy
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import ProxyConfig, Rule
from cachingproxy.fetch.sharing import Downloads
from cachingproxy.fetch.upstream import pairs_from_headers
from cachingproxy.front import methods
from cachingproxy.front.auth import ProxyAuth, send_auth_required
from cachingproxy.front.exchange import Exchange
from cachingproxy.front.limits import AllowedClients
from cachingproxy.front.origdst import original_destination
from cachingproxy.front.responses import abort, client_gone, send_error
from cachingproxy.front.routing import BadRequest, Listener, RouteKind, classify
from cachingproxy.front.surface import Surface
from cachingproxy.handler.cached import CachedPath
from cachingproxy.handler.forward import Forwarder, request_body
from cachingproxy.handler.plan import Plan, ServeBody
from cachingproxy.handler.quick import Prepared, QuickHits
from cachingproxy.handler.sender import Sender
from cachingproxy.interfaces import ICacheStore, IFleet, IKnownLookups, IUpstream
from cachingproxy.mirror.mirrors import MirrorTable
from cachingproxy.mirror.mirrorserve import MirrorService
from cachingproxy.ops import pages
from cachingproxy.ops.stats import Stats
from cachingproxy.tls.connect import handle_connect, intercepted_route

if TYPE_CHECKING:
    from cachingproxy.tls.ca import CertificateAuthority
    from cachingproxy.tls.intercept import InterceptPolicy

_log = Logger()


class ProxyResource(Resource):
    """twisted.web glue: every request, whatever its path, goes to ``Proxy``."""

    isLeaf = True

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request) -> Any:
        d = defer.Deferred.fromCoroutine(self._proxy.handle(request))
        d.addErrback(self._proxy.crashed, request)
        return NOT_DONE_YET


class Proxy:
    """Serves requests per SPEC 2-6 with a store, an upstream and a clock."""

    def __init__(
        self,
        config: ProxyConfig,
        store: ICacheStore,
        upstream: IUpstream,
        clock: IReactorTime,
        *,
        access_log: Callable[[dict[str, Any]], None] | None = None,
        stats: Stats | None = None,
        intercept: InterceptPolicy | None = None,
        ca: CertificateAuthority | None = None,
        auth: ProxyAuth | None = None,
        fleet: IFleet | None = None,
    ) -> None:
        self.fleet = fleet
        """--shared-store: shared downloads go through the fleet's upstream."""
        self.intercept = intercept
        self.ca = ca
        self.auth = auth
        """--proxy-auth: every request but those addressed to the proxy itself
        (its pages and mirrors) and those inside an intercepted tunnel (whose
        CONNECT was checked) needs Proxy-Authorization."""
        self._config = config
        self._allowed_clients = AllowedClients(config.allow_client)
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.downloads = Downloads()
        self.stats = stats or Stats(
            clock,
            usage=store.usage,
            in_flight=self.downloads.all,
        )
        if fleet is not None:
            self.stats.sections["shared_store"] = fleet.status
        self.rules: tuple[Rule, ...] = config.rules + policy.default_rules(
            config.index_ttl
        )
        self.via_name = config.names[0] if config.names else "cachingproxy"
        self.via = f"1.1 {self.via_name} (cachingproxy/{__version__})"
        self._names = frozenset(n.lower() for n in config.names)
        self._access_log = access_log
        self.forwarder = Forwarder(
            upstream,
            self.stats,
            via=self.via,
            offline=config.offline,
            purge=self.purge_url,
        )
        self.cached = CachedPath(
            config,
            store,
            upstream if fleet is None else fleet.upstream(upstream),
            clock,
            downloads=self.downloads,
            forwarder=self.forwarder,
            stats=self.stats,
            via=self.via,
        )
        self.sender = Sender(
            store,
            clock,
            downloads=self.downloads,
            stats=self.stats,
            via=self.via,
            read_timeout=config.read_timeout,
        )
        self.mirrors = MirrorService(
            MirrorTable(config.mirrors),
            cached=self.cached,
            forwarder=self.forwarder,
            sender=self.sender,
            store=store,
            config=config,
            rules=self.rules,
            clock=clock,
        )
        self.surface = self._surface()
        self.quick: QuickHits | None = None
        """Repeat hits answered from memory (not in a fleet, whose shared
        store the memo cannot watch)."""
        if fleet is None and IKnownLookups.providedBy(store):
            self.quick = QuickHits(
                store,
                clock,
                reusable=self.cached.reusable,
                allowed=self._client_allowed,
                purging=self.downloads.is_purging,
                expected=self.mirrors.expected,
                record=self._record_quick,
            )

    def _surface(self) -> Surface:
        return Surface(
            via=self.via,
            clock=self.clock,
            stats=self.stats,
            config=self._config,
            upstream=self.upstream,
            error=self.sender.fail,
            log_tunnel=self.log_tunnel,
            purge_url=self.purge_url,
            purge_prefix=self.purge_prefix,
            intercepts=self.intercepts,
            ca=self.ca,
        )

    @property
    def config(self) -> ProxyConfig:
        return self._config

    @config.setter
    def config(self, config: ProxyConfig) -> None:
        """Replace the configuration (tests set ports known only once
        listening); the narrow surface handed to other parts follows."""
        self._config = config
        self._allowed_clients = AllowedClients(config.allow_client)
        self.surface = self._surface()
        if self.quick is not None:
            self.quick.clear()

    # -- entry point -----------------------------------------------------------

    async def handle(self, request: Request) -> None:
        started = self.clock.seconds()
        info = Exchange(started)
        request.notifyFinish().addBoth(self._log_request, request, started, info)
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        fail = self.sender.fail
        if host is not None and not self._client_allowed(host):
            _log.warn("refused client {client}", client=host)
            return fail(request, 403, "client not allowed", info)
        if self._is_loop(request):
            return fail(request, 508, "loop detected (Via)", info)
        method = request.method.decode("latin-1")
        target = request.uri.decode("latin-1")
        local = request.getHost()
        listener = Listener(
            getattr(local, "host", ""), getattr(local, "port", 0), self._names
        )
        host_values = request.requestHeaders.getRawHeaders(b"host")
        if host_values is not None and len(host_values) > 1:
            return fail(request, 400, "several Host headers", info)
        intercept = getattr(request.channel, "intercept", None)
        try:
            if intercept is not None:
                route = intercepted_route(target, intercept)
            else:
                route = classify(
                    method,
                    target,
                    host_values[0].decode("latin-1") if host_values else None,
                    listener,
                    original_destination(request.channel.transport),
                )
        except BadRequest as e:
            _log.info("bad request from {client}: {e}", client=host, e=e)
            return fail(request, 400, str(e), info)
        if (
            self.auth is not None
            and route.kind is not RouteKind.SELF
            and intercept is None
        ):
            header = request.getHeader(b"proxy-authorization")
            if await self.auth.check(header, host or "-") is None:
                return send_auth_required(request, self.via)
        if route.kind is RouteKind.CONNECT:
            return await handle_connect(self.surface, request, route.url, info)
        if route.kind is RouteKind.SELF:
            if self.fleet is not None and route.path.startswith("/_fleet/"):
                info.own_page = True
                return await self.fleet.internal(request, route.path, self)
            match = self.mirrors.match(route.path)
            if match is not None:
                return await self.mirrors.serve(request, match, method, info)
            info.own_page = True
            return await pages.render(request, route.path, self.surface)
        info.url = route.url
        info.upstream = route.url.split("/", 3)[2]
        client_headers = pairs_from_headers(request.requestHeaders)
        rule = policy.select_rule(self.rules, route.url)
        if self.auth is None:
            info.rule = rule
        plan: Plan
        if (answer := methods.local_answer(method, client_headers)) is not None:
            plan = local_plan(answer)
        elif policy.request_bypass(rule, method, client_headers) is not None:
            plan = await self.forwarder.forward(
                route.url, method, client_headers, request_body(request)
            )
        else:
            plan = await self.cached.decide(
                route.url, rule, client_headers, head=method == "HEAD"
            )
        await self.sender.send(request, plan, info, client_headers)

    def crashed(self, failure: Failure, request: Request) -> None:
        _log.failure("error while serving {uri!r}", failure, uri=request.uri)
        if request.finished or client_gone(request):
            return
        if request.startedWriting:
            abort(request)
        else:
            send_error(request, 500, "internal error", via=self.via)

    # -- checks ----------------------------------------------------------------

    def _client_allowed(self, host: str) -> bool:
        return self._allowed_clients(host)

    def _is_loop(self, request: Request) -> bool:
        for value in request.requestHeaders.getRawHeaders(b"via", []):
            for hop in value.decode("latin-1").split(","):
                parts = hop.split()
                if len(parts) >= 2 and parts[1].lower() == self.via_name.lower():
                    return True
        return False

    # -- admin ------------------------------------------------------------------

    def purge_url(self, url: str) -> defer.Deferred[int]:
        """Drop every variant of ``url``, including one being downloaded,
        and the rewritten forms of a mirrored document (keyed ``url#…``)."""
        return defer.Deferred.fromCoroutine(
            self.downloads.purge(lambda u: u == url, partial(self._remove_url, url))
        )

    async def _remove_url(self, url: str) -> int:
        count = await self.store.remove(url)
        await self.store.remove_prefix(url + "#")
        return count

    def purge_prefix(self, prefix: str) -> defer.Deferred[int]:
        """Drop every entry whose URL starts with ``prefix``."""
        return defer.Deferred.fromCoroutine(
            self.downloads.purge(
                lambda u: u.startswith(prefix),
                lambda: self.store.remove_prefix(prefix),
            )
        )

    def intercepts(self, host: str) -> bool:
        """Whether CONNECTs to ``host`` are intercepted (--intercept)."""
        return self.intercept is not None and self.intercept.matches(host)

    # -- logging ---------------------------------------------------------------

    def log_tunnel(
        self, request: Request, started: float, authority: str, up: int, down: int
    ) -> None:
        """The access log line of a CONNECT tunnel, written when it closes."""
        if self._access_log is None:
            return
        client = request.getClientAddress()
        self._access_log(
            {
                "time": started,
                "client": getattr(client, "host", "-"),
                "method": "CONNECT",
                "url": authority,
                "status": 200,
                "bytes": up + down,
                "duration_ms": int((self.clock.seconds() - started) * 1000),
                "cache": CacheStatus.TUNNEL,
                "upstream": authority,
            }
        )

    def _log_request(
        self, _: object, request: Request, started: float, info: Exchange
    ) -> None:
        if info.tunnel:
            return  # logged when the tunnel closes
        if self.quick is not None:
            self.quick.offer(request, info)
        client = request.getClientAddress()
        self._record(
            getattr(client, "host", "-"),
            request.method.decode("latin-1"),
            info.url or request.uri.decode("latin-1"),
            request.code,
            request.sentLength,
            started,
            info,
        )

    def _record_quick(
        self, client: str | None, ready: Prepared, now: float, status: int, sent: int
    ) -> None:
        """The record of a repeat hit answered from memory."""
        info = Exchange(now, CacheStatus.HIT, ready.upstream, ready.url)
        self._record(client or "-", "GET", ready.url, status, sent, now, info)

    def _record(
        self,
        client: str,
        method: str,
        url: str,
        status: int,
        sent: int,
        started: float,
        info: Exchange,
    ) -> None:
        """Count a finished request and write its access log line."""
        duration = self.clock.seconds() - started
        if not info.own_page:
            self.stats.record_request(
                cache=info.cache,
                status=status,
                bytes_sent=sent,
                duration=duration,
                host=info.upstream,
                url=info.url or "",
            )
        if self._access_log is None:
            return
        self._access_log(
            {
                "time": started,
                "client": client,
                "method": method,
                "url": url,
                "status": status,
                "bytes": sent,
                "duration_ms": int(duration * 1000),
                "cache": info.cache,
                "upstream": info.upstream,
            }
        )


def local_plan(answer: methods.LocalAnswer) -> ServeBody:
    """A response the proxy gives itself (TRACE, OPTIONS Max-Forwards: 0)."""
    body = f"{answer.status} {answer.message}\n".encode() if answer.message else b""
    extra = [("Content-Type", "text/plain; charset=utf-8")] if body else []
    return ServeBody(answer.status, (*answer.headers, *extra), body, CacheStatus.NONE)


__all__ = ["Proxy", "ProxyResource"]
