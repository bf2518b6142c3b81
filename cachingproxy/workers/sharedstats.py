"""Statistics that are totals over every worker (SPEC 11).

Each worker's :class:`SharedStats` counts as a :class:`~cachingproxy.ops.stats.Stats`
does and also adds every figure to prometheus_client counters in
multi-process mode: one memory-mapped file per worker pid under
``CACHE/run/metrics`` (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor
before the worker imports prometheus_client).  ``/metrics`` and the totals of
``/status.json`` are read back from all those files, so whichever worker
answers shows the same totals, including those of workers that have since
died.  Per-host and per-URL tallies and the per-minute history stay per
worker (they are bounded tables, not counters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet.interfaces import IReactorTime

from cachingproxy import __version__
from cachingproxy.cache.status import CacheStatus
from cachingproxy.ops.metrics import RESPONSE_BUCKETS, Figures, Metrics
from cachingproxy.ops.stats import (
    CACHE_STATUSES,
    ERROR_KINDS,
    FROM_CACHE,
    InFlightLike,
    Stats,
    UsageLike,
)

_EXPOSED = frozenset(
    {
        "cachingproxy_requests",
        "cachingproxy_bytes",
        "cachingproxy_upstream_errors",
        "cachingproxy_response_seconds",
    }
)
"""The shared families ``/metrics`` shows (``cachingproxy_worker_totals``
only feeds ``/status.json``)."""
_TOTALS = ("served", "from_cache", "misses", "errors")


class _Counters:
    """This worker's shares of the totals, in the multi-process files."""

    def __init__(self) -> None:
        self.requests = Counter(
            "cachingproxy_requests",
            "Proxied requests answered, by X-Cache status (- is an error "
            "answered before any cache decision).",
            ["cache"],
            registry=None,
        )
        self.bytes = Counter(
            "cachingproxy_bytes",
            "Body bytes sent to clients from the cache (source=cache) and "
            "received from upstream (source=upstream).",
            ["source"],
            registry=None,
        )
        self.errors = Counter(
            "cachingproxy_upstream_errors",
            "Upstream failures by kind.",
            ["kind"],
            registry=None,
        )
        self.seconds = Histogram(
            "cachingproxy_response_seconds",
            "Time from receiving a proxied request to finishing its response, "
            "by X-Cache status.",
            ["cache"],
            buckets=RESPONSE_BUCKETS,
            registry=None,
        )
        self.totals = Counter(
            "cachingproxy_worker_totals",
            "Figures of /status.json summed over the workers.",
            ["what"],
            registry=None,
        )
        for cache in CACHE_STATUSES:
            self.requests.labels(cache)
        for source in ("cache", "upstream"):
            self.bytes.labels(source)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for what in _TOTALS:
            self.totals.labels(what)


class SharedMetrics(Metrics):
    """``/metrics`` over every worker's files, plus this worker's gauges
    (disk usage is the shared index's; in-flight downloads are the shared
    claims)."""

    def __init__(
        self, figures: Callable[[], Figures], counters: _Counters, directory: str
    ) -> None:
        self._counters = counters
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SharedCollector(figures, directory))

    def observe_response(self, cache: str, duration: float) -> None:
        self._counters.seconds.labels(cache).observe(max(0.0, duration))


class _SharedCollector(Collector):
    def __init__(self, figures: Callable[[], Figures], directory: str) -> None:
        self._figures = figures
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        figures = self._figures()
        info = InfoMetricFamily("cachingproxy_build", "The running cachingproxy.")
        info.add_metric([], {"version": __version__})
        yield info
        for family in read_families(self._directory):
            if family.name in _EXPOSED:
                yield family
        disk = GaugeMetricFamily(
            "cachingproxy_disk_bytes", "Bytes of cached bodies on disk."
        )
        disk.add_metric([], figures.disk_bytes)
        yield disk
        if figures.max_size is not None:
            max_size = GaugeMetricFamily(
                "cachingproxy_max_size_bytes", "The disk budget (--max-size)."
            )
            max_size.add_metric([], figures.max_size)
            yield max_size
        entries = GaugeMetricFamily("cachingproxy_entries", "Cache entries stored.")
        entries.add_metric([], figures.entries)
        yield entries
        in_flight = GaugeMetricFamily(
            "cachingproxy_inflight_downloads", "Upstream downloads in progress."
        )
        in_flight.add_metric([], figures.in_flight)
        yield in_flight


def read_families(directory: str) -> list[Metric]:
    """The families summed over every worker's file in ``directory``."""
    return list(MultiProcessCollector(None, directory).collect())


