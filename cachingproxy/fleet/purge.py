"""Purges across the fleet: a log under the prefix that every node polls.

A purge on any node deletes the shared objects itself and appends one small
object, ``purges/<epoch ms>-<node>-<random>``, holding what was purged; every
node lists the log every :data:`POLL_EVERY` seconds and removes the same from
its local tier.  Why a log: object stores have no notifications that work
the same on AWS, MinIO, Ceph and SeaweedFS, and a node cannot be told
directly (it may be down, or behind a NAT); a listing of recent keys is one
cheap request that every S3 implementation answers the same way, and it
doubles as the health probe of the store.  Each poll lists the last
:data:`WINDOW` seconds of the log (keys sort by time), remembering which
records it applied, so clocks that disagree by less than that lose nothing.
Old records are only read, never needed: a bucket lifecycle rule (or
:meth:`PurgeLog.prune`) deletes them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from cachingproxy.fleet import layout
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.s3 import NoSuchKey, S3Client, S3Error

_log = Logger()

POLL_EVERY = 2.0
WINDOW = 120.0
"""Seconds of the log each poll reads."""
KEEP = 24 * 3600.0
"""Records older than this are deleted by :meth:`PurgeLog.prune`."""


class PurgeLog:
    """Publishes this node's purges and applies the others'."""

    def __init__(
        self,
        client: S3Client,
        prefix: str,
        health: Health,
        clock: Any,
        node: str,
        apply: Callable[[dict[str, str]], defer.Deferred[Any]],
    ) -> None:
        self._client = client
        self._dir = layout.purge_dir(prefix)
        self._health = health
        self._clock = clock
        self._node = node
        self._apply = apply
        self._seen: dict[str, float] = {}
        self._poller = task.LoopingCall(self.poll)
        self._poller.clock = clock
        self._polls = 0

    def start(self) -> None:
        self._poller.start(POLL_EVERY, now=True).addErrback(
            lambda f: _log.failure("the purge log poller stopped", f)
        )

    def stop(self) -> None:
        if self._poller.running:
            self._poller.stop()

    def _key(self, when: float) -> str:
        return f"{self._dir}{int(when * 1000):015d}"

    def publish(self, record: dict[str, str]) -> defer.Deferred[None]:
        """Tell the other nodes (in the background; errors only logged)."""
        key = f"{self._key(self._clock.seconds())}-{self._node}-{secrets.token_hex(4)}"
        self._seen[key] = self._clock.seconds()
        return defer.Deferred.fromCoroutine(self._put(key, record))

    async def _put(self, key: str, record: dict[str, str]) -> None:
        try:
            await self._client.put(key, json.dumps(record).encode())
        except S3Error as e:
            self._health.failed(e)
            _log.warn("purge of {what} not published: {e}", what=record, e=e)

    def poll(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        now = self._clock.seconds()
        try:
            listed = await self._client.list(
                self._dir, start_after=self._key(now - WINDOW), retries=0
            )
        except S3Error as e:
            self._health.failed(e)
            return
        self._health.succeeded()
        for item in listed:
            if item.key in self._seen:
                continue
            self._seen[item.key] = now
            try:
                record = json.loads(await self._client.get_bytes(item.key, limit=65536))
            except (NoSuchKey, ValueError):
                continue
            except S3Error as e:
                self._health.failed(e)
                del self._seen[item.key]
                return
            if isinstance(record, dict):
                _log.info("purge from the fleet: {record}", record=record)
                await self._apply(record)
        for key, when in list(self._seen.items()):
            if when < now - 2 * WINDOW:
                del self._seen[key]
        self._polls += 1
        if self._polls % 1800 == 0:
            await self.prune()

    async def prune(self) -> None:
        """Delete records older than :data:`KEEP` (any node may)."""
        try:
            for item in await self._client.list(self._dir):
                if item.key >= self._key(self._clock.seconds() - KEEP):
                    break
                await self._client.delete(item.key)
        except S3Error as e:
            self._health.failed(e)


__all__ = ["POLL_EVERY", "WINDOW", "PurgeLog"]
