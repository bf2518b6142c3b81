"""Shared upstream downloads (request coalescing) and the clients that follow them.

A :class:`Download` fetches one URL once, writes the body into a store
writer as it arrives, and tells everyone waiting on it what happened
(:class:`Outcome`).  Each client of a body being stored is followed by a
:class:`~cachingproxy.cache.pump.Pump` over its own
:class:`~cachingproxy.fetch.receiver.Reading` of the
body: it reads the bytes already written at its own pace, so a slow client
never holds the download back and nothing is buffered per client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy, variants
from cachingproxy.cache.age import corrected_age
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.pump import CHUNK_SIZE, Pump
from cachingproxy.config import FetchSettings, Rule
from cachingproxy.errors import BodyMissing, DestinationRefused, StoreFull
from cachingproxy.fetch.outcomes import Discard, Outcome, OutcomeKind, body_failure
from cachingproxy.fetch.receiver import BodyReceiver, Reading
from cachingproxy.fetch.spill import Spill
from cachingproxy.fetch.upstream import headers_from_pairs, pairs_from_headers
from cachingproxy.interfaces import (
    IBodyWriter,
    ICacheStore,
    IDownload,
    IPartialReader,
    IUpstream,
)
from cachingproxy.mirror.rewrite import Digest
from cachingproxy.ops.stats import upstream_error_kind

_log = Logger()

CHUNK = CHUNK_SIZE
"""Bytes per read of a download's body."""


