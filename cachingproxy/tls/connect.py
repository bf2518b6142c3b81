"""CONNECT (SPEC 7): byte-for-byte tunnels, or TLS interception of chosen hosts."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cachingproxy.cache.policy import BadURL, normalize_url
from cachingproxy.cache.status import CacheStatus
from cachingproxy.fetch.outcomes import Outcome, OutcomeKind, error_status
from cachingproxy.front.exchange import Exchange
from cachingproxy.front.responses import client_gone
from cachingproxy.front.routing import BadRequest, Route, RouteKind, split_host
from cachingproxy.front.surface import Surface
from cachingproxy.tls.tunnel import Tunnel

_log = Logger()

TUNNEL_IDLE_TIMEOUT = 600.0
"""Seconds a tunnel may carry nothing either way before it is closed."""

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def parse_authority(authority: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT (the port is required)."""
    host, port = split_host(authority, 0)
    if port == 0:
        raise BadRequest(f"CONNECT needs host:port, not {authority!r}")
    return host.strip("[]"), port


def intercepted_route(target: str, authority: tuple[str, int]) -> Route:
    """How a request inside an intercepted tunnel is served: as a forward
    request to ``https://host/…`` (the CONNECT's host, whatever Host says)."""
    host, port = authority
    if target.lower().startswith("https://"):
        url = target
    elif target.startswith("/"):
        netloc = f"[{host}]" if ":" in host else host
        url = f"https://{netloc}:{port}{target}"
    else:
        raise BadRequest(f"bad request target {target[:100]!r} inside a tunnel")
    try:
        url = normalize_url(url)
    except BadURL as e:
        raise BadRequest(str(e)) from None
    if url.split("/", 3)[2].split(":")[0].strip("[]") != host.lower():
        raise BadRequest("request inside a tunnel names another host")
    return Route(RouteKind.FORWARD, url=url)


def _finish_without_response(request: Request) -> None:
    """End the CONNECT request: the 200 was written raw, nothing more."""
    request.code = 200
    request.startedWriting = 1
    request.channel.persistent = True
    request.finish()


async def handle_connect(
    surface: Surface, request: Request, authority: str, info: Exchange
) -> None:
    """Serve ``CONNECT authority``: intercept, tunnel, or refuse."""
    try:
        host, port = parse_authority(authority)
    except BadRequest as e:
        return surface.error(request, 400, str(e), info, CacheStatus.NONE)
    info.url = authority
    info.upstream = authority
    if surface.intercepts(host) and surface.ca is not None and surface.ca.permits(host):
        try:
            context = surface.ca.context_factory(host)
        except ValueError as e:
            _log.warn("cannot intercept {host}: {e}", host=host, e=e)
        else:
            return _intercept(surface, request, host, port, context, info)
    if port not in surface.config.connect_ports:
        _log.info("refused CONNECT to {a}: port not allowed", a=authority)
        return surface.error(
            request,
            403,
            f"CONNECT to port {port} is not allowed",
            info,
            CacheStatus.NONE,
        )
    channel: Any = request.channel  # channel.Channel
    info.tunnel = True
    started = surface.clock.seconds()

    def closed(up: int, down: int) -> None:
        surface.stats.record_upstream_bytes(down)
        surface.log_tunnel(request, started, authority, up, down)

    tunnel = Tunnel(channel.transport, surface.clock, TUNNEL_IDLE_TIMEOUT, closed)
    try:
        protocol = await surface.upstream.connect_tcp(
            host, port, tunnel.factory(), surface.config.connect_ports
        )
    except Exception:
        info.tunnel = False

        status, message = error_status(Outcome(OutcomeKind.ERROR, failure=Failure()))
        return surface.error(request, status, message, info, CacheStatus.NONE)
    if client_gone(request):
        protocol.transport.loseConnection()  # type: ignore[attr-defined]
        return
    channel.transport.write(_ESTABLISHED)
    channel.take_over(tunnel)
    tunnel.connected(protocol)  # type: ignore[arg-type]
    _finish_without_response(request)


def _intercept(
    surface: Surface,
    request: Request,
    host: str,
    port: int,
    context: Any,
    info: Exchange,
) -> None:
    """Terminate TLS with a certificate for ``host`` from the local CA; the
    requests inside are served like forward requests to ``https://host``."""
    channel: Any = request.channel  # channel.Channel
    transport: Any = channel.transport
    transport.write(_ESTABLISHED)
    transport.startTLS(context)
    inner = channel.site.buildProtocol(transport.getPeer())
    inner.intercept = (host, port)
    transport.unregisterProducer()
    inner.makeConnection(transport)
    channel.take_over(inner)
    info.cache = CacheStatus.NONE
    info.own_page = True  # the requests inside are counted, not the CONNECT
    _finish_without_response(request)


__all__ = [
    "TUNNEL_IDLE_TIMEOUT",
    "handle_connect",
    "intercepted_route",
    "parse_authority",
]
