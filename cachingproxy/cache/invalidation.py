"""Which stored responses an unsafe request's response invalidates (RFC 9111
4.4, SPEC 3): pure, the caller purges."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urljoin

from cachingproxy.cache import headers as H
from cachingproxy.cache.entry import Header
from cachingproxy.cache.policy import BadURL, normalize_url

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def invalidated_urls(
    method: str, status: int, url: str, response_headers: Iterable[Header]
) -> list[str]:
    """The cache keys an unsafe request's response invalidates (RFC 9111 4.4).

    A non-error response (2xx, 3xx) to a method that is not safe invalidates
    the target URL and the URLs in ``Location`` and ``Content-Location`` when
    they are on the same host (scheme, host and port) as ``url`` — another
    origin's entries are never dropped on a third party's say-so.
    """
    if method.upper() in _SAFE_METHODS or not 200 <= status < 400:
        return []
    items = list(response_headers)
    origin = url.split("/", 3)[:3]
    result = [url]
    for name in ("location", "content-location"):
        value = H.get(items, name)
        if value is None or "," in value:
            continue
        try:
            target = normalize_url(urljoin(url, value.strip()))
        except (BadURL, ValueError):
            continue
        if target.split("/", 3)[:3] == origin and target not in result:
            result.append(target)
    return result


__all__ = ["invalidated_urls"]
