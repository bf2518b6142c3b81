"""Protocol-level unit tests of cachingproxy.fetch.download: no network, no reactor.

A fake upstream hands out Deferreds the test fires by hand with fake
responses whose bodies the test pushes byte by byte; time is a task.Clock;
clients are StringTransports (which are IConsumers).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.store import MemoryStore
from cachingproxy.errors import UpstreamTimeout
from cachingproxy.fetch import download as download_module
from cachingproxy.fetch.download import Download, FetchSettings
from cachingproxy.fetch.outcomes import OutcomeKind
from cachingproxy.fetch.sharing import Downloads
from cachingproxy.fetch.spill import Spill
from cachingproxy.interfaces import IUpstream

IMMUTABLE, METADATA, ORIGIN = policy.default_rules(300.0)
URL = "http://example.com/pkg-1.0.whl"
START = 1_700_000_000.0
READ_TIMEOUT = 30.0


@implementer(IPushProducer)
class FakeBodyTransport:
    """What twisted hands a body protocol as its transport: a push producer."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """An IResponse whose body the test delivers by hand."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self,
        code: int = 200,
        headers: list[Header] = (),  # type: ignore[assignment]
        length: int | object = UNKNOWN_LENGTH,
        phrase: bytes = b"OK",
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers()
        for name, value in headers:
            self.headers.addRawHeader(name, value)
        self.length = length
        self.protocol: Protocol | None = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol: Protocol) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: IResponse) -> None:  # noqa: N802
        pass

    def push(self, data: bytes) -> None:
        assert self.protocol is not None, "body not delivered yet"
        self.protocol.dataReceived(data)

    def end(self, reason: BaseException | None = None) -> None:
        assert self.protocol is not None, "body not delivered yet"
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


@implementer(IUpstream)
class FakeUpstream:
    """Records requests; each returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[
            tuple[bytes, bytes, Headers, defer.Deferred[IResponse]]
        ] = []

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: Any = None,
        *,
        mirrored: bool = False,
    ) -> defer.Deferred[IResponse]:
        d: defer.Deferred[IResponse] = defer.Deferred()
        self.requests.append((method, url, headers, d))
        return d

    def answer(self, response: FakeResponse, index: int = -1) -> None:
        self.requests[index][3].callback(response)


class Client:
    """A client following a download into a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.finished: list[Failure | None] = []

    def on_finish(self, failure: Failure | None) -> None:
        self.finished.append(failure)

    @property
    def received(self) -> bytes:
        return self.transport.value()


class DownloadTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryStore()
        self.upstream = FakeUpstream()
        self.downloads = Downloads()

    def download(
        self,
        url: str = URL,
        rule: Any = IMMUTABLE,
        client_headers: list[Header] | None = None,
        stale: StoredResponse | None = None,
        max_object_size: int = 10**9,
    ) -> Download:
        d = Download(
            url=url,
            upstream_url=url,
            request_headers=[("Via", "1.1 test")],
            client_headers=client_headers or [],
            stale=stale,
            rule=rule,
            store=self.store,
            upstream=self.upstream,
            clock=self.clock,
            settings=FetchSettings(
                negative_ttl=60.0,
                max_object_size=max_object_size,
                read_timeout=READ_TIMEOUT,
            ),
            on_done=self.downloads.remove,
        )
        self.downloads.add(d)
        d.start()
        return d

    def follow(self, download: Download) -> Client:
        client = Client()
        download.follow(client.transport, client.on_finish)
        return client

    def stored(self, url: str = URL) -> list[StoredResponse]:
        return self.successResultOf(self.store.lookup(url))

    def stored_body(self, entry: StoredResponse) -> bytes:
        consumer = StringTransport()
        self.successResultOf(self.store.read(entry, consumer))
        return consumer.value()

    def streaming(
        self, length: int | object = 10, headers: list[Header] | None = None
    ) -> tuple[Download, FakeResponse]:
        """A download whose 200 head has arrived (outcome STREAM)."""
        download = self.download()
        outcome = self.downloads.wait(download, [])
        response = FakeResponse(200, headers or [], length)
        self.upstream.answer(response)
        self.assertEqual(self.successResultOf(outcome).kind, OutcomeKind.STREAM)
        return download, response


