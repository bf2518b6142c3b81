"""What each mirrored ecosystem serves (SPEC 6): which files never change,
which are metadata, and which documents carry absolute URLs to rewrite.

Pure values.  A preset names its protocol; a later ``--mirror`` with the
preset's prefix keeps it (``mirrors.combine``).  Patterns are searched in the
upstream URL, so they look only at its tail.
"""

from __future__ import annotations

import re
from enum import Enum

from attrs import frozen

from cachingproxy.config import FOREVER, Rule


class Documents(Enum):
    """Which responses of a mirror are documents whose URLs are rewritten."""

    INDEX = "index"
    """PEP 503 HTML, PEP 691 JSON, npm packuments: by Content-Type."""
    NONE = "none"
    """Nothing is rewritten (the protocol's documents carry no URLs, or only
    relative ones)."""
    CRATES = "crates"
    """Only the sparse index's ``config.json`` (``dl`` and ``api``)."""


@frozen
class Protocol:
    """One ecosystem's files: ``immutable`` are fresh forever, ``metadata``
    fresh for ``--index-ttl``; both are regular expressions searched in the
    upstream URL and tried before the default rules (metadata first, so a
    ``APKINDEX.tar.gz`` or a SNAPSHOT ``.jar`` is not taken for a package
    file)."""

    name: str
    immutable: str = ""
    metadata: str = ""
    documents: Documents = Documents.NONE

    def rules(self, index_ttl: float) -> tuple[Rule, ...]:
        """The rules this protocol puts before the default ones."""
        rules = []
        if self.metadata:
            rules.append(
                Rule(re.compile(self.metadata), index_ttl, name=f"{self.name} metadata")
            )
        if self.immutable:
            rules.append(
                Rule(re.compile(self.immutable), FOREVER, name=f"{self.name} immutable")
            )
        return tuple(rules)


_END = r"(?:\?[^#]*)?$"

GENERIC = Protocol("generic", documents=Documents.INDEX)
"""A plain ``--mirror PREFIX=URL``: the default rules, index documents
rewritten."""

PROTOCOLS: dict[str, Protocol] = {
    "pypi": Protocol("pypi", documents=Documents.INDEX),
    "npm": Protocol("npm", documents=Documents.INDEX),
    "go": Protocol(
        "go",
        # The checksum database behind a module proxy (/sumdb/NAME/…): its
        # lookups and tiles never change, its signed tree head does.
        immutable=(
            r"/@v/[^/?]+\.(?:info|mod|zip)" + _END + r"|/sumdb/[^/]+/(?:lookup|tile)/"
        ),
        metadata=(
            r"/@v/list"
            + _END
            + r"|/@latest"
            + _END
            + r"|/sumdb/[^/]+/(?:latest|supported)"
            + _END
        ),
    ),
    "crates": Protocol(
        "crates",
        # Every file of the sparse index (config.json, one file per crate).
        metadata=r".",
        documents=Documents.CRATES,
    ),
    "crates-dl": Protocol(
        "crates-dl",
        immutable=r"\.crate" + _END + r"|/download" + _END,
    ),
    "rubygems": Protocol(
        "rubygems",
        immutable=(
            r"\.gem" + _END + r"|/quick/Marshal\.4\.8/[^/?]+\.gemspec\.rz" + _END
        ),
        metadata=(
            r"/(?:versions|names)"
            + _END
            + r"|/info/[^/?]+"
            + _END
            + r"|/(?:latest_|prerelease_)?specs\.4\.8(?:\.gz)?"
            + _END
            + r"|/api/v1/"
        ),
    ),
    "maven": Protocol(
        "maven",
        immutable=(
            r"\.(?:jar|pom|war|aar|ear|module|zip|tar\.gz|asc"
            r"|sha1|sha256|sha512|md5)" + _END
        ),
        metadata=r"/maven-metadata\.xml(?:\.[a-z0-9]+)?" + _END + r"|-SNAPSHOT/",
    ),
    "apt": Protocol(
        "apt",
        immutable=r"/pool/|/by-hash/",
        metadata=r"/dists/(?!.*/by-hash/)",
    ),
    "alpine": Protocol(
        "alpine",
        immutable=r"\.apk" + _END,
        metadata=r"/APKINDEX\.tar\.gz" + _END,
    ),
}


def protocol_named(name: str) -> Protocol:
    """The protocol called ``name``; a plain mirror's for ``""``."""
    return PROTOCOLS.get(name, GENERIC)


__all__ = ["GENERIC", "PROTOCOLS", "Documents", "Protocol", "protocol_named"]
