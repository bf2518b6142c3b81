"""One upstream download per key across the workers (SPEC 11).

:class:`SharedDownloads` is what a worker's download sharing asks before it
starts a download of its own: it takes the key's claim
(:mod:`cachingproxy.workers.claims`) and publishes the download's progress
there, or, when another worker holds the claim, hands back a
:class:`~cachingproxy.workers.remote.RemoteDownload` that follows that
worker's download.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cachingproxy.fetch.download import Download
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind
from cachingproxy.interfaces import IDownload
from cachingproxy.workers.claims import (
    DONE,
    FAILED,
    OTHER,
    STREAM,
    Claim,
    Claims,
    ClaimState,
)
from cachingproxy.workers.followers import Followers
from cachingproxy.workers.remote import RemoteDownload

_log = Logger()

PURGE_POLL = 0.1
"""Seconds between an owner's looks for a purge mark on its claim."""
JUST_DONE = 2.0
"""A download another worker finished this recently is followed to its
stored body rather than fetched again (its commit may not have been seen by
this worker's lookup)."""


FORGET_AFTER = 30.0
"""Seconds a finished download's state stays for followers in other workers
(they poll every 10 ms; a just-stored body is followed for JUST_DONE)."""


@frozen
class InFlight:
    """A download in flight in some worker, for ``/status.json``."""

    url: str
    bytes_written: int
    total: int | None
    clients: int
    started_at: float


class SharedDownloads:
    """Claims and follows downloads across the workers of one cache."""

    def __init__(self, cache_dir: str, claims_dir: str, clock: IReactorTime) -> None:
        self._cache_dir = cache_dir
        self._clock = clock
        self.claims = Claims(claims_dir, clock.seconds)
        self.followers = Followers(claims_dir)

    def download(
        self,
        url: str,
        new: Callable[[], Download],
        on_done: Callable[[IDownload], None],
    ) -> IDownload:
        """The download this worker's clients of ``url`` follow: ``new()``
        (which starts it) under this worker's claim, or one following the
        worker that holds it."""
        claim = self.claims.acquire(url, unless=self._just_done)
        if claim is None:
            # Another worker runs it, or has just stored it (after this
            # worker's lookup): follow that.
            state = self.claims.read(url)
            ignore = None
            if state is not None and state.final and not self._just_done(state):
                ignore = state.id  # the new owner has not published yet
            return self._follow(url, new, on_done, ignore)
        download = new()
        self.own(claim, download)
        return download

    def _just_done(self, state: ClaimState) -> bool:
        """Whether ``state`` is of a download stored a moment ago."""
        return (
            state.state == DONE
            and state.ended_at is not None
            and self._clock.seconds() - state.ended_at < JUST_DONE
            and self._stored(state.body)
        )

    def _stored(self, name: str | None) -> bool:
        """Whether body file ``name`` was committed (and is still there)."""
        if not name or "/" in name:
            return False
        return os.path.exists(os.path.join(self._cache_dir, "bodies", name[:2], name))

    def _follow(
        self,
        url: str,
        new: Callable[[], Download],
        on_done: Callable[[IDownload], None],
        ignore: str | None,
    ) -> RemoteDownload:
        def take_over(claim: Claim) -> None:
            self.own(claim, new())

        remote = RemoteDownload(
            url=url,
            claims=self.claims,
            cache_dir=self._cache_dir,
            clock=self._clock,
            take_over=take_over,
            on_done=on_done,
            ignore=ignore,
        )
        remote.start()
        return remote

    def own(self, claim: Claim, download: Download) -> None:
        """Publish ``download``'s head, body file and end under ``claim``."""

        def head(outcome: Outcome) -> None:
            if outcome.kind is OutcomeKind.STREAM and download.body_file:
                claim.publish(
                    state=STREAM,
                    status=outcome.status,
                    phrase=outcome.phrase,
                    headers=tuple(outcome.headers),
                    vary=download.vary,
                    variant=download.variant,
                    total=download.total,
                    body=download.body_file,
                    checks_digest=download.checks_digest,
                )
            elif not claim.state.final:
                claim.publish(state=OTHER)

        def purge_check() -> None:
            if claim.held and claim.purged:
                download.purge()

        watch = task.LoopingCall(purge_check)
        watch.clock = self._clock
        watch.start(PURGE_POLL, now=False)

        def end(_: object) -> None:
            if watch.running:
                watch.stop()
            purge_check()
            now = self._clock.seconds()
            if claim.state.state != STREAM:
                claim.release(state=OTHER, ended_at=now)
            elif download.body_complete and download.failure is None:
                claim.release(state=DONE, size=download.bytes_written, ended_at=now)
            else:
                claim.release(state=FAILED, ended_at=now)
            self._clock.callLater(FORGET_AFTER, claim.forget)

        _outcome_of(download, self._clock).addCallback(head).addErrback(
            lambda f: _log.failure("publishing {url}", f, url=download.url)
        )
        download.finished().addBoth(end).addErrback(
            lambda f: _log.failure("releasing {url}", f, url=download.url)
        )

    def running(self, url: str) -> RemoteDownload | None:
        """The download of ``url`` another worker runs now, followed here;
        None when none runs.  Never starts one: if the owner dies, the
        follower fails (its reader, a fleet peer, asks again)."""
        state = self.claims.read(url)
        if state is None or state.final or not self.claims.owner_alive(url):
            return None

        def give_up(claim: Claim) -> None:
            claim.release(state=FAILED, ended_at=self._clock.seconds())

        remote = RemoteDownload(
            url=url,
            claims=self.claims,
            cache_dir=self._cache_dir,
            clock=self._clock,
            take_over=give_up,
        )
        remote.start()
        return remote

    def mark_purged(self, matches: Callable[[str], bool]) -> None:
        """A purge: downloads in other workers matching it store nothing."""
        self.claims.mark_purged(matches)

    def in_flight(self) -> list[InFlight]:
        """The downloads in flight in every worker."""
        found = []
        clients = self.followers.totals()
        for state in self.claims.in_flight():
            size = 0
            if state.body:
                try:
                    size = os.stat(
                        os.path.join(self._cache_dir, "tmp", state.body)
                    ).st_size
                except OSError:
                    size = state.size or 0
            found.append(
                InFlight(
                    state.url,
                    size,
                    state.total,
                    clients.get(state.url, 0),
                    state.started_at,
                )
            )
        return found


def _outcome_of(download: Download, clock: IReactorTime) -> defer.Deferred[Outcome]:
    """The head of ``download`` without taking it from a client: the
    ``wait()`` of the sharing code, or the older ``wait(client_headers)``
    asked after the first client (a pass-through goes to the first asker)."""
    wait: Any = download.wait
    try:
        result: defer.Deferred[Outcome] = wait()
        return result
    except TypeError:
        d: defer.Deferred[Outcome] = defer.Deferred()
        clock.callLater(0, lambda: wait([]).chainDeferred(d))
        return d


__all__ = ["InFlight", "SharedDownloads"]
