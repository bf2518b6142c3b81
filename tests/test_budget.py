"""The disk budget end to end: LRU eviction under concurrent downloads, bodies
too big to store, and a disk that fills up (SPEC 1 ``--max-size``,
``--max-object-size``; SPEC 5).

A real origin, a real proxy and real clients on 127.0.0.1, with a
``DiskStore`` (or a ``MemoryStore`` with a capacity, to stand for a full
disk).
"""

from __future__ import annotations

import os
import random
import sqlite3
from typing import Any

from twisted.internet import defer
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import readBody
from zope.interface import implementer

from cachingproxy.cache.store import MemoryStore
from cachingproxy.fetch import download as download_module
from cachingproxy.fetch.spill import Spill
from cachingproxy.service import ProxyService

from .support import (
    Origin,
    client,
    downloads_done,
    fetch,
    header,
    parse_raw_response,
    raw_connect,
    start_origin,
    start_proxy,
    start_proxy_with_store,
    stored,
    streaming,
    wait_for,
)

KiB = 1024
MiB = 1024 * KiB


def _body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _on_disk(cache_dir: str) -> tuple[int, int, list[str]]:
    """Count and bytes of the committed body files, and the names in ``tmp/``."""
    count = size = 0
    for shard in os.scandir(os.path.join(cache_dir, "bodies")):
        for item in os.scandir(shard.path):
            count += 1
            size += item.stat().st_size
    return count, size, os.listdir(os.path.join(cache_dir, "tmp"))


def _index_totals(cache_dir: str) -> tuple[int, int]:
    """Rows and summed sizes in the index, read by a separate connection."""
    db = sqlite3.connect(f"file:{cache_dir}/index.sqlite?mode=ro", uri=True)
    try:
        rows, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
        ).fetchone()
    finally:
        db.close()
    return rows, size


async def _stalled_get(test: TestCase, pport: int, url: str) -> Any:
    """A raw GET of ``url`` through the proxy from a client that reads nothing
    until resumed."""
    authority = url.split("/", 3)[2]
    request = f"GET {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    return await raw_connect(test, pport, request.encode(), stalled=True)


async def _whole_body(test: TestCase, stalled: Any, expected: bytes) -> None:
    """Resume a stalled client and check it gets status 200 and ``expected``."""
    stalled.resume()
    await wait_for(lambda: stalled.closed, timeout=20)
    status, _, body = parse_raw_response(bytes(stalled.received))
    test.assertEqual(status, 200)
    test.assertEqual(len(body), len(expected))
    test.assertEqual(body, expected)


