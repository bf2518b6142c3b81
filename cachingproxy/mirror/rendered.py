"""Index documents rewritten once, kept in the store beside their entry.

A mirrored index document (an npm packument, a PEP 503 page) is rewritten
for the client's base URL.  Rewriting an 8 MB packument takes far longer
than sending it, so the rewritten form is stored like any other body, under
the entry's URL with :data:`REWRITTEN` appended (a fragment: no client
request can name it, and a purge of the URL's prefix takes it along), and
later hits send that stored body (zero-copy where the connection allows).

A form is valid for exactly one body of its entry: it records the entry's
digest, and a form made from another body (the entry was refreshed) is
never served; rendering the new body replaces it.  The digests a document
publishes are stored beside it too (:data:`DIGESTS`), so a process that
serves a stored form without rewriting it still knows them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cachingproxy import __version__
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import ICacheStore
from cachingproxy.mirror import documents
from cachingproxy.mirror.mirrors import MirrorTable
from cachingproxy.mirror.rewrite import MAX_DOCUMENT, Digest

_log = Logger()

REWRITTEN = "#rewritten"
"""Appended to an entry's URL: the store key of its rewritten forms."""

DIGESTS = "#digests"
"""Appended to an entry's URL: the digests its documents publish."""

FROM = "X-Rewritten-From"
"""Header of a stored form: the digest of the body it was made from."""

_LOADED = 10_000
"""Forms whose digests this process has taken in (then it starts over)."""

Render = Callable[[bytes], tuple[bytes, dict[str, Digest]]]
"""Rewrites a document's body: the new body and the digests it publishes."""


def keys_of(url: str) -> tuple[str, str]:
    """The store keys of ``url``'s rewritten forms and of their digests."""
    return url + REWRITTEN, url + DIGESTS


class RenderedDocuments:
    """Rewritten forms of stored documents, made once and then stored.

    ``remember`` takes the digests a document publishes (into the proxy's
    table of expected digests).
    """

    def __init__(
        self,
        store: ICacheStore,
        clock: IReactorTime,
        remember: Callable[[dict[str, Digest]], None],
        table: MirrorTable,
    ) -> None:
        self._store = store
        self._clock = clock
        self._remember = remember
        self._fingerprint = hashlib.sha256(
            f"{__version__}\n{table.mirrors!r}".encode()
        ).hexdigest()
        """What every form depends on: the mounted mirrors (a form made for
        other mounts, or by another version, is not used)."""
        self._rendering: dict[tuple[str, str], defer.Deferred[None]] = {}
        self._loaded: set[tuple[str, str, str]] = set()

    async def get(
        self,
        entry: StoredResponse,
        form: str,
        render: Render,
        body: bytes | None = None,
    ) -> StoredResponse | bytes:
        """``entry``'s body rewritten by ``render``: its stored form, made
        now if there is none for this body.  ``form`` names everything the
        rewrite depends on besides the body and the mounted mirrors (the
        client's base URL, the document's URL); ``body`` is the entry's
        body if the caller has it.  Answers the bytes themselves when the
        form cannot be stored.

        @raise BodyMissing: the entry's body is gone.
        """
        named = f"{self._fingerprint}\n{entry.variant}\n{form}"
        variant = hashlib.sha256(named.encode()).hexdigest()[:32]
        source = entry.digest or f"{entry.body_ref}/{entry.size}"
        for _ in range(2):
            stored = await self._find(entry.url, variant, source)
            if stored is not None:
                return stored
            busy = self._rendering.get((entry.url, variant))
            if busy is None:
                break
            await busy  # the same form being made for another client
        done: defer.Deferred[None] = defer.Deferred()
        self._rendering[(entry.url, variant)] = done
        try:
            return await self._make(entry, variant, source, render, body)
        finally:
            del self._rendering[(entry.url, variant)]
            done.callback(None)

    async def _find(self, url: str, variant: str, source: str) -> StoredResponse | None:
        """The stored form made from the body ``source``, its digests taken in."""
        rewritten, digests = keys_of(url)
        for stored in await self._store.lookup(rewritten):
            if stored.variant == variant and stored.header(FROM) == source:
                await self._take_digests(digests, variant, source)
                self._store.touch(stored)
                return stored
        return None

    async def _take_digests(self, key: str, variant: str, source: str) -> None:
        if (key, variant, source) in self._loaded:
            return
        for stored in await self._store.lookup(key):
            if stored.variant == variant and stored.header(FROM) == source:
                try:
                    body = await documents.read_entry(self._store, stored, MAX_DOCUMENT)
                    published = json.loads(body)
                except (BodyMissing, documents.TooBig, ValueError) as e:
                    _log.warn("cannot read the digests of {url}: {e}", url=key, e=e)
                    return
                self._remember({k: (a, h) for k, (a, h) in published.items()})
        if len(self._loaded) >= _LOADED:
            self._loaded.clear()
        self._loaded.add((key, variant, source))

    async def _make(
        self,
        entry: StoredResponse,
        variant: str,
        source: str,
        render: Render,
        body: bytes | None,
    ) -> StoredResponse | bytes:
        if body is None:
            body = await documents.read_entry(self._store, entry, MAX_DOCUMENT)
        body, published = render(body)
        self._remember(published)
        rewritten, digests = keys_of(entry.url)
        try:
            await self._put(digests, variant, source, json.dumps(published).encode())
            stored = await self._put(rewritten, variant, source, body)
        except (StoreFull, BodyMissing) as e:
            _log.info("rewritten {url} not stored: {e}", url=entry.url, e=e)
            return body
        self._loaded.add((digests, variant, source))
        return stored

    async def _put(
        self, key: str, variant: str, source: str, body: bytes
    ) -> StoredResponse:
        writer = await self._store.open_writer(key)
        try:
            writer.write(body)
        except BaseException:
            writer.abort()
            raise
        stored: StoredResponse = await writer.commit(
            StoredResponse(
                url=key,
                variant=variant,
                vary=(),
                status=200,
                headers=((FROM, source),),
                stored_at=self._clock.seconds(),
            )
        )
        return stored


__all__ = ["DIGESTS", "FROM", "REWRITTEN", "RenderedDocuments", "keys_of"]
