"""What the handling of one request has learned so far.

Filled in as the request is routed and served; read by the access log and
the statistics.
"""

from __future__ import annotations

from attrs import define

from cachingproxy.cache.status import CacheStatus


@define
class Exchange:
    """One request's running record."""

    started: float
    cache: CacheStatus = CacheStatus.NONE
    """The X-Cache value (``-`` for errors and the proxy's own pages)."""
    upstream: str = "-"
    """The upstream host (for the access log)."""
    url: str = ""
    """The normalised URL (the cache key) once routed."""
    own_page: bool = False
    """Served by the proxy's own pages: not counted in the statistics."""
    tunnel: bool = False
    """A CONNECT tunnel: logged when it closes."""


__all__ = ["Exchange"]
