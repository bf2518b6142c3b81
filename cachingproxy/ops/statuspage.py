"""The HTML status page at ``/`` and the JSON at ``/status.json`` (SPEC 9).

Both are rendered from :meth:`cachingproxy.ops.stats.Stats.snapshot`.  The page
is plain HTML5 with inline CSS and an inline SVG chart: no external assets,
no JavaScript, a ``meta refresh``.  It is written as well-formed XML
(XHTML syntax) so that tests can parse it strictly; every value that comes
from a request (URLs, host names) is escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from cachingproxy.config import Mirror
from cachingproxy.ops.onboarding import mirrors_html

JSON_CONTENT_TYPE = "application/json"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:64em;padding:0 1em;color:#222}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.3em 0}
th,td{padding:.15em .7em .15em 0;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(odd){background:#f4f4f4}
.url{word-break:break-all;max-width:40em}
.bar{background:#e3e3e3;height:.9em;width:20em;display:inline-block;vertical-align:middle}
.bar span{background:#3a7;height:100%;display:block}
.bar.full span{background:#c43}
.grid{display:flex;flex-wrap:wrap;gap:0 3em}
svg{border:1px solid #ddd;max-width:100%;height:auto}
.none{color:#888}
pre{background:#f4f4f4;padding:.5em;overflow-x:auto}
h3.client{font-size:1em;margin:.8em 0 .2em}
"""

_KIB = 1024


def render_json(snapshot: Mapping[str, Any]) -> bytes:
    """The body of ``/status.json``."""
    return (json.dumps(snapshot, indent=1, sort_keys=True) + "\n").encode("utf-8")


def render_html(
    snapshot: Mapping[str, Any],
    *,
    refresh: int = 10,
    host: str | None = None,
    mirrors: Sequence[Mirror] = (),
) -> str:
    """The status page for ``snapshot`` (:meth:`Stats.snapshot`); ``host``
    (the request's Host) is shown in a usage hint when given, and the
    ``mirrors`` with client settings written for it."""
    s = snapshot
    version = escape(str(s.get("version", "")))
    disk = int(s["disk_bytes"])
    budget = None if s.get("max_size") is None else int(s["max_size"])
    if budget:
        used = disk / budget
        disk_use = (
            f"{_bar(used)} {escape(format_bytes(disk))} of "
            f"{escape(format_bytes(budget))} ({used:.0%})"
        )
    else:
        disk_use = f"{escape(format_bytes(disk))} (no budget)"
    parts = [
        "<!DOCTYPE html>\n",
        '<html lang="en"><head><meta charset="utf-8" />',
        f'<meta http-equiv="refresh" content="{int(refresh)}" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>cachingproxy {version}</title>",
        f"<style>{_CSS}</style></head>\n<body>",
        f"<h1>cachingproxy {version}</h1>",
        f'<p class="sub">up {escape(format_duration(float(s["uptime"])))}'
        f" &#183; refreshes every {int(refresh)}&#160;s</p>",
        _usage_hint(host),
        mirrors_html(mirrors, host) if host else "",
        '<div class="grid"><div>',
        "<h2>Requests</h2>",
        _table(
            None,
            [
                ("requests", _int(s["requests"])),
                ("hits", _int(s["hits"])),
                ("misses", _int(s["misses"])),
                ("stale", _int(s["stale"])),
                ("revalidated", _int(s["revalidated"])),
                ("offline", _int(s.get("offline", 0))),
                ("bypass", _int(s.get("bypass", 0))),
                ("errors", _int(s.get("errors", 0))),
            ],
            numeric=(1,),
        ),
        "</div><div>",
        "<h2>Hit ratio</h2>",
        _table(
            None,
            [
                ("by requests", _percent_bar(float(s["hit_ratio"]))),
                ("by bytes", _percent_bar(float(s["byte_hit_ratio"]))),
            ],
            escaped=True,
        ),
        "<h2>Bytes</h2>",
        _table(
            None,
            [
                ("served from cache", format_bytes(s["bytes_from_cache"])),
                ("fetched upstream", format_bytes(s["bytes_from_upstream"])),
                ("served in all", format_bytes(s.get("bytes_served", 0))),
            ],
            numeric=(1,),
        ),
        "<h2>Disk</h2>",
        _table(
            None,
            [
                ("used", disk_use),
                ("entries", _int(s["entries"])),
            ],
            escaped=True,
        ),
        "</div></div>",
        _shared_store(s.get("shared_store")),
        "<h2>Last hour</h2>",
        history_svg(s.get("history", [])),
        "<h2>Downloads in flight</h2>",
        _in_flight(s.get("in_flight", [])),
        '<div class="grid"><div>',
        "<h2>Top hosts</h2>",
        _top_hosts(s.get("top_hosts", [])),
        "</div><div>",
        "<h2>Top objects</h2>",
        _top_objects(s.get("top_objects", [])),
        "</div></div>",
        "<h2>Upstream errors</h2>",
        _upstream_errors(s.get("upstream_errors", {})),
        '<p class="sub">Also as <a href="/status.json">JSON</a> and '
        '<a href="/metrics">Prometheus metrics</a>.</p>',
        "</body></html>\n",
    ]
    return "".join(parts)


