"""Ready-to-paste client settings for the mounted mirrors (SPEC 6), written
with the host and port the browser used; shown on the status page and
shipped, for ``cache.example.lan:3128``, under ``etc/clients/mirror/``.

Pure functions of the mirror list and the address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from html import escape

from attrs import frozen

from cachingproxy.config import Mirror


@frozen
class Snippet:
    """One client's settings: where they go and what to paste."""

    client: str
    """Who reads it (``pip``, ``cargo`` …)."""
    where: str
    """The file (or shell) the text goes into."""
    text: str
    shipped: str
    """Its file under ``etc/clients/mirror/``."""


def _pypi(url: str, address: str) -> list[Snippet]:
    index = f"{url}simple/"
    return [
        Snippet(
            "pip",
            "/etc/pip.conf or ~/.config/pip/pip.conf",
            f"[global]\nindex-url = {index}\ntrusted-host = {address}\n",
            "pip.conf",
        ),
        Snippet(
            "uv",
            "/etc/uv/uv.toml or ~/.config/uv/uv.toml",
            f'[[index]]\nname = "cache"\nurl = "{index}"\ndefault = true\n',
            "uv.toml",
        ),
    ]


def _npm(url: str, address: str) -> list[Snippet]:
    return [Snippet("npm, pnpm", "~/.npmrc", f"registry={url}\n", "npmrc")]


def _go(url: str, address: str) -> list[Snippet]:
    return [
        Snippet(
            "go",
            "the environment (or: go env -w GOPROXY=...)",
            f"export GOPROXY={url}\n",
            "go.env",
        )
    ]


def _crates(url: str, address: str) -> list[Snippet]:
    return [
        Snippet(
            "cargo",
            "~/.cargo/config.toml",
            '[source.crates-io]\nreplace-with = "cache"\n\n'
            f'[source.cache]\nregistry = "sparse+{url}"\n',
            "cargo-config.toml",
        )
    ]


def _rubygems(url: str, address: str) -> list[Snippet]:
    return [
        Snippet("gem", "~/.gemrc", f":sources:\n- {url}\n", "gemrc"),
        Snippet(
            "Bundler",
            "a shell (writes ~/.bundle/config)",
            f"bundle config set --global mirror.https://rubygems.org {url}\n",
            "bundler.sh",
        ),
    ]


def _maven(url: str, address: str) -> list[Snippet]:
    return [
        Snippet(
            "Maven",
            "~/.m2/settings.xml",
            "<settings>\n  <mirrors>\n    <mirror>\n      <id>cache</id>\n"
            "      <mirrorOf>central</mirrorOf>\n"
            f"      <url>{url}</url>\n    </mirror>\n  </mirrors>\n</settings>\n",
            "maven-settings.xml",
        )
    ]


def _apt(url: str, address: str) -> list[Snippet]:
    suites: tuple[str, ...]
    if "ubuntu" in url:
        suites, components = ("noble", "noble-updates", "noble-security"), "main"
        shipped = "ubuntu-sources.list"
    elif "security" in url:
        suites, components = ("bookworm-security",), "main"
        shipped = "debian-security-sources.list"
    else:
        suites, components = ("bookworm", "bookworm-updates"), "main"
        shipped = "debian-sources.list"
    lines = "".join(f"deb {url} {s} {components}\n" for s in suites)
    return [Snippet("apt", "/etc/apt/sources.list", lines, shipped)]


def _alpine(url: str, address: str) -> list[Snippet]:
    return [
        Snippet(
            "apk",
            "/etc/apk/repositories",
            f"{url}v3.20/main\n{url}v3.20/community\n",
            "apk-repositories",
        )
    ]


_BY_PROTOCOL: dict[str, Callable[[str, str], list[Snippet]]] = {
    "pypi": _pypi,
    "npm": _npm,
    "go": _go,
    "crates": _crates,
    "rubygems": _rubygems,
    "maven": _maven,
    "apt": _apt,
    "alpine": _alpine,
}


def snippets(mirror: Mirror, address: str) -> list[Snippet]:
    """The client settings for ``mirror`` at ``http://ADDRESS``; none for a
    mount that only serves files (``/pypi-files/``, ``/crates-dl/``) or has
    no protocol."""
    if mirror.prefix in ("/pypi-files/",):
        return []
    make = _BY_PROTOCOL.get(mirror.protocol)
    if make is None:
        return []
    return make(f"http://{address}{mirror.prefix}", address)


def all_snippets(mirrors: Iterable[Mirror], address: str) -> list[Snippet]:
    """Every mirror's settings, in mount order."""
    return [s for m in mirrors for s in snippets(m, address)]


def mirrors_html(mirrors: Iterable[Mirror], address: str) -> str:
    """The status page's section: each mounted prefix with its upstreams,
    then every client's settings in a ``<pre>`` (well-formed XHTML, every
    value escaped)."""
    mounted = list(mirrors)
    if not mounted:
        return ""
    rows = "".join(
        f"<tr><td><code>{escape(f'http://{address}{m.prefix}')}</code></td>"
        f"<td>{escape(', '.join(m.upstreams))}</td>"
        f"<td>{escape(m.protocol or '-')}</td></tr>"
        for m in mounted
    )
    parts = [
        "<h2>Mirrors</h2>",
        "<table><thead><tr><th>mounted at</th><th>upstream</th>"
        f"<th>protocol</th></tr></thead><tbody>{rows}</tbody></table>",
    ]
    for snippet in all_snippets(mounted, address):
        parts.append(
            f'<h3 class="client">{escape(snippet.client)}'
            f' <span class="sub">{escape(snippet.where)}</span></h3>'
            f"<pre>{escape(snippet.text)}</pre>"
        )
    return "".join(parts)


__all__ = ["Snippet", "all_snippets", "mirrors_html", "snippets"]
