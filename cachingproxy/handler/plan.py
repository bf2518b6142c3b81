"""What the cached and uncached paths decide to serve: small frozen values
that one sender (:mod:`~cachingproxy.handler.sender`) turns into bytes."""

from __future__ import annotations

from attrs import frozen
from twisted.web.iweb import IResponse

from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.interfaces import IDownload


@frozen
class ServeEntry:
    """Serve a stored entry (with 304, 416 and ``Range`` as the client asks)."""

    entry: StoredResponse
    cache: CacheStatus


@frozen
class FollowDownload:
    """Follow a download whose head has arrived (``status``, ``headers``)."""

    download: IDownload
    status: int
    phrase: str
    headers: tuple[Header, ...]
    cache: CacheStatus


@frozen
class PassResponse:
    """Relay an upstream response unstored (its body is this client's)."""

    response: IResponse
    status: int
    phrase: str
    headers: tuple[Header, ...]
    cache: CacheStatus


@frozen
class ServeBody:
    """Serve a small body made here: a mirror's merged index page (a
    document), or an answer the proxy gives itself (TRACE)."""

    status: int
    headers: tuple[Header, ...]
    body: bytes
    cache: CacheStatus


@frozen
class Fail:
    """Answer with the proxy's own error page."""

    status: int
    message: str
    cache: CacheStatus = CacheStatus.NONE


Plan = ServeEntry | FollowDownload | PassResponse | ServeBody | Fail
"""What to send a client."""


__all__ = [
    "Fail",
    "FollowDownload",
    "PassResponse",
    "Plan",
    "ServeBody",
    "ServeEntry",
]