# -- sections ------------------------------------------------------------------


def _usage_hint(host: str | None) -> str:
    if not host:
        return ""
    return (
        "<p>A caching HTTP proxy for package downloads: use it as "
        f"<code>http_proxy=http://{escape(host)}/</code>.</p>"
    )


def _in_flight(downloads: Sequence[Mapping[str, Any]]) -> str:
    if not downloads:
        return '<p class="none">none</p>'
    rows = []
    for d in downloads:
        total = d.get("total")
        written = int(d["bytes"])
        progress = written / total if isinstance(total, int) and total > 0 else None
        rows.append(
            (
                f'<span class="url">{escape(str(d["url"]))}</span>',
                escape(format_bytes(written)),
                escape(format_bytes(total)) if total is not None else "?",
                _bar(progress, warn=False) if progress is not None else "",
                escape(format_bytes(float(d.get("rate", 0.0)))) + "/s",
                _int(d.get("clients", 0)),
            )
        )
    return _table(
        ("URL", "so far", "total", "progress", "rate", "clients"),
        rows,
        numeric=(1, 2, 4, 5),
        escaped=True,
    )


def _top_hosts(hosts: Sequence[Mapping[str, Any]]) -> str:
    if not hosts:
        return '<p class="none">none</p>'
    return _table(
        ("host", "hits", "requests"),
        [(str(h["host"]), _int(h["hits"]), _int(h["requests"])) for h in hosts],
        numeric=(1, 2),
    )


def _top_objects(objects: Sequence[Mapping[str, Any]]) -> str:
    if not objects:
        return '<p class="none">none</p>'
    return _table(
        ("URL", "hits"),
        [
            (f'<span class="url">{escape(str(o["url"]))}</span>', _int(o["hits"]))
            for o in objects
        ],
        numeric=(1,),
        escaped=True,
    )


def _shared_store(store: Mapping[str, Any] | None) -> str:
    """The fleet's shared tier (SPEC 12), when there is one."""
    if not store:
        return ""
    ok = bool(store.get("ok"))
    state = "reachable" if ok else f"UNREACHABLE: {store.get('error') or ''}"
    return "<h2>Shared store</h2>" + _table(
        None,
        [
            ("store", str(store.get("url", ""))),
            ("state", state),
            ("node", str(store.get("node", ""))),
            ("uploads in flight", _int(store.get("uploads", 0))),
        ],
    )


def _upstream_errors(errors: Mapping[str, int]) -> str:
    rows = [(str(kind), _int(n)) for kind, n in errors.items() if n]
    if not rows:
        return '<p class="none">none</p>'
    return _table(("kind", "count"), rows, numeric=(1,))


# -- the chart -----------------------------------------------------------------

_W, _H, _LEFT, _TOP, _BOTTOM = 600, 150, 40, 10, 20


