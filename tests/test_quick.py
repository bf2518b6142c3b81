"""The lean hit path: plain repeat GETs answered from memory
(front/quick.py, handler/quick.py), and every way back to the request path."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store.disk import DiskStore
from cachingproxy.config import Rule
from cachingproxy.front.quick import SimpleGet, framed, simple_get
from cachingproxy.handler.quick import Prepared, QuickHits
from cachingproxy.interfaces import ICacheStore, IKnownLookups
from tests.support import (
    Origin,
    RawClient,
    _response_complete,
    parse_raw_response,
    raw_connect,
    run,
    start_origin,
    start_proxy,
    stored,
    wait_for,
)
from tests.test_mirror import WHEEL, demo_mirror

BODY = os.urandom(20_000)
PLAIN = "Host: {host}\r\nUser-Agent: pip/24\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n"


def head(target: str, host: str, extra: str = "", version: str = "1.1") -> bytes:
    fields = PLAIN.format(host=host)
    return f"GET {target} HTTP/{version}\r\n{fields}{extra}\r\n".encode()


class SimpleGetTests(SynchronousTestCase):
    """Which heads the lean front takes; everything else is the full
    parser's (with all of SPEC 8's checks)."""

    def test_plain_heads(self) -> None:
        self.assertEqual(
            simple_get(head("/pypi/x.whl", "cache:3128")),
            SimpleGet(b"/pypi/x.whl", b"cache:3128", b"HTTP/1.1", True),
        )
        self.assertEqual(
            simple_get(head("http://example.org/a?b=c", "example.org")),
            SimpleGet(b"http://example.org/a?b=c", b"example.org", b"HTTP/1.1", True),
        )
        heads = {
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive\r\n\r\n": (
                b"HTTP/1.1",
                True,
            ),
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n": (
                b"HTTP/1.1",
                False,
            ),
            b"GET / HTTP/1.0\r\nHost: h\r\n\r\n": (b"HTTP/1.0", False),
            b"GET / HTTP/1.0\r\nHost: h\r\nConnection: Keep-Alive\r\n\r\n": (
                b"HTTP/1.0",
                True,
            ),
            b"GET / HTTP/1.0\r\nHost: h\r\nConnection: close\r\n\r\n": (
                b"HTTP/1.0",
                False,
            ),
        }
        for data, (version, keep) in heads.items():
            self.assertEqual(simple_get(data), SimpleGet(b"/", b"h", version, keep))

    def test_framed(self) -> None:
        """The answer in the request's version, saying whether the
        connection stays open."""
        head_ = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"

        def framed_for(version: bytes, keep: bool) -> bytes:
            return framed(head_, b"x", SimpleGet(b"/", b"h", version, keep))

        self.assertEqual(framed_for(b"HTTP/1.1", True), head_ + b"\r\nx")
        self.assertEqual(
            framed_for(b"HTTP/1.1", False), head_ + b"Connection: close\r\n\r\nx"
        )
        self.assertEqual(
            framed_for(b"HTTP/1.0", True),
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\nx",
        )
        self.assertEqual(
            framed_for(b"HTTP/1.0", False),
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        )

    def test_everything_else_goes_to_the_full_parser(self) -> None:
        refused = [
            b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
            b"GET / HTTP/0.9\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # no Host
            b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n",
            b'GET / HTTP/1.1\r\nHost: h\r\nIf-None-Match: "x"\r\nIf-None-Match: "y"\r\n\r\n',
            b"GET / HTTP/1.1\r\nHost: h\r\nIf-Match: *\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nIf-Range: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nCache-Control: no-cache\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nPragma: no-cache\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.1 other\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic eA==\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, TE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\n b\r\n\r\n",  # obs-fold
            b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\nAccept: a\r\n\r\n",  # bare LF
            b"GET / HTTP/1.1\r\nHost: h\rX\r\n\r\n",  # bare CR
            b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET https://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n",  # not complete yet
            b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: " + b"a" * 9000 + b"\r\n\r\n",
        ]
        for data in refused:
            self.assertIsNone(simple_get(data), data)


class _Entries:
    """What a store knows of one URL (the seam QuickHits reads)."""

    def __init__(self, entry: StoredResponse) -> None:
        self.entries: list[StoredResponse] | None = [entry]
        self.touched = 0

    def known(self, url: str) -> list[StoredResponse] | None:
        return self.entries

    def touch(self, entry: StoredResponse) -> None:
        self.touched += 1


class AnswerTests(SynchronousTestCase):
    """QuickHits.answer makes the checks of a hit again, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.entry = StoredResponse(
            url="http://o/f",
            variant="",
            vary=(),
            status=200,
            headers=(("Content-Length", "3"),),
            stored_at=1000,
            initial_age=5,
            size=3,
        )
        self.store = _Entries(self.entry)
        self.allowed = True
        self.purge: object | None = None
        self.digest: tuple[str, str] | None = None
        self.records: list[tuple[str | None, float]] = []
        directlyProvides(self.store, ICacheStore, IKnownLookups)
        self.quick = QuickHits(
            self.store,  # type: ignore[arg-type]
            self.clock,
            reusable=lambda rule, entry, now: now < entry.stored_at + 60,
            allowed=lambda client: self.allowed,
            purging=lambda url: self.purge,
            expected=lambda url: self.digest,
            record=lambda client, ready, now, status, sent: self.records.append(
                (client, now)
            ),
        )
        self.quick._keep(
            (b"/f", b"o", "127.0.0.1", 80),
            Prepared(
                url="http://o/f",
                upstream="o",
                rule=Rule(re.compile(""), 60, name="r"),
                entry=self.entry,
                mirror=True,
                expected=None,
                head=b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",
                head304=b"HTTP/1.1 304 Not Modified\r\n",
                dated=False,
                body=b"abc",
            ),
        )

    def answer(self) -> tuple[bytes, bytes] | None:
        return self.quick.answer(b"/f", b"o", "127.0.0.1", ("127.0.0.1", 80))

    def test_answer_with_age(self) -> None:
        self.clock.advance(7)
        self.assertEqual(
            self.answer(),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nAge: 12\r\n", b"abc"),
        )
        self.assertEqual(self.records, [("127.0.0.1", 1007)])
        self.assertEqual(self.store.touched, 1)
        self.assertIsNone(
            self.quick.answer(b"/f", b"other", "127.0.0.1", ("127.0.0.1", 80))
        )
        self.assertIsNone(
            self.quick.answer(b"/f", b"o", "127.0.0.1", ("127.0.0.1", 81))
        )
        self.assertIsNone(
            self.quick.answer(b"/f", b"o", "127.0.0.1", ("127.0.0.2", 80))
        )

    def test_stale_is_not_answered(self) -> None:
        self.clock.advance(60)
        self.assertIsNone(self.answer())
        self.assertEqual(self.records, [])

    def test_each_check(self) -> None:
        self.allowed = False
        self.assertIsNone(self.answer())
        self.allowed = True
        self.purge = object()
        self.assertIsNone(self.answer())
        self.purge = None
        self.digest = ("sha256", "00")  # an index now publishes a digest
        self.assertIsNone(self.answer())
        self.digest = None
        self.store.entries = None  # the store would need I/O to tell
        self.assertIsNone(self.answer())
        self.store.entries = [self.entry]
        self.assertIsNotNone(self.answer())
        self.store.entries = [self.entry.replace(size=3)]  # replaced
        self.assertIsNone(self.answer())
        self.store.entries = [self.entry]
        self.assertIsNone(self.answer())  # forgotten with the replacement
        self.assertEqual(len(self.records), 1)


