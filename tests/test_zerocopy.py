"""Zero-copy hits (issue 11): on plain TCP stored bodies go out with
``os.sendfile``, or for a loopback peer from mapped windows of the file, byte
for byte, whole and ranged, to slow readers, on kept-alive and pipelined
connections and from files cut short; TLS keeps the producer path and the
same bytes.  Every test of one way runs for the other too (the sendfile way
with the loopback choice patched out)."""

from __future__ import annotations

import hashlib
import ipaddress
import mmap
import os
import random
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import TestCase

from cachingproxy.cache.store import _sendfile
from cachingproxy.cache.store._sendfile import MAPPED, SENDFILE, WINDOW, Way
from cachingproxy.tls.ca import CA_CERT_FILE

from .support import (
    client,
    curl,
    fetch,
    header,
    need,
    parse_raw_response,
    pause,
    raw_connect,
    run,
    start_origin,
    start_proxy,
    stored,
    wait_for,
)
from .test_tls import Authority, HTTPSOrigin

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
PATH = "/big-1.0-py3-none-any.whl"


def body_of(size: int) -> bytes:
    """``size`` bytes that differ everywhere (a shifted range would show)."""
    return random.Random(size).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Counting:
    """Counts the sends of one way (``os.sendfile`` calls, or ``os.write``
    calls from mapped windows) and the bytes they sent, the other way's
    bytes, and the windows mapped."""

    def __init__(self, test: TestCase, way: Way = SENDFILE) -> None:
        self.calls = 0
        self.sent = 0
        self.other = 0
        self.maps: list[mmap.mmap] = []
        sendfile, write, mapping = os.sendfile, os.write, mmap.mmap

        def count(mine: bool, sent: int) -> int:
            self.calls += mine
            self.sent += sent if mine else 0
            self.other += 0 if mine else sent
            return sent

        def counted_sendfile(out: int, in_: int, offset: int, size: int) -> int:
            return count(way == SENDFILE, sendfile(out, in_, offset, size))

        def counted_write(fd: int, data: Any) -> int:
            if not isinstance(data, memoryview):
                return write(fd, data)
            return count(way == MAPPED, write(fd, data))

        def counted_mmap(*args: Any, **kwargs: Any) -> mmap.mmap:
            self.maps.append(mapping(*args, **kwargs))
            test.assertLessEqual(len(self.maps[-1]), WINDOW)
            return self.maps[-1]

        test.patch(os, "sendfile", counted_sendfile)
        test.patch(os, "write", counted_write)
        test.patch(mmap, "mmap", counted_mmap)

    def mapped(self) -> int:
        """Windows mapped and not yet unmapped."""
        return sum(not m.closed for m in self.maps)


