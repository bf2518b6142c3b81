"""The proxy's own surface (SPEC 9): status page, JSON, metrics, purge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from cachingproxy.front.responses import send_error, set_head
from cachingproxy.ops import admin, metrics, statuspage

if TYPE_CHECKING:
    from cachingproxy.proxy import Proxy

_NO_STORE = ("Cache-Control", "no-store")


def _send(request: Request, proxy: Proxy, body: bytes, content_type: str) -> None:
    set_head(
        request,
        200,
        [("Content-Type", content_type), _NO_STORE],
        cache="-",
        via=proxy.via,
        length=len(body),
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


async def render(request: Request, path: str, proxy: Proxy) -> None:
    """Serve ``path`` (with its query) of the proxy's own pages."""
    bare, _, query = path.partition("?")
    method = request.method
    if bare == "/cache":
        if method != b"DELETE":
            send_error(request, 405, "use DELETE", cache="-", via=proxy.via)
            return
        await admin.purge(request, query, proxy)
        return
    if method not in (b"GET", b"HEAD"):
        send_error(request, 405, "method not allowed", cache="-", via=proxy.via)
        return
    if bare == "/":
        host = (request.getHeader(b"host") or b"").decode("latin-1") or None
        page = statuspage.render_html(proxy.stats.snapshot(), host=host)
        _send(request, proxy, page.encode("utf-8"), statuspage.HTML_CONTENT_TYPE)
    elif bare == "/status.json":
        body = statuspage.render_json(proxy.stats.snapshot())
        _send(request, proxy, body, statuspage.JSON_CONTENT_TYPE)
    elif bare == "/metrics":
        _send(request, proxy, metrics.metrics_text(proxy.stats), metrics.CONTENT_TYPE)
    else:
        send_error(request, 404, "no such page", cache="-", via=proxy.via)
