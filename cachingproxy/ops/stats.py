"""What the proxy has done: request, byte and error counts for the status pages.

:class:`Stats` is pure bookkeeping: the proxy tells it about every finished
request, every byte received from upstream and every upstream failure, and
:meth:`Stats.snapshot` turns that (plus the live disk usage and downloads
in flight, read through injected callables) into the content of
``/status.json`` (SPEC 9).  Time comes from an injected ``IReactorTime``, so
tests drive it with ``task.Clock``.  Memory stays bounded: per-host and
per-URL tallies are pruned to their busiest keys, the history keeps one
bucket per minute for an hour.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from OpenSSL.SSL import Error as SSLError
from service_identity.exceptions import CertificateError, VerificationError
from twisted.internet import defer
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)

from cachingproxy import __version__
from cachingproxy.cache.status import CacheStatus
from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.upstream import DNSLookupFailed
from cachingproxy.ops.metrics import Figures, Metrics

CACHE_STATUSES = tuple(c.value for c in CacheStatus if c is not CacheStatus.TUNNEL)
"""Every cache status a request is recorded with; ``-`` is an error or
refusal answered before any cache decision (its ``X-Cache`` header says
``BYPASS``)."""

FROM_CACHE = frozenset(
    {CacheStatus.HIT, CacheStatus.REVALIDATED, CacheStatus.STALE, CacheStatus.OFFLINE}
)
"""Cache statuses whose body came out of the cache."""

ERROR_KINDS = (
    "refused",
    "timeout",
    "tls",
    "dns",
    "http_5xx",
    "broken",
    "policy",
    "other",
)
"""The kinds of upstream error counted; anything else is counted as ``other``."""

MAX_KEYS = 10_000
"""How many hosts and how many URLs are tallied before the least hit are pruned."""

HISTORY_MINUTES = 60
TOP = 10
_MAX_KEY_LENGTH = 1024


class UsageLike(Protocol):
    """The store's disk usage (``ICacheStore.usage()``, an
    :class:`cachingproxy.cache.entry.Usage`): what :class:`Stats` reads through
    ``usage``.  ``max_size`` is None when the store has no budget."""

    @property
    def bytes(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def max_size(self) -> int | None: ...


class InFlightLike(Protocol):
    """A download in flight, as :class:`cachingproxy.interfaces.IDownload` is."""

    @property
    def url(self) -> str: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def total(self) -> int | None: ...
    @property
    def clients(self) -> int: ...
    @property
    def started_at(self) -> float: ...


class _Tally:
    """Hits and requests per key, keeping at most ``limit`` keys.

    When a new key would pass the limit, only the busiest three quarters
    (by hits, then requests) are kept, so pruning happens once per
    ``limit / 4`` new keys and costs O(limit log limit) then.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._counts: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._counts)

    @staticmethod
    def _key(key: str) -> str:
        # Bounds memory per key too: a request line may be 16 KiB long.
        if len(key) > _MAX_KEY_LENGTH:
            return key[: _MAX_KEY_LENGTH - 1] + "\N{HORIZONTAL ELLIPSIS}"
        return key

    def add(self, key: str, hit: bool) -> None:
        key = self._key(key)
        counts = self._counts.get(key)
        if counts is None:
            if len(self._counts) >= self._limit:
                self._prune(max(1, self._limit * 3 // 4))
            counts = self._counts[key] = [0, 0]
        counts[0] += hit
        counts[1] += 1

    def _prune(self, keep: int) -> None:
        kept = self.top(keep)
        self._counts = {key: [hits, requests] for key, hits, requests in kept}

    def top(self, n: int) -> list[tuple[str, int, int]]:
        """The ``n`` keys with most hits (then most requests): (key, hits, requests)."""
        ranked = heapq.nlargest(
            n, self._counts.items(), key=lambda item: (item[1][0], item[1][1])
        )
        return [(key, hits, requests) for key, (hits, requests) in ranked]


class Stats:
    """Counts what the proxy does; :meth:`snapshot` is ``/status.json``.

    ``usage`` and ``in_flight`` are read when a snapshot or a scrape is
    taken, never stored.  Each Stats owns a Prometheus registry
    (``self.metrics.registry``), so several proxies can live in one process.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        usage: Callable[[], UsageLike],
        in_flight: Callable[[], Iterable[InFlightLike]],
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._clock = clock
        self.usage = usage
        self.in_flight = in_flight
        self.started_at = clock.seconds()
        self.by_cache: dict[str, int] = dict.fromkeys(CACHE_STATUSES, 0)
        self.errors = 0
        self.from_cache = 0
        self.cache_misses = 0
        self.bytes_served = 0
        self.bytes_from_cache = 0
        self.bytes_from_upstream = 0
        self.upstream_errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._hosts = _Tally(max_keys)
        self._objects = _Tally(max_keys)
        # [minute, requests, hits, misses], oldest first, one per minute with traffic.
        self._history: deque[list[int]] = deque(maxlen=HISTORY_MINUTES)
        self.metrics = Metrics(self.figures)
        self.sections: dict[str, Callable[[], Any]] = {}
        """More top-level keys of the snapshot (``shared_store``), each read
        when a snapshot is taken."""

    # -- recording -------------------------------------------------------------

    def record_request(
        self,
        *,
        cache: str,
        status: int,
        bytes_sent: int,
        duration: float,
        host: str,
        url: str,
    ) -> None:
        """One finished proxied request (not the proxy's own pages).

        ``cache`` is the cache status (``-`` for an error answered before
        any cache decision, whose ``X-Cache`` header says ``BYPASS``), ``bytes_sent`` the body bytes written to the
        client, ``host`` the upstream host (``-`` or empty if none).
        """
        if cache not in self.by_cache:
            cache = "-"
        self.by_cache[cache] += 1
        # An OFFLINE 504 ("not cached and --offline") did not come from the cache.
        hit = cache in FROM_CACHE and status < 500
        miss = cache == CacheStatus.MISS or (cache in FROM_CACHE and not hit)
        self.from_cache += hit
        self.cache_misses += miss
        if cache == "-" or status >= 500:
            self.errors += 1
        bytes_sent = max(0, bytes_sent)
        self.bytes_served += bytes_sent
        if hit:
            self.bytes_from_cache += bytes_sent
        if host and host != "-":
            self._hosts.add(host.lower(), hit)
        if url:
            self._objects.add(url, hit)
        self._count_minute(hit, miss)
        self.metrics.observe_response(cache, duration)

    def record_upstream_bytes(self, n: int) -> None:
        """``n`` body bytes received from upstream (downloads and pass-through)."""
        self.bytes_from_upstream += max(0, n)

    def record_upstream_error(self, kind: str) -> None:
        """One upstream failure of ``kind`` (one of :data:`ERROR_KINDS`)."""
        if kind not in self.upstream_errors:
            kind = "other"
        self.upstream_errors[kind] += 1

    def _count_minute(self, hit: bool, miss: bool) -> None:
        minute = int(self._clock.seconds() // 60)
        if not self._history or self._history[-1][0] < minute:
            self._history.append([minute, 0, 0, 0])
        bucket = self._history[-1]  # a clock going backwards counts as "now"
        bucket[1] += 1
        bucket[2] += hit
        bucket[3] += miss

    # -- reading ---------------------------------------------------------------

    def history(self) -> list[dict[str, int]]:
        """Per-minute buckets for the last hour, oldest first, the current
        minute last; minutes without traffic are zeros.  ``hits`` counts
        requests served from the cache, ``misses`` those that could have
        been but were not."""
        now = int(self._clock.seconds() // 60)
        by_minute = {bucket[0]: bucket for bucket in self._history}
        result = []
        for minute in range(now - HISTORY_MINUTES + 1, now + 1):
            _, requests, hits, misses = by_minute.get(minute, (minute, 0, 0, 0))
            result.append(
                {
                    "time": minute * 60,
                    "requests": requests,
                    "hits": hits,
                    "misses": misses,
                }
            )
        return result

    def in_flight_list(self) -> list[dict[str, Any]]:
        """The downloads in flight: URL, bytes so far, total, rate, clients."""
        now = self._clock.seconds()
        result = []
        for download in self.in_flight():
            written = download.bytes_written
            elapsed = max(0.0, now - download.started_at)
            result.append(
                {
                    "url": download.url,
                    "bytes": written,
                    "total": download.total,
                    "rate": written / elapsed if elapsed > 0 else 0.0,
                    "clients": download.clients,
                    "elapsed": elapsed,
                }
            )
        return result

    def figures(self) -> Figures:
        """What ``/metrics`` reports besides response times, as of now."""
        usage = self.usage()
        return Figures(
            by_cache=dict(self.by_cache),
            bytes_from_cache=self.bytes_from_cache,
            bytes_from_upstream=self.bytes_from_upstream,
            upstream_errors=dict(self.upstream_errors),
            disk_bytes=usage.bytes,
            entries=usage.entries,
            max_size=usage.max_size,
            in_flight=sum(1 for _ in self.in_flight()),
        )

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status.json`` shows (JSON-serialisable)."""
        now = self._clock.seconds()
        usage = self.usage()
        by_cache = self.by_cache
        return {
            "version": __version__,
            "time": now,
            "uptime": now - self.started_at,
            "requests": sum(by_cache.values()),
            "hits": by_cache[CacheStatus.HIT],
            "misses": by_cache[CacheStatus.MISS],
            "stale": by_cache[CacheStatus.STALE],
            "revalidated": by_cache[CacheStatus.REVALIDATED],
            "offline": by_cache[CacheStatus.OFFLINE],
            "bypass": by_cache[CacheStatus.BYPASS],
            "errors": self.errors,
            "from_cache": self.from_cache,
            "hit_ratio": _ratio(self.from_cache, self.from_cache + self.cache_misses),
            "byte_hit_ratio": _ratio(self.bytes_from_cache, self.bytes_served),
            "bytes_served": self.bytes_served,
            "bytes_from_cache": self.bytes_from_cache,
            "bytes_from_upstream": self.bytes_from_upstream,
            "disk_bytes": usage.bytes,
            "max_size": usage.max_size,
            "entries": usage.entries,
            "in_flight": self.in_flight_list(),
            "top_hosts": [
                {"host": host, "hits": hits, "requests": requests}
                for host, hits, requests in self._hosts.top(TOP)
            ],
            "top_objects": [
                {"url": url, "hits": hits, "requests": requests}
                for url, hits, requests in self._objects.top(TOP)
                if hits
            ],
            "upstream_errors": dict(self.upstream_errors),
            "history": self.history(),
            **{name: section() for name, section in self.sections.items()},
        }


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def upstream_error_kind(
    failure: Failure | BaseException | None = None, status: int = 0
) -> str:
    """The :data:`ERROR_KINDS` entry for an upstream failure or 5xx ``status``.

    Unwraps twisted.web's ``ResponseNeverReceived``/``ResponseFailed`` to
    the first underlying reason.  A ``StoreFull`` or a client going away is
    not an upstream error: do not record those.
    """
    if failure is None:
        return "http_5xx" if status >= 500 else "other"
    if isinstance(failure, BaseException):
        failure = Failure(failure)
    wrapper = failure.check(ResponseNeverReceived, ResponseFailed)
    reasons = getattr(failure.value, "reasons", None) or []
    if wrapper is not None and reasons:
        inner = reasons[0]
        if not isinstance(inner, Failure):
            inner = Failure(inner)
        kind = upstream_error_kind(inner)
        # A connection lost while waiting for, or reading, a response.
        return "broken" if kind == "other" else kind
    if failure.check(DestinationRefused):
        return "policy"
    if failure.check(
        UpstreamTimeout, ConnectTimeoutError, defer.TimeoutError, TimeoutError
    ):
        return "timeout"
    if failure.check(DNSLookupFailed, DNSLookupError):
        return "dns"
    if failure.check(SSLError, VerificationError, CertificateError):
        return "tls"
    if failure.check(ConnectError):
        return "refused"
    if failure.check(PotentialDataLoss, ResponseDone, ResponseFailed, ConnectionClosed):
        # ResponseDone here: the body ended, but short of its Content-Length.
        return "broken"
    return "other"


__all__ = [
    "CACHE_STATUSES",
    "ERROR_KINDS",
    "FROM_CACHE",
    "MAX_KEYS",
    "InFlightLike",
    "Stats",
    "UsageLike",
    "upstream_error_kind",
]
