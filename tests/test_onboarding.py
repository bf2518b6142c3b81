"""The status page's client settings for the mounted mirrors (SPEC 6) and
the matching files under ``etc/clients/mirror/``."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.mirror.mirrors import parse_mirror
from cachingproxy.ops.onboarding import all_snippets
from cachingproxy.ops.statuspage import render_html

from .support import own_page, raw_exchange, start_proxy
from .test_mirror_clients import EXAMPLE, SNIPPETS
from .test_stats import Fixture


def _snapshot() -> dict[str, Any]:
    return Fixture().stats.snapshot()


def _settings_lines(text: str) -> list[str]:
    """The lines of a settings file that are not comments or blank."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "#!"))
    ]


def _pres(page: str) -> dict[str, str]:
    """The ``<pre>`` blocks of the page by the client named before each."""
    root = ET.fromstring(page.split("\n", 1)[1])
    found: dict[str, str] = {}
    client = ""
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "h3":
            client = (element.text or "").strip()
        elif tag == "pre":
            found[client] = found.get(client, "") + (element.text or "")
    return found


class ShippedSnippetTests(TestCase):
    """``etc/clients/mirror/`` says what the status page says."""

    def test_files_match_page(self) -> None:
        """For every preset (``packages``), each client's settings, written
        for ``cache.example.lan:3128``, are exactly the settings lines of its
        file under etc/clients/mirror/, and every such file is one of them
        (or one of the PyPI/npm extras and the proxy's own config)."""
        snippets = all_snippets(parse_mirror("packages"), EXAMPLE)
        shipped = {s.shipped for s in snippets}
        extras = {"cachingproxy.toml", "poetry-pyproject.toml", "yarnrc.yml"}
        self.assertEqual(set(os.listdir(SNIPPETS)), shipped | extras)
        clients = {s.client for s in snippets}
        for name in (
            "pip",
            "uv",
            "npm, pnpm",
            "go",
            "cargo",
            "gem",
            "Bundler",
            "Maven",
            "apt",
            "apk",
        ):
            self.assertIn(name, clients)
        for snippet in snippets:
            with open(os.path.join(SNIPPETS, snippet.shipped), encoding="utf-8") as f:
                text = f.read()
            self.assertEqual(
                _settings_lines(text), _settings_lines(snippet.text), snippet.shipped
            )
            self.assertIn(EXAMPLE, snippet.text)


class StatusPageSettingsTests(TestCase):
    """The settings on ``/`` use the Host the browser sent."""

    def test_render(self) -> None:
        """Mounted mirrors are listed with their upstreams and protocols and
        every client's settings name the host:port given; a hostile Host is
        escaped (the page stays well-formed XML)."""
        page = render_html(
            _snapshot(), host="cache.lan:8080", mirrors=parse_mirror("packages")
        )
        pres = _pres(page)
        self.assertIn("sparse+http://cache.lan:8080/crates/", pres["cargo"])
        self.assertIn("export GOPROXY=http://cache.lan:8080/go/", pres["go"])
        self.assertIn("<url>http://cache.lan:8080/maven2/</url>", pres["Maven"])
        self.assertIn("deb http://cache.lan:8080/debian/ bookworm main", pres["apt"])
        self.assertIn("http://cache.lan:8080/alpine/v3.20/main", pres["apk"])
        self.assertIn("trusted-host = cache.lan:8080", pres["pip"])
        self.assertIn("https://static.crates.io/crates/", page)
        hostile = render_html(
            _snapshot(), host='x"><script>&', mirrors=parse_mirror("go")
        )
        ET.fromstring(hostile.split("\n", 1)[1])
        self.assertNotIn("<script>", hostile)
        self.assertNotIn("Mirrors", render_html(_snapshot(), host="h", mirrors=()))

    def test_served(self) -> defer.Deferred[None]:
        """A running proxy with ``--mirror packages`` serves the settings on
        ``/`` for the name and port the request used."""
        return defer.Deferred.fromCoroutine(self._served())

    async def _served(self) -> None:
        _, port = start_proxy(self, mirrors=parse_mirror("packages"))
        response, body = await own_page(self, port, "/")
        self.assertEqual(response.code, 200)
        pres = _pres(body.decode())
        self.assertIn(f"registry=http://127.0.0.1:{port}/npm/", pres["npm, pnpm"])
        raw: Any = await raw_exchange(
            self,
            port,
            f"GET / HTTP/1.1\r\nHost: cachingproxy.test:{port}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        self.assertIn(f"sparse+http://cachingproxy.test:{port}/crates/".encode(), raw)
