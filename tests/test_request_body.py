"""Request bodies are streamed upstream as they arrive (issue 10, D1):
never spooled to a temporary file, with backpressure both ways."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http import _ChunkedTransferDecoder, _IdentityTransferDecoder

from cachingproxy.front.channel import IDLE_TIMEOUT
from tests.support import pause, start_proxy
from tests.test_hardening import channels_on

MiB = 1024 * 1024
BLOCK = 256 * 1024
_PATTERN = [hashlib.sha256(b"%d" % i).digest() * (BLOCK // 32) for i in range(7)]


class SinkOrigin(Protocol):
    """An origin that hashes request bodies as they arrive (it spools
    nothing either) and answers each request with the body's sha256."""

    def __init__(self, state: Origin) -> None:
        self.state = state
        self.buffer = b""
        self.decoder: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        self.state.connections.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.decoder is not None:
            self.decoder.dataReceived(data)
            return
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        self.buffer = b""
        self.state.heads.append(head)
        if self.state.answer_early:
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly"
            )
            self.decoder = _IdentityTransferDecoder(
                None, lambda d: None, lambda r: None
            )
            return
        self.digest = hashlib.sha256()
        self.received = 0
        lines = head.lower().split(b"\r\n")
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                length = int(value)
            elif name.strip() == b"transfer-encoding":
                chunked = value.strip() == b"chunked"
        if chunked:
            self.decoder = _ChunkedTransferDecoder(self._chunk, self._done)
        elif length:
            self.decoder = _IdentityTransferDecoder(length, self._chunk, self._done)
        else:
            self._done(rest)
            return
        if rest:
            self.decoder.dataReceived(rest)

    def _chunk(self, data: bytes) -> None:
        if self.received == 0:
            self.state.first_byte(self)
        self.received += len(data)
        self.state.received += len(data)
        self.digest.update(data)
        if (
            self.state.stall_at is not None
            and self.state.received >= self.state.stall_at
        ):
            self.state.stall_at = None
            self.state.stalled = self
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _done(self, rest: bytes) -> None:
        self.decoder = None
        body = self.digest.hexdigest().encode()
        self.state.bodies.append(body)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if rest:
            self.dataReceived(rest)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.state.lost.append(self)


class Origin(Factory):
    def __init__(self) -> None:
        self.connections: list[SinkOrigin] = []
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.lost: list[SinkOrigin] = []
        self.received = 0
        self.stall_at: int | None = None
        self.answer_early = False
        self.stalled: SinkOrigin | None = None
        self.client: Uploader | None = None
        self.client_done_at_first_byte: bool | None = None

    def buildProtocol(self, addr: Any) -> SinkOrigin:  # noqa: N802
        return SinkOrigin(self)

    def first_byte(self, protocol: SinkOrigin) -> None:
        if self.client_done_at_first_byte is None and self.client is not None:
            self.client_done_at_first_byte = self.client.done


class Uploader(Protocol):
    """A client that sends a request head, then ``total`` body bytes as
    fast as its connection takes them (a pull producer: it blocks when the
    proxy does not read), then ``after``."""

    def __init__(
        self, head: bytes, total: int, *, chunked: bool = False, after: bytes = b""
    ) -> None:
        self.head = head
        self.total = total
        self.chunked = chunked
        self.after = after
        self.sent = 0
        self.done = False
        self.digest = hashlib.sha256()
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.stop_at: int | None = None
        self.stall_at: int | None = None

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.head)  # type: ignore[union-attr]
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:  # noqa: N802
        if self.done or self.transport is None:
            return
        if self.stop_at is not None and self.sent >= self.stop_at:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.stall_at is not None and self.sent >= self.stall_at:
            return  # nothing more, and the connection stays open
        block = _PATTERN[(self.sent // BLOCK) % len(_PATTERN)]
        block = block[: self.total - self.sent]
        self.sent += len(block)
        self.digest.update(block)
        if self.chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(block), block))  # type: ignore[union-attr]
        else:
            self.transport.write(block)  # type: ignore[union-attr]
        if self.sent >= self.total:
            self.done = True
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.write(  # type: ignore[union-attr]
                (b"0\r\n\r\n" if self.chunked else b"") + self.after
            )

    def stopProducing(self) -> None:  # noqa: N802
        pass

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.closed.callback(None)


