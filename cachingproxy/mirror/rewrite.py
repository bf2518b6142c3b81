"""Index documents under mirrors: URL rewriting, published digests, merging.

Pure functions over bytes.  PEP 503 HTML, PEP 691 JSON, the PyPI JSON API
and npm packuments are handled; every URL that leads into a mirrored
upstream becomes the matching URL on the proxy, so what a client fetches
next also goes through the cache.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import urljoin

from cachingproxy.mirror.mirrors import MirrorTable

Digest = tuple[str, str]
"""(algorithm as hashlib names it, lower-case hex digest)."""

MAX_DOCUMENT = 64 * 1024 * 1024
"""Largest index document rewritten (bigger ones pass unchanged)."""

_HASHES = ("sha256", "sha512", "sha384", "sha1", "md5")
_ATTR = re.compile(
    rb"""(?P<pre>\b(?:href|src)\s*=\s*)(?P<q>["'])(?P<url>[^"'<>]*)(?P=q)""",
    re.IGNORECASE,
)
_ANCHOR = re.compile(rb"<a\b[^>]*>.*?</a\s*>", re.IGNORECASE | re.DOTALL)


def document_kind(content_type: str | None) -> str | None:
    """``"html"`` or ``"json"`` for index documents, else None."""
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("text/html", "application/xhtml+xml"):
        return "html"
    if media == "application/json" or (
        media.startswith("application/vnd.") and media.endswith("+json")
    ):
        return "json"
    return None


class _Mapper:
    """Turns one URL of a document into the URL a client should follow."""

    def __init__(self, table: MirrorTable, doc_url: str, local_root: str) -> None:
        self.table = table
        self.doc_url = doc_url
        self.local_root = local_root.rstrip("/")
        self.digests: dict[str, Digest] = {}

    def absolute(self, value: str) -> str:
        return urljoin(self.doc_url, value)

    def map(self, value: str, digest: Digest | None = None) -> str:
        url, _, fragment = value.partition("#")
        if not url:
            return value
        absolute = self.absolute(url)
        if not absolute.startswith(("http://", "https://")):
            return value
        fragment_digest = _fragment_digest(fragment)
        self._remember(absolute, digest or fragment_digest)
        local = self.table.local_path(absolute)
        suffix = f"#{fragment}" if fragment else ""
        if local is not None:
            return self.local_root + local + suffix
        if url.startswith("/") and not url.startswith("//"):
            return absolute + suffix  # root-relative on the upstream's host
        return value

    def _remember(self, absolute: str, digest: Digest | None) -> None:
        if digest is None:
            return
        key = self.table.key_for(absolute) or absolute
        self.digests[key] = digest


def _fragment_digest(fragment: str) -> Digest | None:
    name, sep, value = fragment.partition("=")
    if sep and name.lower() in _HASHES and re.fullmatch(r"[0-9a-fA-F]+", value):
        return name.lower(), value.lower()
    return None


def rewrite(
    body: bytes, kind: str, doc_url: str, table: MirrorTable, local_root: str
) -> tuple[bytes, dict[str, Digest]]:
    """``body`` with mirrored URLs made local, and the digests it publishes
    (by the cache key of the file they describe)."""
    mapper = _Mapper(table, doc_url, local_root)
    if kind == "html":
        out = _ATTR.sub(lambda m: _html_attr(m, mapper), body)
        return out, mapper.digests
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body, {}
    _npm_digests(document, mapper)
    document = _walk(document, mapper, None)
    out = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return out, mapper.digests


def _html_attr(match: re.Match[bytes], mapper: _Mapper) -> bytes:
    raw = match.group("url").decode("latin-1")
    new = mapper.map(raw.replace("&amp;", "&")).replace("&", "&amp;")
    if new == raw.replace("&amp;", "&").replace("&", "&amp;"):
        return match.group(0)
    quote = match.group("q")
    return match.group("pre") + quote + new.encode("latin-1") + quote


_URL_KEYS = frozenset({"url", "tarball", "href"})


def _walk(node: Any, mapper: _Mapper, key: str | None) -> Any:
    if isinstance(node, dict):
        digest = _pep691_digest(node)
        result = {}
        for k, v in node.items():
            if digest is not None and k == "url" and isinstance(v, str):
                result[k] = mapper.map(v, digest)
            else:
                result[k] = _walk(v, mapper, k)
        return result
    if isinstance(node, list):
        return [_walk(item, mapper, key) for item in node]
    if isinstance(node, str) and (
        node.startswith(("http://", "https://"))
        or (key in _URL_KEYS and node.startswith("/"))
    ):
        return mapper.map(node)
    return node


def _pep691_digest(node: dict[str, Any]) -> Digest | None:
    hashes = node.get("hashes") or node.get("digests")
    if not isinstance(hashes, dict) or not isinstance(node.get("url"), str):
        return None
    for name in _HASHES:
        value = hashes.get(name)
        if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]+", value):
            return name, value.lower()
    return None


