"""The mirror's document filter (SPEC 6): what the sender changes in a
mirrored response — ``Location`` made local, index documents rewritten, the
digests they publish remembered."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urljoin

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from cachingproxy.cache import headers as H
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.interfaces import IDocumentFilter
from cachingproxy.mirror.mirrors import MirrorTable, Target
from cachingproxy.mirror.protocols import Documents
from cachingproxy.mirror.rendered import Render, RenderedDocuments
from cachingproxy.mirror.rewrite import (
    Digest,
    document_kind,
    rewrite,
    rewrite_crates_config,
)


@implementer(IDocumentFilter)
class MirrorFilter:
    """Rewrites one mirrored request's response for its client."""

    def __init__(
        self,
        target: Target,
        table: MirrorTable,
        key_url: str,
        remember: Callable[[dict[str, Digest]], None],
        documents: Documents = Documents.INDEX,
        *,
        rendered: RenderedDocuments,
    ) -> None:
        self._target = target
        self._table = table
        self._key_url = key_url
        self._remember = remember
        self._rendered = rendered
        """Where rewritten forms of stored documents are kept."""
        self._documents = documents
        """Which documents are rewritten (NONE for a package file, whatever
        its type; CRATES for a crates index's ``config.json``)."""

    def location(self, headers: list[Header]) -> list[Header]:
        """A mirrored upstream's ``Location`` as a local URL, and the
        upstream named in ``X-Cache-Upstream`` (SPEC 5) where the stored
        head has none (an entry first cached through the forward path, under
        the same key: the URL at the mirror's first upstream)."""
        target = self._target
        if target.match is None:
            return headers
        label = H.get(headers, "x-cache-upstream")
        if label is None and not target.doc_url:  # a merged page names none
            label = target.match.mirror.upstreams[0]
            headers = [*headers, ("X-Cache-Upstream", label)]
        location = H.get(headers, "location")
        if location is None:
            return headers
        base = label if label is not None else target.candidates[0][1]
        local = self._table.local_path(urljoin(base + target.match.rest, location))
        if local is None:
            return headers
        value = target.local_root + local
        return [(k, value) if k.lower() == "location" else (k, v) for k, v in headers]

    def is_document(self, headers: list[Header]) -> bool:
        """An index document (identity-encoded, of a known kind)."""
        if self._documents is Documents.NONE:
            return False
        encoding = (H.get(headers, "content-encoding") or "identity").lower()
        return encoding == "identity" and (
            document_kind(H.get(headers, "content-type")) is not None
            or self._documents is Documents.CRATES
        )

    def document(self, status: int, headers: list[Header], body: bytes) -> bytes:
        """Every URL into a mirrored upstream made local (200s only)."""
        rewrite = self._rewrite(status, headers)
        if rewrite is None:
            return body
        body, digests = rewrite(body)
        self._remember(digests)
        return body

    def stored(
        self, entry: StoredResponse, body: bytes | None
    ) -> Deferred[StoredResponse | bytes]:
        """The entry itself when it is sent as it is, else its rewritten form
        for this client, made once and kept in the store."""
        headers = list(entry.headers)
        rewrite = self._rewrite(entry.status, headers)
        if rewrite is None:
            return succeed(entry)
        form = "\n".join(
            (
                self._documents.value,
                document_kind(H.get(headers, "content-type")) or "",
                self._document_url(headers),
                self._target.local_root,
            )
        )
        return Deferred.fromCoroutine(self._rendered.get(entry, form, rewrite, body))

    def _document_url(self, headers: list[Header]) -> str:
        return self._target.document_url(
            H.get(headers, "x-cache-upstream"), self._key_url
        )

    def _rewrite(self, status: int, headers: list[Header]) -> Render | None:
        """How a document with these headers is rewritten (None: it is not)."""
        if status != 200 or self._documents is Documents.NONE:
            return None
        target = self._target
        if self._documents is Documents.CRATES:
            return lambda body: (
                rewrite_crates_config(
                    body, self._key_url, self._table, target.local_root
                ),
                {},
            )
        kind = document_kind(H.get(headers, "content-type"))
        if kind is None:
            return None
        doc_url = self._document_url(headers)
        return lambda body: rewrite(body, kind, doc_url, self._table, target.local_root)


__all__ = ["MirrorFilter"]
