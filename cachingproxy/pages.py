"""The proxy's own pages (SPEC 9); for now a small page naming the version."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from twisted.web.server import Request

from . import __version__
from .responses import send_error, set_head

if TYPE_CHECKING:
    from .proxy import Proxy

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cachingproxy {version}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}</style></head>
<body><h1>cachingproxy {version}</h1>
<p>A caching HTTP proxy for package downloads. Use it as
<code>http_proxy=http://{host}/</code>.</p>
<p>Downloads in flight: {in_flight}</p>
</body></html>
"""


def render(request: Request, path: str, proxy: Proxy) -> None:
    """Serve ``path`` of the proxy's own pages."""
    bare = path.split("?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        send_error(request, 405, "method not allowed", cache="-", via=proxy.via)
        return
    if bare != "/":
        send_error(request, 404, "no such page", cache="-", via=proxy.via)
        return
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    body = _PAGE.format(
        version=__version__,
        host=html.escape(host or "HOST:3128"),
        in_flight=len(proxy.downloads.in_flight),
    ).encode("utf-8")
    set_head(
        request,
        200,
        [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")],
        cache="-",
        via=proxy.via,
        length=len(body),
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
