"""The handler tier: the cached path, the sender and the mirror, with the
memory store, a fake upstream and a ``task.Clock`` -- no socket.

Each request runs through the real ``Channel`` of a ``ProxySite`` whose
resource is the real ``Proxy``, on a ``StringTransport``; the fake upstream
hands out Deferreds the test fires with fake responses whose bodies it
pushes by hand (``tests.test_download_unit``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.status import CacheStatus
from cachingproxy.cache.store import MemoryStore
from cachingproxy.config import Mirror, ProxyConfig
from cachingproxy.fetch.outcomes import OutcomeKind
from cachingproxy.front.channel import ProxySite
from cachingproxy.handler.plan import Fail, FollowDownload, ServeEntry
from cachingproxy.interfaces import IBodyWriter
from cachingproxy.proxy import Proxy, ProxyResource
from tests.test_download_unit import FakeResponse, FakeUpstream

START = 1_700_000_000.0
WHEEL = "http://origin.test/pkg-1.0.whl"
PAGE = "http://origin.test/page"
"""Under the ``origin`` rule (RFC 9111)."""
INDEX = "http://origin.test/simple/pkg/"
"""Under the metadata rule (``--index-ttl``)."""
BODY = bytes(range(256)) * 4


class Reply:
    """One response as a client on ``transport`` received it."""

    def __init__(self, transport: StringTransport) -> None:
        self._transport = transport

    @property
    def raw(self) -> bytes:
        return self._transport.value()

    @property
    def complete(self) -> bool:
        _, sep, body = self.raw.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = self.headers.get("content-length")
        return length is not None and len(body) >= int(length)

    @property
    def status(self) -> int:
        m = re.match(rb"HTTP/1\.1 ([0-9]{3}) ", self.raw)
        assert m is not None, self.raw[:200]
        return int(m.group(1))

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.partition(b"\r\n\r\n")[0].decode("latin-1")
        pairs = (line.split(":", 1) for line in head.split("\r\n")[1:])
        return {k.strip().lower(): v.strip() for k, v in pairs}

    @property
    def cache(self) -> str:
        return self.headers["x-cache"]

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]


class HeldStore(MemoryStore):
    """A memory store whose commits wait until the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[defer.Deferred[None]] = []

    def open_writer(self, url: str) -> defer.Deferred[IBodyWriter]:
        store = self

        def hold(writer: Any) -> Any:
            commit = writer.commit

            def held_commit(entry: StoredResponse) -> defer.Deferred[StoredResponse]:
                gate: defer.Deferred[None] = defer.Deferred()
                store.held.append(gate)
                return gate.addCallback(lambda _: commit(entry))

            writer.commit = held_commit
            return writer

        return super().open_writer(url).addCallback(hold)

    def release(self) -> None:
        held, self.held = self.held, []
        for gate in held:
            gate.callback(None)


class Handler:
    """A proxy on a clock, a memory store and a fake upstream."""

    def __init__(self, store: MemoryStore | None = None, **config: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = store or MemoryStore()
        self.upstream = FakeUpstream()
        self.config = ProxyConfig(
            listen=(),
            allow_client=(ipaddress.ip_network("127.0.0.0/8"),),
            names=("localhost",),
            **config,
        )
        self.proxy = Proxy(self.config, self.store, self.upstream, self.clock)
        self.site = ProxySite(ProxyResource(self.proxy))
        self.site.reactor = self.clock  # type: ignore[assignment]

    def get(
        self,
        target: str,
        headers: list[Header] = (),
        method: str = "GET",  # type: ignore[assignment]
    ) -> Reply:
        """Send one request on a new connection from 127.0.0.1."""
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 3128),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        channel: Any = self.site.buildProtocol(transport.getPeer())
        channel.callLater = self.clock.callLater
        channel.makeConnection(transport)
        items = list(headers)
        if not any(k.lower() == "host" for k, _ in items):
            own = target.startswith("/")
            host = "localhost:3128" if own else target.split("/", 3)[2]
            items.insert(0, ("Host", host))
        lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in items)]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.turn()
        return Reply(transport)

    def turn(self) -> None:
        """Let scheduled work (the pump's turns) run."""
        for _ in range(20):
            self.clock.advance(0)

    def answer(
        self,
        headers: list[Header] = (),  # type: ignore[assignment]
        body: bytes = BODY,
        status: int = 200,
        index: int = -1,
        end: bool = True,
    ) -> FakeResponse:
        """Answer upstream request ``index`` (with ``body`` when ``end``)."""
        response = FakeResponse(status, [*headers], len(body))
        self.upstream.answer(response, index)
        if end:
            response.push(body)
            response.end()
        self.turn()
        return response

    def requested(self) -> list[str]:
        return [url.decode() for _, url, _, _ in self.upstream.requests]

    def stored(self, url: str) -> list[StoredResponse]:
        result: list[StoredResponse] = []
        self.store.lookup(url).addCallback(result.extend)
        return result

    def fetch(self, url: str, headers: list[Header] = ()) -> Reply:  # type: ignore[assignment]
        """A miss answered at once with ``BODY`` (or a hit)."""
        reply = self.get(url, headers)
        if len(self.upstream.requests) and not reply.complete:
            self.answer([("Content-Type", "application/octet-stream")])
        return reply


