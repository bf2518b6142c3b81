"""A real ``pip download`` through the proxy from a local PEP 503 index.

The index and the wheel (built here with zipfile) are served by a twisted.web
origin in the test's reactor; the proxy runs in-process; pip is a child
process with ``http_proxy`` pointing at the proxy and every pip setting of
this machine (config files, ``PIP_*``) shut out.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import os
import sys
import zipfile

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import ProcessResult, StoppableOrigin, run_process, start_proxy

WHEEL = "demo_pkg-1.0-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build_wheel() -> bytes:
    """A minimal valid wheel for demo-pkg 1.0 (PEP 427), with a RECORD."""
    files = {
        "demo_pkg/__init__.py": b'"""demo-pkg for the cachingproxy tests."""\n',
        "demo_pkg-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n"
            b"Summary: A wheel served by the cachingproxy tests\n"
        ),
        "demo_pkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cachingproxy-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items()
    )
    record += "demo_pkg-1.0.dist-info/RECORD,,\n"
    files["demo_pkg-1.0.dist-info/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def pip_env(proxy_port: int) -> dict[str, str]:
    """This environment without any pip setting or proxy variable, plus
    ``http_proxy`` for the proxy under test."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("PIP_") and "proxy" not in k.lower()
    }
    env.update(
        http_proxy=f"http://127.0.0.1:{proxy_port}",
        PIP_CONFIG_FILE=os.devnull,
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_NO_COLOR="1",
    )
    return env


class PipDownloadTests(TestCase):
    """pip, the main client of a package cache, works through the proxy."""

    def setUp(self) -> None:
        if importlib.util.find_spec("pip") is None:
            raise self.skipTest(f"pip is not installed for {sys.executable}")

    async def _pip_download(self, index_port: int, proxy_port: int) -> str:
        dest = os.path.abspath(self.mktemp())
        result: ProcessResult = await run_process(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--timeout",
                "15",
                "--retries",
                "0",
                "-d",
                dest,
                "--index-url",
                f"http://127.0.0.1:{index_port}/simple/",
                "demo-pkg==1.0",
            ],
            env=pip_env(proxy_port),
            timeout=90,
        )
        self.assertEqual(result.code, 0, result.output)
        return os.path.join(dest, WHEEL)

    def test_pip_download_through_proxy(self) -> defer.Deferred[None]:
        """pip downloads a byte-identical wheel through the proxy; a second run
        gets the wheel from the cache (origin wheel count stays 1); with the
        origin gone, a third run still succeeds: the index is served STALE
        (index_ttl=0 forces revalidation) and the wheel is a HIT."""
        return defer.Deferred.fromCoroutine(self._pip())

    async def _pip(self) -> None:
        wheel = build_wheel()
        sha256 = hashlib.sha256(wheel).hexdigest()
        server = StoppableOrigin(self)
        origin, oport = server.origin, server.port
        origin.static(
            "/simple/",
            b'<!DOCTYPE html><html><body><a href="demo-pkg/">demo-pkg</a></body></html>',
            headers=[("Content-Type", "text/html")],
        )
        origin.static(
            "/simple/demo-pkg/",
            (
                f"<!DOCTYPE html><html><body>"
                f'<a href="/files/{WHEEL}#sha256={sha256}">{WHEEL}</a>'
                f"</body></html>"
            ).encode(),
            headers=[("Content-Type", "text/html")],
        )
        origin.static(f"/files/{WHEEL}", wheel)
        log = os.path.abspath(self.mktemp())
        # index_ttl=0: every index fetch revalidates, so the third run
        # exercises stale-on-error rather than a fresh index entry.
        _, pport = start_proxy(self, index_ttl=0.0, access_log=log)

        first = await self._pip_download(oport, pport)
        with open(first, "rb") as f:
            self.assertEqual(f.read(), wheel)
        self.assertEqual(origin.count(f"/files/{WHEEL}"), 1)
        index_fetches = origin.count("/simple/demo-pkg/")
        self.assertGreaterEqual(index_fetches, 1)

        second = await self._pip_download(oport, pport)
        with open(second, "rb") as f:
            self.assertEqual(f.read(), wheel)
        self.assertEqual(origin.count(f"/files/{WHEEL}"), 1)
        self.assertGreater(origin.count("/simple/demo-pkg/"), index_fetches)

        await server.stop()
        seen = len(origin.requests)
        third = await self._pip_download(oport, pport)
        with open(third, "rb") as f:
            self.assertEqual(f.read(), wheel)
        self.assertEqual(len(origin.requests), seen)

        with open(log, encoding="utf-8") as f:
            lines = f.read().splitlines()
        index_url = f"http://127.0.0.1:{oport}/simple/demo-pkg/"
        wheel_url = f"http://127.0.0.1:{oport}/files/{WHEEL}"
        last = {}
        for line in lines:
            fields = line.split()
            last[fields[3]] = fields[7]
        self.assertEqual(last.get(index_url), "STALE", lines)
        self.assertEqual(last.get(wheel_url), "HIT", lines)
