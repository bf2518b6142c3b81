"""The value objects that cross the store seam: a stored response's metadata
and a store's usage."""

from __future__ import annotations

from attrs import evolve, field, frozen

Header = tuple[str, str]
"""One header line as (name, value), both decoded as latin-1, name case kept."""


def _headers(value: object) -> tuple[Header, ...]:
    return tuple((str(k), str(v)) for k, v in value)  # type: ignore[attr-defined]


@frozen
class StoredResponse:
    """Metadata of one cached response variant.

    ``url`` (the normalised URL) and ``variant`` (the normalised values of the
    request headers named by ``vary``; ``""`` when there are none) identify
    it.  ``body_ref`` is opaque to everything but the store that made it.
    """

    url: str
    variant: str
    vary: tuple[str, ...]
    status: int
    headers: tuple[Header, ...] = field(converter=_headers)
    stored_at: float
    """When the response (or its last 304 refresh) was received, epoch seconds."""
    initial_age: float = 0.0
    """The upstream's ``Age`` at ``stored_at``."""
    size: int = 0
    digest: str = ""
    """sha256 hex digest of the body, computed by the store's writer."""
    body_ref: str = ""

    def header(self, name: str) -> str | None:
        """All values of header ``name`` joined with ``", "``, or None."""
        lname = name.lower()
        values = [v for k, v in self.headers if k.lower() == lname]
        return ", ".join(values) if values else None

    def replace(self, **changes: object) -> StoredResponse:
        """A copy with ``changes`` applied."""
        return evolve(self, **changes)  # type: ignore[arg-type]


@frozen
class Usage:
    """What a store holds: committed body ``bytes`` and ``entries``, against
    its ``max_size`` budget (None when unbounded)."""

    bytes: int
    entries: int
    max_size: int | None


__all__ = ["Header", "StoredResponse", "Usage"]