class StreamingTests(DownloadTestCase):
    def test_request_sent_upstream(self) -> None:
        """start() sends one GET for the upstream URL with the given headers."""
        self.download()
        [(method, url, headers, _)] = self.upstream.requests
        self.assertEqual((method, url), (b"GET", URL.encode()))
        self.assertEqual(headers.getRawHeaders(b"via"), [b"1.1 test"])
        self.assertFalse(headers.hasHeader(b"if-none-match"))

    def test_followers_get_bytes_as_they_arrive(self) -> None:
        """Every follower receives each chunk as soon as it was received,
        before the body is complete."""
        download, response = self.streaming(length=10)
        a, b = self.follow(download), self.follow(download)
        self.assertEqual(download.clients, 2)
        response.push(b"hello")
        self.assertEqual((a.received, b.received), (b"hello", b"hello"))
        self.assertEqual((a.finished, b.finished), ([], []))
        self.assertEqual(self.stored(), [])
        response.push(b"world")
        self.assertEqual((a.received, b.received), (b"helloworld", b"helloworld"))
        self.assertEqual(download.bytes_written, 10)

    def test_late_follower_gets_bytes_already_received(self) -> None:
        """A client that joins mid-download first gets what was received so far."""
        download, response = self.streaming(length=6)
        response.push(b"abc")
        late = self.follow(download)
        self.assertEqual(late.received, b"abc")
        response.push(b"def")
        self.assertEqual(late.received, b"abcdef")

    def test_paused_follower(self) -> None:
        """A paused follower gets nothing until resumed, while another keeps
        receiving; on resume it catches up with everything."""
        download, response = self.streaming(length=9)
        slow, fast = Client(), Client()
        slow_follower = download.follow(slow.transport, slow.on_finish)
        download.follow(fast.transport, fast.on_finish)
        response.push(b"abc")
        slow_follower.pauseProducing()
        response.push(b"def")
        response.push(b"ghi")
        self.assertEqual(slow.received, b"abc")
        self.assertEqual(fast.received, b"abcdefghi")
        self.assertFalse(response.transport.paused)
        response.end()
        self.assertEqual(fast.finished, [None])
        self.assertEqual(slow.finished, [])
        slow_follower.resumeProducing()
        self.assertEqual(slow.received, b"abcdefghi")
        self.assertEqual(slow.finished, [None])

    def test_complete_body_is_committed(self) -> None:
        """A complete body becomes one committed entry with the upstream's
        status, headers and bytes; followers finish cleanly and unregister;
        the download leaves the in-flight table."""
        download, response = self.streaming(
            length=10, headers=[("Content-Type", "application/zip"), ("Age", "7")]
        )
        a = self.follow(download)
        response.push(b"0123456789")
        self.assertIn(URL, self.downloads.in_flight)
        response.end()
        self.assertEqual(a.finished, [None])
        self.assertIsNone(a.transport.producer)
        [entry] = self.stored()
        self.assertEqual((entry.status, entry.size), (200, 10))
        self.assertEqual(entry.header("content-type"), "application/zip")
        self.assertEqual(entry.stored_at, START)
        self.assertEqual(entry.initial_age, 7)
        self.assertEqual(self.stored_body(entry), b"0123456789")
        self.assertTrue(download.body_complete)
        self.assertEqual(download.entry, entry)
        self.assertNotIn(URL, self.downloads.in_flight)

    def test_unknown_length_committed_on_clean_end(self) -> None:
        """Without Content-Length the body is stored when the upstream ends it
        cleanly."""
        _, response = self.streaming(length=UNKNOWN_LENGTH)
        response.push(b"abc")
        response.end()
        [entry] = self.stored()
        self.assertEqual(self.stored_body(entry), b"abc")

    def test_close_delimited_body_is_committed(self) -> None:
        """A body without Content-Length that ends with the connection
        (twisted's PotentialDataLoss) is complete as far as anyone can tell."""
        _, response = self.streaming(length=UNKNOWN_LENGTH)
        response.push(b"abc")
        response.end(PotentialDataLoss())
        [entry] = self.stored()
        self.assertEqual(self.stored_body(entry), b"abc")

    def test_follow_with_range(self) -> None:
        """A follower with [start, end) gets only those bytes and finishes when
        it has them, before the body is complete."""
        download, response = self.streaming(length=10)
        client = Client()
        download.follow(client.transport, client.on_finish, 2, 5)
        response.push(b"0123")
        self.assertEqual(client.received, b"23")
        self.assertEqual(client.finished, [])
        response.push(b"456")
        self.assertEqual(client.received, b"234")
        self.assertEqual(client.finished, [None])

    def test_follower_stopped_by_client(self) -> None:
        """A client that goes away stops only its follower: the download
        continues and is stored."""
        download, response = self.streaming(length=4)
        gone, stays = Client(), Client()
        follower = download.follow(gone.transport, gone.on_finish)
        download.follow(stays.transport, stays.on_finish)
        response.push(b"ab")
        follower.stopProducing()
        self.assertEqual(len(gone.finished), 1)
        self.assertIsNotNone(gone.finished[0])
        response.push(b"cd")
        response.end()
        self.assertEqual(gone.received, b"ab")
        self.assertEqual(stays.received, b"abcd")
        self.assertEqual(len(self.stored()), 1)


