"""One upstream fetch per object in a fleet (SPEC 12): leases, live streaming
between nodes, a lease holder killed mid-download."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.fleetnodes import Node, make_bucket, objects, start_nodes, wait_until
from tests.seaweed import shared_seaweed
from tests.support import (
    RawClient,
    StoppableOrigin,
    parse_raw_response,
    pause,
    raw_connect,
    streaming,
)

MiB = 1024 * 1024


def _body_started(client: RawClient) -> bool:
    _head, sep, rest = bytes(client.received).partition(b"\r\n\r\n")
    return bool(sep) and len(rest) > 0


async def _request(test: TestCase, port: int, url: str) -> RawClient:
    authority = url.split("/", 3)[2]
    data = f"GET {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    return await raw_connect(test, port, data.encode())


class LeaseTests(TestCase):
    timeout = 240

    def test_concurrent_cold_clients(self) -> defer.Deferred[None]:
        """12 cold clients spread over 3 nodes: one origin GET; every client,
        on every node, has its first bytes while the origin still holds the
        rest back; all get the whole, correct body."""
        return defer.Deferred.fromCoroutine(self._concurrent())

    async def _concurrent(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(4 * MiB)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.origin.route("/big-1.0.tar.gz", streaming(body, gate=gate))
        url = f"http://127.0.0.1:{origin.port}/big-1.0.tar.gz"
        nodes = await start_nodes(self, weed, prefix)
        clients = []
        for i in range(12):
            clients.append(await _request(self, nodes[i % 3].port, url))
        try:
            await wait_until(
                lambda: defer.succeed(all(map(_body_started, clients))), 60
            )
        finally:
            gate.callback(None)
        for c in clients:
            await c.lost
        digest = hashlib.sha256(body).hexdigest()
        for c in clients:
            status, _, got = parse_raw_response(bytes(c.received))
            self.assertEqual(status, 200)
            self.assertEqual(hashlib.sha256(got).hexdigest(), digest)
        self.assertEqual(origin.origin.count("/big-1.0.tar.gz"), 1)

        async def uploaded() -> bool:
            return len(await objects(s3, prefix)) == 1

        await wait_until(uploaded, 30)
        [(_, _, size)] = await objects(s3, prefix)
        self.assertEqual(size, len(body))
        self.assertEqual(origin.origin.count("/big-1.0.tar.gz"), 1)

    def test_holder_killed_mid_download(self) -> defer.Deferred[None]:
        """kill -9 of the node holding the lease mid-download: another node
        serves the whole, correct body once the lease expired (bounded by the
        request's own timeout), and the bucket never holds a partial object."""
        return defer.Deferred.fromCoroutine(self._killed())

    async def _killed(self) -> None:
        weed = shared_seaweed()
        s3, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(3 * MiB)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.origin.route("/pkg-2.0.whl", streaming(body, gate=gate))
        url = f"http://127.0.0.1:{origin.port}/pkg-2.0.whl"
        a, b, _c = await start_nodes(self, weed, prefix)
        first = await _request(self, a.port, url)
        await wait_until(lambda: defer.succeed(_body_started(first)), 30)
        follower = await _request(self, b.port, url)
        await wait_until(lambda: defer.succeed(_body_started(follower)), 30)
        await a.kill("KILL")
        self.assertEqual(await objects(s3, prefix), [])  # nothing partial
        origin.origin.route("/pkg-2.0.whl", streaming(body))
        await follower.lost  # cut off with the holder
        again = await _request(self, b.port, url)
        await defer.Deferred.fromCoroutine(_lost(again)).addTimeout(40, reactor)
        status, _, got = parse_raw_response(bytes(again.received))
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(body).digest())
        self.assertEqual(origin.origin.count("/pkg-2.0.whl"), 2)

        async def uploaded() -> bool:
            return len(await objects(s3, prefix)) == 1

        await wait_until(uploaded, 30)
        for _key, _size, body_size in await objects(s3, prefix):
            self.assertEqual(body_size, len(body))
        gate.callback(None)


async def _lost(client: RawClient) -> None:
    await client.lost


class SetUpsTests(TestCase):
    """Leases with other node set-ups: workers, no --advertise."""

    timeout = 240

    def test_nodes_with_workers(self) -> defer.Deferred[None]:
        """Two nodes of two workers each: 8 concurrent cold clients cause one
        origin GET, all have their first bytes while the origin holds the rest
        back (a peer's request may reach any worker of the holder), and all
        get the whole body (leases between nodes, claims between workers)."""
        return defer.Deferred.fromCoroutine(self._workers())

    async def _workers(self) -> None:
        weed = shared_seaweed()
        _, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(2 * MiB)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.origin.route("/w-1.0.tar.gz", streaming(body, gate=gate))
        url = f"http://127.0.0.1:{origin.port}/w-1.0.tar.gz"
        nodes = await start_nodes(self, weed, prefix, 2, "--workers", "2")
        clients = [await _request(self, nodes[i % 2].port, url) for i in range(8)]
        try:
            await wait_until(
                lambda: defer.succeed(all(map(_body_started, clients))), 60
            )
        finally:
            gate.callback(None)
        for c in clients:
            await c.lost
        for c in clients:
            status, _, got = parse_raw_response(bytes(c.received))
            self.assertEqual((status, got == body), (200, True))
        self.assertEqual(origin.origin.count("/w-1.0.tar.gz"), 1)

    def test_without_advertise_the_others_wait(self) -> defer.Deferred[None]:
        """Nodes without --advertise: a cold request on the second node waits
        for the first node's object instead of fetching (one origin GET) and
        is served that object whole."""
        return defer.Deferred.fromCoroutine(self._no_advertise())

    async def _no_advertise(self) -> None:
        weed = shared_seaweed()
        _, prefix = await make_bucket(self, weed)
        origin = StoppableOrigin(self)
        body = os.urandom(1 * MiB)
        gate: defer.Deferred[None] = defer.Deferred()
        origin.origin.route("/q-1.0.tar.gz", streaming(body, gate=gate))
        url = f"http://127.0.0.1:{origin.port}/q-1.0.tar.gz"
        a, b = (Node(self, weed, prefix, advertise=False) for _ in range(2))
        for node in (a, b):
            await node.wait_listening(60)
        first = await _request(self, a.port, url)
        await wait_until(lambda: defer.succeed(_body_started(first)), 30)
        second = await _request(self, b.port, url)
        await pause(1.0)
        self.assertFalse(_body_started(second))  # waiting, not fetching
        gate.callback(None)
        for c in (first, second):
            await c.lost
            status, _, got = parse_raw_response(bytes(c.received))
            self.assertEqual((status, got == body), (200, True))
        self.assertEqual(origin.origin.count("/q-1.0.tar.gz"), 1)
