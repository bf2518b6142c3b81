"""Following a download that another worker runs (SPEC 11).

A :class:`RemoteDownload` stands, in this worker, for the download of a key
whose claim another worker holds: its clients wait for the head that worker
publishes and then read the body file it writes, as it grows, from the
shared cache directory.  Growth and the state are polled every
:data:`POLL` seconds (see the closing note of issue 11 for the measurement
against inotify).

If the owner dies before the end (its claim's lock is free while the state
is not final) a worker following it takes the claim and fetches the body
again itself; followers keep their offsets and read on in the new file,
provided the new response is the same body (same length and the same
validators), else they are cut off rather than sent a mixed body.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.cache import policy
from cachingproxy.cache.age import corrected_age
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.pump import Pump
from cachingproxy.errors import BodyMissing
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind
from cachingproxy.interfaces import IBodySource, IDownload, IPartialReader
from cachingproxy.workers.claims import (
    DONE,
    FETCHING,
    OTHER,
    STREAM,
    Claim,
    Claims,
    ClaimState,
)

_log = Logger()

POLL = 0.01
"""Seconds between looks at the owner's state and body file."""
LIVENESS = 0.1
"""Seconds between tests of the owner's lock."""
KEEP_OPEN = 5.0
"""Seconds the body file stays open after the end, for late followers."""


class OwnerGone(Exception):
    """The worker running a download died and its replacement differs."""


@implementer(IPartialReader)
class _FileReader:
    """Reads the body file of the generation being followed."""

    def __init__(self, download: RemoteDownload) -> None:
        self._download = download

    def read(self, offset: int, length: int) -> bytes:
        return self._download._pread(offset, length)

    def close(self) -> None:
        pass


@implementer(IBodySource)
class _Following:
    """One client's reading of a remote download."""

    def __init__(self, download: RemoteDownload, start: int) -> None:
        self.offset = start
        self.pump: Pump | None = None
        self._download = download

    @property
    def readable(self) -> int:
        return self._download.readable

    @property
    def complete(self) -> bool:
        return self._download.body_complete

    @property
    def failure(self) -> Failure | None:
        return self._download.failure

    def read(self, offset: int, length: int) -> bytes:
        return self._download._pread(offset, length)

    def consumed(self, offset: int) -> None:
        self.offset = offset

    def close(self) -> None:
        self._download._followings.discard(self)