def windows(start: int, end: int) -> int:
    """How many windows send ``[start, end)`` (the first starts on a page)."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    return -(-(end - base) // WINDOW)


async def stalled(counting: _Counting) -> None:
    """Wait until the sender has sent some bytes and then none for a while
    (the client's socket buffers are full)."""
    await wait_for(lambda: counting.sent > 0)
    for _ in range(100):
        sent = counting.sent
        await pause(0.1)
        if counting.sent == sent:
            return
    raise AssertionError("the sender never stopped for the stalled client")


class WayTests(TestCase):
    """The choice of way is the peer's address alone."""

    def test_loopback_is_mapped(self) -> None:
        for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertEqual(_sendfile.way_for(host), MAPPED, host)

    def test_others_use_sendfile(self) -> None:
        hosts = ("10.0.0.1", "192.168.1.2", "::ffff:10.1.2.3", "2001:db8::1")
        for host in (*hosts, "fe80::1%eth0", "0.0.0.0", "", "localhost"):
            self.assertEqual(_sendfile.way_for(host), SENDFILE, host)


class _Request:
    """The consumer side of a sender: a request whose head is set."""

    sentLength = 0  # noqa: N815 (twisted.web's name)

    def __init__(self) -> None:
        self.producer: Any = None
        self.writes: list[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class _Transport:
    """A plain TCP transport from a loopback peer, holding nothing."""

    dataBuffer, offset, _tempDataLen = b"", 0, 0  # noqa: N815

    def __init__(self, sock: socket.socket) -> None:
        self.fileno = sock.fileno

    def getPeer(self) -> IPv4Address:  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 40000)


class WindowTests(TestCase):
    """The mapped way, one writable event at a time."""

    def test_each_window_unmapped_once_sent(self) -> None:
        """A window is unmapped as soon as its last byte is written, not
        when the next one is needed; bytes and counts are exact."""
        self.patch(_sendfile, "WINDOW", 4 * mmap.ALLOCATIONGRANULARITY)
        self.patch(_sendfile, "SEND_PER_CALL", _sendfile.WINDOW)
        body = body_of(3 * _sendfile.WINDOW)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        fd = os.open(path, os.O_RDONLY)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        reactor, request = MemoryReactor(), _Request()
        counting = _Counting(self, MAPPED)
        released: list[int] = []
        start, end = 100, len(body) - 100
        sender = _sendfile.Sendfile(
            reactor, request, _Transport(ours), fd, lambda: released.append(fd),
            start, end,
        )  # fmt: skip
        done = sender.start()
        self.assertEqual((request.writes, reactor.getWriters()), ([b""], [sender]))
        got = b""
        while not released:
            sender.doWrite()
            got += theirs.recv(len(body))
            self.assertEqual(counting.mapped(), 0)
        os.close(fd)
        self.assertEqual(sha(got), sha(body[start:end]))
        self.assertEqual(len(counting.maps), 3)
        self.assertEqual(request.sentLength, end - start)
        self.assertEqual((reactor.getWriters(), request.producer), ([], None))
        self.assertIsNone(self.successResultOf(done))


class _PlainTCP:
    """Hits on a plain TCP connection go out the way ``way`` names (a mixin
    of the TestCases below, one per way)."""

    size = 3 * 1024 * 1024 + 12345
    way: Way

    def counting(self) -> _Counting:
        counting = _Counting(self, self.way)  # type: ignore[arg-type]
        self.addCleanup(lambda: self.assertEqual(counting.mapped(), 0))
        return counting

    def windows(self, counting: _Counting, *spans: tuple[int, int]) -> None:
        """The mapped way mapped one window per ``WINDOW`` of each span (and
        unmapped them all); the sendfile way mapped none."""
        want = sum(windows(*span) for span in spans) if self.way == MAPPED else 0
        self.assertEqual(len(counting.maps), want)
        self.assertEqual(counting.mapped(), 0)
        self.assertEqual(counting.other, 0)

    async def warm(self, size: int | None = None) -> tuple[Any, int, bytes, str]:
        body = body_of(size or self.size)
        origin, oport = start_origin(self)
        origin.static(PATH, body, [("Content-Type", "application/octet-stream")])
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}{PATH}"
        http = client(self, pport)
        response, got = await fetch(http, url)
        self.assertEqual(header(response, "x-cache"), "MISS")
        self.assertEqual(sha(got), sha(body))
        await stored(service, url)
        self.origin = origin
        return service, pport, body, url

    def get(self, url: str, *lines: str) -> bytes:
        head = [f"GET {url} HTTP/1.1", f"Host: {url.split('/')[2]}", *lines]
        return ("\r\n".join(head) + "\r\n\r\n").encode()

    def test_whole_and_ranged_hits(self) -> defer.Deferred[None]:
        """Whole and ranged HITs (open-ended, suffix, small) are the stored
        bytes exactly; the large ones went out this way, the access figures
        count every byte, and one connection carries them all."""
        return run(self._whole_and_ranged())

    async def _whole_and_ranged(self) -> None:
        service, pport, body, url = await self.warm()
        counting = self.counting()
        http = client(self, pport)
        size = len(body)
        served_before = service.proxy.stats.bytes_from_cache
        cases = [
            (None, 200, body, (0, size)),
            ("bytes=1000-2000999", 206, body[1000:2001000], (1000, 2001000)),
            ("bytes=777777-", 206, body[777777:], (777777, size)),
            ("bytes=-300001", 206, body[-300001:], (size - 300001, size)),
            ("bytes=5-104", 206, body[5:105], None),  # small: one write
        ]
        for value, status, want, _ in cases:
            headers = {"Range": value} if value else {}
            response, got = await fetch(http, url, headers)
            self.assertEqual(response.code, status, value)
            self.assertEqual(header(response, "x-cache"), "HIT")
            self.assertEqual(len(got), len(want), value)
            self.assertEqual(sha(got), sha(want), value)
            if value:
                first = value.split("=")[1]
                self.assertTrue(
                    header(response, "content-range").startswith("bytes "), first
                )
        large = sum(len(w) for _, _, w, _ in cases[:4])
        self.assertEqual(counting.sent, large)
        self.windows(counting, *(span for *_, span in cases[:4] if span))
        self.assertEqual(
            service.proxy.stats.bytes_from_cache - served_before,
            sum(len(w) for _, _, w, _ in cases),
        )
        self.assertEqual(self.origin.count(PATH), 1)
        self.assertEqual(size, self.size)

    def test_slow_reader(self) -> defer.Deferred[None]:
        """A client that stops reading fills the socket: the sender waits
        for it to be writable again (no busy loop, no lost or repeated
        byte; a mapped sender holds one window meanwhile)."""
        return run(self._slow_reader())

    async def _slow_reader(self) -> None:
        service, pport, body, url = await self.warm(24 * 1024 * 1024)
        counting = self.counting()
        raw = await raw_connect(self, pport, self.get(url), stalled=True)
        await stalled(counting)
        # Waiting for writability, not retrying in a loop.
        calls = counting.calls
        await pause(0.2)
        self.assertLessEqual(counting.calls - calls, 1)
        self.assertLess(counting.sent, len(body))
        self.assertEqual(counting.mapped(), 1 if self.way == MAPPED else 0)
        raw.resume()
        await wait_for(lambda: len(raw.received) >= len(body), timeout=30)
        await wait_for(lambda: counting.sent == len(body))
        status, headers, got = parse_raw_response(bytes(raw.received))
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-cache"], ["HIT"])
        self.assertEqual(sha(got), sha(body))
        store = service.store
        await wait_for(lambda: not store._readers)
        self.windows(counting, (0, len(body)))

    def test_pipelined_hits_keep_their_order(self) -> defer.Deferred[None]:
        """Two pipelined requests on one connection: each head is followed
        by its own body, the second after the whole first."""
        return run(self._pipelined())

    async def _pipelined(self) -> None:
        _, pport, body, url = await self.warm()
        counting = self.counting()
        one = self.get(url, "Range: bytes=100-")
        two = self.get(url, "Connection: close")
        raw = await raw_connect(self, pport, one + two)
        await raw.lost
        data = bytes(raw.received)
        status, headers, first = parse_raw_response(data)
        self.assertEqual(status, 206)
        self.assertEqual(headers["x-cache"], ["HIT"])
        self.assertEqual(sha(first), sha(body[100:]))
        rest = data[data.index(b"\r\n\r\n") + 4 + len(first) :]
        status, _, second = parse_raw_response(rest)
        self.assertEqual(status, 200)
        self.assertEqual(sha(second), sha(body))
        self.assertEqual(counting.sent, len(body) * 2 - 100)
        self.windows(counting, (100, len(body)), (0, len(body)))

    def test_client_gone_midway(self) -> defer.Deferred[None]:
        """A client that goes away during a hit: the body is released
        (nothing left reading it, no window left mapped) and the next
        client is served."""
        return run(self._gone())

    async def _gone(self) -> None:
        service, pport, body, url = await self.warm(24 * 1024 * 1024)
        counting = self.counting()
        raw = await raw_connect(self, pport, self.get(url), stalled=True)
        await stalled(counting)
        store = service.store
        self.assertTrue(store._readers)
        raw.transport.abortConnection()
        await wait_for(lambda: not store._readers)
        self.assertEqual(counting.mapped(), 0)
        self.assertEqual(_sendfile.MAPPED_NOW.used, 0)
        response, got = await fetch(client(self, pport), url)
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(sha(got), sha(body))

    def test_body_file_cut_short(self) -> defer.Deferred[None]:
        """A stored file shorter than its entry says (cut after the commit):
        the client gets a true prefix and a closed connection, never a byte
        past the end of the file (for a mapping: the size is checked before
        a window is mapped, so no SIGBUS kills this process), and the body
        is released."""
        return run(self._cut_short())

    async def _cut_short(self) -> None:
        service, pport, body, url = await self.warm()
        store = service.store
        (entry,) = await store.lookup(url)
        cut = WINDOW + WINDOW // 4
        os.truncate(store._body_path(entry.body_ref), cut)
        counting = self.counting()
        raw = await raw_connect(self, pport, self.get(url))
        await raw.lost
        status, headers, got = parse_raw_response(bytes(raw.received))
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], [str(len(body))])
        # sendfile sends up to the end of the file; the mapped way sends
        # the whole windows that the file still holds.  (The connection is
        # aborted: the client may get less.)
        self.assertEqual(counting.sent, cut if self.way == SENDFILE else WINDOW)
        self.assertLessEqual(len(got), counting.sent)
        self.assertEqual(sha(got), sha(body[: len(got)]))
        await wait_for(lambda: not store._readers)
        self.assertEqual(counting.mapped(), 0)
        self.assertEqual(_sendfile.MAPPED_NOW.used, 0)


