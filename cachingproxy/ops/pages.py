"""The proxy's own surface (SPEC 9): status page, JSON, metrics, purge."""

from __future__ import annotations

from twisted.web.server import Request

from cachingproxy.front.responses import send_error, set_head
from cachingproxy.front.surface import Surface
from cachingproxy.ops import admin, metrics, statuspage

_NO_STORE = ("Cache-Control", "no-store")


def _send(request: Request, surface: Surface, body: bytes, content_type: str) -> None:
    set_head(
        request,
        200,
        [("Content-Type", content_type), _NO_STORE],
        via=surface.via,
        length=len(body),
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


async def render(request: Request, path: str, surface: Surface) -> None:
    """Serve ``path`` (with its query) of the proxy's own pages."""
    bare, _, query = path.partition("?")
    method = request.method
    if bare == "/cache":
        if method != b"DELETE":
            send_error(request, 405, "use DELETE", via=surface.via)
            return
        await admin.purge(request, query, surface)
        return
    if method not in (b"GET", b"HEAD"):
        send_error(request, 405, "method not allowed", via=surface.via)
        return
    if bare == "/":
        host = (request.getHeader(b"host") or b"").decode("latin-1") or None
        page = statuspage.render_html(
            surface.stats.snapshot(), host=host, mirrors=surface.config.mirrors
        )
        _send(request, surface, page.encode("utf-8"), statuspage.HTML_CONTENT_TYPE)
    elif bare == "/status.json":
        body = statuspage.render_json(surface.stats.snapshot())
        _send(request, surface, body, statuspage.JSON_CONTENT_TYPE)
    elif bare == "/metrics":
        _send(
            request, surface, metrics.metrics_text(surface.stats), metrics.CONTENT_TYPE
        )
    else:
        send_error(request, 404, "no such page", via=surface.via)
