"""Serving ``--mirror`` requests (SPEC 6): routing to upstreams, merged and
rewritten index documents, published digests.

:class:`MirrorService` is built from the cached path and the sender: it
decides with the one and hands the other its document filter.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Protocol

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import FOREVER, ProxyConfig, Rule
from cachingproxy.fetch.upstream import pairs_from_headers
from cachingproxy.front.exchange import Exchange
from cachingproxy.handler.cached import CachedPath
from cachingproxy.handler.forward import Forwarder, request_body
from cachingproxy.handler.plan import Fail, Plan, ServeBody
from cachingproxy.handler.sender import Sender
from cachingproxy.interfaces import ICacheStore
from cachingproxy.mirror import documents
from cachingproxy.mirror.filter import MirrorFilter
from cachingproxy.mirror.mirrors import MirrorMatch, MirrorTable, Target
from cachingproxy.mirror.protocols import Documents, protocol_named
from cachingproxy.mirror.rendered import RenderedDocuments
from cachingproxy.mirror.rewrite import MAX_DOCUMENT, Digest, document_kind, merge

_log = Logger()

_MAX_DIGESTS = 200_000
"""Published digests remembered (the oldest are forgotten first)."""


class MirrorService:
    """Serves requests under the ``--mirror`` prefixes."""

    def __init__(
        self,
        table: MirrorTable,
        *,
        cached: CachedPath,
        forwarder: Forwarder,
        sender: Sender,
        store: ICacheStore,
        config: ProxyConfig,
        rules: tuple[Rule, ...],
        clock: IReactorTime,
    ) -> None:
        self.table = table
        self._cached = cached
        self._forwarder = forwarder
        self._sender = sender
        self._store = store
        self._config = config
        self._rules = rules
        """The operator's rules, then the defaults."""
        self._protocol_rules: dict[str, tuple[Rule, ...]] = {}
        self._mirror_rule = Rule(re.compile(""), config.index_ttl, name="mirror")
        self.digests: OrderedDict[str, Digest] = OrderedDict()
        """Digests published by index documents served, by the cache key of
        the file they describe (bounded, oldest dropped)."""
        self.shared_digests: SharedDigestsLike | None = None
        """Set in a worker process: digests the other workers saw (SPEC 11)."""
        self._rendered = RenderedDocuments(store, clock, self._remember, table)

    def match(self, path: str) -> MirrorMatch | None:
        """The mirror serving local ``path``, if any."""
        return self.table.match(path) if self.table else None

    async def serve(
        self, request: Request, match: MirrorMatch, method: str, info: Exchange
    ) -> None:
        """A request under a ``--mirror`` prefix (SPEC 6)."""
        try:
            url = policy.normalize_url(match.key_url)
        except policy.BadURL as e:
            return self._sender.fail(request, 400, str(e), info)
        target = Target(match, local_root(request))
        info.url = url
        info.upstream = match.mirror.upstreams[0].split("/", 3)[2]
        client_headers = pairs_from_headers(request.requestHeaders)
        rule = policy.select_rule(self._rules_of(match.mirror.protocol), url)
        if rule.name == "origin":
            rule = self._mirror_rule  # everything under a mirror is metadata
        # A package file is never rewritten, whatever its Content-Type.
        kind = Documents.NONE if rule.ttl == FOREVER else documents_of(target)
        rewrite = MirrorFilter(
            target, self.table, url, self._remember, kind, rendered=self._rendered
        )
        plan: Plan
        if policy.request_bypass(rule, method, client_headers) is not None:
            plan = await self._forwarder.forward(
                target.candidates[0][0],
                method,
                client_headers,
                request_body(request),
            )
        else:
            path = match.rest.split("?", 1)[0]
            # Only index pages are merged; a package file comes whole from
            # the first upstream that has it.
            if len(match.mirror.upstreams) > 1 and (
                path in ("simple/", "simple")
                or (match.mirror.merge and "/" in path and rule.ttl != FOREVER)
            ):
                plan = await self._merged(target, rule, client_headers)
                rewrite = MirrorFilter(
                    attrs.evolve(target, doc_url=target.candidates[0][0]),
                    self.table,
                    url,
                    self._remember,
                    kind,
                    rendered=self._rendered,
                )
            else:
                info.rule, info.mirror = rule, True
                info.expected = expected = self.expected(url)
                plan = await self._cached.decide(
                    url,
                    rule,
                    client_headers,
                    target,
                    head=method == "HEAD",
                    expected=expected,
                )
        await self._sender.send(request, plan, info, client_headers, rewrite)

    async def _merged(
        self, target: Target, rule: Rule, client_headers: list[Header]
    ) -> Plan:
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
            return Fail(404, "no upstream has this page", CacheStatus.MISS)
        cache = CacheStatus.MISS if CacheStatus.MISS in caches else sorted(caches)[0]
        headers = [
            (k, v)
            for k, v in first[1]
            if k.lower() not in ("etag", "last-modified", "x-cache-upstream")
        ]
        kind = document_kind(H.get(headers, "content-type")) or "html"
        return ServeBody(200, tuple(headers), merge(kind, docs), cache)

    async def _fetch_document(
        self, url: str, rule: Rule, client_headers: list[Header]
    ) -> tuple[int, list[Header], bytes, CacheStatus] | None:
        """One upstream's document through the cache, whole; None on failure."""
        plan = await self._cached.decide(
            url, rule, client_headers, Target.single(url), client_freshness=False
        )
        try:
            return await documents.read_plan(self._store, plan, MAX_DOCUMENT)
        except Exception as e:
            _log.warn("cannot read {url}: {e}", url=url, e=e)
            return None

    def _rules_of(self, protocol: str) -> tuple[Rule, ...]:
        """The operator's rules, then the protocol's, then the defaults."""
        rules = self._protocol_rules.get(protocol)
        if rules is None:
            config = self._config
            own = protocol_named(protocol).rules(config.index_ttl)
            rules = config.rules + own + self._rules[len(config.rules) :]
            self._protocol_rules[protocol] = rules
        return rules

    def expected(self, url: str) -> Digest | None:
        """The digest an index published for the file at ``url``, if any."""
        digest = self.digests.get(url)
        if digest is None and self.shared_digests is not None:
            digest = self.shared_digests.get(url)
        return digest

    def _remember(self, digests: dict[str, Digest]) -> None:
        if self.shared_digests is not None:
            self.shared_digests.add(digests)
        for url, digest in digests.items():
            self.digests[url] = digest
            self.digests.move_to_end(url)
        while len(self.digests) > _MAX_DIGESTS:
            self.digests.popitem(last=False)


class SharedDigestsLike(Protocol):
    """Published digests shared with other worker processes."""

    def add(self, digests: dict[str, Digest]) -> None: ...
    def get(self, url: str) -> Digest | None: ...


def local_root(request: Request) -> str:
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


__all__ = ["MirrorService", "documents_of", "local_root"]
