"""The digest check of stored files served under a mirror (SPEC 6, issue 10
D8).

A file fetched through a mirror is checked against the digest its index
published while it downloads.  The same file may already be in the cache
under the same key, stored through the forward or transparent path, where
no index was seen: before the mirror serves such an entry it compares the
entry's body with the published digest (sha256 from the store's own record;
other algorithms by reading the body once, remembered by content).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.errors import BodyMissing
from cachingproxy.interfaces import ICacheStore
from cachingproxy.mirror.rewrite import Digest

_log = Logger()

_MAX_REMEMBERED = 4096
_computed: OrderedDict[tuple[str, str], str] = OrderedDict()
"""(sha256 of a body, algorithm) -> that body's digest under the algorithm:
content-addressed, so valid whatever entry holds the body."""


@implementer(IConsumer)
class _Hasher:
    """A consumer that hashes what it is given."""

    def __init__(self, algorithm: str) -> None:
        self.hash = hashlib.new(algorithm)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        pass

    def unregisterProducer(self) -> None:  # noqa: N802
        pass

    def write(self, data: bytes) -> None:
        self.hash.update(data)


async def _digest_of(
    store: ICacheStore, entry: StoredResponse, algorithm: str
) -> str | None:
    if algorithm == "sha256" and entry.digest:
        return entry.digest
    key = (entry.digest, algorithm)
    known = _computed.get(key) if entry.digest else None
    if known is not None:
        _computed.move_to_end(key)
        return known
    hasher = _Hasher(algorithm)
    try:
        await store.read(entry, hasher)
    except BodyMissing:
        return None
    value = hasher.hash.hexdigest()
    if entry.digest:
        _computed[key] = value
        while len(_computed) > _MAX_REMEMBERED:
            _computed.popitem(last=False)
    return value


async def checked(
    store: ICacheStore, entry: StoredResponse | None, expected: Digest | None
) -> StoredResponse | None:
    """``entry`` if it may be served against the ``expected`` published
    digest (or there is none); else None, the entry dropped so that the
    mirror fetches (and checks) the file again."""
    if entry is None or expected is None or entry.status != 200:
        return entry
    algorithm, hexdigest = expected
    try:
        actual = await _digest_of(store, entry, algorithm)
    except ValueError:  # an algorithm hashlib does not know
        return entry
    if actual is not None and hmac.compare_digest(actual, hexdigest):
        return entry
    _log.error(
        "stored {url} does not match the digest its index published"
        " ({algo} {expected}, stored body has {actual}); dropped, fetching again",
        url=entry.url,
        algo=algorithm,
        expected=hexdigest,
        actual=actual,
    )
    await store.remove(entry.url, entry.variant)
    return None


__all__ = ["checked"]