class BudgetTests(TestCase):
    def at_rest(self, service: ProxyService) -> None:
        """The store keeps to its budget at rest, and its figures agree with
        the index and with the files on disk (no leaked body, no temp file)."""
        store = service.store
        assert store is not None
        usage = store.usage()
        assert usage.max_size is not None
        self.assertLessEqual(usage.bytes, usage.max_size)
        cache_dir = service.config.cache_dir
        self.assertEqual(_index_totals(cache_dir), (usage.entries, usage.bytes))
        self.assertEqual(_on_disk(cache_dir), (usage.entries, usage.bytes, []))

    async def test_concurrent_downloads_stay_within_budget(self) -> None:
        """18 files of 200 KiB through a 1 MiB budget, 16 of them fetched at
        once while other clients read (and stall on) hits: every client gets
        the exact bytes, and at rest the store holds at most 1 MiB."""
        origin, oport = start_origin(self)
        bodies = {f"/f{i:02d}-1.0.whl": _body(200 * KiB, seed=i) for i in range(18)}
        for path, body in bodies.items():
            origin.route(path, streaming(body, chunk=16 * KiB))
        service, pport = start_proxy(self, max_size=1 * MiB)
        url = {path: f"http://127.0.0.1:{oport}{path}" for path in bodies}
        hot, cold = list(bodies)[:2], list(bodies)[2:]
        http = client(self, pport)
        for path in hot:
            await fetch(http, url[path])
            await stored(service, url[path])
        stalled = [await _stalled_get(self, pport, url[path]) for path in hot]

        async def get(path: str) -> str | None:
            response, got = await fetch(client(self, pport), url[path])
            self.assertEqual((response.code, len(got)), (200, len(bodies[path])))
            self.assertEqual(got, bodies[path])
            return header(response, "x-cache")

        seen = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(get(p)) for p in cold + hot * 3]
        )
        self.assertEqual(seen[: len(cold)], ["MISS"] * len(cold))
        for client_, path in zip(stalled, hot, strict=True):
            await _whole_body(self, client_, bodies[path])
        await downloads_done(service)
        self.at_rest(service)
        assert service.store is not None
        usage = service.store.usage()
        self.assertGreaterEqual(usage.entries, 3)
        self.assertLess(usage.entries, len(bodies))
        # Hot entries may have been evicted and fetched again meanwhile.
        self.assertGreaterEqual(origin.count(), len(bodies))

    async def test_entry_being_read_is_not_evicted(self) -> None:
        """A stored body that a slow client is still reading is never evicted
        under it, though least recently used; once the read is over it is
        evicted like any other entry, and the budget holds at rest."""
        origin, oport = start_origin(self)
        # Bigger than what the kernel buffers for a stalled loopback client,
        # so the read stays open until the client resumes.
        big = _body(8 * MiB, seed=100)
        origin.static("/big-1.0.whl", big)
        small = {f"/s{i:02d}-1.0.whl": _body(512 * KiB, seed=i) for i in range(12)}
        for path, body in small.items():
            origin.route(path, streaming(body, chunk=32 * KiB))
        service, pport = start_proxy(self, max_size=10 * MiB)
        store = service.store
        assert store is not None
        big_url = f"http://127.0.0.1:{oport}/big-1.0.whl"
        url = {path: f"http://127.0.0.1:{oport}{path}" for path in small}
        paths = list(small)
        http = client(self, pport)
        await fetch(http, big_url)
        await stored(service, big_url)
        reader = await _stalled_get(self, pport, big_url)
        # White-box: the store counts the bodies being read.
        await wait_for(lambda: bool(store._readers))  # type: ignore[attr-defined]
        # A slow client of a download too: its body is not in the index yet.
        follower = await _stalled_get(self, pport, url[paths[0]])
        responses = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(fetch(client(self, pport), url[p]))
                for p in paths[:8]
            ]
        )
        for path, (response, got) in zip(paths[:8], responses, strict=True):
            self.assertEqual((header(response, "x-cache"), got), ("MISS", small[path]))
        await downloads_done(service)
        self.assertLess(store.usage().entries, 9, "nothing was evicted")
        self.assertNotEqual(await store.lookup(big_url), [])
        self.assertTrue(store._readers, "the read is over already")  # type: ignore[attr-defined]
        await _whole_body(self, reader, big)
        await _whole_body(self, follower, small[paths[0]])
        await wait_for(lambda: not store._readers)  # type: ignore[attr-defined]
        # Now unread and least recently used, the big entry goes first when
        # 2 MiB more pass the 10 MiB budget.
        for path in paths[8:]:
            await fetch(client(self, pport), url[path])
            await stored(service, url[path])
        self.assertEqual(await store.lookup(big_url), [])
        for path in paths[8:]:
            self.assertNotEqual(await store.lookup(url[path]), [], path)
        self.at_rest(service)
        response, got = await fetch(client(self, pport), big_url)
        self.assertEqual((header(response, "x-cache"), got), ("MISS", big))

    async def test_budget_restored_when_the_last_read_ends(self) -> None:
        """When the only entry that could make room is being read, a commit
        may take the store past its budget; as soon as that read ends the
        store evicts back under it, without waiting for a periodic flush."""
        origin, oport = start_origin(self)
        big = _body(8 * MiB, seed=200)
        other = _body(3 * MiB, seed=201)
        origin.static("/big-1.0.whl", big)
        origin.static("/other-1.0.whl", other)
        service, pport = start_proxy(self, max_size=10 * MiB)
        store = service.store
        assert store is not None
        big_url = f"http://127.0.0.1:{oport}/big-1.0.whl"
        other_url = f"http://127.0.0.1:{oport}/other-1.0.whl"
        await fetch(client(self, pport), big_url)
        await stored(service, big_url)
        reader = await _stalled_get(self, pport, big_url)
        await wait_for(lambda: bool(store._readers))  # type: ignore[attr-defined]
        response, got = await fetch(client(self, pport), other_url)
        self.assertEqual((header(response, "x-cache"), got), ("MISS", other))
        await stored(service, other_url)
        self.assertEqual(store.usage().bytes, len(big) + len(other))
        await _whole_body(self, reader, big)
        # The end of the read evicts at once (synchronously), not at a flush.
        await wait_for(lambda: not store._readers)  # type: ignore[attr-defined]
        self.at_rest(service)
        self.assertEqual(await store.lookup(big_url), [])

    async def test_hits_keep_a_hot_entry(self) -> None:
        """LRU: an entry hit between downloads stays while entries stored
        after it but never hit are evicted."""
        origin, oport = start_origin(self)
        bodies = {f"/l{i}-1.0.whl": _body(200 * KiB, seed=i) for i in range(9)}
        for path, body in bodies.items():
            origin.static(path, body)
        service, pport = start_proxy(self, max_size=1 * MiB)
        url = {path: f"http://127.0.0.1:{oport}{path}" for path in bodies}
        hot, *cold = list(bodies)
        http = client(self, pport)
        for path in [hot, *cold]:
            response, _ = await fetch(http, url[path])
            self.assertEqual(header(response, "x-cache"), "MISS")
            await stored(service, url[path])
            response, got = await fetch(http, url[hot])
            self.assertEqual((header(response, "x-cache"), got), ("HIT", bodies[hot]))
        assert service.store is not None
        kept = [p for p in bodies if await service.store.lookup(url[p])]
        self.assertEqual(kept, [hot, *cold[-4:]])
        self.assertEqual(origin.count(hot), 1)
        self.at_rest(service)