class BrokenBodyTests(DownloadTestCase):
    def test_broken_body_stores_nothing(self) -> None:
        """An upstream that breaks off mid-body leaves nothing in the store;
        followers finish with a failure; the download is no longer in flight."""
        download, response = self.streaming(length=10)
        a, b = self.follow(download), self.follow(download)
        response.push(b"01234")
        response.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(self.stored(), [])
        for client in (a, b):
            self.assertEqual(client.received, b"01234")
            [failure] = client.finished
            self.assertIsNotNone(failure)
        self.assertIsNotNone(download.failure)
        self.assertNotIn(URL, self.downloads.in_flight)

    def test_waiter_after_failure_retries(self) -> None:
        """A client asking a download that already failed mid-body is told to
        fetch on its own."""
        download, response = self.streaming(length=10)
        response.push(b"01")
        response.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(
            self.successResultOf(self.downloads.wait(download, [])).kind,
            OutcomeKind.RETRY,
        )

    def test_short_body_stores_nothing(self) -> None:
        """A body shorter than its Content-Length is not stored even if the
        connection ended cleanly; followers get a failure."""
        download, response = self.streaming(length=10)
        a = self.follow(download)
        response.push(b"01234")
        response.end()
        self.assertEqual(self.stored(), [])
        [failure] = a.finished
        self.assertIsNotNone(failure)

    def test_long_body_stores_nothing(self) -> None:
        """A body longer than its Content-Length is not stored."""
        download, response = self.streaming(length=3)
        a = self.follow(download)
        response.push(b"0123456")
        response.end()
        self.assertEqual(self.stored(), [])
        self.assertIsNotNone(a.finished[0])

    def test_read_timeout(self) -> None:
        """An upstream silent for the read timeout is cut off: the transport is
        stopped, followers fail with UpstreamTimeout, nothing is stored."""
        download, response = self.streaming(length=10)
        a = self.follow(download)
        response.push(b"01234")
        self.clock.advance(READ_TIMEOUT - 1)
        response.push(b"5")
        self.clock.advance(READ_TIMEOUT - 1)
        self.assertFalse(response.transport.stopped)
        self.clock.advance(1)
        self.assertTrue(response.transport.stopped)
        # Stopping the transport makes twisted end the body with an error.
        response.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(self.stored(), [])
        [failure] = a.finished
        assert failure is not None
        self.assertTrue(failure.check(UpstreamTimeout))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_left_after_success(self) -> None:
        """A completed body leaves no read-timeout timer behind."""
        _, response = self.streaming(length=1)
        response.push(b"x")
        response.end()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_object_size(self) -> None:
        """A body that grows past --max-object-size without Content-Length is
        served to its followers but not stored."""
        download = self.download(max_object_size=4)
        outcome = self.downloads.wait(download, [])
        response = FakeResponse(200, [], UNKNOWN_LENGTH)
        self.upstream.answer(response)
        self.assertEqual(self.successResultOf(outcome).kind, OutcomeKind.STREAM)
        a = self.follow(download)
        response.push(b"0123456789")
        response.end()
        self.assertEqual(a.received, b"0123456789")
        self.assertEqual(a.finished, [None])
        self.assertEqual(self.stored(), [])

    def test_declared_too_large_passes_through(self) -> None:
        """A Content-Length over --max-object-size is handed through unstored."""
        download = self.download(max_object_size=4)
        outcome = self.downloads.wait(download, [])
        self.upstream.answer(FakeResponse(200, [], 10))
        self.assertEqual(self.successResultOf(outcome).kind, OutcomeKind.PASSTHROUGH)


