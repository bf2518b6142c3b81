"""Mirrors (SPEC 6): upstream base URLs mounted under local path prefixes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from attrs import frozen

from cachingproxy.cache.policy import BadURL, normalize_url
from cachingproxy.config import Mirror
from cachingproxy.mirror.protocols import PROTOCOLS

PRESETS: dict[str, tuple[Mirror, ...]] = {
    "pypi": (
        Mirror("/pypi/", ("https://pypi.org/",), protocol="pypi"),
        Mirror("/pypi-files/", ("https://files.pythonhosted.org/",), protocol="pypi"),
    ),
    "npm": (Mirror("/npm/", ("https://registry.npmjs.org/",), protocol="npm"),),
    "go": (Mirror("/go/", ("https://proxy.golang.org/",), protocol="go"),),
    "crates": (
        Mirror("/crates/", ("https://index.crates.io/",), protocol="crates"),
        Mirror(
            "/crates-dl/", ("https://static.crates.io/crates/",), protocol="crates-dl"
        ),
    ),
    "rubygems": (
        Mirror("/rubygems/", ("https://rubygems.org/",), protocol="rubygems"),
    ),
    "maven": (
        Mirror("/maven2/", ("https://repo1.maven.org/maven2/",), protocol="maven"),
    ),
    "debian": (
        Mirror("/debian/", ("http://deb.debian.org/debian/",), protocol="apt"),
        Mirror(
            "/debian-security/",
            ("http://deb.debian.org/debian-security/",),
            protocol="apt",
        ),
    ),
    "ubuntu": (
        Mirror("/ubuntu/", ("http://archive.ubuntu.com/ubuntu/",), protocol="apt"),
    ),
    "alpine": (
        Mirror(
            "/alpine/", ("https://dl-cdn.alpinelinux.org/alpine/",), protocol="alpine"
        ),
    ),
}
PRESETS["packages"] = tuple(m for group in list(PRESETS.values()) for m in group)
"""``packages``: every preset at once."""


def parse_base(value: object) -> str:
    """An upstream base URL, normalised, ending in ``/``."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a URL")
    try:
        url = normalize_url(value.strip())
    except BadURL as e:
        raise ValueError(f"{value!r} is not an http(s) URL ({e})") from None
    if "?" in url:
        raise ValueError(f"{value!r}: a base URL has no query")
    return url if url.endswith("/") else url + "/"


def parse_prefix(value: str) -> str:
    """A local path prefix: starts and ends with ``/``."""
    prefix = value.strip()
    if not prefix.startswith("/") or any(c in prefix for c in "?#% \t"):
        raise ValueError(f"{value!r} is not a path prefix like /pypi/")
    return prefix if prefix.endswith("/") else prefix + "/"


