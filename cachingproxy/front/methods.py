"""Request methods the proxy answers itself (RFC 9110 9.3.7, 9.3.8, 7.6.2).

``TRACE`` is refused: echoing a request back (its cookies and credentials
included) is a cross-site tracing vector, and the proxy has nothing to gain
from forwarding it.  ``OPTIONS`` with ``Max-Forwards: 0`` is answered here,
as RFC 9110 requires of the last hop it may reach; a larger value is
decremented on the way upstream.  Method names are RFC 9110 tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen

from cachingproxy.cache import headers as H
from cachingproxy.cache.entry import Header

ALLOW = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
"""The methods the proxy carries (the Allow of its own answers)."""


@frozen
class LocalAnswer:
    """A response the proxy gives instead of forwarding the request."""

    status: int
    headers: tuple[Header, ...]
    message: str = ""
    """For an error: the text of the error page."""


def max_forwards(request_headers: Iterable[Header]) -> int | None:
    """The ``Max-Forwards`` value, or None when absent or not a number."""
    value = H.get(request_headers, "max-forwards")
    if value is None or not value.strip().isdigit() or not value.isascii():
        return None
    return int(value.strip())


def local_answer(method: str, request_headers: Iterable[Header]) -> LocalAnswer | None:
    """What the proxy answers itself for ``method``, or None to go on."""
    if method == "TRACE":
        return LocalAnswer(405, (("Allow", ALLOW),), "TRACE is not supported")
    if method == "OPTIONS" and max_forwards(request_headers) == 0:
        return LocalAnswer(200, (("Allow", ALLOW), ("Content-Length", "0")))
    return None


def forwarded(method: str, request_headers: Iterable[Header]) -> list[Header]:
    """``request_headers`` for upstream: ``Max-Forwards`` of an ``OPTIONS``
    decremented (RFC 9110 7.6.2); other methods ignore it."""
    items = list(request_headers)
    hops = max_forwards(items)
    if method != "OPTIONS" or hops is None:
        return items
    kept = [(k, v) for k, v in items if k.lower() != "max-forwards"]
    return [*kept, ("Max-Forwards", str(hops - 1))]


__all__ = [
    "ALLOW",
    "LocalAnswer",
    "forwarded",
    "local_answer",
    "max_forwards",
]
