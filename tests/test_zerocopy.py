"""Zero-copy hits (issue 11): stored bodies go out with ``os.sendfile`` on
plain TCP, byte for byte, whole and ranged, to slow readers and on kept-alive
and pipelined connections; TLS keeps the producer path and the same bytes."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.cache.store import _sendfile
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
    """Counts ``os.sendfile`` calls (and the bytes they sent)."""

    def __init__(self, test: TestCase) -> None:
        self.calls = 0
        self.sent = 0
        original = os.sendfile

        def sendfile(out: int, in_: int, offset: int, count: int) -> int:
            self.calls += 1
            sent = original(out, in_, offset, count)
            self.sent += sent
            return sent

        test.patch(os, "sendfile", sendfile)


async def stalled(counting: _Counting) -> None:
    """Wait until sendfile has sent some bytes and then none for a while
    (the client's socket buffers are full)."""
    await wait_for(lambda: counting.sent > 0)
    for _ in range(100):
        sent = counting.sent
        await pause(0.1)
        if counting.sent == sent:
            return
    raise AssertionError("sendfile never stopped for the stalled client")


class PlainTCPTests(TestCase):
    """Hits on a plain TCP connection go through sendfile."""

    size = 3 * 1024 * 1024 + 12345

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

    def test_whole_and_ranged_hits(self) -> defer.Deferred[None]:
        """Whole and ranged HITs (open-ended, suffix, small) are the stored
        bytes exactly; the large ones went out through sendfile, the access
        figures count every byte, and one connection carries them all."""
        return run(self._whole_and_ranged())

    async def _whole_and_ranged(self) -> None:
        service, pport, body, url = await self.warm()
        counting = _Counting(self)
        http = client(self, pport)
        size = len(body)
        served_before = service.proxy.stats.bytes_from_cache
        cases = [
            (None, 200, body),
            ("bytes=1000-2000999", 206, body[1000:2001000]),
            ("bytes=777777-", 206, body[777777:]),
            ("bytes=-300001", 206, body[-300001:]),
            ("bytes=5-104", 206, body[5:105]),  # small: one write, no sendfile
        ]
        for value, status, want in cases:
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
        large = sum(len(w) for _, _, w in cases[:4])
        self.assertEqual(counting.sent, large)
        self.assertEqual(
            service.proxy.stats.bytes_from_cache - served_before,
            sum(len(w) for _, _, w in cases),
        )
        self.assertEqual(self.origin.count(PATH), 1)
        self.assertEqual(size, self.size)

    def test_slow_reader(self) -> defer.Deferred[None]:
        """A client that stops reading fills the socket: sendfile waits for
        it to be writable again (no busy loop, no lost or repeated byte)."""
        return run(self._slow_reader())

    async def _slow_reader(self) -> None:
        service, pport, body, url = await self.warm(24 * 1024 * 1024)
        counting = _Counting(self)
        request = f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n"
        raw = await raw_connect(self, pport, request.encode(), stalled=True)
        await stalled(counting)
        # Waiting for writability, not retrying in a loop.
        calls = counting.calls
        await pause(0.2)
        self.assertLessEqual(counting.calls - calls, 1)
        self.assertLess(counting.sent, len(body))
        raw.resume()
        await wait_for(lambda: len(raw.received) >= len(body), timeout=30)
        await wait_for(lambda: counting.sent == len(body))
        status, headers, got = parse_raw_response(bytes(raw.received))
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-cache"], ["HIT"])
        self.assertEqual(sha(got), sha(body))
        store = service.store
        await wait_for(lambda: not store._readers)

    def test_pipelined_hits_keep_their_order(self) -> defer.Deferred[None]:
        """Two pipelined requests on one connection: each head is followed
        by its own body, the second after the whole first."""
        return run(self._pipelined())

    async def _pipelined(self) -> None:
        _, pport, body, url = await self.warm()
        counting = _Counting(self)
        host = url.split("/")[2]
        one = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=100-\r\n\r\n"
        two = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        raw = await raw_connect(self, pport, (one + two).encode())
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

    def test_client_gone_midway(self) -> defer.Deferred[None]:
        """A client that goes away during a sendfile hit: the body is
        released (nothing left reading it) and the next client is served."""
        return run(self._gone())

    async def _gone(self) -> None:
        service, pport, body, url = await self.warm(24 * 1024 * 1024)
        counting = _Counting(self)
        request = f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n"
        raw = await raw_connect(self, pport, request.encode(), stalled=True)
        await stalled(counting)
        store = service.store
        self.assertTrue(store._readers)
        raw.transport.abortConnection()
        await wait_for(lambda: not store._readers)
        response, got = await fetch(client(self, pport), url)
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(sha(got), sha(body))


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
        counting = _Counting(self)
        self.assertEqual(sha(await self.curl(pport, ca)), sha(self.body))
        got = await self.curl(pport, ca, "-r", "300000-")
        self.assertEqual(sha(got), sha(self.body[300000:]))
        got = await self.curl(pport, ca, "-r", "-500000")
        self.assertEqual(sha(got), sha(self.body[-500000:]))
        self.assertEqual(counting.calls, 0)
        self.assertEqual(self.https.origin.count(PATH), 1)
        self.assertIsNone(_sendfile.socket_of(object()))
