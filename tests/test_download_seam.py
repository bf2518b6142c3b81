"""The download seam (``IDownload`` in cachingproxy/interfaces.py): a download
this worker runs and one another worker runs, followed here, are both what
the code holding a download reads and calls, built the way the proxy builds
them (the sharing code, and in a worker the claims of SPEC 11).  No network:
the upstream is faked, time is a task.Clock, the claims directory is real.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from cachingproxy.cache.store import MemoryStore
from cachingproxy.fetch.download import Download, FetchSettings
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind
from cachingproxy.fetch.sharing import Downloads
from cachingproxy.interfaces import IDownload
from cachingproxy.workers.claims import DONE, STREAM, Claims
from cachingproxy.workers.coordination import SharedDownloads
from cachingproxy.workers.remote import KEEP_OPEN, POLL, RemoteDownload

from . import test_download_unit as unit

URL = "http://example.com/pkg-1.0.whl"
BODY_FILE = "ab" * 16
"""The owner's body file, as named in ``tmp/`` of the cache directory."""


async def _nothing_stored() -> int:
    return 0


class DownloadSeamTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(unit.START)
        self.cache_dir = self.mktemp()
        os.makedirs(os.path.join(self.cache_dir, "tmp"))
        claims_dir = os.path.join(self.cache_dir, "run", "claims")
        self.shared = SharedDownloads(self.cache_dir, claims_dir, self.clock)
        self.other_worker = Claims(claims_dir, self.clock.seconds)
        self.upstream = unit.FakeUpstream()
        self.downloads = Downloads()
        self.downloads.across = self.shared

    def new(self) -> Download:
        """A download as the cached path makes one (not started)."""
        return Download(
            url=URL,
            upstream_url=URL,
            request_headers=[("Via", "1.1 test")],
            client_headers=[],
            stale=None,
            rule=unit.IMMUTABLE,
            store=MemoryStore(),
            upstream=self.upstream,
            clock=self.clock,
            settings=FetchSettings(
                negative_ttl=60.0, max_object_size=10**9, read_timeout=30.0
            ),
            on_done=self.downloads.remove,
        )

    def obtain(self) -> tuple[IDownload, Outcome] | None:
        """The download a first client of ``URL`` follows, and its head."""
        return self.successResultOf(
            defer.Deferred.fromCoroutine(
                self.downloads.obtain(URL, [], self.new, lambda entry: True)
            )
        )

    def test_local_download(self) -> None:
        """A download this worker runs (it got the key's claim) provides
        IDownload before it starts and once its head is in."""
        verifyObject(IDownload, self.new())
        got = defer.Deferred.fromCoroutine(
            self.downloads.obtain(URL, [], self.new, lambda entry: True)
        )
        response = unit.FakeResponse(200, [("Cache-Control", "max-age=60")], 3)
        self.upstream.answer(response)
        found = self.successResultOf(got)
        assert found is not None
        download, outcome = found
        self.assertIsInstance(download, Download)
        self.assertIs(outcome.kind, OutcomeKind.STREAM)
        self.assertTrue(verifyObject(IDownload, download))
        self.assertEqual(self.downloads.matching(lambda u: u == URL), [download])
        response.push(b"abc")
        response.end()
        self.assertTrue(download.body_complete)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_remote_download(self) -> None:
        """A download another worker runs, followed here, provides IDownload
        without fetching anything; the sharing code lists it among the
        downloads in flight, and a purge marks the owner's claim (SPEC 11)."""
        claim = self.other_worker.acquire(URL)
        assert claim is not None
        claim.publish(
            state=STREAM,
            status=200,
            headers=(("Cache-Control", "max-age=60"), ("Content-Length", "6")),
            total=6,
            body=BODY_FILE,
        )
        path = os.path.join(self.cache_dir, "tmp", BODY_FILE)
        with open(path, "wb") as f:
            f.write(b"abc")
        found = self.obtain()
        assert found is not None
        download, outcome = found
        self.assertIsInstance(download, RemoteDownload)
        self.assertIs(outcome.kind, OutcomeKind.STREAM)
        self.assertTrue(verifyObject(IDownload, download))
        running = self.shared.running(URL)
        self.assertIsInstance(running, RemoteDownload)
        self.assertTrue(verifyObject(IDownload, running))
        self.assertEqual(self.downloads.matching(lambda u: u == URL), [download])
        self.assertEqual(self.upstream.requests, [])
        reader = download.open_reader()
        self.assertEqual(download.read(reader, 0, 10), b"abc")

        purge = self.downloads.purge(lambda u: u == URL, _nothing_stored)
        self.assertEqual(self.successResultOf(defer.Deferred.fromCoroutine(purge)), 0)
        self.assertTrue(download.purged)
        self.assertTrue(claim.purged)

        with open(path, "ab") as f:
            f.write(b"def")
        claim.release(state=DONE, size=6, ended_at=self.clock.seconds())
        self.clock.advance(POLL)
        self.assertTrue(download.body_complete)
        self.assertIsNone(self.successResultOf(download.finished()))
        # Complete: a purge now waits for the follower to be over (it is).
        waiting = download.purge_waiting()
        assert waiting is not None
        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.downloads.get(URL))
        self.clock.advance(KEEP_OPEN)

    def test_remote_download_over_at_once_is_not_left_in_flight(self) -> None:
        """A download another worker has all but finished (its whole body is
        in the file already) ends while it is being started here: it is not
        listed in flight afterwards (``/status.json`` ``in_flight``)."""
        claim = self.other_worker.acquire(URL)
        assert claim is not None
        claim.publish(
            state=STREAM,
            status=200,
            headers=(("Cache-Control", "max-age=60"), ("Content-Length", "3")),
            total=3,
            body=BODY_FILE,
        )
        with open(os.path.join(self.cache_dir, "tmp", BODY_FILE), "wb") as f:
            f.write(b"abc")
        found = self.obtain()
        assert found is not None
        download, _ = found
        self.assertIsInstance(download, RemoteDownload)
        self.assertTrue(download.body_complete)
        self.assertIsNone(self.successResultOf(download.finished()))
        self.assertEqual(self.downloads.all(), [])
        self.assertEqual(self.downloads.matching(lambda u: True), [])
