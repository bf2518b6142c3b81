"""Exceptions that cross module boundaries."""


class BodyMissing(Exception):
    """The stored body of an entry is gone (evicted, replaced or corrupted)."""


class DestinationRefused(Exception):
    """The upstream address is not allowed by the destination policy (SPEC 8)."""


class UpstreamTimeout(Exception):
    """The upstream did not connect or went silent for longer than allowed."""


class DigestMismatch(Exception):
    """A download does not match the digest its index published."""


class StoreFull(Exception):
    """The store could not accept more bytes (disk full)."""


__all__ = [
    "BodyMissing",
    "DestinationRefused",
    "DigestMismatch",
    "StoreFull",
    "UpstreamTimeout",
]
