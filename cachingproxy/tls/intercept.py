"""Which hosts' HTTPS is intercepted (SPEC 7): ``--intercept`` host globs.

Pure: patterns are parsed and validated once; matching and the name
constraints a generated CA can carry are plain functions of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import translate
from ipaddress import ip_address

import attrs

PACKAGES: tuple[str, ...] = (
    # PyPI
    "pypi.org",
    "files.pythonhosted.org",
    # npm
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    # Debian
    "deb.debian.org",
    "security.debian.org",
    "ftp.*.debian.org",
    # Ubuntu
    "archive.ubuntu.com",
    "*.archive.ubuntu.com",
    "security.ubuntu.com",
    "ports.ubuntu.com",
    # Alpine
    "dl-cdn.alpinelinux.org",
    # Maven Central
    "repo.maven.apache.org",
    "repo1.maven.org",
    # crates.io
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    # RubyGems
    "rubygems.org",
    "index.rubygems.org",
    # Go
    "proxy.golang.org",
    "sum.golang.org",
)
"""The public package hosts the preset ``packages`` stands for."""

PRESETS: dict[str, tuple[str, ...]] = {"packages": PACKAGES}

_GLOB = frozenset("*?")
_PATTERN_CHARS = re.compile(r"[a-z0-9._*?-]+")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


def _ip(text: str) -> str | None:
    """``text`` as a canonical IP address literal, or None if it is not one."""
    try:
        return str(ip_address(text))
    except ValueError:
        return None


def normalize_host(text: str) -> str | None:
    """The host of ``text`` (``host``, ``host:port``, ``[v6]:port``) as
    matched and certified: lower case, no trailing dot, IP addresses in
    canonical form; None when it is not a valid host name or IP address."""
    host = text.strip().lower()
    if host.startswith("["):
        host, sep, port = host[1:].partition("]")
        if not sep or (port and not (port[0] == ":" and _PORT.fullmatch(port[1:]))):
            return None
        return _ip(host)
    if host.count(":") > 1:
        return _ip(host)
    host, colon, port = host.partition(":")
    if colon and not _PORT.fullmatch(port):
        return None
    host = host.removesuffix(".")
    ip = _ip(host)
    if ip is not None:
        return ip
    if (
        len(host) > 253
        or not _HOST_NAME.fullmatch(host)
        or host.rpartition(".")[2].isdigit()
    ):
        return None  # a name ending in digits would be read as an address
    return host


def parse_pattern(text: object) -> tuple[str, ...]:
    """The host glob(s) ``text`` stands for: one lower-cased glob such as
    ``*.example.org`` or ``pypi.org``, an IP address, or a preset name
    (``packages``).  ValueError, saying why, for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not a host pattern")
    value = text.strip().lower()
    if value in PRESETS:
        return PRESETS[value]
    if "/" in value:
        raise ValueError(f"{text!r}: a host pattern is a host name glob, not a URL")
    literal = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    ip = _ip(literal)
    if ip is not None:
        return (ip,)
    if ":" in value:
        raise ValueError(f"{text!r}: a host pattern has no port (see --connect-ports)")
    value = value.removesuffix(".")
    if not value.isascii():
        raise ValueError(f"{text!r}: write international names in their xn-- form")
    if not _PATTERN_CHARS.fullmatch(value):
        raise ValueError(
            f"{text!r}: a host pattern has letters, digits, '-', '.', and the"
            " wildcards '*' and '?'"
        )
    labels = value.split(".")
    if "" in labels:
        hint = f" (did you mean '*.{value[1:]}'?)" if value[:1] == "." else ""
        raise ValueError(f"{text!r}: empty label in host pattern{hint}")
    for label in labels:
        if _GLOB.isdisjoint(label) and not re.fullmatch(_LABEL, label):
            raise ValueError(f"{text!r}: {label!r} is not a valid host name label")
    if len(value) > 253:
        raise ValueError(f"{text!r}: host pattern longer than 253 characters")
    return (value,)


def _parse_all(texts: Iterable[str]) -> tuple[str, ...]:
    """Every pattern of ``texts`` parsed, presets expanded, duplicates dropped."""
    if isinstance(texts, str):
        texts = (texts,)
    found: dict[str, None] = {}
    for text in texts:
        found.update(dict.fromkeys(parse_pattern(text)))
    return tuple(found)


def _subtree(pattern: str) -> str | None:
    """The DNS subtree holding every name ``pattern`` matches, or None.

    Everything after the last label with a wildcard is a literal
    ``.suffix``, so every match ends in it: ``*.example.org`` and
    ``ftp.*.debian.org`` give ``example.org`` and ``debian.org``.
    """
    labels = pattern.split(".")
    wild = [i for i, label in enumerate(labels) if not _GLOB.isdisjoint(label)]
    if not wild:
        return pattern
    suffix = labels[wild[-1] + 1 :]
    return ".".join(suffix) if suffix else None


def _within(name: str, subtree: str) -> bool:
    """Whether DNS ``name`` lies in ``subtree`` (RFC 5280 dNSName rules)."""
    return name == subtree or name.endswith("." + subtree)


@attrs.frozen
class InterceptPolicy:
    """The hosts whose CONNECTs (or SNI names) are intercepted.

    Built from ``--intercept`` values: globs, IP addresses, preset names.
    """

    patterns: tuple[str, ...] = attrs.field(converter=_parse_all)
    _ips: frozenset[str] = attrs.field(init=False, repr=False, eq=False)
    _names: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        ips = frozenset(p for p in self.patterns if _ip(p) is not None)
        globs = [translate(p) for p in self.patterns if p not in ips]
        names = re.compile("|".join(f"(?:{g})" for g in globs)) if globs else None
        object.__setattr__(self, "_ips", ips)
        object.__setattr__(self, "_names", names)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, host: str) -> bool:
        """Whether ``host`` (``name``, ``name:port``, IP literal; any case,
        trailing dot allowed) is intercepted.  An IP address matches only an
        identical pattern, never a glob."""
        name = normalize_host(host)
        if name is None:
            return False
        if _ip(name) is not None:
            return name in self._ips
        return self._names is not None and self._names.match(name) is not None

    def permitted_subtrees(self) -> tuple[str, ...] | None:
        """The DNS name-constraint subtrees of a CA that may sign for every
        matching host (sorted, none inside another), or None when some
        pattern has no fixed domain (``pypi*``, ``*``), is an IP address, or
        there are no patterns."""
        subtrees = set()
        for pattern in self.patterns:
            subtree = None if pattern in self._ips else _subtree(pattern)
            if subtree is None:
                return None
            subtrees.add(subtree)
        kept = (s for s in subtrees if not any(_within(s, o) for o in subtrees - {s}))
        return tuple(sorted(kept)) or None


__all__ = [
    "PACKAGES",
    "PRESETS",
    "InterceptPolicy",
    "normalize_host",
    "parse_pattern",
]
