"""Checks made as soon as a request head is complete, before its body is
read (issue 10, D1): who the client is, its credentials, and the declared
body size.

twisted.web reads a whole request body (spooling anything over 100 kB to a
temporary file) before the resource sees the request; without this gate a
client outside ``--allow-client``, or without ``--proxy-auth`` credentials,
could fill the temporary directory before being refused.  The request path
checks the same things again; the gate only refuses earlier.  Credentials are
checked here only for requests that announce a body: a body-less request
gets its ``407`` from the request path, on a connection kept alive for the
client's retry with credentials.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet import defer
from twisted.web.http_headers import Headers

from cachingproxy.cache import headers as H
from cachingproxy.config import Network
from cachingproxy.front.auth import CHALLENGE, ProxyAuth
from cachingproxy.front.limits import AllowedClients, client_allowed
from cachingproxy.front.routing import BadRequest, Listener, RouteKind, classify

MAX_REQUEST_BODY = 2 * 1024**3
"""The largest request body accepted (an upload through the proxy); larger
declared or received bodies get ``413``."""


@frozen
class Refusal:
    """The answer to a request refused at its head."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def declared_too_large(headers: Headers, limit: int = MAX_REQUEST_BODY) -> bool:
    """Whether the request's ``Content-Length`` exceeds ``limit``."""
    values = headers.getRawHeaders(b"content-length") or []
    pairs = [("content-length", v.decode("latin-1")) for v in values]
    length = H.content_length(pairs)
    return length is not None and length > limit


def has_body(headers: Headers) -> bool:
    """Whether a request head announces a body (chunked or a length > 0)."""
    if headers.hasHeader(b"transfer-encoding"):
        return True
    values = headers.getRawHeaders(b"content-length") or []
    return any(v.strip() not in (b"", b"0") for v in values)


class HeadGate:
    """The head-time checks of one proxy's configuration."""

    def __init__(
        self,
        allow_client: tuple[Network, ...],
        auth: ProxyAuth | None,
        names: frozenset[str],
    ) -> None:
        self._allowed = AllowedClients(allow_client)
        self._auth = auth
        self._names = names

    def check(
        self,
        client: str | None,
        local: tuple[str, int],
        method: bytes,
        target: bytes,
        headers: Headers,
        intercepted: bool,
    ) -> Refusal | defer.Deferred[Refusal | None] | None:
        """A Refusal, None to read the body, or a Deferred of either (a
        password check in progress)."""
        if client is not None and not self._allowed(client):
            return Refusal(403, "client not allowed")
        if declared_too_large(headers):
            return Refusal(413, "request body too large")
        if (
            self._auth is None
            or intercepted
            or not has_body(headers)  # the request path answers 407 as usual
            or not self._needs_auth(local, method, target, headers)
        ):
            return None
        header = headers.getRawHeaders(b"proxy-authorization")
        d = self._auth.check(header[0] if header else None, client or "-")
        refusal = Refusal(
            407, "proxy authentication required", (("Proxy-Authenticate", CHALLENGE),)
        )
        checked: defer.Deferred[Refusal | None] = d.addCallback(
            lambda user: None if user is not None else refusal
        )
        if checked.called:
            result: list[Refusal | None] = []
            checked.addCallback(result.append)
            return result[0]
        return checked

    def streams(
        self, local: tuple[str, int], method: bytes, target: bytes, headers: Headers
    ) -> bool:
        """Whether the body of this request is streamed upstream as it
        arrives (front/upload.py) instead of read whole first: a body-carrying
        method (not GET/HEAD) addressed upstream (not to the proxy itself,
        not a CONNECT)."""
        if method in (b"GET", b"HEAD", b"CONNECT") or not has_body(headers):
            return False
        return self._needs_auth(local, method, target, headers)

    def _needs_auth(
        self, local: tuple[str, int], method: bytes, target: bytes, headers: Headers
    ) -> bool:
        """Everything but requests addressed to the proxy itself (its pages
        and mirrors) needs credentials; a head the router refuses is left to
        the request path (400)."""
        hosts = headers.getRawHeaders(b"host") or []
        try:
            route = classify(
                method.decode("latin-1"),
                target.decode("latin-1"),
                hosts[0].decode("latin-1") if len(hosts) == 1 else None,
                Listener(local[0], local[1], self._names),
            )
        except (BadRequest, UnicodeDecodeError):
            return False
        return route.kind is not RouteKind.SELF


__all__ = [
    "MAX_REQUEST_BODY",
    "HeadGate",
    "Refusal",
    "client_allowed",
    "declared_too_large",
    "has_body",
]
