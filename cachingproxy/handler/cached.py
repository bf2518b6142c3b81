"""The cached path (SPEC 3-5): from a URL, its rule and the client's headers
to what to serve, as a :mod:`~cachingproxy.handler.plan` value.

Nothing here touches a client request: the sender writes the plan.
"""

from __future__ import annotations

from functools import partial

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import FetchSettings, ProxyConfig, Rule
from cachingproxy.fetch.download import Download
from cachingproxy.fetch.outcomes import (
    Discard,
    Outcome,
    OutcomeKind,
    describe,
    error_status,
)
from cachingproxy.fetch.sharing import Downloads
from cachingproxy.handler.forward import Forwarder, upstream_via
from cachingproxy.handler.plan import (
    Fail,
    FollowDownload,
    PassResponse,
    Plan,
    ServeEntry,
)
from cachingproxy.interfaces import ICacheStore, IDownload, IUpstream
from cachingproxy.mirror import verify
from cachingproxy.mirror.mirrors import Target
from cachingproxy.mirror.rewrite import Digest
from cachingproxy.ops.stats import Stats

_log = Logger()

_LOOKUPS = 3
"""Store lookups for one request: a download that completes hands its
clients over to the entry it is committing; after the last one, a client
follows such a download instead of waiting again."""

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


