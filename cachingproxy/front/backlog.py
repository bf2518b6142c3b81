"""The listen backlog of the endpoints the proxy builds (issue 10, D6)."""

from __future__ import annotations

import re

LISTEN_BACKLOG = 2048
"""The listen queue of the endpoints the proxy builds, unless the endpoint
string sets ``backlog=``: Twisted's 50 keeps a burst of 1000 clients waiting
for seconds (the kernel caps it at net.core.somaxconn)."""

_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """``description`` with ``:backlog=N`` added when its type takes one and
    it sets none itself."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or re.search(r"(?:^|:)\s*backlog=", description):
        return description
    return f"{description}:backlog={backlog}"


__all__ = ["LISTEN_BACKLOG", "with_backlog"]