def parse_mirror(value: object) -> tuple[Mirror, ...]:
    """``PREFIX=URL[,URL…]`` or a preset name (``pypi``, ``go``, … ``packages``)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not PREFIX=URL[,URL...] or a preset")
    if value.strip() in PRESETS:
        return PRESETS[value.strip()]
    prefix, sep, urls = value.partition("=")
    if not sep:
        raise ValueError(
            f"{value!r} is not PREFIX=URL[,URL...] or a preset"
            f" ({', '.join(sorted(PRESETS))})"
        )
    bases = tuple(parse_base(u) for u in urls.split(",") if u.strip())
    if not bases:
        raise ValueError(f"{value!r} names no upstream URL")
    return (Mirror(parse_prefix(prefix), bases),)


def parse_mirror_table(table: object) -> Mirror:
    """A ``[[mirror]]`` table: ``prefix``, ``upstreams`` (or ``url``), ``merge``,
    ``protocol`` (a preset's protocol: ``go``, ``crates``, ``maven`` …)."""
    if not isinstance(table, dict):
        raise ValueError("must be a table ([[mirror]]) or a PREFIX=URL string")
    unknown = sorted(set(table) - {"prefix", "upstreams", "url", "merge", "protocol"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    if "prefix" not in table:
        raise ValueError("key 'prefix' is required")
    urls = table.get("upstreams", table.get("url"))
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        raise ValueError("key 'upstreams' must be a list of URLs")
    merge = table.get("merge", False)
    if not isinstance(merge, bool):
        raise ValueError("key 'merge' must be true or false")
    protocol = table.get("protocol", "")
    if protocol != "" and protocol not in PROTOCOLS:
        raise ValueError(
            f"key 'protocol': {protocol!r} is not one of {', '.join(sorted(PROTOCOLS))}"
        )
    return Mirror(
        parse_prefix(str(table["prefix"])),
        tuple(parse_base(u) for u in urls),
        merge,
        protocol,
    )


def combine(
    mirrors: Iterable[Mirror], sources: Sequence[str] = ()
) -> tuple[Mirror, ...]:
    """Final mirror list: ``--source`` adds ``/``; a later prefix replaces an
    earlier one (so a preset can be overridden) and keeps the protocol the
    earlier one had (``--mirror go --mirror /go/=URL`` is still Go)."""
    by_prefix: dict[str, Mirror] = {}
    for mirror in mirrors:
        earlier = by_prefix.pop(mirror.prefix, None)
        if earlier is not None and not mirror.protocol:
            mirror = attrs.evolve(mirror, protocol=earlier.protocol)
        by_prefix[mirror.prefix] = mirror
    if sources:
        by_prefix.pop("/", None)
        by_prefix["/"] = Mirror("/", tuple(sources))
    return tuple(by_prefix.values())


@frozen
class MirrorMatch:
    mirror: Mirror
    rest: str
    """The path after the prefix, with the query."""

    def upstream_urls(self) -> list[str]:
        return [base + self.rest for base in self.mirror.upstreams]

    @property
    def key_url(self) -> str:
        """The cache key: the URL at the first upstream."""
        return self.mirror.upstreams[0] + self.rest


class MirrorTable:
    """Maps local paths to upstream URLs and back (for rewriting)."""

    def __init__(self, mirrors: Iterable[Mirror]) -> None:
        self.mirrors = sorted(mirrors, key=lambda m: len(m.prefix), reverse=True)
        self._bases = sorted(
            ((base, m) for m in self.mirrors for base in m.upstreams),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    def __bool__(self) -> bool:
        return bool(self.mirrors)

    def match(self, path: str) -> MirrorMatch | None:
        """The mirror serving local ``path`` (longest prefix wins)."""
        for mirror in self.mirrors:
            if path.startswith(mirror.prefix):
                return MirrorMatch(mirror, path[len(mirror.prefix) :])
        return None

    def local_path(self, upstream_url: str) -> str | None:
        """The local path that leads to absolute ``upstream_url``, if mirrored."""
        for base, mirror in self._bases:
            if upstream_url.startswith(base):
                return mirror.prefix + upstream_url[len(base) :]
            if upstream_url + "/" == base:
                return mirror.prefix
        return None

    def key_for(self, upstream_url: str) -> str | None:
        """The cache key of ``upstream_url`` when it is served through a mirror."""
        path = self.local_path(upstream_url)
        if path is None:
            return None
        match = self.match(path)
        return None if match is None else match.key_url


@frozen
class Target:
    """Where a mirrored request goes: its match and how the client sees us."""

    match: MirrorMatch | None
    local_root: str
    doc_url: str = ""
    """Base for resolving links of a merged document (else the upstream's URL)."""
    single_url: str = ""

    @property
    def candidates(self) -> list[tuple[str, str]]:
        """(upstream URL, label) in the order they are tried."""
        if self.match is None:
            return [(self.single_url, "")]
        return list(
            zip(self.match.upstream_urls(), self.match.mirror.upstreams, strict=True)
        )

    def document_url(self, label: str | None, key_url: str) -> str:
        """The upstream URL a document came from: links resolve against it."""
        if self.doc_url:
            return self.doc_url
        if label and self.match is not None:
            return label + self.match.rest
        return key_url

    @classmethod
    def single(cls, url: str) -> Target:
        """One upstream URL fetched for a merged document."""
        return cls(None, "", single_url=url)


__all__ = [
    "PRESETS",
    "Mirror",
    "MirrorMatch",
    "MirrorTable",
    "Target",
    "combine",
    "parse_base",
    "parse_mirror",
    "parse_mirror_table",
    "parse_prefix",
]
