"""The access log (``--access-log``): one squid-like line per request."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class AccessLog:
    """Appends lines to a file (or stdout for ``-``); ``reopen`` for logrotate."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: IO[str] | None = None
        self.reopen()

    def reopen(self) -> None:
        if self._path == "-":
            self._file = sys.stdout
            return
        old = self._file
        self._file = open(self._path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if old is not None:
            old.close()

    def __call__(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["time"]))
        self._file.write(
            "{stamp} {client} {method} {url} {status} {bytes} {duration_ms} "
            "{cache} {upstream}\n".format(stamp=stamp, **record)
        )

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None