def read_totals(directory: str) -> dict[str, dict[str, float]]:
    """``{family: {label value: total}}`` of the counters in ``directory``
    (for families with one label; ``_total`` samples only)."""
    totals: dict[str, dict[str, float]] = {}
    for family in read_families(directory):
        if family.type != "counter":
            continue
        values = totals.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_total") and len(sample.labels) == 1:
                (label,) = sample.labels.values()
                values[label] = values.get(label, 0.0) + sample.value
    return totals


class SharedStats(Stats):
    """A worker's Stats whose totals are shared through ``directory``."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        usage: Callable[[], UsageLike],
        in_flight: Callable[[], Iterable[InFlightLike]],
        directory: str,
        in_flight_count: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(clock, usage=usage, in_flight=in_flight)
        self._directory = directory
        self._in_flight_count = in_flight_count
        self._counters = _Counters()
        self.metrics = SharedMetrics(self.figures, self._counters, directory)

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
        super().record_request(
            cache=cache,
            status=status,
            bytes_sent=bytes_sent,
            duration=duration,
            host=host,
            url=url,
        )
        counters = self._counters
        if cache not in self.by_cache:
            cache = "-"
        hit = cache in FROM_CACHE and status < 500
        bytes_sent = max(0, bytes_sent)
        counters.requests.labels(cache).inc()
        counters.totals.labels("served").inc(bytes_sent)
        if hit:
            counters.totals.labels("from_cache").inc()
            counters.bytes.labels("cache").inc(bytes_sent)
        if cache == CacheStatus.MISS or (cache in FROM_CACHE and not hit):
            counters.totals.labels("misses").inc()
        if cache == "-" or status >= 500:
            counters.totals.labels("errors").inc()

    def record_upstream_bytes(self, n: int) -> None:
        super().record_upstream_bytes(n)
        self._counters.bytes.labels("upstream").inc(max(0, n))

    def record_upstream_error(self, kind: str) -> None:
        super().record_upstream_error(kind)
        if kind not in self.upstream_errors:
            kind = "other"
        self._counters.errors.labels(kind).inc()

    def _in_flight_total(self) -> int:
        if self._in_flight_count is not None:
            return self._in_flight_count()
        return sum(1 for _ in self.in_flight())

    def figures(self) -> Figures:
        totals = read_totals(self._directory)
        usage = self.usage()
        return Figures(
            by_cache=_ints(totals.get("cachingproxy_requests", {})),
            bytes_from_cache=int(totals.get("cachingproxy_bytes", {}).get("cache", 0)),
            bytes_from_upstream=int(
                totals.get("cachingproxy_bytes", {}).get("upstream", 0)
            ),
            upstream_errors=_ints(totals.get("cachingproxy_upstream_errors", {})),
            disk_bytes=usage.bytes,
            entries=usage.entries,
            max_size=usage.max_size,
            in_flight=self._in_flight_total(),
        )

    def snapshot(self) -> dict[str, Any]:
        snapshot = super().snapshot()
        totals = read_totals(self._directory)
        by_cache = {c: 0 for c in CACHE_STATUSES}
        by_cache.update(_ints(totals.get("cachingproxy_requests", {})))
        mine = _ints(totals.get("cachingproxy_worker_totals", {}))
        moved = _ints(totals.get("cachingproxy_bytes", {}))
        from_cache, misses = mine.get("from_cache", 0), mine.get("misses", 0)
        served, cached = mine.get("served", 0), moved.get("cache", 0)
        snapshot.update(
            requests=sum(by_cache.values()),
            hits=by_cache[CacheStatus.HIT],
            misses=by_cache[CacheStatus.MISS],
            stale=by_cache[CacheStatus.STALE],
            revalidated=by_cache[CacheStatus.REVALIDATED],
            offline=by_cache[CacheStatus.OFFLINE],
            bypass=by_cache[CacheStatus.BYPASS],
            errors=mine.get("errors", 0),
            from_cache=from_cache,
            hit_ratio=from_cache / (from_cache + misses)
            if from_cache + misses
            else 0.0,
            byte_hit_ratio=cached / served if served else 0.0,
            bytes_served=served,
            bytes_from_cache=cached,
            bytes_from_upstream=moved.get("upstream", 0),
            upstream_errors={
                kind: n
                for kind, n in {
                    **dict.fromkeys(ERROR_KINDS, 0),
                    **_ints(totals.get("cachingproxy_upstream_errors", {})),
                }.items()
            },
        )
        return snapshot


def _ints(values: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in values.items()}


__all__ = ["SharedMetrics", "SharedStats", "read_families", "read_totals"]
