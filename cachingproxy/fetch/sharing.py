"""Which download a client follows: the one decision to share (SPEC 5).

:class:`Downloads` knows the downloads in flight by key and decides, for
each client, whether it may use a running download's response or must
fetch its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import attrs
from twisted.internet import defer

from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header
from cachingproxy.fetch.download import Download
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind

_RETRY = Outcome(OutcomeKind.RETRY)


@attrs.define(eq=False)
class PassingThrough:
    """A response streaming to one client unstored (for the status page)."""

    url: str
    total: int | None
    started_at: float
    bytes_written: int = 0
    clients: int = 1

    def received(self, n: int) -> None:
        self.bytes_written += n


def usable(
    download: Download, outcome: Outcome, client_headers: list[Header]
) -> Outcome:
    """What ``outcome`` of ``download`` means for a client with these
    headers: the outcome itself, or RETRY when the client must fetch alone."""
    if outcome.kind is OutcomeKind.STREAM:
        if (
            download.failure is not None
            or download.spilled
            or policy.variant_of(download.vary, client_headers) != download.variant
        ):
            return _RETRY
    elif outcome.kind is OutcomeKind.NOT_MODIFIED:
        assert outcome.entry is not None
        entry = outcome.entry
        if policy.variant_of(entry.vary, client_headers) != entry.variant:
            return _RETRY
    elif outcome.kind is OutcomeKind.PASSTHROUGH:
        if not download.take_passthrough():
            return _RETRY
    elif outcome.response is not None and not download.take_passthrough():
        # An origin's 5xx: its body goes to one client, the others get the
        # status without it.
        return attrs.evolve(outcome, response=None)
    return outcome


class Across(Protocol):
    """Sharing downloads with other worker processes (SPEC 11; see
    :class:`cachingproxy.workers.coordination.SharedDownloads`)."""

    def download(
        self,
        url: str,
        new: Callable[[], Download],
        on_done: Callable[[Download], None],
    ) -> Download:
        """``new()`` (a started download), or one another worker runs."""

    def mark_purged(self, matches: Callable[[str], bool]) -> None:
        """Downloads in other workers whose URL ``matches`` store nothing."""


class Downloads:
    """The downloads in flight, by normalised URL (for coalescing and status)."""

    def __init__(self) -> None:
        self.across: Across | None = None
        """Set in a worker process: downloads are shared with the others."""
        self.in_flight: dict[str, Download] = {}
        self.passing: set[PassingThrough] = set()
        self._variants: dict[tuple[str, str], Download] = {}
        """Downloads of other variants of a URL, by (url, variant under the
        Vary of the URL's first download), so their clients share them too."""

    async def obtain(
        self,
        url: str,
        client_headers: list[Header],
        new: Callable[[], Download],
    ) -> tuple[Download, Outcome]:
        """The download a client follows and what it means for it: the one
        in flight for ``url`` when the client may use its response, else one
        of its own (``new``, shared with the clients of the same variant)."""
        download = self.get(url)
        if download is None:
            download = self._start_shared(url, new)
        outcome = await self.wait(download, client_headers)
        if outcome.kind is not OutcomeKind.RETRY:
            return download, outcome
        # Another variant (or a passthrough another client took): the
        # clients of one variant share one download of it.
        variant = policy.variant_of(download.vary, client_headers)
        sibling = self.get_variant(url, variant) if download.vary else None
        if sibling is not None:
            outcome = await self.wait(sibling, client_headers)
        if sibling is None or outcome.kind is OutcomeKind.RETRY:
            sibling = new()
            if download.vary:
                self.add_variant(sibling, variant)
            self._start(sibling, shared=False)
            outcome = await self.wait(sibling, client_headers)
        return sibling, outcome

    def wait(
        self, download: Download, client_headers: Iterable[Header]
    ) -> defer.Deferred[Outcome]:
        """Fires with what ``download`` means for a client with these headers."""
        items = list(client_headers)
        return download.wait().addCallback(
            lambda outcome: usable(download, outcome, items)
        )

    def _start_shared(self, url: str, new: Callable[[], Download]) -> Download:
        """A download for every client of ``url``: a new one, or in a worker
        process possibly the one another worker runs."""
        if self.across is None:
            return self._start(new(), shared=True)
        download = self.across.download(
            url, lambda: self._start(new(), shared=True), self.remove
        )
        if self.get(url) is None:
            self.add(download)
        return download

    def purge(self, matches: Callable[[str], bool]) -> None:
        """Downloads in flight (in any worker) whose URL ``matches`` leave no
        entry behind."""
        for download in self.matching(matches):
            download.purge()
        if self.across is not None:
            self.across.mark_purged(matches)

    def _start(self, download: Download, *, shared: bool) -> Download:
        if shared:
            self.add(download)
        download.start()
        return download

    def get(self, url: str) -> Download | None:
        return self.in_flight.get(url)

    def all(self) -> list[Download | PassingThrough]:
        """Every download in flight: shared by URL or by variant, and the
        responses streaming through unstored."""
        shared = [*self.in_flight.values(), *self._variants.values()]
        unique: list[Download | PassingThrough] = list(
            {id(d): d for d in shared}.values()
        )
        return unique + list(self.passing)

    def matching(self, predicate: Callable[[str], bool]) -> list[Download]:
        """The shared downloads in flight whose URL satisfies ``predicate``."""
        return [d for d in self.all() if isinstance(d, Download) and predicate(d.url)]

    def add(self, download: Download) -> None:
        self.in_flight[download.url] = download

    def get_variant(self, url: str, variant: str) -> Download | None:
        return self._variants.get((url, variant))

    def add_variant(self, download: Download, variant: str) -> None:
        self._variants[(download.url, variant)] = download

    def remove(self, download: Download) -> None:
        if self.in_flight.get(download.url) is download:
            del self.in_flight[download.url]
        for key in [k for k, d in self._variants.items() if d is download]:
            del self._variants[key]


__all__ = ["Downloads", "PassingThrough", "usable"]