@implementer(IDownload)
class RemoteDownload:
    """A download of ``url`` that another worker runs, followed here."""

    def __init__(
        self,
        *,
        url: str,
        claims: Claims,
        cache_dir: str,
        clock: IReactorTime,
        take_over: Callable[[Claim], None],
        on_done: Callable[[IDownload], None] = lambda d: None,
        ignore: str | None = None,
    ) -> None:
        """``ignore``: the id of a state already over when this worker found
        the claim taken (the new owner has not published yet)."""
        self.url = url
        self.purged = False
        self.vary: tuple[str, ...] = ()
        self.variant = ""
        self.total: int | None = None
        self.body_complete = False
        self.failure: Failure | None = None
        self.entry: StoredResponse | None = None
        self.started_at = clock.seconds()
        self._claims = claims
        self._tmp = os.path.join(cache_dir, "tmp")
        self._bodies = os.path.join(cache_dir, "bodies")
        self._clock = clock
        self._take_over = take_over
        self._on_remote_done = on_done
        self._state: ClaimState | None = None
        self._watch = claims.watch(url)
        self._ignore = ignore
        self._head: ClaimState | None = None
        """The generation whose head the clients were sent."""
        self._fd = -1
        self._size = 0
        self._result: Outcome | None = None
        self._waiting: list[defer.Deferred[Outcome]] = []
        self._ended: list[defer.Deferred[None]] = []
        self._over = False
        self._followings: set[_Following] = set()
        self._last_liveness = 0.0
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = clock

    # -- IDownload --------------------------------------------------------------

    def start(self) -> None:
        """Start following (nothing is sent upstream)."""
        if not self._loop.running:
            self._loop.start(POLL, now=True).addErrback(self._crashed)

    def wait(self, *client_headers: Any) -> defer.Deferred[Outcome]:
        """The head the owner published (with client headers, as the older
        ``wait(client_headers)``: RETRY for another variant)."""
        d: defer.Deferred[Outcome]
        if self._result is not None:
            d = defer.succeed(self._result)
        else:
            d = defer.Deferred()
            self._waiting.append(d)
        if client_headers:
            headers = list(client_headers[0])
            d.addCallback(lambda outcome: self._usable(outcome, headers))
        return d

    def _usable(self, outcome: Outcome, headers: Any) -> Outcome:
        if outcome.kind is OutcomeKind.STREAM and (
            self.failure is not None
            or policy.variant_of(self.vary, headers) != self.variant
        ):
            return Outcome(OutcomeKind.RETRY)
        return outcome

    def finished(self) -> defer.Deferred[None]:
        if self._over:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ended.append(d)
        return d

    @property
    def spilled(self) -> bool:
        return False

    def take_passthrough(self) -> bool:
        return False

    @property
    def readable(self) -> int:
        n = self._size
        head = self._head
        if not self.body_complete and head is not None and head.checks_digest:
            n = max(0, n - 1)
        return n

    def open_reader(self) -> IPartialReader:
        return _FileReader(self)

    @property
    def bytes_written(self) -> int:
        return self._size

    def head_entry(self) -> StoredResponse | None:
        """The entry the owner's published head would make now (its age
        counted from when the owner claimed the download)."""
        head = self._head
        if head is None:
            return None
        now, headers = self._clock.seconds(), tuple(head.headers)
        age = corrected_age(headers, head.started_at or self.started_at, now)
        return StoredResponse(
            self.url, self.variant, self.vary, head.status, headers, now, age
        )

    def purge(self) -> None:
        self.purged = True
        self._claims.mark_purged(lambda url: url == self.url)

    def purge_waiting(self) -> defer.Deferred[None] | None:
        """Purge; when the owner has the whole body (its commit may be under
        way there), the Deferred returned fires once this follower is over."""
        complete = self.body_complete and self.failure is None
        self.purge()
        return self.finished() if complete else None

    def read(self, reader: IPartialReader, offset: int, length: int) -> bytes:
        return reader.read(offset, length)

    @property
    def clients(self) -> int:
        return len(self._followings)

    def follow(
        self,
        consumer: IConsumer,
        on_finish: Callable[[Failure | None], None],
        start: int = 0,
        end: int | None = None,
    ) -> Pump:
        following = _Following(self, start)
        pump = following.pump = Pump(consumer, following, start, end, self._clock)
        self._followings.add(following)
        pump.start().addCallbacks(lambda _: on_finish(None), on_finish)
        return pump

    # -- following -------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        if self._fd < 0 and (self._state is None or not self._open(self._state)):
            raise BodyMissing(f"no body file for {self.url}")
        return os.pread(self._fd, length, offset)

    def _tick(self) -> None:
        state = self._watch.read()
        if state is not None and state.id != self._ignore:
            if self._state is not None and state.id != self._state.id:
                # A new owner: its body file comes with its head.
                self._close_file()
                self._size = 0
            self._state = state
        state = self._state
        if state is None or not state.final:
            now = self._clock.seconds()
            if now - self._last_liveness >= LIVENESS:
                self._last_liveness = now
                if not self._claims.owner_alive(self.url):
                    self._owner_gone()
                    return
        if state is None or state.state == FETCHING:
            return
        if state.state in (STREAM, DONE):
            self._grow(state)
        elif state.state == OTHER and self._head is None:
            self._end(None)  # nothing to share: the clients fetch themselves
        else:
            self._end(Failure(BodyMissing(f"the download of {self.url} failed")))

    def _stream_head(self, state: ClaimState) -> None:
        """Follow ``state``'s body (its head was checked against the one
        the clients got, if any); the first head decides the waiters."""
        if self._head is not None:
            self._head = state
            return
        self._head = state
        self.vary, self.variant, self.total = state.vary, state.variant, state.total
        self._decide(
            Outcome(
                OutcomeKind.STREAM,
                state.status,
                state.phrase,
                tuple(state.headers),
            )
        )

    def _grow(self, state: ClaimState) -> None:
        if self._over:
            return
        if self._fd < 0 and not self._open(state):
            if state.final and self._head is None:
                self._end(None)  # not stored after all: fetch it here
            elif state.final:
                self._end(Failure(BodyMissing(f"the body of {self.url} is gone")))
            return
        head = self._head
        if head is not None and head.id != state.id and not _same_body(head, state):
            self._end(Failure(OwnerGone(f"{self.url} changed while resumed")))
            return
        size = os.fstat(self._fd).st_size
        if state.state == DONE and state.size is not None:
            size = min(size, state.size)
        self._size = size
        # Complete before the head goes out: a client that gets the head of
        # a whole body is a HIT.
        complete = (state.state == DONE and state.size == size) or (
            state.total is not None and size >= state.total and not state.checks_digest
        )
        self.body_complete = self.body_complete or complete
        self._stream_head(state)
        self._wake()
        if complete:
            self._end(None)

    def _open(self, state: ClaimState) -> bool:
        name = state.body
        if not name or "/" in name or name.startswith("."):
            return False
        for path in (
            os.path.join(self._tmp, name),
            os.path.join(self._bodies, name[:2], name),
        ):
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            return True
        return False

    def _owner_gone(self) -> None:
        """The owner died mid-way: take the claim (or see another take it)."""
        claim = self._claims.acquire(self.url)
        if claim is None:
            return  # another worker took it; its state comes next
        _log.warn("the worker fetching {url} died; fetching it here", url=self.url)
        self._take_over(claim)

    def _wake(self) -> None:
        for following in list(self._followings):
            if following.pump is not None:
                following.pump.wake()

    def _decide(self, outcome: Outcome) -> None:
        if self._result is not None:
            return
        self._result = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)

    def _end(self, failure: Failure | None) -> None:
        if self._over:
            return
        self._over = True
        if failure is not None and not self.body_complete:
            self.failure = failure
        self._decide(Outcome(OutcomeKind.RETRY))
        self._wake()
        if self._loop.running:
            self._loop.stop()
        self._on_remote_done(self)
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)
        self._clock.callLater(KEEP_OPEN, self._release_file)

    def _release_file(self) -> None:
        """Close the body file once no client reads it (one whose wait
        fired at the end may start following a little later)."""
        if not self._followings:
            self._close_file()
        else:
            self._clock.callLater(KEEP_OPEN, self._release_file)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _crashed(self, failure: Failure) -> None:
        _log.failure("following {url} failed", failure, url=self.url)
        self._end(failure)


def _same_body(old: ClaimState, new: ClaimState) -> bool:
    """Whether a new response is certainly the body an old one announced."""
    if old.total != new.total or old.total is None:
        return False
    validators = ("etag", "last-modified")
    before = {k.lower(): v for k, v in old.headers if k.lower() in validators}
    after = {k.lower(): v for k, v in new.headers if k.lower() in validators}
    return bool(before) and before == after


__all__ = ["LIVENESS", "POLL", "OwnerGone", "RemoteDownload"]