class CachedPathTests(TestCase):
    """Hit, miss, coalescing, 304 and stale-on-error, end to end."""

    def test_miss_then_hit(self) -> None:
        """A miss streams the upstream body (MISS) and stores it; the next
        request is a HIT from the store without asking upstream again."""
        h = Handler()
        miss = h.fetch(WHEEL)
        self.assertEqual((miss.status, miss.cache, miss.body), (200, "MISS", BODY))
        hit = h.get(WHEEL)
        self.assertEqual((hit.status, hit.cache, hit.body), (200, "HIT", BODY))
        self.assertEqual(h.requested(), [WHEEL])
        self.assertIn("age", hit.headers)

    def test_coalesced_miss(self) -> None:
        """Two clients asking before the head came share one upstream
        request, and both get the whole body."""
        h = Handler()
        first, second = h.get(WHEEL), h.get(WHEEL)
        self.assertEqual(len(h.upstream.requests), 1)
        h.answer()
        self.assertEqual((first.cache, first.body), ("MISS", BODY))
        self.assertEqual((second.cache, second.body), ("MISS", BODY))

    def test_not_modified(self) -> None:
        """A client's matching If-None-Match on a stored entry gets 304 with
        no body."""
        h = Handler()
        h.get(WHEEL)
        h.answer([("ETag", '"v1"')])
        reply = h.get(WHEEL, [("If-None-Match", '"v1"')])
        self.assertEqual((reply.status, reply.cache, reply.body), (304, "HIT", b""))

    def test_stale_on_error(self) -> None:
        """A stale index entry is served STALE when upstream cannot be
        reached."""
        h = Handler(index_ttl=60.0)
        h.fetch(INDEX)
        h.clock.advance(120)
        reply = h.get(INDEX)
        self.assertEqual(len(h.upstream.requests), 2)
        h.upstream.requests[-1][3].errback(ConnectionRefusedError())
        h.turn()
        self.assertEqual((reply.status, reply.cache, reply.body), (200, "STALE", BODY))

    def test_error_without_stale(self) -> None:
        """With nothing stored, an unreachable upstream is a 502 (MISS)."""
        h = Handler()
        reply = h.get(WHEEL)
        h.upstream.requests[0][3].errback(ConnectionRefusedError())
        h.turn()
        self.assertEqual((reply.status, reply.cache), (502, "MISS"))


class RangeTests(TestCase):
    """Each Range case the sender answers."""

    def setUp(self) -> None:
        self.h = Handler()
        self.h.fetch(WHEEL)

    def test_satisfiable_range(self) -> None:
        """A single range of a stored entry is a 206 with Content-Range."""
        reply = self.h.get(WHEEL, [("Range", "bytes=10-19")])
        self.assertEqual(reply.status, 206)
        self.assertEqual(reply.headers["content-range"], f"bytes 10-19/{len(BODY)}")
        self.assertEqual(reply.body, BODY[10:20])

    def test_suffix_range(self) -> None:
        """``bytes=-N`` is the last N bytes."""
        reply = self.h.get(WHEEL, [("Range", "bytes=-5")])
        self.assertEqual((reply.status, reply.body), (206, BODY[-5:]))

    def test_unsatisfiable_range(self) -> None:
        """A range past the end is a 416 naming the size, without a body."""
        reply = self.h.get(WHEEL, [("Range", f"bytes={len(BODY) + 10}-")])
        self.assertEqual(reply.status, 416)
        self.assertEqual(reply.headers["content-range"], f"bytes */{len(BODY)}")
        self.assertEqual(reply.body, b"")

    def test_if_range_mismatch(self) -> None:
        """An If-Range that does not match the entry gets the whole body."""
        reply = self.h.get(WHEEL, [("Range", "bytes=0-9"), ("If-Range", '"other"')])
        self.assertEqual((reply.status, reply.body), (200, BODY))

    def test_range_on_a_miss(self) -> None:
        """On a miss of known length the range is served from the download
        while the whole file is fetched and stored."""
        h = Handler()
        reply = h.get(WHEEL, [("Range", "bytes=4-7")])
        h.answer()
        self.assertEqual((reply.status, reply.body), (206, BODY[4:8]))
        self.assertNotIn(
            b"Range", h.upstream.requests[0][2].getRawHeaders(b"range") or []
        )
        [entry] = h.stored(WHEEL)
        self.assertEqual(entry.size, len(BODY))


