"""Which download a client follows: the one decision to share (SPEC 5).

:class:`Downloads` knows the downloads in flight by key and decides, for
each client, whether it may use a running download's response or must
fetch its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import attrs
from twisted.internet import defer

from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.fetch.download import Download
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind
from cachingproxy.interfaces import IDownload

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


def _reusable(download: IDownload, outcome: Outcome, may_reuse: Reusable) -> Outcome:
    """``outcome`` for a client joining ``download``, or RETRY when the
    client may not reuse the response it brings (SPEC 5)."""
    if outcome.kind is OutcomeKind.STREAM:
        entry = download.head_entry()
    elif outcome.kind is OutcomeKind.NOT_MODIFIED:
        entry = outcome.entry
    else:
        return outcome
    if entry is not None and not may_reuse(entry):
        return _RETRY
    return outcome


def usable(
    download: IDownload, outcome: Outcome, client_headers: list[Header]
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
        on_done: Callable[[IDownload], None],
    ) -> IDownload:
        """``new()`` (a started download), or one another worker runs."""

    def mark_purged(self, matches: Callable[[str], bool]) -> None:
        """Downloads in other workers whose URL ``matches`` store nothing."""

    def running(self, url: str) -> IDownload | None:
        """The download of ``url`` another worker runs now, followed here;
        None when none runs (never starts one: for a fleet peer, SPEC 12)."""


Reusable = Callable[[StoredResponse], bool]
"""Whether a client may be served a response (as the entry it would make)
without asking upstream: the same checks as for a stored entry."""


class Downloads:
    """The downloads in flight, by normalised URL (for coalescing and status)."""

    def __init__(self) -> None:
        self.across: Across | None = None
        """Set in a worker process: downloads are shared with the others."""
        self.in_flight: dict[str, IDownload] = {}
        self.passing: set[PassingThrough] = set()
        self._variants: dict[tuple[str, str], IDownload] = {}
        """Downloads of other variants of a URL, by (url, variant under the
        Vary of the URL's first download), so their clients share them too."""
        self._running: set[IDownload] = set()
        """Every download until it is over, joinable or not (for purges)."""
        self._purges: list[tuple[Callable[[str], bool], defer.Deferred[None]]] = []
        """Purges under way: the keys they mark, and when they are over."""

    async def obtain(
        self,
        url: str,
        client_headers: list[Header],
        new: Callable[[], Download],
        may_reuse: Reusable,
        *,
        handover: bool = True,
    ) -> tuple[IDownload, Outcome] | None:
        """The download a client follows and what it means for it.

        The client joins the download in flight for ``url`` when it may use
        its response (``may_reuse``, the checks a stored entry gets, and the
        right variant); otherwise it gets one of its own (``new``), shared
        with later clients of the same variant.  None when the download in
        flight has its whole body (with ``handover``): it is being stored,
        and the client is served from that entry once it is committed --
        look it up again."""
        download = self.get(url)
        joined = download is not None and not download.purged
        if download is None or not joined:
            download = self._start_shared(url, new)
        elif handover and download.body_complete and download.failure is None:
            await download.finished()
            return None
        outcome = await self.wait(download, client_headers)
        if joined:
            outcome = _reusable(download, outcome, may_reuse)
        if outcome.kind is not OutcomeKind.RETRY:
            return download, outcome
        # Another variant (or a passthrough another client took, or a
        # response this client may not reuse): the clients of one variant
        # share one download of it.
        variant = policy.variant_of(download.vary, client_headers)
        sibling = self.get_variant(url, variant) if download.vary else None
        if sibling is not None and not sibling.purged:
            outcome = _reusable(
                sibling, await self.wait(sibling, client_headers), may_reuse
            )
        if sibling is None or sibling.purged or outcome.kind is OutcomeKind.RETRY:
            sibling = new()
            if download.vary:
                self.add_variant(sibling, variant)
            self._start(sibling, shared=False)
            outcome = await self.wait(sibling, client_headers)
        return sibling, outcome

    def is_purging(self, url: str) -> bool:
        """Whether a purge marking ``url`` is in progress (nothing made)."""
        return any(matches(url) for matches, _ in self._purges)

    def purging(self, url: str) -> defer.Deferred[None] | None:
        """Fires when the purges marking ``url`` are over (None: there are
        none): nothing is served from the store for a key being purged."""
        pending = [d for matches, d in self._purges if matches(url)]
        if not pending:
            return None
        return defer.gatherResults(pending).addCallback(lambda _: None)

    async def purge(
        self, matches: Callable[[str], bool], remove: Callable[[], Awaitable[int]]
    ) -> int:
        """Purge the keys ``matches`` accepts: no download in flight for them
        (in any worker) commits; one committing is waited for; then ``remove`` drops what is
        stored (its count is returned).  Requests for those keys wait until
        the purge is over."""
        over: defer.Deferred[None] = defer.Deferred()
        mark = (matches, over)
        self._purges.append(mark)
        try:
            committing = [
                d
                for download in list(self._running)
                if matches(download.url) and (d := download.purge_waiting()) is not None
            ]
            if self.across is not None:
                self.across.mark_purged(matches)  # in the other workers
            for d in committing:
                await d
            return await remove()
        finally:
            self._purges.remove(mark)
            over.callback(None)

    def wait(
        self, download: IDownload, client_headers: Iterable[Header]
    ) -> defer.Deferred[Outcome]:
        """Fires with what ``download`` means for a client with these headers."""
        items = list(client_headers)
        return download.wait().addCallback(
            lambda outcome: usable(download, outcome, items)
        )

    def _start_shared(self, url: str, new: Callable[[], Download]) -> IDownload:
        """A download for every client of ``url``: a new one, or in a worker
        process possibly the one another worker runs."""
        if self.across is None:
            return self._start(new(), shared=True)
        download = self.across.download(
            url, lambda: self._start(new(), shared=True), self.remove
        )
        current = self.get(url)
        # A download another worker has (all but) finished may be over
        # already: its on_done ran before it could be listed here.
        if (current is None or current.purged) and not download.finished().called:
            self.add(download)
        return download

    def _start(self, download: Download, *, shared: bool) -> Download:
        if shared:
            self.add(download)
        else:
            self._running.add(download)
        download.start()
        return download

    def get(self, url: str) -> IDownload | None:
        return self.in_flight.get(url)

    def all(self) -> list[IDownload | PassingThrough]:
        """Every download in flight: shared by URL or by variant, and the
        responses streaming through unstored."""
        shared = [*self.in_flight.values(), *self._variants.values()]
        unique: list[IDownload | PassingThrough] = list(
            {id(d): d for d in shared}.values()
        )
        return unique + list(self.passing)

    def matching(self, predicate: Callable[[str], bool]) -> list[IDownload]:
        """The shared downloads in flight whose URL satisfies ``predicate``."""
        return [
            d
            for d in self.all()
            if not isinstance(d, PassingThrough) and predicate(d.url)
        ]

    def add(self, download: IDownload) -> None:
        self.in_flight[download.url] = download
        self._running.add(download)

    def get_variant(self, url: str, variant: str) -> IDownload | None:
        return self._variants.get((url, variant))

    def add_variant(self, download: IDownload, variant: str) -> None:
        self._variants[(download.url, variant)] = download
        self._running.add(download)

    def remove(self, download: IDownload) -> None:
        self._running.discard(download)
        if self.in_flight.get(download.url) is download:
            del self.in_flight[download.url]
        for key in [k for k, d in self._variants.items() if d is download]:
            del self._variants[key]


__all__ = ["Downloads", "PassingThrough", "usable"]
