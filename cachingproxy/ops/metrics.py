"""``/metrics``: the figures of a :class:`~cachingproxy.ops.stats.Stats` for Prometheus.

Each Stats owns a :class:`Metrics` with its own ``CollectorRegistry`` (never
the process-wide default one, so several proxies can share a process).
Everything is read at scrape time by one custom collector, as one
:class:`Figures` value the Stats hands over: counters from the Stats, gauges
from the live store usage and downloads in flight, so ``/metrics`` and
``/status.json`` can never disagree.  Only the
response-time histogram is kept here (as plain bucket counts: no
``_created`` samples and no wall-clock reads).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import Protocol

from attrs import frozen
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from cachingproxy import __version__

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The ``Content-Type`` of :func:`metrics_text` (Prometheus text format 0.0.4)."""

RESPONSE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Response time buckets in seconds: from a hit off the page cache to a
multi-gigabyte download."""


@frozen
class Figures:
    """What one scrape reports besides the histogram, read at scrape time."""

    by_cache: Mapping[str, int]
    """Requests answered, by X-Cache status."""
    bytes_from_cache: int
    bytes_from_upstream: int
    upstream_errors: Mapping[str, int]
    """Upstream failures by kind."""
    disk_bytes: int
    entries: int
    max_size: int | None
    """The disk budget; None: no budget (and no sample)."""
    in_flight: int
    """Upstream downloads in progress."""


class Metrics:
    """The Prometheus view of one Stats, and its response-time histogram.

    ``figures`` is called at each scrape."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        # cache status -> [count per bucket (the last is +Inf), sum]
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(figures, self))

    def observe_response(self, cache: str, duration: float) -> None:
        """Record one response time (seconds) of a request with ``cache`` status."""
        duration = max(0.0, duration)
        counts = self._buckets.get(cache)
        if counts is None:
            counts = self._buckets[cache] = [0] * (len(RESPONSE_BUCKETS) + 1)
            self._sums[cache] = 0.0
        counts[bisect_left(RESPONSE_BUCKETS, duration)] += 1
        self._sums[cache] += duration

    def _histogram(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "cachingproxy_response_seconds",
            "Time from receiving a proxied request to finishing its response, "
            "by X-Cache status.",
            labels=["cache"],
        )
        bounds = [*(floatToGoString(b) for b in RESPONSE_BUCKETS), "+Inf"]
        for cache, counts in self._buckets.items():
            family.add_metric(
                [cache],
                list(zip(bounds, accumulate(counts), strict=True)),
                self._sums[cache],
            )
        return family


class _StatsCollector(Collector):
    """Counters and gauges read from the Stats at scrape time."""

    def __init__(self, figures: Callable[[], Figures], metrics: Metrics) -> None:
        self._figures = figures
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Without this the registry would call collect(), and so the usage
        # callable, at registration time.
        return list(self._families(live=False))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(live=True))

    def _families(self, *, live: bool) -> Iterator[Metric]:
        info = InfoMetricFamily("cachingproxy_build", "The running cachingproxy.")
        requests = CounterMetricFamily(
            "cachingproxy_requests",
            "Proxied requests answered, by X-Cache status (- is an error "
            "answered before any cache decision).",
            labels=["cache"],
        )
        bytes_ = CounterMetricFamily(
            "cachingproxy_bytes",
            "Body bytes sent to clients from the cache (source=cache) and "
            "received from upstream (source=upstream).",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "cachingproxy_upstream_errors",
            "Upstream failures by kind.",
            labels=["kind"],
        )
        disk = GaugeMetricFamily(
            "cachingproxy_disk_bytes", "Bytes of cached bodies on disk."
        )
        max_size = GaugeMetricFamily(
            "cachingproxy_max_size_bytes", "The disk budget (--max-size)."
        )
        entries = GaugeMetricFamily("cachingproxy_entries", "Cache entries stored.")
        in_flight = GaugeMetricFamily(
            "cachingproxy_inflight_downloads", "Upstream downloads in progress."
        )
        if live:
            figures = self._figures()
            info.add_metric([], {"version": __version__})
            for cache, n in figures.by_cache.items():
                requests.add_metric([cache], n)
            bytes_.add_metric(["cache"], figures.bytes_from_cache)
            bytes_.add_metric(["upstream"], figures.bytes_from_upstream)
            for kind, n in figures.upstream_errors.items():
                errors.add_metric([kind], n)
            disk.add_metric([], figures.disk_bytes)
            if figures.max_size is not None:  # no sample: no budget
                max_size.add_metric([], figures.max_size)
            entries.add_metric([], figures.entries)
            in_flight.add_metric([], figures.in_flight)
        yield from (info, requests, bytes_, errors, disk, max_size, entries, in_flight)
        yield self._metrics._histogram()


class HasMetrics(Protocol):
    """What owns a :class:`Metrics` (a :class:`~cachingproxy.ops.stats.Stats`)."""

    @property
    def metrics(self) -> Metrics: ...


def metrics_text(stats: HasMetrics) -> bytes:
    """The body of ``/metrics``; serve it with :data:`CONTENT_TYPE`."""
    return generate_latest(stats.metrics.registry)


__all__ = [
    "CONTENT_TYPE",
    "RESPONSE_BUCKETS",
    "Figures",
    "HasMetrics",
    "Metrics",
    "metrics_text",
]