class SendfileTests(_PlainTCP, TestCase):
    """Every peer but a loopback one: ``os.sendfile`` (the loopback choice
    patched out, since tests only have loopback)."""

    way = SENDFILE

    def setUp(self) -> None:
        self.patch(_sendfile, "way_for", lambda host: SENDFILE)


class MappedTests(_PlainTCP, TestCase):
    """A loopback peer (as chosen by ``way_for`` itself): writes from
    mapped windows of the file."""

    way = MAPPED

    def test_mapped_streams_are_bounded(self) -> defer.Deferred[None]:
        """Beyond ``MAPPED_STREAMS`` responses at once a process uses
        sendfile for the others: both ways at once, the same bytes, and the
        slots all given back."""
        return run(self._bounded())

    async def _bounded(self) -> None:
        self.patch(_sendfile, "MAPPED_STREAMS", 1)
        _, pport, body, url = await self.warm(24 * 1024 * 1024)
        counting = self.counting()
        one = await raw_connect(self, pport, self.get(url), stalled=True)
        await stalled(counting)
        two = await raw_connect(self, pport, self.get(url), stalled=True)
        await wait_for(lambda: counting.other > 0)
        self.assertEqual(_sendfile.MAPPED_NOW.used, 1)
        self.assertEqual(counting.mapped(), 1)
        for raw in (one, two):
            raw.resume()
        for raw in (one, two):
            await wait_for(lambda r=raw: len(r.received) >= len(body), timeout=30)
            _, _, got = parse_raw_response(bytes(raw.received))
            self.assertEqual(sha(got), sha(body))
        self.assertEqual((counting.sent, counting.other), (len(body), len(body)))
        await wait_for(lambda: _sendfile.MAPPED_NOW.used == 0)
        self.assertEqual(counting.mapped(), 0)