class TooBigTests(TestCase):
    """Bodies larger than the whole budget or than ``max_object_size``
    stream through to the client unstored."""

    async def streams_through(self, **config: Any) -> None:
        origin, oport = start_origin(self)
        big = _body(400 * KiB, seed=7)
        origin.static("/big-1.0.whl", big)
        origin.route("/chunked-1.0.whl", streaming(big, chunk=32 * KiB, length=False))
        origin.static("/small-1.0.whl", b"s" * 50_000)
        service, pport = start_proxy(self, **config)
        assert service.store is not None
        for path, body, expected in [
            ("/big-1.0.whl", big, ["MISS", "MISS"]),
            ("/chunked-1.0.whl", big, ["MISS", "MISS"]),
            ("/small-1.0.whl", b"s" * 50_000, ["MISS", "HIT"]),
        ]:
            url = f"http://127.0.0.1:{oport}{path}"
            seen = []
            for _ in range(2):
                response, got = await fetch(client(self, pport), url)
                self.assertEqual((response.code, got), (200, body))
                seen.append(header(response, "x-cache"))
                await downloads_done(service)
            self.assertEqual(seen, expected, path)
        self.assertEqual(service.store.usage().entries, 1)
        self.assertEqual(origin.count("/big-1.0.whl"), 2)
        self.assertEqual(origin.count("/chunked-1.0.whl"), 2)
        tmp = os.path.join(service.config.cache_dir, "tmp")
        self.assertEqual(os.listdir(tmp), [])

    async def test_larger_than_the_budget(self) -> None:
        """A body bigger than ``max_size`` (declared or not) is not stored."""
        await self.streams_through(max_size=256 * KiB)

    async def test_larger_than_max_object_size(self) -> None:
        """A body bigger than ``max_object_size`` is not stored."""
        await self.streams_through(max_size=64 * MiB, max_object_size=256 * KiB)