class CachedPath:
    """Decides how a cacheable request is served: from the store, from a
    download (shared or its own), passed through, or an error."""

    def __init__(
        self,
        config: ProxyConfig,
        store: ICacheStore,
        upstream: IUpstream,
        clock: IReactorTime,
        *,
        downloads: Downloads,
        forwarder: Forwarder,
        stats: Stats,
        via: str,
    ) -> None:
        self._config = config
        self._store = store
        self._upstream = upstream
        self._clock = clock
        self._downloads = downloads
        self._forwarder = forwarder
        self._stats = stats
        self._via = via
        self._settings = FetchSettings(
            negative_ttl=config.negative_ttl,
            # A body bigger than the whole budget streams through unstored.
            max_object_size=min(config.max_object_size, config.max_size),
            read_timeout=config.read_timeout,
        )

    async def decide(
        self,
        url: str,
        rule: Rule,
        client_headers: list[Header],
        target: Target | None = None,
        *,
        head: bool = False,
        expected: Digest | None = None,
        client_freshness: bool = True,
    ) -> Plan:
        """What to serve for ``url`` (a GET, or a HEAD when ``head``).

        ``target`` sends a miss to a mirror's upstreams (checking the body
        against ``expected``, a digest an index published);
        ``client_freshness`` False ignores the client's request for a fresh
        copy (documents fetched to be merged)."""

        def may_reuse(response: StoredResponse) -> bool:
            # Under ``origin``, a response in flight gets the checks a
            # stored one gets; other rules count their TTL from storing.
            return rule.ttl is not None or self._reusable(
                rule,
                response,
                client_headers,
                self._clock.seconds(),
                client_freshness,
            )

        for attempt in range(_LOOKUPS):
            pending = self._downloads.purging(url)
            if pending is not None:
                await pending  # nothing a purge is dropping is served
            entry = policy.select_variant(await self._store.lookup(url), client_headers)
            entry = await verify.checked(self._store, entry, expected)  # D8
            now = self._clock.seconds()
            if entry is not None:
                if self._reusable(rule, entry, client_headers, now, client_freshness):
                    return ServeEntry(entry, CacheStatus.HIT)
                if self._config.offline:
                    return ServeEntry(entry, CacheStatus.OFFLINE)
            elif self._config.offline:
                return Fail(504, "not cached and --offline", CacheStatus.OFFLINE)
            if policy.only_if_cached(client_headers):
                return Fail(504, "not cached (only-if-cached)", CacheStatus.MISS)
            # A HEAD miss under a mirror is fetched as a GET (and answered
            # with its head), so the next HEAD works with the registry down
            # (gem asks HEAD of a source before using it).
            if head and entry is None and target is None:
                return await self._forwarder.forward(
                    url, "HEAD", client_headers, None, CacheStatus.MISS
                )

            got = await self._downloads.obtain(
                url,
                client_headers,
                partial(
                    self._new_download,
                    url,
                    rule,
                    client_headers,
                    entry,
                    target,
                    expected,
                ),
                may_reuse,
                handover=attempt < _LOOKUPS - 1,
            )
            if got is not None:
                return self._outcome_plan(url, rule, entry, *got)
        raise AssertionError("obtain hands over only before the last lookup")

    def _outcome_plan(
        self,
        url: str,
        rule: Rule,
        entry: StoredResponse | None,
        download: IDownload,
        outcome: Outcome,
    ) -> Plan:
        """What a download's outcome means for the client (``entry``: the
        stale entry it revalidated, if any)."""
        config = self._config
        if outcome.kind is OutcomeKind.STREAM:
            # A body complete but not yet committed (followed only after the
            # last handover) is already ours.
            cache = CacheStatus.HIT if download.body_complete else CacheStatus.MISS
            return FollowDownload(
                download, outcome.status, outcome.phrase, outcome.headers, cache
            )
        if outcome.kind is OutcomeKind.NOT_MODIFIED:
            assert outcome.entry is not None
            return ServeEntry(outcome.entry, CacheStatus.REVALIDATED)
        if outcome.kind is OutcomeKind.PASSTHROUGH:
            assert outcome.response is not None
            return PassResponse(
                outcome.response,
                outcome.status,
                outcome.phrase,
                outcome.headers,
                CacheStatus.MISS,
            )
        # ERROR (or a second RETRY, which cannot normally happen)
        if entry is not None and policy.stale_allowed(
            rule,
            entry,
            self._clock.seconds(),
            config.index_ttl,
            config.negative_ttl,
            config.max_stale,
        ):
            _log.info(
                "upstream failed for {url}; serving stale: {why}",
                url=url,
                why=describe(outcome),
            )
            if outcome.response is not None:
                outcome.response.deliverBody(Discard())
            return ServeEntry(entry, CacheStatus.STALE)
        if outcome.response is not None:  # the origin's own 5xx (SPEC 5)
            return PassResponse(
                outcome.response,
                outcome.status,
                outcome.phrase,
                outcome.headers,
                CacheStatus.MISS,
            )
        status, message = error_status(outcome)
        return Fail(status, message, CacheStatus.MISS)

    def reusable(self, rule: Rule, entry: StoredResponse, now: float) -> bool:
        """Whether ``entry`` may be served as a hit at ``now`` to a client
        that asks nothing of its freshness (no ``Cache-Control``)."""
        return self._reusable(rule, entry, [], now, True)

    def _reusable(
        self,
        rule: Rule,
        entry: StoredResponse,
        client_headers: list[Header],
        now: float,
        client_freshness: bool,
    ) -> bool:
        """Whether ``entry`` may be served without asking upstream: fresh,
        and the client did not ask for a fresher one (under ``origin``
        always honoured, under a metadata rule at most once per
        ``--index-refresh``; not at all without ``client_freshness``)."""
        config = self._config
        if not policy.is_fresh(rule, entry, now, config.index_ttl, config.negative_ttl):
            return False
        return not client_freshness or not (
            policy.request_wants_revalidation(
                rule, client_headers, policy.current_age(entry, now)
            )
            or policy.index_refresh_due(
                rule, entry, client_headers, now, config.index_refresh
            )
        )

    def _new_download(
        self,
        url: str,
        rule: Rule,
        client_headers: list[Header],
        stale: StoredResponse | None,
        target: Target | None,
        expected: Digest | None,
    ) -> Download:
        """A download of ``url`` (not started) for this client."""
        drop = _CACHED_PATH_DROP | ({"accept-encoding"} if target else set())
        upstream_headers = [
            (k, v) for k, v in H.end_to_end(client_headers) if k.lower() not in drop
        ]
        upstream_headers.append(("Via", upstream_via(self._via, client_headers)))
        candidates = target.candidates if target else [(url, "")]
        return Download(
            url=url,
            upstream_url=candidates[0][0],
            label=candidates[0][1],
            fallbacks=candidates[1:],
            mirrored=target is not None,
            expected=expected if target else None,
            request_headers=upstream_headers,
            client_headers=client_headers,
            stale=stale,
            rule=rule,
            store=self._store,
            upstream=self._upstream,
            clock=self._clock,
            settings=self._settings,
            on_done=self._downloads.remove,
            on_upstream_bytes=self._stats.record_upstream_bytes,
            on_upstream_error=self._stats.record_upstream_error,
        )


__all__ = ["CachedPath"]