class OutcomeTests(DownloadTestCase):
    def stale_entry(
        self,
        headers: list[Header],
        body: bytes = b"old body",
        vary: tuple[str, ...] = (),
        variant: str = "",
    ) -> StoredResponse:
        writer = self.successResultOf(self.store.open_writer(URL))
        writer.write(body)
        return self.successResultOf(
            writer.commit(
                StoredResponse(
                    url=URL,
                    variant=variant,
                    vary=vary,
                    status=200,
                    headers=tuple(headers),
                    stored_at=START - 1000,
                )
            )
        )

    def test_not_modified_refreshes_stale(self) -> None:
        """A 304 to a revalidation (sent with the stale entry's validators)
        gives NOT_MODIFIED with the entry refreshed in the store: new headers
        and stored_at, same body."""
        stale = self.stale_entry([("ETag", '"v1"'), ("Cache-Control", "max-age=10")])
        download = self.download(rule=ORIGIN, stale=stale)
        [(_, _, sent, _)] = self.upstream.requests
        self.assertEqual(sent.getRawHeaders(b"if-none-match"), [b'"v1"'])
        outcome = self.downloads.wait(download, [])
        self.upstream.answer(
            FakeResponse(304, [("ETag", '"v1"'), ("Cache-Control", "max-age=99")], 0)
        )
        result = self.successResultOf(outcome)
        self.assertEqual(result.kind, OutcomeKind.NOT_MODIFIED)
        assert result.entry is not None
        self.assertEqual(result.entry.stored_at, START)
        self.assertEqual(result.entry.header("cache-control"), "max-age=99")
        [entry] = self.stored()
        self.assertEqual(entry.stored_at, START)
        self.assertEqual(entry.header("cache-control"), "max-age=99")
        self.assertEqual(entry.body_ref, stale.body_ref)
        self.assertEqual(self.stored_body(entry), b"old body")
        self.assertNotIn(URL, self.downloads.in_flight)

    def test_not_modified_but_entry_gone(self) -> None:
        """A 304 for an entry removed meanwhile tells clients to retry."""
        stale = self.stale_entry([("ETag", '"v1"')])
        self.successResultOf(self.store.remove(URL))
        download = self.download(stale=stale)
        outcome = self.downloads.wait(download, [])
        self.upstream.answer(FakeResponse(304, [("ETag", '"v1"')], 0))
        self.assertEqual(self.successResultOf(outcome).kind, OutcomeKind.RETRY)

    def test_server_error(self) -> None:
        """A 5xx is an ERROR outcome carrying the status; nothing is stored."""
        download = self.download()
        outcome = self.downloads.wait(download, [])
        response = FakeResponse(503, [], 0, b"Service Unavailable")
        self.upstream.answer(response)
        result = self.successResultOf(outcome)
        self.assertEqual((result.kind, result.status), (OutcomeKind.ERROR, 503))
        self.assertEqual(result.phrase, "Service Unavailable")
        self.assertEqual(self.stored(), [])
        self.assertNotIn(URL, self.downloads.in_flight)

    def test_connect_error(self) -> None:
        """A failed upstream request is an ERROR outcome carrying the failure."""
        download = self.download()
        outcome = self.downloads.wait(download, [])
        self.upstream.requests[0][3].errback(ConnectionRefusedError())
        result = self.successResultOf(outcome)
        self.assertEqual(result.kind, OutcomeKind.ERROR)
        assert result.failure is not None
        self.assertTrue(result.failure.check(ConnectionRefusedError))
        self.assertNotIn(URL, self.downloads.in_flight)

    def test_unstorable_passthrough_then_retry(self) -> None:
        """An unstorable response (no-store under origin) goes whole to the
        first waiter as PASSTHROUGH; the second waiter must RETRY alone."""
        download = self.download(url="http://example.com/page", rule=ORIGIN)
        first = self.downloads.wait(download, [])
        second = self.downloads.wait(download, [])
        response = FakeResponse(200, [("Cache-Control", "no-store")], 4)
        self.upstream.answer(response)
        result = self.successResultOf(first)
        self.assertEqual(result.kind, OutcomeKind.PASSTHROUGH)
        self.assertIs(result.response, response)
        self.assertEqual(self.successResultOf(second).kind, OutcomeKind.RETRY)
        self.assertEqual(
            self.successResultOf(self.downloads.wait(download, [])).kind,
            OutcomeKind.RETRY,
        )
        self.assertEqual(self.stored("http://example.com/page"), [])
        self.assertIsNone(response.protocol, "the body is the first waiter's to read")

    def test_passthrough_with_no_waiter_is_drained(self) -> None:
        """If nobody waits any more, an unstorable body is read and dropped so
        the connection can be reused."""
        download = self.download(url="http://example.com/page", rule=ORIGIN)
        response = FakeResponse(200, [("Set-Cookie", "a=b")], 4)
        self.upstream.answer(response)
        self.assertIsNotNone(response.protocol)
        response.push(b"data")
        response.end()
        self.assertEqual(
            self.successResultOf(self.downloads.wait(download, [])).kind,
            OutcomeKind.PASSTHROUGH,
        )

    def test_variant_mismatch_retries(self) -> None:
        """A waiter whose Vary'd request headers differ from the download's
        gets RETRY; a matching one gets STREAM."""
        html = [("Accept", "text/html")]
        download = self.download(
            url="https://pypi.org/simple/x/", rule=METADATA, client_headers=html
        )
        same = self.downloads.wait(download, html)
        other = self.downloads.wait(
            download, [("Accept", "application/vnd.pypi.simple.v1+json")]
        )
        response = FakeResponse(200, [("Vary", "Accept")], 2)
        self.upstream.answer(response)
        self.assertEqual(self.successResultOf(same).kind, OutcomeKind.STREAM)
        self.assertEqual(self.successResultOf(other).kind, OutcomeKind.RETRY)
        self.assertEqual(download.vary, ("accept",))
        response.push(b"ok")
        response.end()
        [entry] = self.stored("https://pypi.org/simple/x/")
        self.assertEqual(entry.variant, policy.variant_of(("accept",), html))

    def test_not_modified_variant_mismatch_retries(self) -> None:
        """After a 304 refreshed one variant, a waiter of another variant must
        fetch its own; a waiter of the same variant gets the refreshed entry."""
        html = [("Accept", "text/html")]
        stale = self.stale_entry(
            [("ETag", '"v1"'), ("Vary", "Accept")],
            vary=("accept",),
            variant=policy.variant_of(("accept",), html),
        )
        download = self.download(stale=stale, client_headers=html)
        same = self.downloads.wait(download, html)
        other = self.downloads.wait(download, [("Accept", "application/json")])
        self.upstream.answer(FakeResponse(304, [("ETag", '"v1"')], 0))
        self.assertEqual(self.successResultOf(same).kind, OutcomeKind.NOT_MODIFIED)
        self.assertEqual(self.successResultOf(other).kind, OutcomeKind.RETRY)