class DecideTests(TestCase):
    """``CachedPath.decide`` returns values and never touches a request."""

    def test_plans(self) -> None:
        """A miss is a FollowDownload, then a hit a ServeEntry, and an
        offline miss a Fail."""
        h = Handler()
        rule = h.proxy.rules[0]
        d = defer.Deferred.fromCoroutine(h.proxy.cached.decide(WHEEL, rule, []))
        response = h.answer(end=False)
        plan = self.successResultOf(d)
        self.assertIsInstance(plan, FollowDownload)
        assert isinstance(plan, FollowDownload)
        self.assertEqual(plan.cache, CacheStatus.MISS)
        response.push(BODY)
        response.end()
        hit = self.successResultOf(
            defer.Deferred.fromCoroutine(h.proxy.cached.decide(WHEEL, rule, []))
        )
        self.assertIsInstance(hit, ServeEntry)
        offline = Handler(offline=True)
        plan = self.successResultOf(
            defer.Deferred.fromCoroutine(offline.proxy.cached.decide(WHEEL, rule, []))
        )
        self.assertEqual(
            plan, Fail(504, "not cached and --offline", CacheStatus.OFFLINE)
        )


class JoinTests(TestCase):
    """A request joins a running download only if it may reuse its
    response; a complete download hands over to its entry (SPEC 5)."""

    def test_no_cache_in_commit_window_goes_upstream(self) -> None:
        """Under ``origin``, a ``no-cache`` request arriving while the body
        is complete but not yet committed is not served that body as a HIT:
        it is revalidated upstream."""
        h = Handler(store=HeldStore())
        first = h.get(PAGE)
        h.answer([("Cache-Control", "max-age=3600"), ("ETag", '"v1"')])
        self.assertEqual(first.body, BODY)
        second = h.get(PAGE, [("Cache-Control", "no-cache")])
        self.assertTrue(h.store.held, "the commit is held")
        h.store.release()
        h.turn()
        self.assertEqual(len(h.upstream.requests), 2)
        h.answer([("ETag", '"v1"')], body=b"", status=304)
        self.assertEqual((second.status, second.cache), (200, "REVALIDATED"))
        self.assertEqual(second.body, BODY)

    def test_commit_window_served_from_the_entry(self) -> None:
        """A plain request in the commit window waits for the entry and is
        served from it (HIT), without a second upstream request."""
        h = Handler(store=HeldStore())
        h.get(PAGE)
        h.answer([("Cache-Control", "max-age=3600")])
        second = h.get(PAGE)
        self.assertFalse(second.raw, "waits for the commit")
        h.store.release()
        h.turn()
        self.assertEqual((second.cache, second.body), ("HIT", BODY))
        self.assertEqual(len(h.upstream.requests), 1)

    def test_stale_on_arrival_not_joined(self) -> None:
        """Under ``origin``, a response that is stale as it arrives
        (``max-age=0``, with a validator: storable) is not shared with a client that joins later: that
        one gets its own upstream request."""
        h = Handler()
        first = h.get(PAGE)
        stale = [("Cache-Control", "max-age=0"), ("ETag", '"v1"')]
        response = h.answer(stale, end=False)
        second = h.get(PAGE)
        self.assertEqual(len(h.upstream.requests), 2)
        response.push(BODY)
        response.end()
        h.answer(stale, body=b"fresh")
        self.assertEqual(first.body, BODY)
        self.assertEqual(second.body, b"fresh")

    def test_max_age_of_the_client(self) -> None:
        """A client's ``max-age`` younger than the response in flight (its
        upstream ``Age``) makes it fetch its own copy."""
        h = Handler()
        h.get(PAGE)
        response = h.answer(
            [("Cache-Control", "max-age=3600"), ("Age", "100")], end=False
        )
        joined = h.get(PAGE)
        self.assertEqual(len(h.upstream.requests), 1, "a plain client joins")
        own = h.get(PAGE, [("Cache-Control", "max-age=10")])
        self.assertEqual(len(h.upstream.requests), 2)
        response.push(BODY)
        response.end()
        h.turn()
        self.assertEqual((joined.cache, joined.body), ("MISS", BODY))
        self.assertFalse(own.raw)

    def test_variant_not_joined(self) -> None:
        """A client of another variant does not join (Vary)."""
        h = Handler()
        h.get(INDEX, [("Accept", "text/html")])
        response = h.answer([("Vary", "Accept")], end=False)
        h.get(INDEX, [("Accept", "application/json")])
        self.assertEqual(len(h.upstream.requests), 2)
        response.end()


