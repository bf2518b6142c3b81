"""What a download turned into (:class:`Outcome`), and what to tell a
client when upstream failed."""

from __future__ import annotations

from enum import Enum

from attrs import frozen
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IResponse

from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.upstream import DNSLookupFailed


class OutcomeKind(Enum):
    """What a download turned into, from one waiting client's point of view."""

    STREAM = "stream"
    """A storable body is arriving: follow it."""
    NOT_MODIFIED = "not-modified"
    """The stale entry was refreshed by a 304: serve it."""
    ERROR = "error"
    """Upstream failed (``failure``) or answered 5xx (``status``)."""
    PASSTHROUGH = "passthrough"
    """An unstorable response, handed whole to the one client that asked first."""
    RETRY = "retry"
    """Not usable for this client (other variant, or passthrough taken): fetch alone."""


@frozen
class Outcome:
    """What a download (or an uncached request) got from upstream."""

    kind: OutcomeKind
    status: int = 0
    phrase: str = ""
    headers: tuple[Header, ...] = ()
    entry: StoredResponse | None = None
    failure: Failure | None = None
    response: IResponse | None = None


class Discard(Protocol):
    """Reads and drops a body we do not want (keeps the connection reusable)."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        pass


def describe(outcome: Outcome) -> str:
    if outcome.failure is not None:
        return outcome.failure.getErrorMessage()
    return f"upstream answered {outcome.status} {outcome.phrase}"


def error_status(outcome: Outcome) -> tuple[int, str]:
    """The status and message for a client when upstream failed."""
    if outcome.failure is None:
        if outcome.status:
            return (
                outcome.status,
                f"upstream answered {outcome.status} {outcome.phrase}",
            )
        return 502, "upstream response unusable"
    failure = outcome.failure
    if failure.check(ResponseNeverReceived):
        reasons = getattr(failure.value, "reasons", [])
        if reasons:
            failure = reasons[0]
    if failure.check(DestinationRefused):
        return 403, f"destination refused: {failure.getErrorMessage()}"
    if failure.check(UpstreamTimeout):
        return 504, f"upstream timed out: {failure.getErrorMessage()}"
    if failure.check(DNSLookupFailed, DNSLookupError):
        return 502, f"upstream name not found: {failure.getErrorMessage()}"
    if failure.check(ConnectError):
        return 502, f"cannot connect upstream: {failure.getErrorMessage()}"
    return 502, f"upstream failed: {failure.getErrorMessage()}"


__all__ = [
    "Discard",
    "Outcome",
    "OutcomeKind",
    "describe",
    "error_status",
]