def _npm_digests(document: Any, mapper: _Mapper) -> None:
    """npm packuments: ``versions.*.dist`` carries integrity/shasum for
    ``tarball``."""
    if not isinstance(document, dict) or not isinstance(document.get("versions"), dict):
        return
    for version in document["versions"].values():
        dist = version.get("dist") if isinstance(version, dict) else None
        if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
            continue
        digest = _integrity(dist.get("integrity")) or (
            ("sha1", dist["shasum"].lower())
            if isinstance(dist.get("shasum"), str)
            else None
        )
        if digest is not None:
            mapper._remember(mapper.absolute(dist["tarball"]), digest)


def _integrity(value: object) -> Digest | None:
    """The strongest ``sha512-BASE64``-style entry of an SRI string, as hex."""
    if not isinstance(value, str):
        return None
    best: Digest | None = None
    for item in value.split():
        algo, _, b64 = item.partition("-")
        if algo in ("sha512", "sha384", "sha256", "sha1"):
            try:
                hexdigest = base64.b64decode(b64, validate=True).hex()
            except ValueError:
                continue
            if best is None or _HASHES.index(algo) < _HASHES.index(best[0]):
                best = (algo, hexdigest)
    return best


def rewrite_crates_config(
    body: bytes, doc_url: str, table: MirrorTable, local_root: str
) -> bytes:
    """A crates.io sparse index's ``config.json`` with ``dl`` and ``api`` led
    into the cache when they name a mirrored upstream.  Cargo appends
    ``/{crate}/{version}/download`` to a ``dl`` without markers, so a value
    that had no trailing slash gets none."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(document, dict):
        return body
    mapper = _Mapper(table, doc_url, local_root)
    for key in ("dl", "api"):
        value = document.get(key)
        if not isinstance(value, str):
            continue
        absolute = mapper.absolute(value)
        local = table.local_path(absolute)
        if local is None:
            continue
        new = mapper.local_root + local
        if not value.endswith("/"):
            new = new.rstrip("/")
        document[key] = new
    return json.dumps(document, separators=(",", ":")).encode()


def merge(kind: str, docs: list[tuple[str, bytes]]) -> bytes:
    """One index document listing everything in ``docs`` (``(url, body)``,
    first wins on a name clash); every link is made absolute."""
    if kind == "html":
        return _merge_html(docs)
    return _merge_json(docs)


def _merge_html(docs: list[tuple[str, bytes]]) -> bytes:
    seen: set[bytes] = set()
    anchors: list[bytes] = []
    for doc_url, body in docs:
        for match in _ANCHOR.finditer(body):
            anchor = match.group(0)
            name = re.sub(rb"<[^>]*>", b"", anchor).strip()
            if name in seen:
                continue
            seen.add(name)
            anchors.append(
                _ATTR.sub(
                    lambda m, u=doc_url: (
                        m.group("pre")  # type: ignore[misc]
                        + m.group("q")
                        + urljoin(u, m.group("url").decode("latin-1")).encode("latin-1")
                        + m.group("q")
                    ),
                    anchor,
                )
            )
    return (
        b'<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version"'
        b' content="1.0"><title>Links</title></head><body>\n'
        + b"<br/>\n".join(anchors)
        + b"\n</body></html>\n"
    )


def _merge_json(docs: list[tuple[str, bytes]]) -> bytes:
    merged: dict[str, Any] | None = None
    seen: set[str] = set()
    for doc_url, body in docs:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(document, dict):
            continue
        if merged is None:
            merged = {
                k: v for k, v in document.items() if k not in ("files", "projects")
            }
            merged["files" if "files" in document else "projects"] = []
        listing = "files" if "files" in merged else "projects"
        key = "filename" if listing == "files" else "name"
        for item in document.get(listing) or []:
            if not isinstance(item, dict) or item.get(key) in seen:
                continue
            seen.add(str(item.get(key)))
            if isinstance(item.get("url"), str):
                item = {**item, "url": urljoin(doc_url, item["url"])}
            merged[listing].append(item)
        if listing == "files" and isinstance(document.get("versions"), list):
            versions = merged.setdefault("versions", [])
            versions.extend(v for v in document["versions"] if v not in versions)
    return json.dumps(merged or {}, separators=(",", ":")).encode()


__all__ = [
    "MAX_DOCUMENT",
    "Digest",
    "document_kind",
    "merge",
    "rewrite",
    "rewrite_crates_config",
]
