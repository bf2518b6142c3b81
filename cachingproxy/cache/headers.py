"""Header helpers: hop-by-hop filtering, Cache-Control and HTTP-date parsing (pure)."""

from __future__ import annotations

import calendar
import re
import time
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


PER_CACHE = frozenset({"x-cache-upstream"})
"""Fields each cache sets for its own clients: an upstream's value (another
cache's, in a chain of them) describes that cache's upstream, not ours."""


def received(headers: Iterable[Header]) -> list[Header]:
    """An upstream response's fields as a response of this cache starts
    from: end to end, without the upstream cache's own :data:`PER_CACHE`."""
    return [(k, v) for k, v in end_to_end(headers) if k.lower() not in PER_CACHE]


def get(headers: Iterable[Header], name: str) -> str | None:
    """All values of ``name`` joined by ``", "``; None when absent."""
    lname = name.lower()
    values = [v for k, v in headers if k.lower() == lname]
    return ", ".join(values) if values else None


def content_length(headers: Iterable[Header]) -> int | None:
    """The ``Content-Length`` of ``headers``: one non-negative integer (the
    same value repeated counts as one, RFC 9110 8.6), else None."""
    values = {v.strip() for k, v in headers if k.lower() == "content-length"}
    values = {p.strip() for v in values for p in v.split(",")}
    if len(values) != 1:
        return None
    (value,) = values
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


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


_MONTHS = {
    m: i
    for i, m in enumerate(
        [
            "jan",
            "feb",
            "mar",
            "apr",
            "may",
            "jun",
            "jul",
            "aug",
            "sep",
            "oct",
            "nov",
            "dec",
        ],
        start=1,
    )
}
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_LONG_DAY = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH = r"(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TIME = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
_IMF_FIXDATE = re.compile(
    rf"{_DAY}, (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) {_TIME} gmt\Z"
)
_RFC850 = re.compile(
    rf"{_LONG_DAY}, (?P<day>[0-9]{{2}})-{_MONTH}-(?P<year>[0-9]{{2}}) {_TIME} gmt\Z"
)
_ASCTIME = re.compile(
    rf"{_DAY} {_MONTH} (?P<day>[ 0-9][0-9]) {_TIME} (?P<year>[0-9]{{4}})\Z"
)


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7) as a POSIX timestamp; None when invalid.

    Strict: IMF-fixdate, and the obsolete RFC 850 and asctime forms a
    recipient must accept; names are matched without regard to case (as
    browsers and the caching test suite do).  Two-digit years other than in
    the RFC 850 form, dashes, missing commas, doubled spaces, other zones
    than GMT and several values (several header lines) are invalid.  An RFC
    850 year that would lie more than 50 years after ``now`` is taken as
    the most recent past year with those digits.
    """
    if not value or len(value) > 40:
        return None
    text = value.strip(" \t").lower()
    m = _IMF_FIXDATE.match(text) or _ASCTIME.match(text)
    if m is not None:
        year = int(m.group("year"))
    else:
        m = _RFC850.match(text)
        if m is None:
            return None
        year = _rfc850_year(int(m.group("year")), now)
    day, hour = int(m.group("day")), int(m.group("hour"))
    minute, second = int(m.group("minute")), int(m.group("second"))
    month = _MONTHS[m.group("month")]
    if not (
        1 <= day <= calendar.monthrange(year, month)[1]
        and hour < 24
        and minute < 60
        and second <= 60
    ):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def _rfc850_year(two_digits: int, now: float | None) -> int:
    current = time.gmtime(now).tm_year
    year = current - current % 100 + two_digits
    if year > current + 50:
        year -= 100
    return year


__all__ = [
    "HOP_BY_HOP",
    "PER_CACHE",
    "connection_tokens",
    "content_length",
    "delta_seconds",
    "end_to_end",
    "get",
    "is_hop_by_hop",
    "parse_cache_control",
    "parse_http_date",
    "received",
]
