"""Where the fleet keeps things under the bucket prefix, and how an entry is
written into one object.

- ``objects/<URL, percent-encoded>!<variant hash>``: one cache entry.  The
  object is a header line, the entry's metadata as JSON (URL, variant, Vary,
  status, headers, stored time, age, size, sha256) and then the body, so an
  entry is written by one conditional ``PUT`` (or one completed multipart
  upload) and can never be seen half: the first writer wins.  Keys keep the
  URL readable, so an operator can find an object and ``DELETE
  /cache?prefix=`` can list them.  A URL too long for a key (over 222
  encoded characters: SeaweedFS and MinIO refuse a key component over 255
  bytes) keeps the first 189 characters of its encoding, then ``*`` and 32
  hex digits of its sha256 (``*`` is encoded in URLs, so never ambiguous):
  a prefix purge lists those too, and reads the URL in the header of each
  object a longer prefix cannot tell apart (:func:`long_keys`).
- ``leases/<sha256 of the URL>``: who is downloading a URL now (see lease.py).
- ``purges/<time>-<node>-<random>``: the purge log the nodes poll (purge.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import quote

from attrs import frozen

from cachingproxy.cache.entry import StoredResponse

MAGIC = b"cachingproxy-entry 1 "
HEADER_PROBE = 16 * 1024
"""Bytes read from the start of an object to get its metadata in one request."""
_SAFE = ""
"""Everything but letters, digits and ``_.-~`` is percent-encoded: keys stay
flat (no ``//``, which some stores fold) and sort like the URLs."""
_VARIANT = "!"
"""Between a URL and its variant hash (encoded in URLs, so never ambiguous)."""
_HASH = 32
"""Hex digits of a sha256 in a key (a variant's, a long URL's)."""
_MAX_KEY_URL = 255 - len(_VARIANT) - _HASH
"""The longest URL part of a key: SeaweedFS and MinIO keep keys as paths
and refuse a component (the part after the last ``/``, here the URL part
and the variant) over 255 bytes."""
_HASHED = "*"
"""Between the kept start of a long URL's encoding and the URL's hash."""
_KEPT = _MAX_KEY_URL - len(_HASHED) - _HASH
"""Encoded characters of a long URL kept in its key."""


@frozen
class Location:
    """``s3://BUCKET[/PREFIX]``: ``prefix`` is empty or ends with ``/``."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_location(value: object) -> Location:
    """``s3://BUCKET[/PREFIX]`` as a Location; ValueError says what is wrong."""
    if not isinstance(value, str) or not value.startswith("s3://"):
        raise ValueError(f"{value!r} is not s3://BUCKET[/PREFIX]")
    bucket, _, prefix = value[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not an S3 bucket name")
    prefix = prefix.strip("/")
    if any(ord(c) < 0x20 for c in prefix) or "//" in prefix:
        raise ValueError(f"{prefix!r} is not a usable key prefix")
    return Location(bucket, prefix + "/" if prefix else "")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def url_part(url: str) -> str:
    """The key component naming ``url``: percent-encoded, or when that is
    long its first :data:`_KEPT` characters, ``*`` and the URL's sha256."""
    quoted = quote(url, safe=_SAFE)
    if len(quoted) <= _MAX_KEY_URL:
        return quoted
    return quoted[:_KEPT] + _HASHED + _hash(url)[:_HASH]


def variants_prefix(prefix: str, url: str) -> str:
    """The key prefix of every variant of ``url``."""
    return f"{prefix}objects/{url_part(url)}{_VARIANT}"


def object_key(prefix: str, url: str, variant: str) -> str:
    return variants_prefix(prefix, url) + _hash(variant)[:_HASH]


def url_prefix_key(prefix: str, url_prefix: str) -> str:
    """The key prefix of the objects of every URL starting with ``url_prefix``
    (but long URLs when :func:`long_keys` says more)."""
    return f"{prefix}objects/{quote(url_prefix, safe=_SAFE)}"


def long_keys(prefix: str, url_prefix: str) -> str | None:
    """The key prefix of the objects of long URLs that may start with
    ``url_prefix`` without :func:`url_prefix_key` finding them (their keys
    keep less of their URL than ``url_prefix`` is long): only the URL in
    each one's header tells.  None when there are none such."""
    quoted = quote(url_prefix, safe=_SAFE)
    if len(quoted) <= _KEPT:
        return None
    return f"{prefix}objects/{quoted[:_KEPT]}{_HASHED}"


def lease_key(prefix: str, url: str) -> str:
    return f"{prefix}leases/{_hash(url)}"


def purge_dir(prefix: str) -> str:
    return f"{prefix}purges/"


def encode_header(entry: StoredResponse) -> bytes:
    """The bytes that precede the body in ``entry``'s object."""
    meta = json.dumps(
        {
            "url": entry.url,
            "variant": entry.variant,
            "vary": list(entry.vary),
            "status": entry.status,
            "headers": [list(h) for h in entry.headers],
            "stored_at": entry.stored_at,
            "initial_age": entry.initial_age,
            "size": entry.size,
            "sha256": entry.digest,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    return MAGIC + str(len(meta)).encode() + b"\n" + meta


def header_length(data: bytes) -> int | None:
    """The length of the header that ``data`` (the start of an object) begins
    with, or None when ``data`` is too short to tell.

    @raise ValueError: not an entry object.
    """
    if not data.startswith(MAGIC):
        raise ValueError("not a cachingproxy entry")
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        if len(data) > len(MAGIC) + 20:
            raise ValueError("bad entry header")
        return None
    return line_end + 1 + int(data[len(MAGIC) : line_end])


def decode_header(data: bytes, key: str) -> StoredResponse:
    """The entry whose object starts with ``data`` (at least its whole header);
    its ``body_ref`` says where the body is (see :func:`shared_ref`).

    @raise ValueError: not an entry object.
    """
    length = header_length(data)
    if length is None or len(data) < length:
        raise ValueError("truncated entry header")
    meta = json.loads(data[data.index(b"\n") + 1 : length])
    return StoredResponse(
        url=str(meta["url"]),
        variant=str(meta["variant"]),
        vary=tuple(str(v) for v in meta["vary"]),
        status=int(meta["status"]),
        headers=tuple((str(k), str(v)) for k, v in meta["headers"]),
        stored_at=float(meta["stored_at"]),
        initial_age=float(meta["initial_age"]),
        size=int(meta["size"]),
        digest=str(meta["sha256"]),
        body_ref=shared_ref(key, length),
    )


SHARED_REF = "s3:"


def shared_ref(key: str, offset: int) -> str:
    """The ``body_ref`` of a body at ``offset`` in object ``key``."""
    return f"{SHARED_REF}{offset}:{key}"


def parse_shared_ref(ref: str) -> tuple[str, int] | None:
    """``(key, offset)`` of a shared body_ref, or None for a local one."""
    if not ref.startswith(SHARED_REF):
        return None
    offset, _, key = ref[len(SHARED_REF) :].partition(":")
    return key, int(offset)


__all__ = [
    "HEADER_PROBE",
    "Location",
    "decode_header",
    "encode_header",
    "header_length",
    "lease_key",
    "long_keys",
    "object_key",
    "parse_location",
    "parse_shared_ref",
    "purge_dir",
    "shared_ref",
    "url_part",
    "url_prefix_key",
    "variants_prefix",
]
