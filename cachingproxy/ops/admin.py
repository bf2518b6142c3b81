"""Admin actions on the proxy's own surface: purging entries (SPEC 9)."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.server import Request

from cachingproxy.cache.policy import BadURL, normalize_url
from cachingproxy.front.responses import send_error, set_head
from cachingproxy.front.surface import Surface

_log = Logger()


_RELAYED = (b"via", b"forwarded", b"x-forwarded-for")


def arrived_through_proxy(request: Request) -> bool:
    """Whether a request was relayed by a proxy (``Via``, ``Forwarded``,
    ``X-Forwarded-For``, or an absolute-form target, which only proxies and
    proxy clients send): its loopback peer is not the operator (SPEC 9)."""
    uri: bytes = getattr(request, "uri", b"/")
    return not uri.startswith(b"/") or any(
        request.getHeader(name) is not None for name in _RELAYED
    )


def is_authorised(request: Request, token: str | None) -> bool:
    """Local clients (loopback or a UNIX socket) that did not come through a
    proxy, or ``Authorization: Bearer TOKEN`` when a token is set."""
    if arrived_through_proxy(request):
        return _bearer(request, token)
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return True  # a UNIX socket: only local users can reach it
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and ip.is_loopback:
        return True
    return _bearer(request, token)


def _bearer(request: Request, token: str | None) -> bool:
    """``Authorization: Bearer TOKEN`` with the configured token."""
    if token is None:
        return False
    supplied = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, value = supplied.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


async def purge(request: Request, query: str, surface: Surface) -> None:
    """``DELETE /cache?url=URL`` or ``?prefix=URL``: answer ``{"removed": N}``."""
    if not is_authorised(request, surface.config.admin_token):
        _log.warn(
            "refused purge from {client}",
            client=getattr(request.getClientAddress(), "host", "?"),
        )
        send_error(request, 403, "purge not allowed", via=surface.via)
        return
    args = parse_qs(query, keep_blank_values=True)
    urls, prefixes = args.get("url", []), args.get("prefix", [])
    if len(urls) + len(prefixes) != 1:
        send_error(
            request,
            400,
            "give exactly one of url= or prefix=",
            via=surface.via,
        )
        return
    if urls:
        try:
            url = normalize_url(urls[0])
        except BadURL as e:
            send_error(request, 400, str(e), via=surface.via)
            return
        removed = await surface.purge_url(url)
        what = url
    else:
        prefix = prefixes[0]
        if prefix.count("/") >= 3:
            with contextlib.suppress(BadURL):
                # Normalise the scheme and host part the same way keys are.
                prefix = normalize_url(prefix)
        else:
            # Only a scheme and (part of) a host: keys have them in lower case.
            prefix = prefix.lower()
        removed = await surface.purge_prefix(prefix)
        what = f"prefix {prefix}"
    _log.info("purged {what}: {n} entries", what=what, n=removed)
    body = json.dumps({"removed": removed}).encode()
    set_head(
        request,
        200,
        [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        via=surface.via,
        length=len(body),
    )
    request.write(body)
    request.finish()
