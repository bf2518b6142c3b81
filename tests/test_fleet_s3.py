"""The S3 client against a real SeaweedFS: round trips, conditional writes,
multipart uploads and ranges."""

from __future__ import annotations

import hashlib
import os
from io import BytesIO
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, ResponseDone

from cachingproxy.fleet.layout import Location, parse_location
from cachingproxy.fleet.s3 import NoSuchKey, PreconditionFailed, S3Client, S3Error
from tests.seaweed import shared_seaweed

MiB = 1024 * 1024


class _Sha(Protocol):
    """Hashes a streamed body; counts the writes."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.writes = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.sha.update(data)
        self.size += len(data)
        self.writes += 1

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802,B008
        self.done.callback(None)


class _Source:
    """A BodySource over a file on disk: every try reads the bytes again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> FileBodyProducer:
        self.calls.append((start, end))
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)  # the test's file, small enough
        return FileBodyProducer(BytesIO(data))


class S3ClientTests(TestCase):
    """One weed server for the process, one bucket (SeaweedFS makes volumes
    per bucket and a test server has room for a few); keys of each test
    under its own prefix."""

    async def _client(self, **kwargs: Any) -> tuple[S3Client, str]:
        weed = shared_seaweed()
        client = S3Client(reactor, "fleet-tests", weed.endpoint, **kwargs)
        await client.create_bucket()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
        return client, f"t{os.urandom(6).hex()}/"

    async def test_round_trip(self) -> None:
        """PUT with metadata, HEAD, GET whole and ranged, LIST, DELETE."""
        client, p = await self._client()
        await client.put(p + "a/b c+d", b"hello world", metadata={"x": "1"})
        head = await client.head(p + "a/b c+d")
        assert head is not None
        self.assertEqual(head.getRawHeaders(b"x-amz-meta-x"), [b"1"])
        self.assertEqual(await client.get_bytes(p + "a/b c+d"), b"hello world")
        self.assertEqual(await client.get_bytes(p + "a/b c+d", 6, 11), b"world")
        self.assertEqual(await client.get_bytes(p + "a/b c+d", 2, 5), b"llo")
        await client.put(p + "a/z", b"z")
        await client.put(p + "b/y", b"y")
        listed = await client.list(p + "a/")
        self.assertEqual(
            [(o.key, o.size) for o in listed], [(p + "a/b c+d", 11), (p + "a/z", 1)]
        )
        after = await client.list(p + "a/", start_after=p + "a/b c+d")
        self.assertEqual([o.key for o in after], [p + "a/z"])
        await client.delete(p + "a/b c+d")
        self.assertIsNone(await client.head(p + "a/b c+d"))
        with self.assertRaises(NoSuchKey):
            await client.get_bytes(p + "a/b c+d")
        await client.delete(p + "a/b c+d")  # deleting what is gone is fine

    async def test_conditional_put(self) -> None:
        """If-None-Match: * writes once; the second writer gets 412 and the
        first writer's bytes stay."""
        client, p = await self._client()
        await client.put(p + "lease", b"first", if_none_match=True)
        with self.assertRaises(PreconditionFailed) as caught:
            await client.put(p + "lease", b"second", if_none_match=True)
        self.assertEqual(caught.exception.status, 412)
        self.assertEqual(await client.get_bytes(p + "lease"), b"first")

    async def test_multipart_streams_from_source(self) -> None:
        """An object over the threshold goes up in parts read from the
        source one at a time; it reads back whole, ranged and streamed; a
        conditional multipart upload on an existing key fails with 412."""
        client, p = await self._client(part_size=5 * MiB, multipart_threshold=6 * MiB)
        path = self.mktemp()
        data = os.urandom(12 * MiB + 123)
        with open(path, "wb") as f:
            f.write(data)
        source = _Source(path)
        await client.put(p + "big", source, len(data), if_none_match=True)
        self.assertEqual(
            source.calls, [(0, 5 * MiB), (5 * MiB, 10 * MiB), (10 * MiB, len(data))]
        )
        response = await client.get(p + "big")
        sha = _Sha()
        response.deliverBody(sha)
        await sha.done
        self.assertEqual(sha.size, len(data))
        self.assertEqual(sha.sha.hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertGreater(sha.writes, 1)  # streamed, not one lump
        middle = await client.get_bytes(p + "big", 5 * MiB - 10, 5 * MiB + 10)
        self.assertEqual(middle, data[5 * MiB - 10 : 5 * MiB + 10])
        with self.assertRaises(PreconditionFailed):
            await client.put(p + "big", _Source(path), len(data), if_none_match=True)

    async def test_unreachable(self) -> None:
        """A store that is not there: S3Error with status 0 after the retries."""
        from tests.support import free_port

        client = S3Client(
            reactor,
            "nothing",
            f"http://127.0.0.1:{free_port()}",
            retries=2,
            backoff=0.01,
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
        with self.assertRaises(S3Error) as caught:
            await client.get_bytes("x")
        self.assertEqual(caught.exception.status, 0)

    def test_parse_location(self) -> None:
        self.assertEqual(parse_location("s3://bkt"), Location("bkt", ""))
        self.assertEqual(parse_location("s3://bkt/a/b/"), Location("bkt", "a/b/"))
        for bad in ("http://bkt", "s3://", "s3://B_ad", "s3://bkt/a//b"):
            with self.assertRaises(ValueError):
                parse_location(bad)