@implementer(ILogObserver)
class _Errors:
    """Collects the text of error-level log events."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.texts.append(formatEvent(event))


class DiskFullTests(TestCase):
    """A store that runs out of space mid-download (ENOSPC), played by a
    ``MemoryStore`` with a capacity smaller than the body."""

    def setUp(self) -> None:
        self.errors = _Errors()
        globalLogPublisher.addObserver(self.errors)
        self.addCleanup(globalLogPublisher.removeObserver, self.errors)

    def start(self, origin: Origin, capacity: int) -> tuple[ProxyService, int]:
        origin.static("/after-1.0.whl", b"a" * 30_000)
        return start_proxy_with_store(self, MemoryStore(capacity=capacity))

    async def still_serving(
        self, service: ProxyService, pport: int, oport: int
    ) -> None:
        """Nothing of the big file is stored and a small one is cached."""
        assert service.store is not None
        self.assertEqual(service.store.usage().entries, 0)
        url = f"http://127.0.0.1:{oport}/after-1.0.whl"
        http = client(self, pport)
        seen = []
        for _ in range(2):
            response, got = await fetch(http, url)
            self.assertEqual((response.code, got), (200, b"a" * 30_000))
            seen.append(header(response, "x-cache"))
            await stored(service, url)
        self.assertEqual(seen, ["MISS", "HIT"])

    async def test_clients_get_the_body_when_the_store_fills(self) -> None:
        """Five clients sharing a download that the store cannot hold all get
        the whole body; a client arriving after the store filled gets it too;
        nothing is stored, an error is logged, and the proxy goes on
        serving and caching."""
        origin, oport = start_origin(self)
        body = _body(1 * MiB, seed=8)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.route("/full-1.0.whl", streaming(body, chunk=32 * KiB, gate=gate))
        service, pport = self.start(origin, capacity=256 * KiB)
        url = f"http://127.0.0.1:{oport}/full-1.0.whl"
        http = client(self, pport)
        responses = await defer.gatherResults([http.get(url) for _ in range(5)])
        self.assertEqual(origin.count("/full-1.0.whl"), 1)
        gate.callback(None)
        assert service.proxy is not None
        download = service.proxy.downloads.in_flight[url]
        await wait_for(lambda: download._spill is not None or download.done)
        late, late_body = await fetch(client(self, pport), url)
        bodies = await defer.gatherResults([readBody(r) for r in responses])
        for got in [*bodies, late_body]:
            self.assertEqual(len(got), len(body))
            self.assertEqual(got, body)
        self.assertEqual({header(r, "x-cache") for r in [*responses, late]}, {"MISS"})
        await downloads_done(service)
        assert service.store is not None
        self.assertEqual(await service.store.lookup(url), [])
        self.assertTrue(
            any(url in text and "cannot store" in text for text in self.errors.texts),
            self.errors.texts,
        )
        await self.still_serving(service, pport, oport)

    async def test_spill_is_bounded_by_a_slow_client(self) -> None:
        """When the store is full, the bytes kept for a client that does not
        read are bounded: the upstream is paused, not buffered; when the
        client reads again, it and a fast client both get the whole body."""
        limit = 128 * KiB
        peak = [0]

        class SmallSpill(Spill):
            def __init__(self, base: int) -> None:
                super().__init__(base, limit=limit)

            def append(self, data: bytes) -> None:
                super().append(data)
                peak[0] = max(peak[0], self.buffered)

        self.patch(download_module, "Spill", SmallSpill)
        origin, oport = start_origin(self)
        body = _body(12 * MiB, seed=9)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.route("/spill-1.0.whl", streaming(body, chunk=64 * KiB, gate=gate))
        service, pport = self.start(origin, capacity=256 * KiB)
        url = f"http://127.0.0.1:{oport}/spill-1.0.whl"
        slow = await _stalled_get(self, pport, url)
        assert service.proxy is not None
        in_flight = service.proxy.downloads.in_flight
        await wait_for(lambda: url in in_flight and in_flight[url].clients == 1)
        fast = await client(self, pport).get(url)
        fast_body = readBody(fast)
        gate.callback(None)
        download = in_flight[url]
        await wait_for(lambda: download._spill is not None)
        # The slow client holds the download back (bounded memory) ...
        await wait_for(lambda: _upstream_paused(download))
        self.assertFalse(download.done)
        self.assertLessEqual(peak[0], limit + 512 * KiB)
        # ... until it reads again.
        await _whole_body(self, slow, body)
        self.assertEqual(await fast_body, body)
        await downloads_done(service)
        self.assertLessEqual(peak[0], limit + 512 * KiB)
        self.assertEqual(origin.count("/spill-1.0.whl"), 1)
        await self.still_serving(service, pport, oport)


def _upstream_paused(download: Any) -> bool:
    """Whether ``download`` stopped reading its upstream (the spill is full)."""
    receiver = download._receiver
    return receiver is not None and receiver._paused
