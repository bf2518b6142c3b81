"""What the cache did for a response: the ``X-Cache`` value (SPEC 5)."""

from __future__ import annotations

from enum import StrEnum


class CacheStatus(StrEnum):
    """The ``X-Cache`` header, the access log's ``cache`` field and the
    statistics' key; a ``str`` so headers and logs keep the same text."""

    HIT = "HIT"
    """Served from a fresh stored entry (or a complete download)."""
    MISS = "MISS"
    """Fetched upstream (stored or not)."""
    REVALIDATED = "REVALIDATED"
    """A stale entry the upstream confirmed with ``304``."""
    STALE = "STALE"
    """A stale entry served because the upstream failed (stale-on-error)."""
    OFFLINE = "OFFLINE"
    """Served or refused under ``--offline``."""
    BYPASS = "BYPASS"
    """Not cacheable by method, rule or request: passed through."""
    NONE = "-"
    """Errors and the proxy's own pages (the access log and the statistics;
    their ``X-Cache`` header says ``BYPASS``)."""
    TUNNEL = "TUNNEL"
    """A CONNECT tunnel (access log only)."""


_HEADER = frozenset(
    {
        CacheStatus.HIT,
        CacheStatus.MISS,
        CacheStatus.REVALIDATED,
        CacheStatus.STALE,
        CacheStatus.OFFLINE,
        CacheStatus.BYPASS,
    }
)


def header_value(cache: CacheStatus) -> CacheStatus:
    """The ``X-Cache`` header for ``cache``: one of SPEC 5's six values.  An
    answer the cache had no part in (an error before any cache decision, the
    proxy's own pages, a CONNECT's 200) says ``BYPASS``."""
    return cache if cache in _HEADER else CacheStatus.BYPASS


__all__ = ["CacheStatus", "header_value"]
