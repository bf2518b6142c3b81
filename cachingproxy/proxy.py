"""The request handler: routes a request and serves it from cache or upstream."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.error import (
    ConnectionDone,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cachingproxy import __version__
from cachingproxy.cache import headers as H
from cachingproxy.cache import invalidation, policy
from cachingproxy.cache.age import corrected_age, relayed_age
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import ProxyConfig, Rule
from cachingproxy.errors import BodyMissing
from cachingproxy.fetch.download import (
    Download,
    Downloads,
    FetchSettings,
    PassingThrough,
)
from cachingproxy.fetch.outcomes import (
    Discard,
    Outcome,
    OutcomeKind,
    describe,
    error_status,
    plan_range,
)
from cachingproxy.front import methods
from cachingproxy.front.auth import ProxyAuth, send_auth_required
from cachingproxy.front.exchange import Exchange
from cachingproxy.front.limits import client_allowed
from cachingproxy.front.origdst import original_destination
from cachingproxy.front.responses import (
    PassThrough,
    abort,
    client_gone,
    send_error,
)
from cachingproxy.front.routing import BadRequest, Listener, RouteKind, classify
from cachingproxy.front.surface import Surface
from cachingproxy.interfaces import ICacheStore, IUpstream
from cachingproxy.mirror import documents
from cachingproxy.mirror.mirrors import MirrorTable, Target
from cachingproxy.mirror.mirrorserve import MirrorServing
from cachingproxy.mirror.rewrite import MAX_DOCUMENT, Digest
from cachingproxy.ops import pages
from cachingproxy.ops.stats import Stats, upstream_error_kind
from cachingproxy.tls.connect import handle_connect, intercepted_route

if TYPE_CHECKING:
    from cachingproxy.tls.ca import CertificateAuthority
    from cachingproxy.tls.intercept import InterceptPolicy
from cachingproxy.fetch.upstream import headers_from_pairs, pairs_from_headers

_log = Logger()

# Request headers never sent upstream on the cached path: the proxy makes
# its own conditional and range requests.
_CACHED_PATH_DROP = frozenset(
    {
        "host",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "via",
    }
)


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


class Proxy(MirrorServing):
    """Serves requests per SPEC 2-5 with a store, an upstream and a clock."""

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
    ) -> None:
        self.intercept = intercept
        self.ca = ca
        self.auth = auth
        """--proxy-auth: every request but those addressed to the proxy itself
        (its pages and mirrors) and those inside an intercepted tunnel (whose
        CONNECT was checked) needs Proxy-Authorization."""
        self._config = config
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.downloads = Downloads()
        self.stats = stats or Stats(
            clock,
            usage=store.usage,
            in_flight=self.downloads.all,
        )
        self.rules: tuple[Rule, ...] = config.rules + policy.default_rules(
            config.index_ttl
        )
        self.via_name = config.names[0] if config.names else "cachingproxy"
        self.via = f"1.1 {self.via_name} (cachingproxy/{__version__})"
        self._names = frozenset(n.lower() for n in config.names)
        self._settings = FetchSettings(
            negative_ttl=config.negative_ttl,
            # A body bigger than the whole budget streams through unstored.
            max_object_size=min(config.max_object_size, config.max_size),
            read_timeout=config.read_timeout,
        )
        self._access_log = access_log
        self.mirrors = MirrorTable(config.mirrors)
        self._mirror_rule = Rule(re.compile(""), config.index_ttl, name="mirror")
        self._protocol_rules: dict[str, tuple[Rule, ...]] = {}
        self.digests: OrderedDict[str, Digest] = OrderedDict()
        """Digests published by index documents served, by the cache key of
        the file they describe (bounded, oldest dropped)."""
        self.surface = self._surface()

    def _surface(self) -> Surface:
        return Surface(
            via=self.via,
            clock=self.clock,
            stats=self.stats,
            config=self._config,
            upstream=self.upstream,
            error=self._error,
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
        self.surface = self._surface()

    # -- entry point -----------------------------------------------------------

    async def handle(self, request: Request) -> None:
        started = self.clock.seconds()
        info = Exchange(started)
        request.notifyFinish().addBoth(self._log_request, request, started, info)
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        if host is not None and not self._client_allowed(host):
            _log.warn("refused client {client}", client=host)
            return self._error(request, 403, "client not allowed", info)
        if self._is_loop(request):
            return self._error(request, 508, "loop detected (Via)", info)
        method = request.method.decode("latin-1")
        target = request.uri.decode("latin-1")
        local = request.getHost()
        listener = Listener(
            getattr(local, "host", ""), getattr(local, "port", 0), self._names
        )
        host_values = request.requestHeaders.getRawHeaders(b"host")
        if host_values is not None and len(host_values) > 1:
            return self._error(request, 400, "several Host headers", info)
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
            return self._error(request, 400, str(e), info)
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
            match = self.mirrors.match(route.path) if self.mirrors else None
            if match is not None:
                return await self._mirror(request, match, method, info)
            info.own_page = True
            return await pages.render(request, route.path, self.surface)
        info.url = route.url
        info.upstream = route.url.split("/", 3)[2]
        client_headers = pairs_from_headers(request.requestHeaders)
        if (answer := methods.local_answer(method, client_headers)) is not None:
            return self._local(request, answer, info)
        rule = policy.select_rule(self.rules, route.url)
        if policy.request_bypass(rule, method, client_headers) is not None:
            return await self._bypass(request, route.url, method, client_headers, info)
        await self._cached(request, route.url, rule, client_headers, info)

    def crashed(self, failure: Failure, request: Request) -> None:
        _log.failure("error while serving {uri!r}", failure, uri=request.uri)
        if request.finished or client_gone(request):
            return
        if request.startedWriting:
            abort(request)
        else:
            send_error(
                request, 500, "internal error", cache=CacheStatus.NONE, via=self.via
            )

    # -- checks ----------------------------------------------------------------

    def _client_allowed(self, host: str) -> bool:
        return client_allowed(host, self.config.allow_client)

    def _is_loop(self, request: Request) -> bool:
        for value in request.requestHeaders.getRawHeaders(b"via", []):
            for hop in value.decode("latin-1").split(","):
                parts = hop.split()
                if len(parts) >= 2 and parts[1].lower() == self.via_name.lower():
                    return True
        return False

    # -- the cached path -------------------------------------------------------

    async def _cached(
        self,
        request: Request,
        url: str,
        rule: Rule,
        client_headers: list[Header],
        info: Exchange,
    ) -> None:
        head_only = request.method == b"HEAD"
        entry = policy.select_variant(await self.store.lookup(url), client_headers)
        now = self.clock.seconds()
        if entry is not None:
            age = policy.current_age(entry, now)
            fresh = policy.is_fresh(
                rule, entry, now, self.config.index_ttl, self.config.negative_ttl
            )
            if fresh and not (
                policy.request_wants_revalidation(rule, client_headers, age)
                or policy.index_refresh_due(
                    rule, entry, client_headers, now, self.config.index_refresh
                )
            ):
                return await self._serve_entry(
                    request, entry, CacheStatus.HIT, client_headers, info
                )
            if self.config.offline:
                return await self._serve_entry(
                    request, entry, CacheStatus.OFFLINE, client_headers, info
                )
        elif self.config.offline:
            return self._error(
                request, 504, "not cached and --offline", info, CacheStatus.OFFLINE
            )
        if policy.only_if_cached(client_headers):
            return self._error(
                request, 504, "not cached (only-if-cached)", info, CacheStatus.MISS
            )
        if head_only and entry is None:
            return await self._bypass(
                request, url, "HEAD", client_headers, info, CacheStatus.MISS
            )
        download = self.downloads.get(url)
        if download is None:
            download = self._new_download(
                url, rule, client_headers, entry, shared=True, target=info.mirror
            )
        outcome = await download.wait(client_headers)
        if outcome.kind is OutcomeKind.RETRY:
            # Another variant (or a passthrough another client took): the
            # clients of one variant share one download of it.
            variant = policy.variant_of(download.vary, client_headers)
            sibling = (
                self.downloads.get_variant(url, variant) if download.vary else None
            )
            if sibling is not None:
                outcome = await sibling.wait(client_headers)
            if sibling is None or outcome.kind is OutcomeKind.RETRY:
                sibling = self._new_download(
                    url,
                    rule,
                    client_headers,
                    entry,
                    shared=False,
                    target=info.mirror,
                )
                if download.vary:
                    self.downloads.add_variant(sibling, variant)
                outcome = await sibling.wait(client_headers)
            download = sibling
        await self._serve_outcome(
            request, download, outcome, rule, entry, client_headers, info
        )

    def _new_download(
        self,
        url: str,
        rule: Rule,
        client_headers: list[Header],
        stale: StoredResponse | None,
        *,
        shared: bool,
        target: Target | None = None,
    ) -> Download:
        drop = _CACHED_PATH_DROP | ({"accept-encoding"} if target else set())
        upstream_headers = [
            (k, v) for k, v in H.end_to_end(client_headers) if k.lower() not in drop
        ]
        upstream_headers.append(("Via", self._upstream_via(client_headers)))
        candidates = target.candidates if target else [(url, "")]
        download = Download(
            url=url,
            upstream_url=candidates[0][0],
            label=candidates[0][1],
            fallbacks=candidates[1:],
            mirrored=target is not None,
            expected=self.digests.get(url) if target else None,
            request_headers=upstream_headers,
            client_headers=client_headers,
            stale=stale,
            rule=rule,
            store=self.store,
            upstream=self.upstream,
            clock=self.clock,
            settings=self._settings,
            on_done=self.downloads.remove,
            on_upstream_bytes=self.stats.record_upstream_bytes,
            on_upstream_error=self.stats.record_upstream_error,
        )
        if shared:
            self.downloads.add(download)
        download.start()
        return download

    async def _serve_outcome(
        self,
        request: Request,
        download: Download,
        outcome: Outcome,
        rule: Rule,
        stale: StoredResponse | None,
        client_headers: list[Header],
        info: Exchange,
    ) -> None:
        if outcome.kind is OutcomeKind.STREAM:
            return await self._follow(request, download, outcome, client_headers, info)
        if outcome.kind is OutcomeKind.NOT_MODIFIED:
            assert outcome.entry is not None
            return await self._serve_entry(
                request, outcome.entry, CacheStatus.REVALIDATED, client_headers, info
            )
        if outcome.kind is OutcomeKind.PASSTHROUGH:
            assert outcome.response is not None
            return self._pass_through(
                request, outcome.response, outcome, CacheStatus.MISS, info
            )
        # ERROR (or a second RETRY, which cannot normally happen)
        now = self.clock.seconds()
        if stale is not None and policy.stale_allowed(
            rule,
            stale,
            now,
            self.config.index_ttl,
            self.config.negative_ttl,
            self.config.max_stale,
        ):
            _log.info(
                "upstream failed for {url}; serving stale: {why}",
                url=download.url,
                why=describe(outcome),
            )
            if outcome.response is not None:
                outcome.response.deliverBody(Discard())
            return await self._serve_entry(
                request, stale, CacheStatus.STALE, client_headers, info
            )
        if outcome.response is not None:  # the origin's own 5xx (SPEC 5)
            return self._pass_through(
                request, outcome.response, outcome, CacheStatus.MISS, info
            )
        status, message = error_status(outcome)
        return self._error(request, status, message, info, CacheStatus.MISS)

    async def _serve_entry(
        self,
        request: Request,
        entry: StoredResponse,
        cache: CacheStatus,
        client_headers: list[Header],
        info: Exchange,
    ) -> None:
        info.cache = cache
        self.store.touch(entry)
        age = policy.current_age(entry, self.clock.seconds())
        if self._is_document(info, entry.headers) and entry.size <= MAX_DOCUMENT:
            try:
                body = await documents.read_entry(self.store, entry, MAX_DOCUMENT)
            except BodyMissing:
                await self.store.remove(entry.url, entry.variant)
                return self._error(request, 502, "stored document vanished", info)
            return self._send_document(
                request, entry.status, entry.headers, body, cache, info, age=age
            )
        if policy.not_modified(entry, client_headers):
            self._set_head(
                info, request, 304, entry.headers, cache=cache, via=self.via, age=age
            )
            request.responseHeaders.removeHeader(b"content-length")
            request.finish()
            return
        planned = plan_range(
            entry.status,
            client_headers if policy.if_range_matches(entry, client_headers) else [],
            entry.size,
        )
        if planned is None:
            self._set_head(
                info,
                request,
                416,
                [("Content-Range", f"bytes */{entry.size}")],
                cache=cache,
                via=self.via,
                age=age,
                length=0,
            )
            request.finish()
            return
        status, start, end, extra = planned
        self._set_head(
            info,
            request,
            status,
            [*entry.headers, *extra],
            cache=cache,
            via=self.via,
            age=age,
            length=end - start,
        )
        if request.method == b"HEAD" or end == start:
            request.finish()
            return
        try:
            await self.store.read(entry, request, start, end)
        except BodyMissing:
            _log.warn("body of {url} vanished; dropping the entry", url=entry.url)
            await self.store.remove(entry.url, entry.variant)
            abort(request)
            return
        except ConnectionDone:
            return
        if not client_gone(request):
            request.finish()

    async def _follow(
        self,
        request: Request,
        download: Download,
        outcome: Outcome,
        client_headers: list[Header],
        info: Exchange,
    ) -> None:
        if client_gone(request):
            return  # the client left while the head was on its way
        # A body that is complete but not yet committed is already ours.
        cache = info.cache = (
            CacheStatus.HIT if download.body_complete else CacheStatus.MISS
        )
        if self._is_document(info, outcome.headers):
            try:
                body = await documents.read_download(
                    download, download.open_reader(), MAX_DOCUMENT
                )
            except Exception as e:
                return self._error(request, 502, f"index document: {e}", info, cache)
            return self._send_document(
                request, outcome.status, outcome.headers, body, cache, info, age=0
            )
        status, start, end = outcome.status, 0, download.total
        extra: list[Header] = []
        if download.total is not None:
            # A range past the end of a file not yet stored: the whole file.
            status, start, end, extra = plan_range(
                status, client_headers, download.total
            ) or (status, 0, download.total, [])
        self._set_head(
            info,
            request,
            status,
            [*outcome.headers, *extra],
            cache=cache,
            via=self.via,
            length=None if end is None else end - start,
            phrase=outcome.phrase if status == outcome.status else None,
            age=corrected_age(
                outcome.headers, download.started_at, self.clock.seconds()
            ),
        )
        # Boxed: a Failure given to callback() would errback the Deferred.
        done: defer.Deferred[list[Failure | None]] = defer.Deferred()
        follower = download.follow(request, lambda f: done.callback([f]), start, end)
        request.notifyFinish().addErrback(lambda _: follower.stopProducing())
        (failure,) = await done
        if client_gone(request) or request.finished:
            return
        if failure is None:
            request.finish()
        else:
            abort(request)

    # -- the uncached path -----------------------------------------------------

    async def _bypass(
        self,
        request: Request,
        url: str,
        method: str,
        client_headers: list[Header],
        info: Exchange,
        cache: CacheStatus = CacheStatus.BYPASS,
    ) -> None:
        if self.config.offline:
            return self._error(request, 504, "--offline", info, CacheStatus.OFFLINE)
        headers = [
            (k, v)
            for k, v in methods.forwarded(method, H.end_to_end(client_headers))
            if k.lower() not in ("host", "via", "content-length")
        ]
        headers.append(("Via", self._upstream_via(client_headers)))
        body = None
        content = request.content
        if content is not None and (
            request.requestHeaders.hasHeader(b"content-length")
            or request.requestHeaders.hasHeader(b"transfer-encoding")
        ):
            content.seek(0)
            body = FileBodyProducer(content)
        try:
            response = await self.upstream.request(
                method.encode("latin-1"),
                url.encode("ascii"),
                headers_from_pairs(headers),
                body,
            )
        except Exception:
            failure = Failure()
            self.stats.record_upstream_error(upstream_error_kind(failure))
            status, message = error_status(Outcome(OutcomeKind.ERROR, failure=failure))
            return self._error(request, status, message, info, cache)
        if response.code >= 500:
            self.stats.record_upstream_error("http_5xx")
        outcome = Outcome(
            OutcomeKind.PASSTHROUGH,
            response.code,
            response.phrase.decode("latin-1", "replace"),
            tuple(H.end_to_end(pairs_from_headers(response.headers))),
        )
        for stale_url in invalidation.invalidated_urls(
            method, outcome.status, url, outcome.headers
        ):
            await self.purge_url(stale_url)
        self._pass_through(request, response, outcome, cache, info)

    def _pass_through(
        self,
        request: Request,
        response: IResponse,
        outcome: Outcome,
        cache: CacheStatus,
        info: Exchange,
    ) -> None:
        info.cache = cache
        if self._is_document(info, outcome.headers) and request.method != b"HEAD":
            d = defer.Deferred.fromCoroutine(
                self._pass_document(request, response, outcome, cache, info)
            )
            d.addErrback(self.crashed, request)
            return
        length = response.length if isinstance(response.length, int) else None
        if request.method == b"HEAD":  # no body: the origin's length (SPEC 3)
            length = H.content_length(outcome.headers)
        self._set_head(
            info,
            request,
            outcome.status,
            outcome.headers,
            cache=cache,
            via=self.via,
            length=length,
            phrase=outcome.phrase,
            age=relayed_age(outcome.headers, info.started, self.clock.seconds()),
        )
        if (
            request.method == b"HEAD"
            or outcome.status in (204, 304)
            or client_gone(request)
        ):
            response.deliverBody(Discard())
            if not client_gone(request):
                request.finish()
            return
        flight = PassingThrough(info.url, length, self.clock.seconds())
        self.downloads.passing.add(flight)

        def received(n: int) -> None:
            flight.received(n)
            self.stats.record_upstream_bytes(n)

        response.deliverBody(
            PassThrough(
                request,
                response,
                on_data=received,
                on_error=self.stats.record_upstream_error,
                on_done=lambda: self.downloads.passing.discard(flight),
            )
        )

    # -- admin ------------------------------------------------------------------

    def purge_url(self, url: str) -> defer.Deferred[int]:
        """Drop every variant of ``url``, including one being downloaded."""
        for download in self.downloads.matching(lambda u: u == url):
            download.purge()
        return self.store.remove(url)

    def purge_prefix(self, prefix: str) -> defer.Deferred[int]:
        """Drop every entry whose URL starts with ``prefix``."""
        for download in self.downloads.matching(lambda u: u.startswith(prefix)):
            download.purge()
        return self.store.remove_prefix(prefix)

    # -- helpers ---------------------------------------------------------------

    def _upstream_via(self, client_headers: list[Header]) -> str:
        previous = H.get(client_headers, "via")
        return f"{previous}, {self.via}" if previous else self.via

    def _error(
        self,
        request: Request,
        status: int,
        message: str,
        info: Exchange,
        cache: CacheStatus = CacheStatus.NONE,
    ) -> None:
        info.cache = cache
        if not client_gone(request) and not request.finished:
            send_error(request, status, message, cache=cache, via=self.via)

    def _local(
        self, request: Request, answer: methods.LocalAnswer, info: Exchange
    ) -> None:
        """A response the proxy gives itself (TRACE, OPTIONS Max-Forwards: 0)."""
        info.cache = CacheStatus.NONE
        body = f"{answer.status} {answer.message}\n".encode() if answer.message else b""
        extra = [("Content-Type", "text/plain; charset=utf-8")] if body else []
        self._set_head(
            info,
            request,
            answer.status,
            [*answer.headers, *extra],
            cache=CacheStatus.NONE,
            via=self.via,
            length=len(body),
        )
        if body and request.method != b"HEAD":
            request.write(body)
        request.finish()

    def intercepts(self, host: str) -> bool:
        """Whether CONNECTs to ``host`` are intercepted (--intercept)."""
        return self.intercept is not None and self.intercept.matches(host)

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
                "cache": "TUNNEL",
                "upstream": authority,
            }
        )

    def _log_request(
        self, _: object, request: Request, started: float, info: Exchange
    ) -> None:
        if info.tunnel:
            return  # logged when the tunnel closes
        if not info.own_page:
            self.stats.record_request(
                cache=info.cache,
                status=request.code,
                bytes_sent=request.sentLength,
                duration=self.clock.seconds() - started,
                host=info.upstream,
                url=info.url or "",
            )
        if self._access_log is None:
            return
        client = request.getClientAddress()
        self._access_log(
            {
                "time": started,
                "client": getattr(client, "host", "-"),
                "method": request.method.decode("latin-1"),
                "url": info.url or request.uri.decode("latin-1"),
                "status": request.code,
                "bytes": request.sentLength,
                "duration_ms": int((self.clock.seconds() - started) * 1000),
                "cache": info.cache,
                "upstream": info.upstream,
            }
        )


__all__ = ["Proxy", "ProxyResource"]