class PurgeTests(TestCase):
    """A purge leaves nothing behind, whenever it comes (SPEC 5, 9)."""

    def test_purge_in_commit_window(self) -> None:
        """``DELETE /cache?url=`` while the body is being committed waits
        for the commit, removes the entry (and says so), and the next GET
        is a MISS."""
        h = Handler(store=HeldStore())
        h.get(WHEEL)
        h.answer()
        self.assertTrue(h.store.held)
        purge = h.get(f"/cache?url={WHEEL}", method="DELETE")
        during = h.get(WHEEL)
        self.assertFalse(purge.raw, "the purge waits for the commit")
        h.store.release()
        h.turn()
        self.assertEqual(purge.status, 200, purge.raw)
        self.assertEqual(json.loads(purge.body), {"removed": 1})
        self.assertEqual(h.stored(WHEEL), [])
        self.assertEqual(len(h.upstream.requests), 2, "the GET went upstream")
        h.answer()
        h.store.release()
        h.turn()
        self.assertEqual((during.cache, during.body), ("MISS", BODY))
        after = h.get(f"/cache?url={WHEEL}", method="DELETE")
        self.assertEqual(json.loads(after.body), {"removed": 1})
        last = h.get(WHEEL)
        self.assertEqual(len(h.upstream.requests), 3)
        h.answer()
        self.assertEqual(last.cache, "MISS")

    def test_purge_during_download(self) -> None:
        """A download purged half-way is not stored and not joined."""
        h = Handler()
        first = h.get(WHEEL)
        response = h.answer(end=False)
        response.push(BODY[:10])
        purge = h.get(f"/cache?url={WHEEL}", method="DELETE")
        self.assertEqual(json.loads(purge.body), {"removed": 0})
        h.get(WHEEL)
        self.assertEqual(len(h.upstream.requests), 2, "a purged download is not joined")
        response.push(BODY[10:])
        response.end()
        h.turn()
        self.assertEqual(first.body, BODY)
        self.assertEqual(h.stored(WHEEL), [])


class MirrorTests(TestCase):
    """The mirror component: documents rewritten, Location made local."""

    def setUp(self) -> None:
        self.h = Handler(mirrors=(Mirror("/pypi/", ("https://pypi.org/",)),))

    def test_index_rewritten(self) -> None:
        """A PEP 503 page has its links into the mirrored upstream made
        local, with the Host the client used; the upstream is asked for the
        mirrored URL."""
        page = b'<a href="https://pypi.org/packages/pkg-1.0.tar.gz#sha256=ab">x</a>'
        reply = self.h.get("/pypi/simple/pkg/")
        self.assertEqual(self.h.requested(), ["https://pypi.org/simple/pkg/"])
        self.h.answer([("Content-Type", "text/html")], body=page)
        self.assertEqual(reply.status, 200)
        self.assertIn(
            b'href="http://localhost:3128/pypi/packages/pkg-1.0.tar.gz#sha256=ab"',
            reply.body,
        )
        self.assertEqual(int(reply.headers["content-length"]), len(reply.body))
        hit = self.h.get("/pypi/simple/pkg/", [("Host", "127.0.0.1:3128")])
        self.assertEqual(hit.cache, "HIT")
        self.assertIn(b"http://127.0.0.1:3128/pypi/packages/", hit.body)

    def test_location_made_local(self) -> None:
        """A redirect to a mirrored upstream URL is sent as the local URL."""
        reply = self.h.get("/pypi/simple/Pkg")
        self.h.answer(
            [("Location", "https://pypi.org/simple/pkg/")], body=b"", status=301
        )
        self.assertEqual(reply.status, 301)
        self.assertEqual(
            reply.headers["location"], "http://localhost:3128/pypi/simple/pkg/"
        )

    def test_package_file_not_rewritten(self) -> None:
        """A package file is sent byte for byte, whatever its type."""
        body = b"https://pypi.org/packages/ inside a file"
        reply = self.h.get("/pypi/packages/pkg-1.0.tar.gz")
        self.h.answer([("Content-Type", "text/html")], body=body)
        self.assertEqual(reply.body, body)


