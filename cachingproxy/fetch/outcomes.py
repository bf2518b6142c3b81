"""What a download turned into (:class:`Outcome`), and what to tell a
client when upstream failed."""

from __future__ import annotations

from enum import Enum

from attrs import frozen
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseNeverReceived
from twisted.web.iweb import IResponse

from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.errors import DestinationRefused, DigestMismatch, UpstreamTimeout
from cachingproxy.fetch.upstream import DNSLookupFailed
from cachingproxy.mirror.rewrite import Digest
from cachingproxy.ops.stats import upstream_error_kind

_log = Logger()


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


def body_failure(
    url: str,
    reason: Failure,
    written: int,
    total: int | None,
    expected: Digest | None,
    actual: str | None,
) -> tuple[Failure, str] | None:
    """Why a body received from upstream is unusable, as (failure, error
    kind for the statistics); None when it is whole: it ended cleanly, its
    length matches ``total`` and its digest (``actual``) the one an index
    published (``expected``).  Logs why."""
    ok = reason.check(ResponseDone) or (
        reason.check(PotentialDataLoss) and total is None
    )
    if ok and total is not None and written != total:
        ok = False
    if not ok:
        _log.warn(
            "download of {url} broke off after {n} bytes: {why}",
            url=url,
            n=written,
            why=reason.getErrorMessage(),
        )
        return reason, upstream_error_kind(reason)
    if expected is not None and actual is not None and actual != expected[1]:
        _log.error(
            "digest mismatch for {url}: index published {algo} {expected},"
            " download has {actual}; not stored, clients cut off",
            url=url,
            algo=expected[0],
            expected=expected[1],
            actual=actual,
        )
        return Failure(DigestMismatch(url)), "broken"
    return None


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
    "body_failure",
    "describe",
    "error_status",
]
