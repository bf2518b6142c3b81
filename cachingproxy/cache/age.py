"""The age of responses (RFC 9111 4.2.3): of stored entries, of responses
received from upstream and relayed (pure; callers pass the times)."""

from __future__ import annotations

from collections.abc import Iterable

from cachingproxy.cache import headers as H
from cachingproxy.cache.entry import Header, StoredResponse


def current_age(entry: StoredResponse, now: float) -> float:
    """Age of ``entry`` at ``now``: the upstream's Age plus time spent here."""
    return entry.initial_age + max(0.0, now - entry.stored_at)


def parse_age(response_headers: Iterable[Header]) -> float:
    """The upstream ``Age`` header as seconds (0 when absent or invalid)."""
    value = H.get(response_headers, "age")
    try:
        return float(max(0, int((value or "0").split(",")[0].strip())))
    except ValueError:
        return 0.0


def corrected_age(
    response_headers: Iterable[Header], request_time: float, now: float
) -> float:
    """The age of a response received from upstream, at ``now``: its ``Age``
    plus the time since the request was sent (RFC 9111 4.2.3, counting the
    response delay conservatively)."""
    return parse_age(response_headers) + max(0.0, now - request_time)


def relayed_age(
    response_headers: Iterable[Header], request_time: float, now: float
) -> float | None:
    """The ``Age`` for a response relayed unstored: None when the upstream
    sent none (the response did not come from a cache), else
    :func:`corrected_age`."""
    items = list(response_headers)
    if H.get(items, "age") is None:
        return None
    return corrected_age(items, request_time, now)


__all__ = ["corrected_age", "current_age", "parse_age", "relayed_age"]