def history_svg(history: Sequence[Mapping[str, Any]]) -> str:
    """An inline SVG chart: requests per minute as bars (left scale) and
    the hit ratio of cacheable requests as a line (right scale, 0-100 %)."""
    plot_w, plot_h = _W - 2 * _LEFT, _H - _TOP - _BOTTOM
    n = max(1, len(history))
    step = plot_w / n
    peak = max([int(b.get("requests", 0)) for b in history] + [1])
    base = _TOP + plot_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" font-size="10" '
        'font-family="sans-serif">',
        "<title>Requests per minute (bars) and hit ratio (line), last hour</title>",
        f'<line x1="{_LEFT}" y1="{base}" x2="{_W - _LEFT}" y2="{base}" '
        'stroke="#999" />',
        f'<text x="{_LEFT - 4}" y="{_TOP + 8}" text-anchor="end">{peak}</text>',
        f'<text x="{_LEFT - 4}" y="{base}" text-anchor="end">0</text>',
        f'<text x="{_W - _LEFT + 4}" y="{_TOP + 8}" fill="#c60">100%</text>',
        f'<text x="{_W - _LEFT + 4}" y="{base}" fill="#c60">0%</text>',
        f'<text x="{_LEFT}" y="{_H - 4}">-{len(history)} min</text>',
        f'<text x="{_W - _LEFT}" y="{_H - 4}" text-anchor="end">now</text>',
    ]
    runs: list[list[str]] = [[]]
    for i, bucket in enumerate(history):
        requests = int(bucket.get("requests", 0))
        hits = int(bucket.get("hits", 0))
        misses = int(bucket.get("misses", 0))
        x = _LEFT + i * step
        if requests:
            h = plot_h * requests / peak
            out.append(
                f'<rect x="{x + 0.5:.1f}" y="{base - h:.1f}" '
                f'width="{max(step - 1, 1):.1f}" height="{h:.1f}" fill="#9bc">'
                f"<title>{requests} requests, {hits} from cache</title></rect>"
            )
        if hits + misses:
            y = base - plot_h * hits / (hits + misses)
            runs[-1].append(f"{x + step / 2:.1f},{y:.1f}")
        elif runs[-1]:
            runs.append([])
    for run in runs:
        if len(run) > 1:
            out.append(
                f'<polyline points="{" ".join(run)}" fill="none" stroke="#c60" '
                'stroke-width="1.5" />'
            )
        for point in run:
            cx, cy = point.split(",")
            out.append(f'<circle cx="{cx}" cy="{cy}" r="1.5" fill="#c60" />')
    out.append("</svg>")
    return "".join(out)


# -- helpers -------------------------------------------------------------------


def _table(
    head: Sequence[str] | None,
    rows: Iterable[Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    escaped: bool = False,
) -> str:
    """A table; cells are escaped unless ``escaped`` says they already are
    (header labels are always literal text and escaped here)."""

    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="n"' if i in numeric else ""
        return f"<{tag}{cls}>{text}</{tag}>"

    out = ["<table>"]
    if head is not None:
        out.append(
            "<thead><tr>"
            + "".join(cell("th", i, escape(h)) for i, h in enumerate(head))
            + "</tr></thead>"
        )
    out.append("<tbody>")
    for row in rows:
        cells = [
            cell(
                "th" if head is None and i == 0 else "td",
                i,
                c if escaped else escape(c),
            )
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _int(value: Any) -> str:
    return f"{int(value):,}"


def _bar(fraction: float, *, warn: bool = True) -> str:
    """A horizontal bar filled to ``fraction``; red from 90 % when ``warn``."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = " full" if warn and fraction >= 0.9 else ""
    return (
        f'<span class="bar{full}"><span style="width:{fraction * 100:.1f}%">'
        "</span></span>"
    )


def _percent_bar(fraction: float) -> str:
    return f"{_bar(fraction, warn=False)} {fraction:.1%}"


def format_bytes(n: float | None) -> str:
    """``n`` bytes in powers of 1024, as ``--max-size`` takes them."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < _KIB or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= _KIB
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``3 d 4 h``, ``5 h 6 min``, ``7 min 8 s``, ``9 s``."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


__all__ = [
    "HTML_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "format_bytes",
    "format_duration",
    "history_svg",
    "render_html",
    "render_json",
]
