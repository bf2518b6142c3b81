"""Three ``twistd cachingproxy`` nodes sharing one bucket of a real SeaweedFS
(tests of SPEC 12)."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cachingproxy.fleet import layout
from cachingproxy.fleet.s3 import S3Client
from tests.seaweed import CREDENTIALS, Seaweed
from tests.support import (
    TWISTD,
    ChildServer,
    checkout_env,
    client,
    fetch,
    free_port,
    own_page,
    raw_get,
)

BUCKET = "fleet-tests"
"""One bucket for every test (SeaweedFS makes volumes per bucket, and a test
server has room for a few): each test has its own prefix in it."""
SECRET = "a-fleet-secret-of-some-length"


class Node(ChildServer):
    """One node: ``twistd -n cachingproxy --shared-store …`` on loopback."""

    ready = "cachingproxy listening on"

    def __init__(
        self,
        test: TestCase,
        weed: Seaweed,
        prefix: str,
        *options: str,
        advertise: bool = True,
    ) -> None:
        port = free_port()
        cwd = os.path.abspath(test.mktemp())
        os.makedirs(cwd)
        secret = os.path.join(cwd, "secret")
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        self.cache_dir = os.path.abspath(os.path.join(cwd, "cache"))
        self.url = f"http://127.0.0.1:{port}"
        argv = [
            *TWISTD,
            "-n",
            "--pidfile=",
            "cachingproxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--cache-dir",
            self.cache_dir,
            "--allow-upstream",
            "127.0.0.1",
            "--allow-client",
            "127.0.0.1",
            "--workers",
            "1",
            "--shared-store",
            f"s3://{BUCKET}/{prefix}",
            "--s3-endpoint",
            weed.endpoint,
            "--fleet-secret",
            secret,
            *(["--advertise", self.url] if advertise else []),
            *options,
        ]
        super().__init__(test, argv, port, env=checkout_env(**CREDENTIALS), path=cwd)
        self.log_path = os.path.join(cwd, "node.log")
        test.addCleanup(self._keep_log)

    def _keep_log(self) -> None:
        """The node's output, kept next to its cache for a look after a run."""
        with open(self.log_path, "wb") as f:
            f.write(self.output)

    async def status(self, test: TestCase) -> dict[str, Any]:
        _, body = await own_page(test, self.port, "/status.json")
        return dict(json.loads(body))

    async def get(
        self, test: TestCase, url: str, headers: str = ""
    ) -> tuple[int, dict[str, list[str]], bytes]:
        """``raw_get`` through this node (``headers``: extra CRLF-ended lines)."""
        return await raw_get(test, self.port, url, headers)


async def make_bucket(test: TestCase, weed: Seaweed) -> tuple[S3Client, str]:
    """A client of the test bucket on ``weed`` (closed by a cleanup) and a new
    prefix in it for this test."""
    from twisted.internet import defer

    s3 = S3Client(reactor, BUCKET, weed.endpoint, retries=1, backoff=0.05)
    await s3.create_bucket()
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(s3.close()))
    return s3, f"t{os.urandom(6).hex()}/"


async def objects(s3: S3Client, prefix: str) -> list[tuple[str, int, int]]:
    """The entry objects under ``prefix``: (key, object size, body size in its
    metadata)."""
    found = []
    for item in await s3.list(prefix + "objects/"):
        head = await s3.get_bytes(item.key, 0, layout.HEADER_PROBE)
        entry = layout.decode_header(head, item.key)
        found.append((item.key, item.size, entry.size))
    return found


async def start_nodes(
    test: TestCase, weed: Seaweed, prefix: str, count: int = 3, *options: str
) -> list[Node]:
    nodes = [Node(test, weed, prefix, *options) for _ in range(count)]
    for node in nodes:
        await node.wait_listening(60)
    return nodes


async def wait_until(condition: Any, timeout: float) -> None:
    """support.wait_for at a pace an object store can take (every 0.2 s)."""
    from tests.support import wait_for

    await wait_for(condition, timeout, step=0.2)


__all__ = [
    "BUCKET",
    "SECRET",
    "Node",
    "client",
    "fetch",
    "make_bucket",
    "objects",
    "start_nodes",
    "wait_until",
]