def _answered(raw: bytes) -> bool:
    """Whether ``raw`` holds one whole response (a 304 has no body)."""
    return (raw.startswith(b"HTTP/1.1 304 ") and b"\r\n\r\n" in raw) or (
        _response_complete(raw)
    )


class Conversation:
    """Requests one after another on one keep-alive connection."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    @classmethod
    async def open(cls, test: TestCase, port: int) -> Conversation:
        return cls(await raw_connect(test, port, b""))

    async def get(self, data: bytes) -> tuple[int, dict[str, list[str]], bytes]:
        self.client.received.clear()
        self.client.transport.write(data)  # type: ignore[union-attr]
        await wait_for(lambda: _answered(bytes(self.client.received)), 10)
        return parse_raw_response(bytes(self.client.received))


class RepeatHitTests(TestCase):
    """A real proxy and origin: what the memo answers, and when it steps
    aside."""

    def setUp(self) -> None:
        self.origin: Origin
        self.origin, self.origin_port = start_origin(self)
        self.origin.static(
            "/f.dat", BODY, [("Cache-Control", "max-age=3600")], etag='"v1"'
        )
        self.origin.static(
            "/v.dat",
            BODY,
            [("Cache-Control", "max-age=3600"), ("Vary", "Accept-Encoding")],
        )
        self.log = self.mktemp()
        self.service, self.port = start_proxy(self, access_log=self.log)
        self.url = f"http://127.0.0.1:{self.origin_port}/f.dat"
        self.host = f"127.0.0.1:{self.origin_port}"

    def logged(self) -> list[str]:
        """The access log lines of the origin's ``/f.dat``."""
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [line for line in f if "/f.dat" in line]

    @property
    def quick(self) -> Any:
        assert self.service.proxy is not None
        return self.service.proxy.quick

    async def warm(self, talk: Conversation, url: str | None = None) -> None:
        """A MISS, then a HIT from the request path (which the memo keeps)."""
        url = url or self.url
        status, headers, _ = await talk.get(head(url, self.host))
        self.assertEqual((status, headers["x-cache"]), (200, ["MISS"]))
        await stored(self.service, url)
        status, headers, _ = await talk.get(head(url, self.host))
        self.assertEqual((status, headers["x-cache"]), (200, ["HIT"]))

    def test_repeat_hits_from_memory(self) -> defer.Deferred[None]:
        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            await self.warm(talk)
            self.assertEqual(self.quick.answered, 0)
            for _ in range(3):
                status, headers, body = await talk.get(head(self.url, self.host))
                self.assertEqual(status, 200)
                self.assertEqual(
                    hashlib.sha256(body).digest(), hashlib.sha256(BODY).digest()
                )
                self.assertEqual(headers["x-cache"], ["HIT"])
                self.assertEqual(headers["content-length"], [str(len(BODY))])
                self.assertEqual(headers["etag"], ['"v1"'])
                self.assertIn("cachingproxy", headers["via"][0])
                self.assertEqual(len(headers["age"]), 1)
                self.assertEqual(len(headers["date"]), 1)
            self.assertEqual(self.quick.answered, 3)
            self.assertEqual(self.origin.count("/f.dat"), 1)
            # On another connection too, and counted like any hit.
            other = await Conversation.open(self, self.port)
            status, _, body = await other.get(head(self.url, self.host))
            self.assertEqual((status, body), (200, BODY))
            self.assertEqual(self.quick.answered, 4)
            stats = self.service.proxy.stats  # type: ignore[union-attr]
            self.assertEqual((stats.from_cache, stats.cache_misses), (5, 1))
            self.assertEqual(stats.bytes_from_cache, 5 * len(BODY))
            await wait_for(lambda: len(self.logged()) >= 6, 10)
            lines = self.logged()
            self.assertEqual(len(lines), 6)
            self.assertEqual(sum(" HIT " in line for line in lines), 5)

        return run(scenario())

    def test_heads_a_hit_depends_on_take_the_request_path(
        self,
    ) -> defer.Deferred[None]:
        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            await self.warm(talk)
            status, headers, body = await talk.get(
                head(self.url, self.host, "Range: bytes=0-9\r\n")
            )
            self.assertEqual((status, body), (206, BODY[:10]))
            # A client asking for a fresh copy revalidates upstream.
            status, headers, _ = await talk.get(
                head(self.url, self.host, "Cache-Control: no-cache\r\n")
            )
            self.assertEqual(headers["x-cache"], ["REVALIDATED"])
            self.assertEqual(self.origin.count("/f.dat"), 2)
            self.assertEqual(self.quick.answered, 0)
            # Two heads in one packet: the full parser, in order.
            data = head(self.url, self.host) + head(self.url, self.host)
            client = await raw_connect(self, self.port, data)
            await wait_for(lambda: client.received.count(BODY) >= 2, 10)
            self.assertEqual(client.received.count(BODY), 2)
            self.assertEqual(self.quick.answered, 0)

        return run(scenario())

    def test_a_purge_or_another_writer_is_seen(self) -> defer.Deferred[None]:
        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            await self.warm(talk)
            await talk.get(head(self.url, self.host))
            self.assertEqual(self.quick.answered, 1)
            await self.service.proxy.purge_url(self.url)  # type: ignore[union-attr]
            _, headers, body = await talk.get(head(self.url, self.host))
            self.assertEqual((headers["x-cache"], body), (["MISS"], BODY))
            self.assertEqual(self.origin.count("/f.dat"), 2)
            await stored(self.service, self.url)
            await talk.get(head(self.url, self.host))  # kept again
            await talk.get(head(self.url, self.host))
            self.assertEqual(self.quick.answered, 2)
            # Another process (a worker, cachingproxy-cache) drops the entry.
            other = DiskStore.open(self.service.config.cache_dir, reactor=reactor)
            await other.remove(self.url)
            await other.close()
            _, headers, body = await talk.get(head(self.url, self.host))
            self.assertEqual((headers["x-cache"], body), (["MISS"], BODY))
            self.assertEqual(self.quick.answered, 2)
            self.assertEqual(self.origin.count("/f.dat"), 3)

        return run(scenario())

    def test_conditionals_from_memory(self) -> defer.Deferred[None]:
        """``If-None-Match``/``If-Modified-Since`` on a kept hit: 304 when the
        entry satisfies them (the request path's 304 head: no
        Content-Length), else the whole body; logged with their status."""

        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            await self.warm(talk)
            stats = self.service.proxy.stats  # type: ignore[union-attr]
            cases = [
                ('If-None-Match: "v1"\r\n', 304),
                ('If-None-Match: W/"v1", "v0"\r\n', 304),
                ('If-None-Match: "v2"\r\n', 200),
                ("If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n", 200),
            ]
            for extra, expected in cases:
                status, headers, body = await talk.get(head(self.url, self.host, extra))
                self.assertEqual(status, expected, extra)
                self.assertEqual(headers["x-cache"], ["HIT"])
                self.assertEqual(headers["etag"], ['"v1"'])
                if expected == 304:
                    self.assertEqual(body, b"")
                    self.assertNotIn("content-length", headers)
                else:
                    self.assertEqual(body, BODY)
            self.assertEqual(self.quick.answered, 4)
            self.assertEqual(stats.from_cache, 5)
            self.assertEqual(stats.bytes_from_cache, 2 * len(BODY) + len(BODY))
            # The same 304 as the request path gives (memo forgotten).
            self.quick.clear()
            raw_304 = await talk.get(
                head(self.url, self.host, 'If-None-Match: "v1"\r\n')
            )
            self.assertEqual(self.quick.answered, 4)
            status, headers, body = raw_304
            self.assertEqual((status, body), (304, b""))
            self.assertNotIn("content-length", headers)
            await wait_for(lambda: len(self.logged()) >= 7, 10)
            statuses = [line.split()[4] for line in self.logged()]
            self.assertEqual(
                statuses, ["200", "200", "304", "304", "200", "200", "304"]
            )

        return run(scenario())

    def test_http10_and_connection_close(self) -> defer.Deferred[None]:
        """A client that closes (``Connection: close``, HTTP/1.0) gets the
        answer from memory in its version, told so, and the connection
        closed; an HTTP/1.0 keep-alive client keeps its connection."""

        async def once(data: bytes) -> tuple[bytes, int, dict[str, list[str]], bytes]:
            client = await raw_connect(self, self.port, data)
            await client.lost
            raw = bytes(client.received)
            return (raw, *parse_raw_response(raw))

        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            await self.warm(talk)
            for extra, version in (("Connection: close\r\n", "1.1"), ("", "1.0")):
                raw, status, headers, body = await once(
                    head(self.url, self.host, extra, version)
                )
                self.assertTrue(raw.startswith(f"HTTP/{version} 200 ".encode()))
                self.assertEqual((status, body), (200, BODY))
                self.assertEqual(headers["connection"], ["close"])
                self.assertEqual(headers["x-cache"], ["HIT"])
            self.assertEqual(self.quick.answered, 2)
            keep = await Conversation.open(self, self.port)
            for _ in range(2):
                status, headers, body = await keep.get(
                    head(self.url, self.host, "Connection: keep-alive\r\n", "1.0")
                )
                self.assertEqual((status, body), (200, BODY))
                self.assertEqual(headers["connection"], ["keep-alive"])
            self.assertFalse(keep.client.closed)
            self.assertEqual(self.quick.answered, 4)
            # The request path tells a closing client so as well.
            self.quick.clear()
            _, status, headers, body = await once(
                head(self.url, self.host, "Connection: close\r\n")
            )
            self.assertEqual(
                (status, body, headers["connection"]), (200, BODY, ["close"])
            )
            self.assertEqual(self.quick.answered, 4)
            self.assertEqual(self.origin.count("/f.dat"), 1)

        return run(scenario())

    def test_vary_is_never_kept(self) -> defer.Deferred[None]:
        async def scenario() -> None:
            talk = await Conversation.open(self, self.port)
            url = f"http://127.0.0.1:{self.origin_port}/v.dat"
            await self.warm(talk, url)
            for _ in range(2):
                _, headers, body = await talk.get(head(url, self.host))
                self.assertEqual((headers["x-cache"], body), (["HIT"], BODY))
            self.assertEqual(self.quick.answered, 0)

        return run(scenario())


