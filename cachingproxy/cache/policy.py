"""Caching policy as pure functions: keys, rules, storability, freshness, ranges.

Nothing here does I/O or reads a clock; callers pass ``now``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from enum import Enum
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from attrs import frozen

from cachingproxy.cache import headers as H
from cachingproxy.cache.age import current_age, parse_age
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.variants import normalise
from cachingproxy.config import FOREVER, Rule

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Labels are separated by exactly one dot: a pattern where the dot is optional
# between repetitions backtracks exponentially on a long invalid host.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$|^\[[0-9a-f:.]+\]$")

_IMMUTABLE = (
    r"(?:\.whl|\.whl\.metadata|\.tar\.gz|\.tgz|\.zip|\.egg|\.gem|\.jar|\.pom"
    r"|\.crate|\.nupkg|\.deb|\.udeb|\.rpm|\.apk|\.tar\.xz|\.tar\.zst|\.tar\.bz2"
    r"|\.iso)(?:\?[^#]*)?$"
    r"|/by-hash/"
    r"|/-/[^/?]+\.tgz(?:\?[^#]*)?$"
)
_METADATA = (
    r"/simple/"
    r"|/pypi/[^/]+(?:/[^/]+)?/json/?(?:\?[^#]*)?$"
    r"|/dists/"
    r"|/(?:In)?Release(?:\.gpg)?$"
    r"|/(?:Packages|Sources)(?:\.(?:gz|bz2|xz|lzma|zst))?$"
    r"|/repodata/"
    r"|/maven-metadata\.xml(?:\.(?:sha1|md5|sha256|sha512))?$"
    r"|^https?://registry\.(?:npmjs\.org|yarnpkg\.com)/"
)


_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class BadURL(ValueError):
    """A request target that cannot be proxied."""


@lru_cache(maxsize=4096)
def normalize_url(url: str) -> str:
    """The cache key form of ``url``: scheme and host lower-cased, a trailing
    dot of the host, the default port and the fragment dropped, empty path
    as ``/``.  Remembered (hits ask for the same URLs again and again); a
    refused URL is not.

    @raise BadURL: not an absolute http(s) URL with a valid host and port, or
        carrying user info.
    """
    # urlsplit silently drops tabs and newlines and strips leading spaces, so
    # check the raw text: such a URL must be refused, not quietly rewritten.
    if not url.isascii() or _CONTROL.search(url):
        raise BadURL("control characters, spaces or non-ASCII in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(f"bad URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadURL(f"unsupported scheme in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise BadURL("user info in URL is not allowed")
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if not host or not _HOST_RE.match(host):
        raise BadURL(f"bad host in {url!r}")
    # "example.org." is the same (fully qualified) name: one key for both.
    host = host.removesuffix(".")
    if port == 0:
        raise BadURL(f"bad port in {url!r}")
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path or "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def default_rules(index_ttl: float) -> tuple[Rule, ...]:
    """The three default rule classes of SPEC 4, in order."""
    return (
        Rule(re.compile(_IMMUTABLE), FOREVER, name="immutable"),
        Rule(re.compile(_METADATA), index_ttl, name="metadata"),
        Rule(re.compile(""), None, name="origin"),
    )


def select_rule(rules: Iterable[Rule], url: str) -> Rule:
    """The first rule whose pattern matches ``url`` (the last default matches all)."""
    for rule in rules:
        if rule.pattern.search(url):
            return rule
    return Rule(re.compile(""), None, name="origin")


# -- Vary ------------------------------------------------------------------


def parse_vary(headers: Iterable[Header]) -> tuple[str, ...] | None:
    """Sorted lower-case header names of ``Vary``; None for ``Vary: *``."""
    value = H.get(headers, "vary")
    if value is None:
        return ()
    names = sorted({n.strip().lower() for n in value.split(",") if n.strip()})
    if "*" in names:
        return None
    return tuple(names)


def variant_of(vary: Sequence[str], request_headers: Iterable[Header]) -> str:
    """The secondary cache key: normalised values of the ``vary`` request headers."""
    if not vary:
        return ""
    items = list(request_headers)
    return "\n".join(f"{name}={normalise(name, H.get(items, name))}" for name in vary)


def select_variant(
    entries: Iterable[StoredResponse], request_headers: Iterable[Header]
) -> StoredResponse | None:
    """The newest stored variant that matches the request, if any."""
    items = list(request_headers)
    keys: dict[tuple[str, ...], str] = {}  # the request's key, once per Vary
    best: StoredResponse | None = None
    for entry in entries:
        key = keys.get(entry.vary)
        if key is None:
            key = keys[entry.vary] = variant_of(entry.vary, items)
        if key == entry.variant and (best is None or entry.stored_at > best.stored_at):
            best = entry
    return best


# -- Storing ---------------------------------------------------------------

_HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


class Bypass(Enum):
    """Why a request skips the cache altogether."""

    METHOD = "method"
    CREDENTIALS = "credentials"
    RULE = "rule"
    NO_STORE = "no-store"


def request_bypass(
    rule: Rule, method: str, request_headers: Iterable[Header]
) -> Bypass | None:
    """Whether a request must go upstream uncached (SPEC 3), and why."""
    items = list(request_headers)
    if method not in ("GET", "HEAD"):
        return Bypass.METHOD
    if not rule.store:
        return Bypass.RULE
    if H.get(items, "authorization") is not None or H.get(items, "cookie") is not None:
        return Bypass.CREDENTIALS
    if rule.ttl is None and "no-store" in H.parse_cache_control(
        H.get(items, "cache-control")
    ):
        return Bypass.NO_STORE
    return None


def is_storable(
    rule: Rule,
    status: int,
    response_headers: Iterable[Header],
    negative_ttl: float,
    received: float | None = None,
) -> bool:
    """Whether a GET response may become a cache entry (SPEC 3);
    ``received``: when it arrived (stands in for a missing or invalid Date)."""
    items = list(response_headers)
    if H.get(items, "set-cookie") is not None or parse_vary(items) is None:
        return False
    if rule.ttl is not None:
        if status == 200 or status in (301, 308):
            return True
        return status in (404, 410) and negative_ttl > 0
    cc = H.parse_cache_control(H.get(items, "cache-control"))
    if "no-store" in cc or "private" in cc:
        return False
    explicit = (
        "max-age" in cc
        or "s-maxage" in cc
        or "public" in cc
        or H.get(items, "expires") is not None
    )
    if status not in _HEURISTIC_STATUSES and not (explicit and status in (302, 307)):
        return False
    has_validator = (
        H.get(items, "etag") is not None or H.get(items, "last-modified") is not None
    )
    lifetime = _origin_lifetime(status, items, received)
    return lifetime > 0 or has_validator


# -- Freshness -------------------------------------------------------------


def _http_date(value: str | None) -> float | None:
    """A strict HTTP-date: anything else is invalid (an invalid Expires means
    already expired, RFC 9111 5.3)."""
    return H.parse_http_date(value)


def _origin_lifetime(
    status: int, items: list[Header], received: float | None = None
) -> float:
    """RFC 9111 4.2.1 freshness lifetime for a shared cache; without a valid
    ``Date`` the time the response was ``received`` stands in for it."""
    cc = H.parse_cache_control(H.get(items, "cache-control"))
    if "no-cache" in cc:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in cc:
            return H.delta_seconds(cc, name) or 0.0
    expires_value = H.get(items, "expires")
    if expires_value is not None:
        expires = _http_date(expires_value)
        date = _http_date(H.get(items, "date")) or received
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    last_modified = _http_date(H.get(items, "last-modified"))
    date = _http_date(H.get(items, "date")) or received
    if last_modified is not None and date is not None and status in _HEURISTIC_STATUSES:
        return min(max(0.0, (date - last_modified) / 10), 86400.0)
    return 0.0


def freshness_lifetime(
    rule: Rule,
    entry: StoredResponse,
    index_ttl: float,
    negative_ttl: float,
) -> float:
    """How long ``entry`` stays fresh under ``rule``, in seconds (may be inf)."""
    if rule.ttl is None:
        return _origin_lifetime(entry.status, list(entry.headers), entry.stored_at)
    if entry.status in (404, 410):
        return negative_ttl
    if entry.status in (301, 308):
        return index_ttl
    return rule.ttl


def only_if_cached(request_headers: Iterable[Header]) -> bool:
    """Whether the client forbids going upstream (``only-if-cached``, RFC
    9111 5.2.1.7): a request the cache cannot answer gets ``504``."""
    cc = H.parse_cache_control(H.get(request_headers, "cache-control"))
    return "only-if-cached" in cc


def request_wants_revalidation(
    rule: Rule, request_headers: Iterable[Header], age: float
) -> bool:
    """Under ``origin``, client ``no-cache``/``max-age`` force a revalidation."""
    if rule.ttl is not None:
        return False
    return asks_for_fresh(request_headers, age)


def asks_for_fresh(request_headers: Iterable[Header], age: float) -> bool:
    """Whether the client asks for a copy fresher than ``age`` seconds:
    ``Cache-Control: no-cache``, ``Pragma: no-cache`` (without any
    ``Cache-Control``), or a ``max-age`` below ``age``."""
    items = list(request_headers)
    cc = H.parse_cache_control(H.get(items, "cache-control"))
    if "no-cache" in cc:
        return True
    if not cc and "no-cache" in (H.get(items, "pragma") or "").lower():
        return True
    max_age = H.delta_seconds(cc, "max-age")
    return max_age is not None and age > max_age


def index_refresh_due(
    rule: Rule,
    entry: StoredResponse,
    request_headers: Iterable[Header],
    now: float,
    interval: float,
) -> bool:
    """Under a metadata rule (a finite TTL), whether a client asking for a
    fresh copy (``no-cache``, ``Pragma: no-cache``, a ``max-age`` below the
    entry's age: pip sends ``max-age=0``) has it revalidated upstream now:
    at most once per ``interval`` seconds (``--index-refresh``), counted from
    when ``entry`` was last fetched or revalidated (SPEC 6)."""
    if rule.ttl is None or math.isinf(rule.ttl):
        return False
    if now - entry.stored_at < interval:
        return False
    return asks_for_fresh(request_headers, current_age(entry, now))


def is_fresh(
    rule: Rule,
    entry: StoredResponse,
    now: float,
    index_ttl: float,
    negative_ttl: float,
) -> bool:
    """Whether ``entry`` may be served without asking upstream."""
    lifetime = freshness_lifetime(rule, entry, index_ttl, negative_ttl)
    return math.isinf(lifetime) or current_age(entry, now) < lifetime


def stale_allowed(
    rule: Rule,
    entry: StoredResponse,
    now: float,
    index_ttl: float,
    negative_ttl: float,
    max_stale: float | None,
) -> bool:
    """Whether a stale ``entry`` may be served when upstream fails (SPEC 4)."""
    if rule.ttl is None:
        cc = H.parse_cache_control(entry.header("cache-control"))
        if cc.keys() & {"must-revalidate", "proxy-revalidate", "no-cache", "s-maxage"}:
            return False
    if max_stale is None:
        return True
    lifetime = freshness_lifetime(rule, entry, index_ttl, negative_ttl)
    return current_age(entry, now) - lifetime <= max_stale


def validators(entry: StoredResponse) -> list[Header]:
    """Conditional request headers that revalidate ``entry``."""
    result: list[Header] = []
    etag = entry.header("etag")
    if etag is not None:
        result.append(("If-None-Match", etag))
    last_modified = entry.header("last-modified")
    if last_modified is not None:
        result.append(("If-Modified-Since", last_modified))
    return result


_NOT_UPDATED_BY_304 = frozenset(
    {"content-length", "content-encoding", "content-range", "transfer-encoding"}
)


def refreshed(
    entry: StoredResponse, not_modified_headers: Iterable[Header], now: float
) -> StoredResponse:
    """``entry`` updated by a 304 (RFC 9111 4.3.4): new header values win."""
    fresh = [
        (k, v)
        for k, v in H.end_to_end(not_modified_headers)
        if k.lower() not in _NOT_UPDATED_BY_304
    ]
    replaced = {k.lower() for k, _ in fresh}
    kept = [(k, v) for k, v in entry.headers if k.lower() not in replaced]
    return entry.replace(
        headers=tuple(kept + fresh),
        stored_at=now,
        initial_age=parse_age(fresh),
    )


# -- Conditional and range requests from clients ----------------------------


def _etags(value: str) -> list[str]:
    return [t.strip().removeprefix("W/") for t in value.split(",") if t.strip()]


def not_modified(entry: StoredResponse, request_headers: Iterable[Header]) -> bool:
    """Whether the client's conditional request is satisfied by ``entry`` (304)."""
    if entry.status != 200:
        return False
    items = list(request_headers)
    inm = H.get(items, "if-none-match")
    if inm is not None:
        etag = entry.header("etag")
        tags = _etags(inm)
        return "*" in tags or (etag is not None and etag.removeprefix("W/") in tags)
    ims = _http_date(H.get(items, "if-modified-since"))
    if ims is None:
        return False
    last_modified = _http_date(entry.header("last-modified"))
    return last_modified is not None and last_modified <= ims


_DIGITS_RE = re.compile(r"^[0-9]*\Z")


@frozen
class ByteRange:
    """A satisfiable single byte range, half-open: ``[start, end)``."""

    start: int
    end: int


class Unsatisfiable(Enum):
    """The requested range lies outside the body (416)."""

    RANGE = "unsatisfiable"


def parse_range(value: str | None, size: int) -> ByteRange | Unsatisfiable | None:
    """A single ``bytes=`` range against a body of ``size`` bytes.

    None means "serve the whole body" (no header, several ranges, or a syntax
    error, which RFC 9110 says to ignore).
    """
    if value is None:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    # str.isdigit() accepts "²" and other non-ASCII digits that int() refuses.
    if not _DIGITS_RE.match(first) or not _DIGITS_RE.match(last):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return Unsatisfiable.RANGE
        return ByteRange(max(0, size - suffix), size)
    start = int(first)
    end = size if last == "" else int(last) + 1
    if last != "" and end <= start:
        return None
    if start >= size:
        return Unsatisfiable.RANGE
    return ByteRange(start, min(end, size))


def if_range_matches(entry: StoredResponse, request_headers: Iterable[Header]) -> bool:
    """Whether an ``If-Range`` precondition (if any) allows a partial answer."""
    value = H.get(request_headers, "if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        etag = entry.header("etag")
        return etag is not None and not etag.startswith("W/") and etag == value
    return value == entry.header("last-modified")


__all__ = [
    "BadURL",
    "Bypass",
    "ByteRange",
    "Unsatisfiable",
    "current_age",
    "default_rules",
    "freshness_lifetime",
    "if_range_matches",
    "index_refresh_due",
    "is_fresh",
    "is_storable",
    "normalize_url",
    "not_modified",
    "only_if_cached",
    "parse_age",
    "parse_range",
    "parse_vary",
    "refreshed",
    "request_bypass",
    "request_wants_revalidation",
    "select_rule",
    "select_variant",
    "stale_allowed",
    "validators",
    "variant_of",
]
