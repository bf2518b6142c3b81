"""The access log (``--access-log``): one squid-like line per request.

Each line goes to the file in one ``write`` on a descriptor opened with
``O_APPEND``, so worker processes sharing the file (SPEC 11) never tear or
interleave each other's lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class AccessLog:
    """Appends lines to a file (or stdout for ``-``); ``reopen`` for logrotate."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = -1
        self._stdout = path == "-"
        self.reopen()

    def reopen(self) -> None:
        if self._stdout:
            return
        old = self._fd
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self._path, flags, 0o644)
        if old >= 0:
            os.close(old)

    def __call__(self, record: dict[str, Any]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["time"]))
        line = (
            "{stamp} {client} {method} {url} {status} {bytes} {duration_ms} "
            "{cache} {upstream}\n".format(stamp=stamp, **record)
        )
        if self._stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        elif self._fd >= 0:
            os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._stdout = False