@implementer(IDownload)
class Download:
    """One upstream GET of ``url``, shared by every client that wants it."""

    def __init__(
        self,
        *,
        url: str,
        upstream_url: str,
        request_headers: list[Header],
        client_headers: list[Header],
        stale: StoredResponse | None,
        rule: Rule,
        store: ICacheStore,
        upstream: IUpstream,
        clock: IReactorTime,
        settings: FetchSettings,
        mirrored: bool = False,
        fallbacks: Sequence[tuple[str, str]] = (),
        label: str = "",
        expected: Digest | None = None,
        on_done: Callable[[Download], None] = lambda d: None,
        on_upstream_bytes: Callable[[int], None] = lambda n: None,
        on_upstream_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.url = url
        self._candidates = [(upstream_url, label), *fallbacks]
        """(URL, label for X-Cache-Upstream) tried in order (SPEC 6)."""
        self.upstream_label = label
        self._expected = expected
        self._hasher = hashlib.new(expected[0]) if expected is not None else None
        self._finished: list[defer.Deferred[None]] = []
        self._done_called = False
        self._request_headers = request_headers
        self._client_headers = client_headers
        self.stale = stale
        self._rule = rule
        self._store = store
        self._upstream = upstream
        self._clock = clock
        self._settings = settings
        self._mirrored = mirrored
        self._on_done = on_done
        self._on_upstream_bytes = on_upstream_bytes
        self._on_upstream_error = on_upstream_error
        self._spill: Spill | None = None
        self._receiver: BodyReceiver | None = None
        self.purged = False
        self._waiters: list[defer.Deferred[Outcome]] = []
        self._outcome: Outcome | None = None
        self._passthrough_taken = False
        self._readings: set[Reading] = set()
        self._writer: IBodyWriter | None = None
        self.vary: tuple[str, ...] = ()
        self.variant = ""
        self.total: int | None = None
        self.body_complete = False
        self.failure: Failure | None = None
        self.entry: StoredResponse | None = None
        self.started_at = clock.seconds()
        self._head_at: float | None = None
        self._purger_waits = False

    # -- public ----------------------------------------------------------------

    def start(self) -> None:
        """Send the upstream request (to the next candidate upstream)."""
        url, self.upstream_label = self._candidates.pop(0)
        pairs = list(self._request_headers)
        if self.stale is not None:
            pairs += policy.validators(self.stale)
        d = self._upstream.request(
            b"GET",
            url.encode("ascii"),
            headers_from_pairs(pairs),
            mirrored=self._mirrored,
        )
        d.addCallbacks(self._got_response, self._got_error)
        d.addErrback(self._internal_error)

    def finished(self) -> defer.Deferred[None]:
        """Fires once the download is over (stored, dropped or failed)."""
        if self._done_called:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._finished.append(d)
        return d

    @property
    def readable(self) -> int:
        """Bytes followers may have: the last byte of a body whose published
        digest is still unchecked is held back, so a corrupt download never
        reaches a client whole."""
        n = self.bytes_written
        if self._expected is not None and not self.body_complete:
            n = max(0, n - 1)
        return n

    def open_reader(self) -> IPartialReader:
        assert self._writer is not None
        return self._writer.open_reader()

    @property
    def body_file(self) -> str | None:
        """The name of the file the body is stored in, where the store has
        one (other worker processes follow the body there, SPEC 11)."""
        name = getattr(self._writer, "name", None)
        return name if isinstance(name, str) else None

    @property
    def checks_digest(self) -> bool:
        """Whether the body is checked against a published digest at its end."""
        return self._expected is not None

    def wait(self) -> defer.Deferred[Outcome]:
        """Fires with what the upstream answered (once the head is in).
        Whether a given client may use it is :mod:`~cachingproxy.fetch.sharing`'s
        decision."""
        if self._outcome is not None:
            return defer.succeed(self._outcome)
        d: defer.Deferred[Outcome] = defer.Deferred()
        self._waiters.append(d)
        return d

    @property
    def spilled(self) -> bool:
        """The store refused part of the body: only the clients already
        following get it (from the spill), nobody may join."""
        return self._spill is not None

    def take_passthrough(self) -> bool:
        """Claim the unstorable response for one client (the first to ask)."""
        if self._passthrough_taken:
            return False
        self._passthrough_taken = True
        return True

    @property
    def bytes_written(self) -> int:
        """Body bytes received so far that followers can read."""
        if self._spill is not None:
            return self._spill.end
        return 0 if self._writer is None else int(self._writer.bytes_written)

    def purge(self) -> None:
        """Make sure this download leaves no entry behind (admin purge)."""
        self.purged = True
        if self.entry is not None:
            self._drop_entry(self.entry)

    def purge_waiting(self) -> defer.Deferred[None] | None:
        """Purge, but when the body is complete and its commit under way,
        leave the entry to the caller: the Deferred returned fires once the
        commit is over, and the caller then removes what it stored."""
        if self.body_complete and self.failure is None and self.entry is None:
            self._purger_waits = True
            self.purge()
            return self.finished()
        self.purge()
        return None

    def _drop_entry(self, stored: StoredResponse) -> None:
        """Drop the entry this download made; a failure (the store closing
        at shutdown, say) is logged, never left unhandled."""
        d = self._store.remove(stored.url, stored.variant)
        d.addErrback(
            lambda f: _log.warn(
                "could not drop purged {url}: {e}", url=stored.url, e=f.value
            )
        )

    def head_entry(self) -> StoredResponse | None:
        """The entry this download's response would make if it were stored
        now (None before a storable head): what a client that wants to join
        it is checked against."""
        if self._head_at is None:
            return None
        now, headers = self._clock.seconds(), tuple(self._headers)
        age = corrected_age(headers, self.started_at, now)
        return StoredResponse(
            self.url, self.variant, self.vary, self._status, headers, now, age
        )

    def read(self, reader: IPartialReader, offset: int, length: int) -> bytes:
        """Body bytes at ``offset`` for a follower, from the store or the spill."""
        spill = self._spill
        if spill is None:
            return reader.read(offset, length)
        if offset >= spill.base:
            return spill.read(offset, length)
        return reader.read(offset, min(length, spill.base - offset))

    def _consumed(self) -> None:
        """A follower moved on: release spilled bytes nobody needs any more."""
        spill = self._spill
        if spill is None:
            return
        spill.trim(min((r.offset for r in self._readings), default=spill.end))
        if self._receiver is not None and spill.buffered <= spill.limit // 2:
            self._receiver.resume()

    @property
    def done(self) -> bool:
        return self.body_complete or self.failure is not None

    @property
    def clients(self) -> int:
        return len(self._readings)

    def follow(
        self,
        consumer: IConsumer,
        on_finish: Callable[[Failure | None], None],
        start: int = 0,
        end: int | None = None,
    ) -> Pump:
        """Attach a client that reads the body ``[start, end)`` as it arrives."""
        assert self._writer is not None
        reading = Reading(
            self, self._writer.open_reader(), start, self._consumed, self._forget
        )
        follower = reading.pump = Pump(consumer, reading, start, end, self._clock)
        self._readings.add(reading)
        follower.start().addCallbacks(lambda _: on_finish(None), on_finish)
        return follower

    # -- outcome ---------------------------------------------------------------

    def _decide(self, outcome: Outcome) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(outcome)
        if outcome.response is not None and not self._passthrough_taken:
            # Every client went away before the head came.
            assert outcome.response is not None
            outcome.response.deliverBody(Discard())
        if outcome.kind is not OutcomeKind.STREAM:
            self._done()

    # -- upstream events -------------------------------------------------------

    def _got_error(self, failure: Failure) -> None:
        self._on_upstream_error(upstream_error_kind(failure))
        if self._candidates and not failure.check(DestinationRefused):
            _log.info(
                "upstream {label} failed for {url} ({why}); trying the next",
                label=self.upstream_label,
                url=self.url,
                why=failure.getErrorMessage(),
            )
            self.start()
            return
        self.failure = failure
        self._decide(Outcome(OutcomeKind.ERROR, failure=failure))

    def _internal_error(self, failure: Failure) -> None:
        _log.failure("download of {url} failed internally", failure, url=self.url)
        if self._outcome is None:
            self._got_error(failure)

    def _got_response(self, response: IResponse) -> defer.Deferred[None] | None:
        status = response.code
        headers = H.received(pairs_from_headers(response.headers))
        phrase = response.phrase.decode("latin-1", "replace")
        if (status >= 500 or status == 404) and self._candidates:
            _log.info(
                "upstream {label} answered {status} for {url}; trying the next",
                label=self.upstream_label,
                status=status,
                url=self.url,
            )
            response.deliverBody(Discard())
            self.start()
            return None
        if self.upstream_label:
            headers.append(("X-Cache-Upstream", self.upstream_label))
        if status == 304 and self.stale is not None:
            response.deliverBody(Discard())
            return defer.Deferred.fromCoroutine(self._refresh(headers))
        if status >= 500:
            # Kept for relaying when there is no stale copy to serve (SPEC 5).
            self._on_upstream_error("http_5xx")
            self._decide(
                Outcome(
                    OutcomeKind.ERROR, status, phrase, tuple(headers), response=response
                )
            )
            return None
        length = response.length if isinstance(response.length, int) else None
        vary, now = policy.parse_vary(headers), self._clock.seconds()
        if (
            vary is None
            or not policy.is_storable(
                self._rule, status, headers, self._settings.negative_ttl, now
            )
            or (length is not None and length > self._settings.max_object_size)
        ):
            self._decide(
                Outcome(
                    OutcomeKind.PASSTHROUGH,
                    status,
                    phrase,
                    tuple(headers),
                    response=response,
                )
            )
            return None
        return defer.Deferred.fromCoroutine(
            self._stream(response, status, phrase, headers, vary, length)
        )

    async def _refresh(self, headers: list[Header]) -> None:
        assert self.stale is not None
        entry = policy.refreshed(self.stale, headers, self._clock.seconds())
        try:
            entry = await self._store.update(entry)
        except BodyMissing:
            self._decide(Outcome(OutcomeKind.RETRY))
            return
        self.entry = entry
        self._decide(Outcome(OutcomeKind.NOT_MODIFIED, entry=entry))

    async def _stream(
        self,
        response: IResponse,
        status: int,
        phrase: str,
        headers: list[Header],
        vary: tuple[str, ...],
        length: int | None,
    ) -> None:
        try:
            self._writer = await self._store.open_writer(self.url)
        except Exception:
            _log.failure("cannot store {url}; passing it through", url=self.url)
            self._decide(
                Outcome(
                    OutcomeKind.PASSTHROUGH,
                    status,
                    phrase,
                    tuple(headers),
                    response=response,
                )
            )
            return
        self.vary = vary
        self.variant = policy.variant_of(vary, self._client_headers)
        self.total = length
        self._status, self._headers = status, headers
        self._head_at = self._clock.seconds()
        self._decide(Outcome(OutcomeKind.STREAM, status, phrase, tuple(headers)))
        self._receiver = BodyReceiver(
            self._clock, self._settings.read_timeout, self._data, self._body_end
        )
        response.deliverBody(self._receiver)

    def _data(self, data: bytes) -> None:
        assert self._writer is not None
        self._on_upstream_bytes(len(data))
        if self._hasher is not None:
            self._hasher.update(data)
        if self._spill is None:
            try:
                self._writer.write(data)
            except StoreFull as e:
                _log.error(
                    "cannot store {url} ({e}); its clients still get it",
                    url=self.url,
                    e=e,
                )
                self._spill = Spill(int(self._writer.bytes_written))
        if self._spill is not None:
            self._spill.append(data)
            if self._spill.full and self._receiver is not None:
                self._receiver.pause()
        self._wake_all()
        self._consumed()

    def _body_end(self, reason: Failure) -> None:
        assert self._writer is not None
        self._receiver = None
        written = self.bytes_written
        broken = body_failure(
            self.url,
            reason,
            written,
            self.total,
            self._expected,
            None if self._hasher is None else self._hasher.hexdigest(),
        )
        if broken is not None:
            self.failure, kind = broken
            self._on_upstream_error(kind)
            self._writer.abort()
            self._wake_all()
            self._done()
            return
        self.body_complete = True
        self._wake_all()
        if (
            written > self._settings.max_object_size
            or self._spill is not None
            or self.purged
        ):
            self._writer.abort()
            self._done()
            return
        entry = self.head_entry()
        assert entry is not None
        d = self._writer.commit(entry)

        def committed(stored: StoredResponse) -> defer.Deferred[None] | None:
            self.entry = stored
            if self.purged:
                if not self._purger_waits:  # else the purger removes it
                    self._drop_entry(stored)
                return None
            trimmed = variants.trim(self._store, stored)  # at most MAX_VARIANTS
            return trimmed.addCallback(lambda _: None)

        def not_committed(failure: Failure) -> None:
            _log.failure("could not store {url}", failure, url=self.url)

        d.addCallbacks(committed, not_committed)
        d.addBoth(lambda _: self._done())

    def _done(self) -> None:
        """The download is over: let go of it and tell whoever waits."""
        if self._done_called:
            return
        self._done_called = True
        self._on_done(self)
        finished, self._finished = self._finished, []
        for d in finished:
            d.callback(None)

    def _wake_all(self) -> None:
        for reading in list(self._readings):
            if reading.pump is not None:
                reading.pump.wake()

    def _forget(self, reading: Reading) -> None:
        self._readings.discard(reading)
        self._consumed()


__all__ = ["CHUNK", "Download", "FetchSettings"]