class SpillTests(DownloadTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = MemoryStore(capacity=4)
        self.patch(download_module, "Spill", lambda base: Spill(base, limit=8))

    def test_store_full_followers_still_get_the_body(self) -> None:
        """Bytes the full store refused reach the followers from the spill,
        and the upstream pauses while a slow follower holds too many."""
        download, response = self.streaming(length=30)
        slow = Client()
        slow_follower = download.follow(slow.transport, slow.on_finish)
        slow_follower.pauseProducing()
        fast = self.follow(download)
        response.push(b"abcdefghij")
        self.assertEqual(fast.received, b"abcdefghij")
        self.assertTrue(response.transport.paused)
        slow_follower.resumeProducing()
        self.assertEqual(slow.received, b"abcdefghij")
        self.assertFalse(response.transport.paused)

    def test_upstream_resumes_when_the_slow_follower_leaves(self) -> None:
        """A paused upstream (spill full) resumes once the only follower
        holding the spill back goes away, so the download can end."""
        download, response = self.streaming(length=30)
        slow = Client()
        slow_follower = download.follow(slow.transport, slow.on_finish)
        slow_follower.pauseProducing()
        response.push(b"abcdefghij")
        self.assertTrue(response.transport.paused)
        slow_follower.stopProducing()
        self.assertFalse(response.transport.paused)
        self.assertEqual(download.clients, 0)
