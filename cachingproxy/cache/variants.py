"""Variants of one URL (SPEC 3, issue 10 D2): how request header values are
normalised into the secondary key, and how many variants a URL may keep.

Any client can make the proxy store a new variant per distinct value of a
header named in ``Vary``; ``Accept-Encoding`` is everywhere on PyPI and npm.
Values that mean the same are keyed the same (``gzip, br`` and
``br;q=1,gzip``), and a URL keeps at most ``MAX_VARIANTS`` variants, the
oldest dropped first, so that a lookup never walks thousands of them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.interfaces import ICacheStore

_log = Logger()

MAX_VARIANTS = 32
"""Variants one URL keeps at most."""


def _tokens(value: str) -> list[tuple[str, list[str]]]:
    """``token;param=x, …`` as (lower-case token, [params]), whitespace gone."""
    result = []
    for item in value.lower().split(","):
        token, *params = (p.strip() for p in item.split(";"))
        if token:
            result.append((token, [p.replace(" ", "") for p in params if p]))
    return result


def _accepted(params: list[str]) -> bool:
    """Whether a q parameter (if any) is above zero."""
    for param in params:
        name, _, value = param.partition("=")
        if name == "q":
            try:
                return float(value) > 0
            except ValueError:
                return True
    return True


@functools.lru_cache(maxsize=4096)
def normalise(name: str, value: str | None) -> str:
    """The key form of request header ``name``'s ``value``.

    ``Accept-Encoding``: the set of codings accepted (q above zero), sorted —
    any response the origin chooses for one such request is acceptable to
    every other.  ``Accept``, ``Accept-Language``, ``Accept-Charset``: case
    and whitespace dropped, order kept (servers break ties by order).
    Others: runs of whitespace as one space.  Remembered: clients send the
    same few values again and again (the hit path).
    """
    if value is None:
        return ""
    if name == "accept-encoding":
        codings = {t for t, params in _tokens(value) if _accepted(params)}
        return ",".join(sorted(codings))
    if name in ("accept", "accept-language", "accept-charset"):
        return ",".join(";".join([t, *params]) for t, params in _tokens(value))
    return " ".join(value.split())


def excess(
    entries: Iterable[StoredResponse], keep: StoredResponse, cap: int = MAX_VARIANTS
) -> list[StoredResponse]:
    """The variants to drop so that at most ``cap`` remain: the oldest
    stored, never ``keep`` (the one just stored)."""
    others = sorted(
        (e for e in entries if e.variant != keep.variant),
        key=lambda e: e.stored_at,
        reverse=True,
    )
    return others[max(0, cap - 1) :]


def trim(store: ICacheStore, stored: StoredResponse) -> defer.Deferred[int]:
    """Drop the variants of ``stored.url`` past the cap; fires with how many."""
    if not stored.vary:
        return defer.succeed(0)

    def drop(entries: list[StoredResponse]) -> defer.Deferred[int]:
        removals = [store.remove(e.url, e.variant) for e in excess(entries, stored)]
        return defer.gatherResults(removals).addCallback(sum)

    def failed(failure: Failure) -> int:
        _log.warn(
            "could not trim the variants of {url}: {why}",
            url=stored.url,
            why=failure.getErrorMessage(),
        )
        return 0

    return store.lookup(stored.url).addCallback(drop).addErrback(failed)


__all__ = ["MAX_VARIANTS", "excess", "normalise", "trim"]
