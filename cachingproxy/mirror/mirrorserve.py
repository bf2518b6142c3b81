"""Serving ``--mirror`` requests (SPEC 6): routing to upstreams, merged and
rewritten index documents, published digests.

``MirrorServing`` is a part of :class:`~cachingproxy.proxy.Proxy`, kept in
its own module; it uses the proxy's cached path for everything it fetches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import FOREVER, ProxyConfig, Rule
from cachingproxy.fetch.download import Download, Downloads
from cachingproxy.fetch.outcomes import Discard, Outcome, OutcomeKind
from cachingproxy.fetch.upstream import pairs_from_headers
from cachingproxy.front.exchange import Exchange
from cachingproxy.front.responses import client_gone, set_head
from cachingproxy.interfaces import ICacheStore
from cachingproxy.mirror import documents
from cachingproxy.mirror.mirrors import MirrorMatch, MirrorTable, Target
from cachingproxy.mirror.protocols import Documents, protocol_named
from cachingproxy.mirror.rewrite import (
    MAX_DOCUMENT,
    Digest,
    document_kind,
    merge,
    rewrite,
    rewrite_crates_config,
)

_log = Logger()

_MAX_DIGESTS = 200_000
"""Published digests remembered (the oldest are forgotten first)."""


class MirrorServing:
    """The mirror half of the proxy (a mixin of ``Proxy``)."""

    config: ProxyConfig
    store: ICacheStore
    clock: IReactorTime
    via: str
    rules: tuple[Rule, ...]
    downloads: Downloads
    mirrors: MirrorTable
    digests: OrderedDict[str, Digest]
    _mirror_rule: Rule
    _protocol_rules: dict[str, tuple[Rule, ...]]

    if TYPE_CHECKING:
        # Provided by Proxy.

        async def _cached(
            self,
            request: Request,
            url: str,
            rule: Rule,
            client_headers: list[Header],
            info: Exchange,
        ) -> None: ...

        async def _bypass(
            self,
            request: Request,
            url: str,
            method: str,
            client_headers: list[Header],
            info: Exchange,
            cache: CacheStatus = CacheStatus.BYPASS,
        ) -> None: ...

        def _new_download(
            self,
            url: str,
            rule: Rule,
            client_headers: list[Header],
            stale: StoredResponse | None,
            *,
            shared: bool,
            target: Target | None = None,
        ) -> Download: ...

        def _error(
            self,
            request: Request,
            status: int,
            message: str,
            info: Exchange,
            cache: CacheStatus = CacheStatus.NONE,
        ) -> None: ...

    async def _mirror(
        self, request: Request, match: MirrorMatch, method: str, info: Exchange
    ) -> None:
        """A request under a ``--mirror`` prefix (SPEC 6)."""
        try:
            url = policy.normalize_url(match.key_url)
        except policy.BadURL as e:
            return self._error(request, 400, str(e), info)
        target = Target(match, self._local_root(request))
        info.url = url
        info.upstream = match.mirror.upstreams[0].split("/", 3)[2]
        info.target = target
        client_headers = pairs_from_headers(request.requestHeaders)
        rule = policy.select_rule(self._rules_of(match.mirror.protocol), url)
        if rule.name == "origin":
            rule = self._mirror_rule  # everything under a mirror is metadata
        if rule.ttl == FOREVER or documents_of(target) is Documents.NONE:
            # A package file is never rewritten, whatever its Content-Type.
            info.target, info.file_target = None, target
        if policy.request_bypass(rule, method, client_headers) is not None:
            return await self._bypass(
                request, target.candidates[0][0], method, client_headers, info
            )
        path = match.rest.split("?", 1)[0]
        # Only index pages are merged; a package file comes whole from the
        # first upstream that has it.
        if len(match.mirror.upstreams) > 1 and (
            path in ("simple/", "simple")
            or (match.mirror.merge and "/" in path and rule.ttl != FOREVER)
        ):
            return await self._merged(request, target, rule, client_headers, info)
        await self._cached(request, url, rule, client_headers, info)

    async def _merged(
        self,
        request: Request,
        target: Target,
        rule: Rule,
        client_headers: list[Header],
        info: Exchange,
    ) -> None:
        """The union of every upstream's page (the root /simple/ page, or a
        project page of a ``merge = true`` mirror)."""
        docs: list[tuple[str, bytes]] = []
        first: tuple[int, list[Header]] | None = None
        caches = set()
        for upstream_url, _ in target.candidates:
            try:
                url = policy.normalize_url(upstream_url)
            except policy.BadURL:
                continue
            got = await self._fetch_document(url, rule, client_headers)
            if got is None:
                continue
            status, headers, body, cache = got
            if status != 200:
                continue
            caches.add(cache)
            docs.append((upstream_url, body))
            first = first or (status, headers)
        if first is None:
            return self._error(
                request, 404, "no upstream has this page", info, CacheStatus.MISS
            )
        cache = CacheStatus.MISS if CacheStatus.MISS in caches else sorted(caches)[0]
        headers = [
            (k, v)
            for k, v in first[1]
            if k.lower() not in ("etag", "last-modified", "x-cache-upstream")
        ]
        kind = document_kind(H.get(headers, "content-type")) or "html"
        body = merge(kind, docs)
        info.target = attrs.evolve(target, doc_url=target.candidates[0][0])
        self._send_document(request, 200, headers, body, cache, info)

    async def _fetch_document(
        self, url: str, rule: Rule, client_headers: list[Header]
    ) -> tuple[int, list[Header], bytes, CacheStatus] | None:
        """One upstream's document through the cache, whole; None on failure."""
        entry = policy.select_variant(await self.store.lookup(url), client_headers)
        now = self.clock.seconds()
        cfg = self.config
        if entry is not None and (
            cfg.offline
            or policy.is_fresh(rule, entry, now, cfg.index_ttl, cfg.negative_ttl)
        ):
            body = await documents.read_entry(self.store, entry, MAX_DOCUMENT)
            return entry.status, list(entry.headers), body, CacheStatus.HIT
        if cfg.offline:
            return None
        download = self.downloads.get(url) or self._new_download(
            url,
            rule,
            client_headers,
            entry,
            shared=True,
            target=Target.single(url),
        )
        outcome = await download.wait(client_headers)
        try:
            if outcome.kind is OutcomeKind.STREAM:
                reader = download.open_reader()
                body = await documents.read_download(download, reader, MAX_DOCUMENT)
                return outcome.status, list(outcome.headers), body, CacheStatus.MISS
            if outcome.kind is OutcomeKind.NOT_MODIFIED and outcome.entry is not None:
                body = await documents.read_entry(
                    self.store, outcome.entry, MAX_DOCUMENT
                )
                return 200, list(outcome.entry.headers), body, CacheStatus.REVALIDATED
            if outcome.kind is OutcomeKind.PASSTHROUGH and outcome.response is not None:
                body = await documents.collect(outcome.response, MAX_DOCUMENT)
                return outcome.status, list(outcome.headers), body, CacheStatus.MISS
        except Exception as e:
            _log.warn("cannot read {url}: {e}", url=url, e=e)
        if outcome.kind is OutcomeKind.ERROR and outcome.response is not None:
            outcome.response.deliverBody(Discard())  # an origin's 5xx
        if entry is not None and policy.stale_allowed(
            rule, entry, now, cfg.index_ttl, cfg.negative_ttl, cfg.max_stale
        ):
            body = await documents.read_entry(self.store, entry, MAX_DOCUMENT)
            return entry.status, list(entry.headers), body, CacheStatus.STALE
        return None

    def _rules_of(self, protocol: str) -> tuple[Rule, ...]:
        """The operator's rules, then the protocol's, then the defaults."""
        rules = self._protocol_rules.get(protocol)
        if rules is None:
            own = protocol_named(protocol).rules(self.config.index_ttl)
            rules = self.config.rules + own + self.rules[len(self.config.rules) :]
            self._protocol_rules[protocol] = rules
        return rules

    def _is_document(self, info: Exchange, headers: Iterable[Header]) -> bool:
        """Whether a mirrored response is an index document to rewrite."""
        if info.target is None:
            return False
        items = list(headers)
        encoding = (H.get(items, "content-encoding") or "identity").lower()
        return encoding == "identity" and (
            document_kind(H.get(items, "content-type")) is not None
            or documents_of(info.target) is Documents.CRATES
        )

    async def _pass_document(
        self,
        request: Request,
        response: IResponse,
        outcome: Outcome,
        cache: CacheStatus,
        info: Exchange,
    ) -> None:
        try:
            body = await documents.collect(response, MAX_DOCUMENT)
        except Exception as e:
            return self._error(request, 502, f"index document: {e}", info, cache)
        self._send_document(
            request, outcome.status, list(outcome.headers), body, cache, info
        )

    def _send_document(
        self,
        request: Request,
        status: int,
        headers: Iterable[Header],
        body: bytes,
        cache: CacheStatus,
        info: Exchange,
        age: float | None = None,
    ) -> None:
        """An index document with its URLs rewritten for this client."""
        target = info.target
        assert target is not None, "documents are only sent for mirrored requests"
        items = list(headers)
        kind = document_kind(H.get(items, "content-type"))
        if documents_of(target) is Documents.CRATES and status == 200:
            body = rewrite_crates_config(
                body, info.url, self.mirrors, target.local_root
            )
        elif kind is not None and status == 200:
            body, digests = rewrite(
                body,
                kind,
                target.document_url(H.get(items, "x-cache-upstream"), info.url),
                self.mirrors,
                target.local_root,
            )
            self._remember(digests)
        if client_gone(request) or request.finished:
            return
        self._set_head(
            info,
            request,
            status,
            items,
            cache=cache,
            via=self.via,
            age=age,
            length=len(body),
        )
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _set_head(
        self, info: Exchange, request: Request, *args: Any, **kwargs: Any
    ) -> None:
        """``set_head``, with a mirrored upstream's ``Location`` made local."""
        set_head(request, *args, **kwargs)
        target: Target | None = info.mirror
        if target is None or target.match is None:
            return
        location = request.responseHeaders.getRawHeaders(b"location")
        if not location:
            return
        label = request.responseHeaders.getRawHeaders(b"x-cache-upstream")
        base = label[0].decode("latin-1") if label else target.candidates[0][1]
        absolute = urljoin(base + target.match.rest, location[0].decode("latin-1"))
        local = self.mirrors.local_path(absolute)
        if local is not None:
            request.responseHeaders.setRawHeaders(
                b"location", [(target.local_root + local).encode("latin-1")]
            )

    def _remember(self, digests: dict[str, Digest]) -> None:
        for url, digest in digests.items():
            self.digests[url] = digest
            self.digests.move_to_end(url)
        while len(self.digests) > _MAX_DIGESTS:
            self.digests.popitem(last=False)

    def _local_root(self, request: Request) -> str:
        """``scheme://host[:port]`` as the client addressed the proxy."""
        scheme = "https" if request.isSecure() else "http"
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip()
        if not host:
            local = request.getHost()
            host = f"{getattr(local, 'host', 'localhost')}:{getattr(local, 'port', 80)}"
        return f"{scheme}://{host}"


def documents_of(target: Target) -> Documents:
    """Which documents of ``target``'s mirror are rewritten: a crates index
    rewrites only its ``config.json``."""
    if target.match is None:
        return Documents.INDEX
    documents = protocol_named(target.match.mirror.protocol).documents
    path = target.match.rest.split("?", 1)[0]
    if documents is Documents.CRATES and path != "config.json":
        return Documents.NONE
    return documents


__all__ = ["MirrorServing", "documents_of"]