class TLSTests(TestCase):
    """Inside an intercepted TLS tunnel hits keep the producer path, with
    the same bytes."""

    def setUp(self) -> None:
        need("curl")
        self.public = Authority("test public CA")
        self.public_pem = self.public.write(self.mktemp())
        self.https = HTTPSOrigin(self, self.public.server_options())
        self.body = body_of(2 * 1024 * 1024 + 4321)
        self.https.origin.static(PATH, self.body)

    async def curl(self, pport: int, ca: str, *options: str) -> bytes:
        result = await curl(
            self.https.url(PATH),
            *("--cacert", ca, *options),
            proxy=pport,
            out=self.mktemp(),
        )
        self.assertEqual(result.code, 0, result.output)
        return result.body

    def test_tls_hits_whole_and_ranged(self) -> defer.Deferred[None]:
        return run(self._tls())

    async def _tls(self) -> None:
        service, pport = start_proxy(
            self,
            allow_upstream=(LOOPBACK,),
            upstream_ca=self.public_pem,
            connect_ports=frozenset({self.https.port}),
            intercept=("localhost",),
        )
        ca = os.path.join(service.config.cache_dir, CA_CERT_FILE)
        self.assertEqual(sha(await self.curl(pport, ca)), sha(self.body))
        await stored(service, self.https.url(PATH))
        counting = _Counting(self, MAPPED)
        self.assertEqual(sha(await self.curl(pport, ca)), sha(self.body))
        got = await self.curl(pport, ca, "-r", "300000-")
        self.assertEqual(sha(got), sha(self.body[300000:]))
        got = await self.curl(pport, ca, "-r", "-500000")
        self.assertEqual(sha(got), sha(self.body[-500000:]))
        self.assertEqual((counting.sent, counting.other, counting.maps), (0, 0, []))
        self.assertEqual(self.https.origin.count(PATH), 1)
        self.assertIsNone(_sendfile.socket_of(object()))