async def wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pause(0.01)
        waited += 0.01


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """The status and Content-Length-delimited body of each response."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        out.append((int(lines[0].split()[1]), rest[:length]))
        raw = rest[length:]
    return out


class RequestBodyTests(TestCase):
    def setUp(self) -> None:
        # Anything twisted.web spools goes to a scratch directory, counted.
        self.scratch = os.path.abspath(self.mktemp())
        os.mkdir(self.scratch)
        self.patch(tempfile, "tempdir", self.scratch)
        self.spooled: list[Any] = []
        real = tempfile.TemporaryFile

        def counted(*args: Any, **kwargs: Any) -> Any:
            f = real(*args, **kwargs)
            self.spooled.append(f)
            return f

        self.patch(tempfile, "TemporaryFile", counted)
        self.origin = Origin()
        port = reactor.listenTCP(0, self.origin, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.oport = port.getHost().port
        self.proxy, self.pport = start_proxy(self, read_timeout=60.0)

    def assert_nothing_spooled(self) -> None:
        self.assertEqual(self.spooled, [])
        self.assertEqual(os.listdir(self.scratch), [])

    def head(self, length: int | None, path: str = "/upload") -> bytes:
        url = f"http://127.0.0.1:{self.oport}{path}"
        framing = (
            "Transfer-Encoding: chunked"
            if length is None
            else f"Content-Length: {length}"
        )
        return (
            f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{self.oport}\r\n{framing}\r\n\r\n"
        ).encode()

    async def upload(self, uploader: Uploader) -> Uploader:
        self.origin.client = uploader
        factory = ClientFactory.forProtocol(lambda: uploader)
        factory.noisy = False
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.pport).connect(factory)

        def close() -> Any:
            if uploader.transport is not None and not uploader.closed.called:
                uploader.transport.abortConnection()  # type: ignore[attr-defined]
                return uploader.closed
            return None

        self.addCleanup(close)
        return uploader

    async def test_large_upload_streamed_not_spooled(self) -> None:
        """64 MiB arrive byte-identical; the origin receives the first bytes
        before the client has sent the last; nothing is spooled."""
        total = 64 * MiB
        up = await self.upload(Uploader(self.head(total), total))
        await wait(lambda: responses(up.received), "the response")
        [(status, body)] = responses(up.received)
        self.assertEqual(status, 200)
        self.assertTrue(up.done)
        self.assertEqual(body, up.digest.hexdigest().encode())
        self.assertIs(self.origin.client_done_at_first_byte, False)
        self.assertIn(b"content-length: %d" % total, self.origin.heads[0].lower())
        self.assert_nothing_spooled()

    async def test_slow_origin_blocks_the_client(self) -> None:
        """While the origin does not read, the client's sending stops after
        what the socket buffers hold: the proxy does not buffer the body."""
        total = 64 * MiB
        self.origin.stall_at = 1 * MiB
        up = await self.upload(Uploader(self.head(total), total))
        await wait(lambda: self.origin.stalled is not None, "the origin to stall")
        last, steady = -1, 0
        while steady < 20:
            await pause(0.05)
            steady = steady + 1 if up.sent == last else 0
            last = up.sent
        self.assertFalse(up.done)
        self.assertLess(up.sent - self.origin.received, 32 * MiB)
        stalled = self.origin.stalled
        assert stalled is not None
        stalled.transport.resumeProducing()  # type: ignore[union-attr]
        await wait(lambda: responses(up.received), "the response")
        self.assertEqual(responses(up.received)[0][1], up.digest.hexdigest().encode())
        self.assert_nothing_spooled()

    async def test_chunked_upload(self) -> None:
        """A chunked body goes upstream chunked, byte-identical."""
        total = 3 * MiB + 17
        up = await self.upload(Uploader(self.head(None), total, chunked=True))
        await wait(lambda: responses(up.received), "the response")
        [(status, body)] = responses(up.received)
        self.assertEqual(status, 200)
        self.assertEqual(body, up.digest.hexdigest().encode())
        self.assertIn(b"transfer-encoding: chunked", self.origin.heads[0].lower())
        self.assert_nothing_spooled()

    async def test_client_hanging_up_aborts_the_upstream_request(self) -> None:
        total = 64 * MiB
        up = Uploader(self.head(total), total)
        up.stop_at = 2 * MiB
        await self.upload(up)
        await up.closed
        await wait(lambda: self.origin.lost, "the upstream connection to close")
        self.assertEqual(self.origin.bodies, [])
        self.assertLess(self.origin.received, total)
        self.assert_nothing_spooled()

    async def test_keep_alive_after_an_upload(self) -> None:
        """A request pipelined behind a streamed body is answered on the same
        connection."""
        total = 2 * MiB
        get = (
            f"GET http://127.0.0.1:{self.oport}/after HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\n\r\n"
        ).encode()
        up = await self.upload(Uploader(self.head(total), total, after=get))
        await wait(lambda: len(responses(up.received)) == 2, "two responses")
        (s1, b1), (s2, b2) = responses(up.received)
        self.assertEqual((s1, s2), (200, 200))
        self.assertEqual(b1, up.digest.hexdigest().encode())
        self.assertEqual(b2, hashlib.sha256().hexdigest().encode())
        self.assertFalse(up.closed.called)
        self.assertEqual(len(self.origin.heads), 2)
        self.assert_nothing_spooled()

    async def test_answer_before_the_body_is_complete(self) -> None:
        """An origin answering before reading the body: the client gets the
        answer with Connection: close, the upstream request is dropped."""
        total = 64 * MiB
        self.origin.answer_early = True
        up = await self.upload(Uploader(self.head(total), total))
        await wait(lambda: up.closed.called, "the client's connection to close")
        [(status, body)] = responses(up.received)
        self.assertEqual((status, body), (200, b"early"))
        self.assertIn(b"connection: close", up.received.lower())
        self.assertFalse(up.done)
        await wait(lambda: self.origin.lost, "the upstream connection to close")
        self.assert_nothing_spooled()

    async def test_refused_upstream_with_a_body(self) -> None:
        """A request the proxy refuses itself (upstream outside
        --allow-upstream) while its body streams in is answered and the
        connection closed; nothing is spooled."""
        total = 64 * MiB
        head = (
            "POST http://10.255.255.1/upload HTTP/1.1\r\nHost: 10.255.255.1\r\n"
            f"Content-Length: {total}\r\n\r\n"
        ).encode()
        up = await self.upload(Uploader(head, total))
        await wait(lambda: up.closed.called, "the client's connection to close")
        [(status, _)] = responses(up.received)
        self.assertEqual(status, 403)
        self.assertFalse(up.done)
        self.assertEqual(self.origin.heads, [])
        self.assert_nothing_spooled()

    async def test_stalled_body_times_out(self) -> None:
        """A client that stops sending in the middle of its body is cut off
        by the idle timeout (on the channels' Clock), and so is the upstream
        request: a streamed body does not hold connections open forever."""
        clock = Clock()
        assert self.proxy.site is not None
        channels_on(self.proxy.site, clock)
        total = 64 * MiB
        up = Uploader(self.head(total), total)
        up.stall_at = 2 * MiB
        await self.upload(up)
        await wait(lambda: self.origin.received >= 2 * MiB, "the first 2 MiB upstream")
        clock.advance(IDLE_TIMEOUT - 1)
        await pause(0.05)
        self.assertFalse(up.closed.called)
        clock.advance(2)
        await wait(lambda: up.closed.called, "the client's connection to close", 10)
        await wait(lambda: self.origin.lost, "the upstream connection to close")
        self.assertEqual(self.origin.bodies, [])
        self.assert_nothing_spooled()
