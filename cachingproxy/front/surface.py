"""What the proxy's own pages, its admin actions and CONNECT handling may use
of the proxy: a narrow surface instead of the whole request handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import ProxyConfig
from cachingproxy.front.exchange import Exchange
from cachingproxy.interfaces import IUpstream
from cachingproxy.ops.stats import Stats

if TYPE_CHECKING:
    from cachingproxy.tls.ca import CertificateAuthority

ErrorSender = Callable[[Request, int, str, Exchange, CacheStatus], None]
"""Answers a request with an error page (status, message) and records the
cache status for the log."""

TunnelLogger = Callable[[Request, float, str, int, int], None]
"""Writes the access log line of a closed tunnel (request, started,
authority, bytes up, bytes down)."""

Purger = Callable[[str], Deferred[int]]
"""Drops entries (of a URL or under a prefix), answering how many."""


@frozen
class Surface:
    """The parts of the proxy that ``connect``, ``pages`` and ``admin`` use."""

    via: str
    """The proxy's ``Via`` token."""
    clock: IReactorTime
    stats: Stats
    config: ProxyConfig
    upstream: IUpstream
    """For CONNECT tunnels (``connect_tcp``)."""
    error: ErrorSender
    log_tunnel: TunnelLogger
    purge_url: Purger
    purge_prefix: Purger
    intercepts: Callable[[str], bool]
    """Whether CONNECTs to a host are intercepted (``--intercept``)."""
    ca: CertificateAuthority | None = None


__all__ = ["ErrorSender", "Purger", "Surface", "TunnelLogger"]