class PublishedDigestTests(TestCase):
    """A mirror file kept before its index published a digest is kept again
    once the request path has checked it against that digest."""

    def test_kept_again_after_an_index_publishes(self) -> defer.Deferred[None]:
        async def scenario() -> None:
            _, _, service, port = demo_mirror(self, WHEEL)
            host = f"127.0.0.1:{port}"
            wheel = "/pypi/packages/demo-1.0-py3-none-any.whl"
            assert service.proxy is not None and service.proxy.quick is not None
            quick = service.proxy.quick
            talk = await Conversation.open(self, port)
            for cache in ("MISS", "HIT", "HIT"):
                _, headers, body = await talk.get(head(wheel, host))
                self.assertEqual((headers["x-cache"], body), ([cache], WHEEL))
                if cache == "MISS":
                    await stored(service, URL_OF(service, wheel))
            self.assertEqual(quick.answered, 1)
            status, _, _ = await talk.get(head("/pypi/simple/demo/", host))
            self.assertEqual(status, 200)  # publishes the wheel's sha256
            for _ in range(3):
                _, headers, body = await talk.get(head(wheel, host))
                self.assertEqual((headers["x-cache"], body), (["HIT"], WHEEL))
            # The first went the request path (checked against the digest
            # and kept again); the next two came from memory.
            self.assertEqual(quick.answered, 3)

        return run(scenario())


def URL_OF(service: Any, local: str) -> str:  # noqa: N802
    """The cache key of a mirrored local path."""
    assert service.proxy is not None
    match = service.proxy.mirrors.match(local)
    assert match is not None
    return str(match.key_url)
