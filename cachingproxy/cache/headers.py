"""Header helpers: hop-by-hop filtering and Cache-Control parsing (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from cachingproxy.cache.entry import Header

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def connection_tokens(headers: Iterable[Header]) -> frozenset[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(names)


def is_hop_by_hop(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """True for headers that must not cross the proxy (SPEC 5)."""
    lname = name.lower()
    return lname in HOP_BY_HOP or lname.startswith("proxy-") or lname in extra


def end_to_end(headers: Iterable[Header]) -> list[Header]:
    """``headers`` without hop-by-hop ones, including those named by Connection."""
    items = list(headers)
    extra = connection_tokens(items)
    return [(k, v) for k, v in items if not is_hop_by_hop(k, extra)]


def get(headers: Iterable[Header], name: str) -> str | None:
    """All values of ``name`` joined by ``", "``; None when absent."""
    lname = name.lower()
    values = [v for k, v in headers if k.lower() == lname]
    return ", ".join(values) if values else None


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives of a Cache-Control value: lower-cased names to their argument."""
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for part in _split_commas(value):
        name, sep, arg = part.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        directives[name] = arg.strip().strip('"') if sep else None
    return directives


def delta_seconds(directives: dict[str, str | None], name: str) -> float | None:
    """The non-negative integer argument of directive ``name``, if valid."""
    arg = directives.get(name)
    if arg is None:
        return None
    try:
        seconds = int(arg)
    except ValueError:
        return None
    return float(seconds) if seconds >= 0 else None


def _split_commas(value: str) -> list[str]:
    """Split on commas outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


__all__ = [
    "HOP_BY_HOP",
    "connection_tokens",
    "delta_seconds",
    "end_to_end",
    "get",
    "is_hop_by_hop",
    "parse_cache_control",
]
