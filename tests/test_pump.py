"""Unit tests of cachingproxy.cache.pump: the one loop hits and followers share.

The source is a body growing by hand, the consumer a StringTransport, time a
task.Clock; no reactor runs.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cachingproxy.cache.pump import CHUNK_SIZE, CHUNKS_PER_TURN, Pump
from cachingproxy.errors import BodyMissing
from cachingproxy.interfaces import IBodySource


@implementer(IBodySource)
class GrowingBody:
    """A body the test appends to; records what the pump consumed."""

    def __init__(self, data: bytes = b"", complete: bool = False) -> None:
        self.data = data
        self.complete = complete
        self.failure: Failure | None = None
        self.consumed_upto = 0
        self.closed = 0

    @property
    def readable(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def consumed(self, offset: int) -> None:
        self.consumed_upto = offset

    def close(self) -> None:
        self.closed += 1


class PumpTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = StringTransport()

    def start(self, body: GrowingBody, start: int = 0, end: int | None = None):
        pump = Pump(self.client, body, start, end, self.clock)
        results: list[Failure | None] = []
        pump.start().addCallbacks(results.append, results.append)
        return pump, results

    def test_source_interface(self) -> None:
        """The test double is a complete IBodySource (the pump needs no more)."""
        self.assertTrue(verifyObject(IBodySource, GrowingBody()))

    def test_follows_a_growing_body(self) -> None:
        """Bytes are written as they become readable (on wake), consumption is
        reported, and the pump finishes once the source is complete."""
        body = GrowingBody(b"abc")
        pump, results = self.start(body)
        self.assertEqual(self.client.value(), b"abc")
        self.assertEqual(results, [])
        body.data += b"def"
        pump.wake()
        self.assertEqual(self.client.value(), b"abcdef")
        self.assertEqual(body.consumed_upto, 6)
        body.complete = True
        pump.wake()
        self.assertEqual(results, [None])
        self.assertEqual(body.closed, 1)
        self.assertIsNone(self.client.producer)

    def test_range_ends_before_the_body(self) -> None:
        """``[start, end)`` of a body still arriving: done at ``end``."""
        body = GrowingBody(b"0123456789")
        _, results = self.start(body, 2, 5)
        self.assertEqual(self.client.value(), b"234")
        self.assertEqual(results, [None])

    def test_yields_to_the_reactor_every_turn(self) -> None:
        """A consumer that never pauses gets CHUNKS_PER_TURN chunks per reactor
        turn; the rest follows when the clock runs the next turn."""
        size = (CHUNKS_PER_TURN + 2) * CHUNK_SIZE
        body = GrowingBody(b"x" * size, complete=True)
        _, results = self.start(body)
        self.assertEqual(len(self.client.value()), CHUNKS_PER_TURN * CHUNK_SIZE)
        self.assertEqual(results, [])
        self.clock.advance(0)
        self.assertEqual(len(self.client.value()), size)
        self.assertEqual(results, [None])

    def test_paused_consumer(self) -> None:
        """Nothing is written while paused; resuming carries on."""
        body = GrowingBody(b"abc")
        pump, _ = self.start(body)
        pump.pauseProducing()
        body.data += b"def"
        pump.wake()
        self.assertEqual(self.client.value(), b"abc")
        pump.resumeProducing()
        self.assertEqual(self.client.value(), b"abcdef")

    def test_source_failure(self) -> None:
        """Bytes already readable are written, then the source's failure ends
        the pump."""
        body = GrowingBody(b"abc")
        pump, results = self.start(body)
        body.data += b"d"
        body.failure = Failure(ConnectionDone("upstream went away"))
        pump.wake()
        self.assertEqual(self.client.value(), b"abcd")
        self.assertIs(results[0], body.failure)

    def test_truncated_source(self) -> None:
        """A source that claims bytes it cannot read ends with BodyMissing."""
        body = GrowingBody(b"abc", complete=True)
        body.read = lambda offset, length: b""  # type: ignore[method-assign]
        _, results = self.start(body)
        failure = results[0]
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(BodyMissing))
        self.assertEqual(body.closed, 1)

    def test_stopped_by_the_consumer(self) -> None:
        """stopProducing ends the pump with ConnectionDone, without
        unregistering, and releases the source once."""
        body = GrowingBody(b"abc")
        pump, results = self.start(body)
        pump.stopProducing()
        pump.stopProducing()
        failure = results[0]
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(ConnectionDone))
        self.assertEqual(body.closed, 1)
        self.assertIs(self.client.producer, pump)
