"""Leases: one upstream download per URL in the whole fleet (SPEC 12).

A node that is about to download a URL writes ``leases/<hash of the URL>``
with ``If-None-Match: *``; the store lets exactly one such write succeed.
The lease says who holds it, where the others can stream the bytes from
(``--advertise``) and until when it holds (``expires``, renewed every
:data:`RENEW_EVERY` seconds while the download runs, deleted when it is over).
A lease past its ``expires`` belongs to a dead node: it is deleted and taken
again by a conditional write, so a crashed holder delays the others by at
most :data:`LEASE_TTL` seconds (plus the clocks' disagreement).
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet import defer, task
from twisted.logger import Logger

from cachingproxy.fleet import layout
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.s3 import NoSuchKey, PreconditionFailed, S3Client, S3Error
from cachingproxy.fleet.shared import QUICK

_log = Logger()

LEASE_TTL = 20.0
"""Seconds a lease holds without renewal."""
RENEW_EVERY = 5.0


@frozen
class Holder:
    """Another node's live lease."""

    node: str
    advertise: str | None
    expires: float


class Lease:
    """A lease this node holds: renewed until :meth:`release`."""

    def __init__(self, leases: Leases, key: str, url: str) -> None:
        self._leases = leases
        self.key = key
        self.url = url
        self._renewer = task.LoopingCall(self._renew)
        self._renewer.clock = leases.clock
        self._renewer.start(RENEW_EVERY, now=False).addErrback(
            lambda f: _log.failure("lease renewal stopped", f)
        )
        self.released = False

    def _renew(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._write())

    async def _write(self) -> None:
        try:
            await self._leases.client.put(self.key, self._leases.record())
        except S3Error as e:
            self._leases.health.failed(e)

    def release(self) -> defer.Deferred[None]:
        """Stop renewing and delete the lease (idempotent)."""
        if self.released:
            return defer.succeed(None)
        self.released = True
        if self._renewer.running:
            self._renewer.stop()
        self._leases.held.pop(self.url, None)
        return defer.Deferred.fromCoroutine(self._delete())

    async def _delete(self) -> None:
        try:
            await self._leases.client.delete(self.key)
        except S3Error as e:
            self._leases.health.failed(e)


class Leases:
    """Takes and inspects leases under ``prefix``."""

    def __init__(
        self,
        client: S3Client,
        prefix: str,
        health: Health,
        clock: Any,
        node: str,
        advertise: str | None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.health = health
        self.clock = clock
        self.node = node
        self.advertise = advertise
        self.held: dict[str, Lease] = {}

    def record(self) -> bytes:
        return json.dumps(
            {
                "node": self.node,
                "advertise": self.advertise,
                "expires": self.clock.seconds() + LEASE_TTL,
            }
        ).encode()

    async def acquire(self, url: str) -> Lease | Holder | None:
        """Take the lease of ``url``: the Lease, or the live Holder that has
        it, or None when the store cannot be asked (then nobody coordinates)."""
        key = layout.lease_key(self.prefix, url)
        for _ in range(3):
            try:
                await self.client.put(
                    key, self.record(), if_none_match=True, retries=QUICK
                )
            except PreconditionFailed:
                pass
            except S3Error as e:
                self.health.failed(e)
                return None
            else:
                self.health.succeeded()
                lease = self.held[url] = Lease(self, key, url)
                return lease
            try:
                holder = self._parse(
                    await self.client.get_bytes(key, limit=4096, retries=QUICK)
                )
            except NoSuchKey:
                continue  # released meanwhile: try again
            except S3Error as e:
                self.health.failed(e)
                return None
            if holder is not None and holder.expires > self.clock.seconds():
                return holder
            _log.info(
                "lease of {url} expired (holder {node}); taking it over",
                url=url,
                node=holder.node if holder else "?",
            )
            try:
                await self.client.delete(key)
            except S3Error as e:
                self.health.failed(e)
                return None
        return None

    @staticmethod
    def _parse(data: bytes) -> Holder | None:
        try:
            record = json.loads(data)
            advertise = record.get("advertise")
            return Holder(
                node=str(record["node"]),
                advertise=str(advertise) if advertise else None,
                expires=float(record["expires"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def release_all(self) -> defer.Deferred[Any]:
        """On shutdown: let the others have every lease at once."""
        return defer.gatherResults(
            [lease.release() for lease in list(self.held.values())],
            consumeErrors=True,
        )


__all__ = ["LEASE_TTL", "RENEW_EVERY", "Holder", "Lease", "Leases"]
