"""What the handling of one request has learned so far.

Filled in as the request is routed and served; read by the access log and
the statistics.
"""

from __future__ import annotations

from attrs import define

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import Rule


@define
class Exchange:
    """One request's running record."""

    started: float
    cache: CacheStatus = CacheStatus.NONE
    """The cache status for the log and the statistics (``-`` for errors
    and the proxy's own pages, whose ``X-Cache`` header says ``BYPASS``)."""
    upstream: str = "-"
    """The upstream host (for the access log)."""
    url: str = ""
    """The normalised URL (the cache key) once routed."""
    own_page: bool = False
    """Served by the proxy's own pages: not counted in the statistics."""
    tunnel: bool = False
    """A CONNECT tunnel: logged when it closes."""
    rule: Rule | None = None
    """The rule that decided a cached-path request whose hits may be
    answered from memory (handler/quick.py): none needs credentials."""
    mirror: bool = False
    """Served under a ``--mirror`` prefix."""
    expected: tuple[str, str] | None = None
    """The published digest a mirror checked the stored body against."""
    served: StoredResponse | None = None
    """The stored entry whose body was sent (a 200 whole, or a range)."""


__all__ = ["Exchange"]