class OutcomeKindTests(TestCase):
    def test_distinct_enums(self) -> None:
        """The route kind and the download outcome kind are different names."""
        from cachingproxy.front.routing import RouteKind

        self.assertIsNot(RouteKind, OutcomeKind)
        self.assertEqual(str(CacheStatus.HIT), "HIT")


class PassThroughTests(TestCase):
    """Responses the cache does not keep are relayed as they come."""

    def test_unstorable_relayed(self) -> None:
        """Under ``origin``, a ``no-store`` response is streamed to its
        client (MISS) and not stored; the next request goes upstream."""
        h = Handler()
        reply = h.get(PAGE)
        h.answer([("Cache-Control", "no-store")])
        self.assertEqual((reply.status, reply.cache, reply.body), (200, "MISS", BODY))
        self.assertEqual(h.stored(PAGE), [])
        h.get(PAGE)
        self.assertEqual(len(h.upstream.requests), 2)

    def test_bypass(self) -> None:
        """A request with credentials bypasses the cache (BYPASS), and its
        answer is not stored."""
        h = Handler()
        reply = h.get(WHEEL, [("Authorization", "Bearer x")])
        h.answer()
        self.assertEqual((reply.cache, reply.body), ("BYPASS", BODY))
        self.assertEqual(h.stored(WHEEL), [])

    def test_head_on_a_hit(self) -> None:
        """HEAD of a stored entry is answered from it: its length, no body."""
        h = Handler()
        h.fetch(WHEEL)
        reply = h.get(WHEEL, method="HEAD")
        self.assertEqual((reply.status, reply.cache), (200, "HIT"))
        self.assertEqual(reply.headers["content-length"], str(len(BODY)))
        self.assertEqual(reply.body, b"")
        self.assertEqual(len(h.upstream.requests), 1)


class MergedMirrorTests(TestCase):
    def test_root_page_merged(self) -> None:
        """A mirror of two upstreams serves the union of their root pages
        (a ServeBody through the document filter), links made local."""
        h = Handler(
            mirrors=(Mirror("/pypi/", ("https://one.test/", "https://two.test/")),)
        )
        reply = h.get("/pypi/simple/")
        self.assertEqual(h.requested(), ["https://one.test/simple/"])
        h.answer(
            [("Content-Type", "text/html")],
            body=b'<a href="https://one.test/simple/a/">a</a>',
        )
        self.assertEqual(h.requested()[1], "https://two.test/simple/")
        h.answer(
            [("Content-Type", "text/html")],
            body=b'<a href="https://two.test/simple/b/">b</a>',
        )
        self.assertEqual(reply.status, 200)
        self.assertIn(b"http://localhost:3128/pypi/simple/a/", reply.body)
        self.assertIn(b"http://localhost:3128/pypi/simple/b/", reply.body)


class RemoteHeadTests(TestCase):
    def test_remote_download_head_entry(self) -> None:
        """A download another worker runs is checked for joining like a
        local one: its published head as an entry, aged from the owner's
        claim (SPEC 5, 11)."""
        from cachingproxy.workers.claims import Claims, ClaimState
        from cachingproxy.workers.remote import RemoteDownload

        clock = Clock()
        clock.advance(START)
        cache_dir = self.mktemp()
        remote = RemoteDownload(
            url=PAGE,
            claims=Claims(cache_dir + "/claims", clock.seconds),
            cache_dir=cache_dir,
            clock=clock,
            take_over=lambda claim: None,
        )
        self.assertIsNone(remote.head_entry())
        remote._head = ClaimState(
            id="x",
            url=PAGE,
            pid=1,
            status=200,
            headers=(("Cache-Control", "max-age=10"), ("Age", "5")),
            started_at=START - 10,
        )
        entry = remote.head_entry()
        assert entry is not None
        self.assertEqual((entry.status, entry.initial_age), (200, 15.0))
