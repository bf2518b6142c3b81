"""What the handling of one request has learned so far.

Filled in as the request is routed and served; read by the access log, the
statistics and the mirror code (which documents to rewrite).
"""

from __future__ import annotations

from attrs import define

from cachingproxy.mirror.mirrors import Target


@define
class Exchange:
    """One request's running record."""

    started: float
    cache: str = "-"
    """The X-Cache value (``-`` for errors and the proxy's own pages)."""
    upstream: str = "-"
    """The upstream host (for the access log)."""
    url: str = ""
    """The normalised URL (the cache key) once routed."""
    own_page: bool = False
    """Served by the proxy's own pages: not counted in the statistics."""
    tunnel: bool = False
    """A CONNECT tunnel: logged when it closes."""
    target: Target | None = None
    """A mirrored request whose index documents are rewritten."""
    file_target: Target | None = None
    """A mirrored package file (never rewritten)."""

    @property
    def mirror(self) -> Target | None:
        """The mirror target of the request, document or file."""
        return self.target or self.file_target


__all__ = ["Exchange"]
