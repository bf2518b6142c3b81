"""Real package clients against the mirror (SPEC 6): pip and npm point
straight at the cache (``--index-url http://127.0.0.1:P/pypi/simple/``,
``--registry http://127.0.0.1:P/npm/``).

The origins are local: a real pypiserver child process, small twisted.web
indexes in the test's reactor (PEP 503 HTML, PEP 691 JSON, npm packuments)
serving wheels and ``npm pack`` tarballs built here.  pip and npm are child
processes with every proxy variable and every pip/npm setting of the machine
shut out, so they only ever talk to the proxy under test.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from cachingproxy.config import Mirror

from .support import (
    REPO_ROOT,
    ChildServer,
    Origin,
    ProcessResult,
    StoppableOrigin,
    Twistd,
    build_wheel,
    client,
    client_env,
    curl,
    fetch,
    free_port,
    header,
    need,
    run,
    run_process,
    start_origin,
    start_proxy,
    stored,
    wait_for,
)

PEP691 = "application/vnd.pypi.simple.v1+json"
SNIPPETS = os.path.join(REPO_ROOT, "etc", "clients", "mirror")
"""The client configuration snippets the README shows."""
EXAMPLE = "cache.example.lan:3128"
"""The proxy address the snippets use."""


def snippet(name: str, address: str) -> str:
    """``etc/clients/mirror/NAME`` with the proxy's ``address`` filled in."""
    with open(os.path.join(SNIPPETS, name), encoding="utf-8") as f:
        text = f.read()
    if EXAMPLE not in text:
        raise AssertionError(f"{name} does not mention {EXAMPLE}")
    return text.replace(EXAMPLE, address)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- pip --------------------------------------------------------------------


def _demo_wheels() -> dict[str, tuple[str, bytes]]:
    """demo-app 1.0, which needs demo-lib (imports it), and demo-lib 1.0."""
    return {
        "demo-lib": build_wheel("demo-lib", "1.0"),
        "demo-app": build_wheel(
            "demo-app",
            "1.0",
            requires=["demo-lib>=1.0"],
            files={
                "demo_app/__init__.py": (
                    b"from demo_lib import VALUE as LIB\n"
                    b"VALUE = 'demo-app uses ' + LIB\n"
                )
            },
        ),
    }


async def pip(
    *args: str, config: str = os.devnull, timeout: float = 90
) -> ProcessResult:
    """Run this Python's pip with a clean environment (no proxy, no config
    but ``config``) and without pip's own cache, so every file comes from
    the index."""
    return await run_process(
        [
            sys.executable,
            "-m",
            "pip",
            *args,
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            "15",
            "--retries",
            "0",
        ],
        env=client_env(PIP_CONFIG_FILE=config),
        timeout=timeout,
    )


async def pip_install(
    test: TestCase, index_url: str | None, *requirements: str, config: str = os.devnull
) -> tuple[ProcessResult, str]:
    """``pip install --target`` a fresh directory from ``index_url`` only
    (or from the index that the pip ``config`` file names)."""
    target = os.path.abspath(test.mktemp())
    index = [] if index_url is None else ["--index-url", index_url]
    result = await pip(
        "install",
        "--only-binary",
        ":all:",
        *index,
        "--target",
        target,
        *requirements,
        config=config,
    )
    return result, target


def installed(target: str, module: str) -> str:
    """The source of ``module/__init__.py`` that pip installed into ``target``."""
    with open(os.path.join(target, module, "__init__.py"), encoding="utf-8") as f:
        return f.read()


async def import_value(target: str, module: str) -> str:
    """``module.VALUE`` as a fresh interpreter importing from ``target`` sees it."""
    result = await run_process(
        [sys.executable, "-c", f"import {module}; print({module}.VALUE)"],
        env=client_env(PYTHONPATH=target),
        timeout=30,
    )
    if result.code != 0:
        raise AssertionError(result.output)
    return result.out.decode().strip()


def access_log(path: str) -> list[tuple[str, str, int, str]]:
    """(url, status, bytes, X-Cache) of every line of an access log."""
    with open(path, encoding="utf-8") as f:
        fields = [line.split() for line in f]
    return [(f[3], f[4], int(f[5]), f[7]) for f in fields if len(f) >= 9]


def caches_of(lines: Iterable[tuple[str, str, int, str]], url: str) -> list[str]:
    return [cache for u, _, _, cache in lines if u == url]


def wheel_metadata(wheel: bytes) -> bytes:
    """The ``METADATA`` file inside ``wheel`` (what PEP 658 serves)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(path)


def html_page(
    links: Iterable[tuple[str, bytes]], prefix: str, metadata: bool = False
) -> bytes:
    """A PEP 503 project page linking ``prefix + filename#sha256=…`` (with
    PEP 658/714 ``data-core-metadata`` when ``metadata``)."""

    def extra(data: bytes) -> str:
        if not metadata:
            return ""
        digest = _sha256(wheel_metadata(data))
        return f' data-dist-info-metadata="sha256={digest}" data-core-metadata="sha256={digest}"'

    anchors = "".join(
        f'<a href="{prefix}{name}#sha256={_sha256(data)}"{extra(data)}>{name}</a><br/>\n'
        for name, data in links
    )
    return f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n".encode()


def json_page(
    project: str,
    links: Iterable[tuple[str, bytes]],
    prefix: str,
    metadata: bool = False,
) -> bytes:
    """A PEP 691 project page with ``url = prefix + filename`` (and PEP
    658/714 ``core-metadata`` when ``metadata``)."""
    files: list[dict[str, Any]] = []
    for name, data in links:
        item: dict[str, Any] = {
            "filename": name,
            "url": prefix + name,
            "hashes": {"sha256": _sha256(data)},
        }
        if metadata:
            digest = {"sha256": _sha256(wheel_metadata(data))}
            item["core-metadata"] = item["dist-info-metadata"] = digest
        files.append(item)
    return json.dumps(
        {"meta": {"api-version": "1.1"}, "name": project, "files": files}
    ).encode()


def serve_index(
    origin: Origin,
    projects: dict[str, list[tuple[str, bytes]]],
    *,
    link_prefix: str = "/packages/",
    file_bodies: dict[str, bytes] | None = None,
) -> None:
    """A PEP 503 HTML index on ``origin``: ``/simple/``, a page per project
    linking ``link_prefix + filename`` and the files under ``/packages/``
    (``file_bodies`` overrides what a file's URL serves)."""
    html = ("Content-Type", "text/html")
    names = "".join(f'<a href="{p}/">{p}</a>\n' for p in projects)
    origin.static("/simple/", f"<html><body>{names}</body></html>".encode(), [html])
    for project, files in projects.items():
        origin.static(f"/simple/{project}/", html_page(files, link_prefix), [html])
        for name, data in files:
            body = (file_bodies or {}).get(name, data)
            origin.static(f"/packages/{name}", body)


def came_through_proxy(origin: Origin, path: str) -> bool:
    """Whether every request for ``path`` the origin saw came via the proxy."""
    seen = [r for r in origin.requests if r.path == path]
    return bool(seen) and all("cachingproxy" in (r.header("via") or "") for r in seen)


class PypiServerTests(TestCase):
    """pip installs through the mirror from a real pypiserver, then from the
    cache alone."""

    def setUp(self) -> None:
        if importlib.util.find_spec("pypiserver") is None:
            raise self.skipTest(
                f"pypiserver is not installed for {sys.executable}"
                " (pip install '.[test]')"
            )

    def test_pip_install_with_dependency_then_origin_stopped(
        self,
    ) -> defer.Deferred[None]:
        """``pip install --index-url …/pypi/simple/ demo-app`` gets demo-app
        and its dependency demo-lib from pypiserver through the mirror
        (pypiserver's root-relative ``/packages/…`` links are made local, so
        each wheel is one MISS); with pypiserver stopped, a second install
        into a fresh directory with no pip cache succeeds from the cache
        alone (index pages and wheels are HITs)."""
        return run(self._pypiserver())

    async def _pypiserver(self) -> None:
        wheels = _demo_wheels()
        wheel_dir = os.path.abspath(self.mktemp())
        os.makedirs(wheel_dir)
        for name, data in wheels.values():
            with open(os.path.join(wheel_dir, name), "wb") as f:
                f.write(data)
        oport = free_port()
        server = ChildServer(
            self,
            [
                sys.executable,
                "-m",
                "pypiserver",
                "run",
                "-p",
                str(oport),
                "-i",
                "127.0.0.1",
                wheel_dir,
            ],
            oport,
            env=client_env(),
        )
        await server.wait_listening()
        base = f"http://127.0.0.1:{oport}/"
        log = os.path.abspath(self.mktemp())
        service, pport = start_proxy(
            self, mirrors=(Mirror("/pypi/", (base,)),), access_log=log
        )
        index = f"http://127.0.0.1:{pport}/pypi/simple/"

        # pypiserver's page really is root-relative: the rewriting is needed.
        _, page = await fetch(client(self), f"{base}simple/demo-app/")
        self.assertIn(b'href="/packages/demo_app-1.0-py3-none-any.whl#sha256=', page)

        result, first = await pip_install(self, index, "demo-app")
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(
            await import_value(first, "demo_app"), "demo-app uses demo-lib 1.0"
        )
        wheel_urls = [f"{base}packages/{name}" for name, _ in wheels.values()]
        lines = access_log(log)
        for url in wheel_urls:
            self.assertEqual(caches_of(lines, url), ["MISS"], lines)
            await stored(service, url)

        # Both of pypiserver's pages, as served, lead only into the mirror.
        local = f"http://127.0.0.1:{pport}/pypi/"
        for page in ("simple/", "simple/demo-app/"):
            response, body = await fetch(client(self), local + page)
            self.assertEqual(response.code, 200)
            assert_all_local(self, "html", body, local + page, local, base)

        await server.stop()
        self.assertFalse(server.running)
        seen = len(access_log(log))
        result, second = await pip_install(self, index, "demo-app")
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(installed(second, "demo_lib"), installed(first, "demo_lib"))
        self.assertEqual(installed(second, "demo_app"), installed(first, "demo_app"))
        later = access_log(log)[seen:]
        for url in wheel_urls:
            self.assertEqual(caches_of(later, url), ["HIT"], later)
        for project in ("demo-app", "demo-lib"):
            caches = caches_of(later, f"{base}simple/{project}/")
            self.assertTrue(caches, later)
            self.assertEqual(set(caches), {"HIT"}, later)


# -- what a client would follow ---------------------------------------------

_HREF = re.compile(r"""\bhref\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def followed_urls(kind: str, body: bytes, doc_url: str) -> list[str]:
    """The absolute URLs a client follows from an index document."""
    if kind == "html":
        raw = [u.replace("&amp;", "&") for u in _HREF.findall(body.decode())]
    else:
        document = json.loads(body)
        if kind == "npm":
            raw = [v["dist"]["tarball"] for v in document["versions"].values()]
        else:
            raw = [f["url"] for f in document.get("files", [])]
            raw += [p["url"] for p in document.get("projects", []) if "url" in p]
    return [urljoin(doc_url, u.partition("#")[0]) for u in raw]


def assert_all_local(
    test: TestCase, kind: str, body: bytes, doc_url: str, local: str, *bases: str
) -> None:
    """Every link of ``body`` (served at ``doc_url``) leads under ``local``
    and no upstream ``bases``' host:port appears anywhere in it."""
    urls = followed_urls(kind, body, doc_url)
    test.assertTrue(urls, body)
    for url in urls:
        test.assertTrue(url.startswith(local), f"{url} is not under {local}")
    for base in bases:
        authority = base.split("/")[2]
        test.assertNotIn(authority.encode(), body)


def negotiating_page(
    project: str,
    files: list[tuple[str, bytes]],
    link_prefix: str,
    served: list[str],
    *,
    json_too: bool = True,
    metadata: bool = False,
) -> Any:
    """A project page that is PEP 691 JSON when ``Accept`` asks for it (with
    ``Vary: Accept``) and HTML otherwise; ``served`` records which."""

    def handler(request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode()
        if json_too:
            request.setHeader(b"Vary", b"Accept")
        if json_too and PEP691 in accept:
            served.append("json")
            request.setHeader(b"Content-Type", PEP691.encode())
            body = json_page(project, files, link_prefix, metadata)
        else:
            served.append("html")
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            body = html_page(files, link_prefix, metadata)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    return handler


class PipIndexFormatTests(TestCase):
    """pip negotiates PEP 691 JSON or gets PEP 503 HTML through the mirror."""

    def test_pip_gets_pep691_json(self) -> defer.Deferred[None]:
        """pip asks for PEP 691 JSON (``Accept``); an index that offers it
        (``Vary: Accept``) serves JSON through the mirror, its file URLs
        (absolute ones and root-relative ones) are made local, and demo-app
        with its dependency installs, every wheel fetched by the proxy.  A
        client asking for HTML then gets the HTML variant: the two are
        kept apart.  pip reads PEP 658 metadata (``core-metadata``) through
        the mirror too."""
        return run(self._json())

    async def _json(self) -> None:
        wheels = _demo_wheels()
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        served: list[str] = []
        for project, prefix in (
            ("demo-app", f"{base}packages/"),
            ("demo-lib", "/packages/"),
        ):
            origin.route(
                f"/simple/{project}/",
                negotiating_page(
                    project, [wheels[project]], prefix, served, metadata=True
                ),
            )
        for name, data in wheels.values():
            origin.static(f"/packages/{name}", data)
            origin.static(f"/packages/{name}.metadata", wheel_metadata(data))
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", (base,)),))
        local = f"http://127.0.0.1:{pport}/pypi/"

        result, target = await pip_install(self, local + "simple/", "demo-app")
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(
            await import_value(target, "demo_app"), "demo-app uses demo-lib 1.0"
        )
        self.assertEqual(served, ["json", "json"])
        for seen in origin.requests:
            if seen.path.startswith("/simple/"):
                self.assertIn(PEP691, seen.header("accept") or "")
        for name, _ in wheels.values():
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}"))
            self.assertEqual(origin.count(f"/packages/{name}"), 1)
            # pip resolved from the PEP 658 metadata, fetched via the proxy.
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}.metadata"))

        http = client(self)
        for project in ("demo-app", "demo-lib"):
            page = f"{local}simple/{project}/"
            response, body = await fetch(http, page, {"Accept": PEP691})
            self.assertEqual(header(response, "content-type"), PEP691)
            self.assertEqual(response.length, len(body))
            assert_all_local(self, "json", body, page, local, base)
            response, body = await fetch(http, page, {"Accept": "text/html"})
            self.assertEqual(header(response, "x-cache"), "MISS")
            self.assertTrue(body.startswith(b"<!DOCTYPE html>"), body)
            response, body = await fetch(http, page, {"Accept": "text/html"})
            self.assertEqual(header(response, "x-cache"), "HIT")
            assert_all_local(self, "html", body, page, local, base)
        self.assertEqual(served, ["json", "json", *["json", "html"] * 2])

    def test_pip_with_html_only_index(self) -> defer.Deferred[None]:
        """An index that only speaks PEP 503 HTML answers pip's JSON-first
        ``Accept`` with HTML; through the mirror pip installs from it all the
        same, every wheel and its PEP 658 metadata (``data-core-metadata``)
        through the proxy."""
        return run(self._html_only())

    async def _html_only(self) -> None:
        wheels = _demo_wheels()
        origin, oport = start_origin(self)
        served: list[str] = []
        for project in ("demo-app", "demo-lib"):
            origin.route(
                f"/simple/{project}/",
                negotiating_page(
                    project,
                    [wheels[project]],
                    "/packages/",
                    served,
                    json_too=False,
                    metadata=True,
                ),
            )
        for name, data in wheels.values():
            origin.static(f"/packages/{name}", data)
            origin.static(f"/packages/{name}.metadata", wheel_metadata(data))
        base = f"http://127.0.0.1:{oport}/"
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", (base,)),))

        result, target = await pip_install(
            self, f"http://127.0.0.1:{pport}/pypi/simple/", "demo-app"
        )
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(
            await import_value(target, "demo_app"), "demo-app uses demo-lib 1.0"
        )
        self.assertEqual(served, ["html", "html"])
        for seen in origin.requests:
            if seen.path.startswith("/simple/"):
                self.assertIn(PEP691, seen.header("accept") or "")
        for name, _ in wheels.values():
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}"))
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}.metadata"))


# -- npm --------------------------------------------------------------------


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class NpmTests(TestCase):
    """npm installs through the mirror from a local registry, then from the
    cache alone."""

    def setUp(self) -> None:
        missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
        if missing:
            raise self.skipTest(f"{' and '.join(missing)} not installed")
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.npmrc = os.path.join(self.home, "npmrc")
        self.global_npmrc = os.path.join(self.home, "global-npmrc")
        for path in (self.npmrc, self.global_npmrc):
            with open(path, "w", encoding="utf-8") as f:
                f.write("")

    async def npm(
        self, cwd: str, *args: str, cache: str | None = None
    ) -> ProcessResult:
        """npm with an empty user and global config, a HOME of its own and no
        proxy in its environment."""
        return await run_process(
            [
                "npm",
                *args,
                "--userconfig",
                self.npmrc,
                "--globalconfig",
                self.global_npmrc,
                "--cache",
                cache or os.path.join(self.home, "cache"),
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
                "--loglevel",
                "warn",
            ],
            env=client_env(home=self.home),
            path=cwd,
            timeout=90,
        )

    async def pack(self, name: str, source: str, deps: dict[str, str]) -> bytes:
        """``npm pack`` of a package ``name`` 1.0.0 with ``index.js`` = source."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        manifest = {
            "name": name,
            "version": "1.0.0",
            "main": "index.js",
            "license": "MIT",
            "dependencies": deps,
        }
        with open(os.path.join(directory, "package.json"), "w") as f:
            json.dump(manifest, f)
        with open(os.path.join(directory, "index.js"), "w") as f:
            f.write(source)
        result = await self.npm(directory, "pack", "--pack-destination", directory)
        self.assertEqual(result.code, 0, result.output)
        packed = f"{name.lstrip('@').replace('/', '-')}-1.0.0.tgz"
        with open(os.path.join(directory, packed), "rb") as f:
            return f.read()

    async def registry(self) -> tuple[StoppableOrigin, str, Any, int, str]:
        """A local registry with demo-app 1.0.0, which needs the scoped
        @demo/lib 1.0.0 (packuments and ``npm pack`` tarballs), and a proxy
        mirroring it under /npm/; returns the registry, its base URL, the
        proxy service, its port and its access log."""
        deps = {"@demo/lib": {}, "demo-app": {"@demo/lib": "^1.0.0"}}
        tarballs = {
            "@demo/lib": await self.pack(
                "@demo/lib", "module.exports = '@demo/lib 1.0.0';\n", {}
            ),
            "demo-app": await self.pack(
                "demo-app",
                "module.exports = 'demo-app uses ' + require('@demo/lib');\n",
                deps["demo-app"],
            ),
        }
        server = StoppableOrigin(self)
        base = f"http://127.0.0.1:{server.port}/"
        for name, data in tarballs.items():
            document = registry_document(packument(name, data, base, deps[name]))
            # npm asks for a scoped package as @scope%2fname.
            for path in {name, name.replace("/", "%2f"), name.replace("/", "%2F")}:
                server.origin.route(f"/{path}", document)
            server.origin.static(f"/{tarball_path(name)}", data)
        log = os.path.abspath(self.mktemp())
        service, pport = start_proxy(
            self, mirrors=(Mirror("/npm/", (base,)),), access_log=log
        )
        return server, base, service, pport, log

    async def install(self, *options: str) -> None:
        """``npm install`` of demo-app into a fresh project with a fresh npm
        cache; checks that demo-app and @demo/lib work."""
        project = os.path.abspath(self.mktemp())
        os.makedirs(project)
        with open(os.path.join(project, "package.json"), "w") as f:
            json.dump(
                {
                    "name": "consumer",
                    "version": "1.0.0",
                    "private": True,
                    "dependencies": {"demo-app": "1.0.0"},
                },
                f,
            )
        result = await self.npm(
            project,
            "install",
            *options,
            "--offline=false",
            "--prefer-online",
            "--no-package-lock",
            "--fetch-retries=0",
            cache=os.path.abspath(self.mktemp()),
        )
        self.assertEqual(result.code, 0, result.output)
        shown = await run_process(
            ["node", "-e", "console.log(require('demo-app'))"],
            env=client_env(home=self.home),
            path=project,
            timeout=30,
        )
        self.assertEqual(
            shown.out.decode().strip(), "demo-app uses @demo/lib 1.0.0", shown.output
        )

    def test_npm_install_with_dependency_then_origin_stopped(
        self,
    ) -> defer.Deferred[None]:
        """``npm install --registry …/npm/`` of demo-app, which depends on
        the scoped @demo/lib, gets both packuments and both ``npm pack``
        tarballs through the mirror (``dist.tarball`` made local, npm's
        integrity check passes; each tarball is one MISS); with the registry
        stopped a second install with fresh node_modules and a fresh npm
        cache succeeds from the cache alone."""
        return run(self._npm())

    async def _npm(self) -> None:
        server, base, service, pport, log = await self.registry()
        origin = server.origin
        registry = f"http://127.0.0.1:{pport}/npm/"
        _, body = await fetch(client(self), registry + "demo-app")
        assert_all_local(self, "npm", body, registry + "demo-app", registry, base)

        await self.install("--registry", registry)
        packuments = [r for r in origin.requests if "/-/" not in r.path]
        self.assertTrue(
            all("cachingproxy" in (r.header("via") or "") for r in packuments)
        )
        names = ("@demo/lib", "demo-app")
        tarball_urls = [base + tarball_path(n) for n in names]
        lines = access_log(log)
        for url in tarball_urls:
            self.assertEqual(caches_of(lines, url), ["MISS"], lines)
            await stored(service, url)
        for name in names:
            self.assertTrue(came_through_proxy(origin, "/" + tarball_path(name)))

        await server.stop()
        seen = len(origin.requests)
        await self.install("--registry", registry)
        self.assertEqual(len(origin.requests), seen)
        later = access_log(log)[len(lines) :]
        for url in tarball_urls:
            self.assertEqual(caches_of(later, url), ["HIT"], later)

    def test_shipped_npmrc(self) -> defer.Deferred[None]:
        """``etc/clients/mirror/npmrc``, with the proxy's address filled in,
        is all npm needs: an install with no ``--registry`` goes through the
        mirror."""
        return run(self._shipped_npmrc())

    async def _shipped_npmrc(self) -> None:
        server, base, _, pport, log = await self.registry()
        with open(self.npmrc, "w", encoding="utf-8") as f:
            f.write(snippet("npmrc", f"localhost:{pport}"))
        await self.install()
        for name in ("@demo/lib", "demo-app"):
            self.assertEqual(
                caches_of(access_log(log), base + tarball_path(name)), ["MISS"]
            )
            self.assertTrue(came_through_proxy(server.origin, "/" + tarball_path(name)))


CORGI = "application/vnd.npm.install-v1+json"
"""The abbreviated packument npm asks registries for."""


def registry_document(document: bytes) -> Any:
    """A packument handler that, like the npm registry, answers
    ``Accept: application/vnd.npm.install-v1+json`` (older npm, yarn, pnpm)
    in that type, else as ``application/json``, with ``Vary: Accept``."""

    def handler(request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode()
        request.setHeader(b"Vary", b"Accept")
        if CORGI in accept:
            request.setHeader(b"Content-Type", CORGI.encode())
        else:
            request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(document))
        return document

    return handler


def tarball_path(name: str) -> str:
    """Where a registry keeps ``name`` 1.0.0's tarball (relative to its root):
    ``demo-app/-/demo-app-1.0.0.tgz``, ``@demo/lib/-/lib-1.0.0.tgz``."""
    return f"{name}/-/{name.rsplit('/', 1)[-1]}-1.0.0.tgz"


def packument(name: str, tarball: bytes, base: str, deps: dict[str, str]) -> bytes:
    """An npm packument for ``name`` 1.0.0 whose ``dist.tarball`` is an
    absolute URL on the registry at ``base``."""
    return json.dumps(
        {
            "name": name,
            "dist-tags": {"latest": "1.0.0"},
            "versions": {
                "1.0.0": {
                    "name": name,
                    "version": "1.0.0",
                    "main": "index.js",
                    "dependencies": deps,
                    "dist": {
                        "tarball": base + tarball_path(name),
                        "shasum": hashlib.sha1(tarball).hexdigest(),
                        "integrity": _sri(tarball),
                    },
                }
            },
        }
    ).encode()


# -- several upstreams -------------------------------------------------------


def _corp_wheels(value: str, version: str) -> tuple[str, bytes]:
    return build_wheel(
        "corp-lib",
        version,
        files={"corp_lib/__init__.py": f"VALUE = {value!r}\n".encode()},
    )


class SeveralUpstreamsTests(TestCase):
    """pip through a mirror with several upstreams: fallback, dependency
    confusion, merged file lists."""

    def test_fallback_on_refused_and_404(self) -> defer.Deferred[None]:
        """With a refused upstream first and an index without the project
        second, pip's install comes from the third: the page and the wheel
        both fall back (the wheel's link is made local, so the wheel falls
        back too), and ``X-Cache-Upstream`` names the third."""
        return run(self._fallback())

    async def _fallback(self) -> None:
        wheels = _demo_wheels()
        refused = f"http://127.0.0.1:{free_port()}/"
        empty, eport = start_origin(self)
        real, rport = start_origin(self)
        serve_index(real, {p: [w] for p, w in wheels.items()})
        bases = (refused, f"http://127.0.0.1:{eport}/", f"http://127.0.0.1:{rport}/")
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", bases),))
        local = f"http://127.0.0.1:{pport}/pypi/"

        result, target = await pip_install(self, local + "simple/", "demo-app")
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(
            await import_value(target, "demo_app"), "demo-app uses demo-lib 1.0"
        )
        for project, (name, _) in wheels.items():
            self.assertEqual(empty.count(f"/simple/{project}/"), 1)
            self.assertEqual(empty.count(f"/packages/{name}"), 1)
            self.assertTrue(came_through_proxy(real, f"/packages/{name}"))
            response, _ = await fetch(client(self), f"{local}packages/{name}")
            self.assertEqual(header(response, "x-cache"), "HIT")
            self.assertEqual(header(response, "x-cache-upstream"), bases[2])

    def test_private_project_wins(self) -> defer.Deferred[None]:
        """Dependency confusion: the private index (first) has corp-lib 1.0,
        the public one a higher corp-lib 2.0; pip installs the private 1.0
        and the public index is never asked for corp-lib.  A project only
        the public index has still installs (404 at the private one)."""
        return run(self._private_wins())

    async def _private_wins(self) -> None:
        private, pvport = start_origin(self)
        public, pbport = start_origin(self)
        tool = build_wheel("public-tool", "3.0")
        serve_index(private, {"corp-lib": [_corp_wheels("private", "1.0")]})
        serve_index(
            public,
            {"corp-lib": [_corp_wheels("public", "2.0")], "public-tool": [tool]},
        )
        bases = (f"http://127.0.0.1:{pvport}/", f"http://127.0.0.1:{pbport}/")
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", bases),))

        result, target = await pip_install(
            self, f"http://127.0.0.1:{pport}/pypi/simple/", "corp-lib", "public-tool"
        )
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(installed(target, "corp_lib"), "VALUE = 'private'\n")
        self.assertEqual(
            installed(target, "public_tool"), "VALUE = 'public-tool 3.0'\n"
        )
        self.assertEqual(public.count("/simple/corp-lib/"), 0)
        self.assertFalse(
            [r for r in public.requests if "corp_lib" in r.path], public.requests
        )

    def test_merge_unions_file_lists(self) -> defer.Deferred[None]:
        """``merge = true``: the project page lists the files of every
        upstream, so pip sees corp-lib 1.0 (private) and 2.0 (public) and
        installs the newest, 2.0, from the second upstream through the
        mirror; the merged page leads only into the mirror."""
        return run(self._merge())

    async def _merge(self) -> None:
        private, pvport = start_origin(self)
        public, pbport = start_origin(self)
        serve_index(private, {"corp-lib": [_corp_wheels("private", "1.0")]})
        serve_index(public, {"corp-lib": [_corp_wheels("public", "2.0")]})
        bases = (f"http://127.0.0.1:{pvport}/", f"http://127.0.0.1:{pbport}/")
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", bases, merge=True),))
        local = f"http://127.0.0.1:{pport}/pypi/"

        result = await pip(
            "index", "versions", "--index-url", local + "simple/", "corp-lib"
        )
        self.assertEqual(result.code, 0, result.output)
        self.assertIn("Available versions: 2.0, 1.0", result.output)
        result, target = await pip_install(self, local + "simple/", "corp-lib")
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(installed(target, "corp_lib"), "VALUE = 'public'\n")
        self.assertTrue(
            came_through_proxy(public, "/packages/corp_lib-2.0-py3-none-any.whl")
        )
        page = local + "simple/corp-lib/"
        _, body = await fetch(client(self), page)
        assert_all_local(self, "html", body, page, local, *bases)
        self.assertIn(b"corp_lib-1.0-py3-none-any.whl", body)
        self.assertIn(b"corp_lib-2.0-py3-none-any.whl", body)


# -- hash checks ---------------------------------------------------------------


class TamperedArtifactTests(TestCase):
    """A file whose bytes do not match the digest its index published."""

    def test_tampered_wheel_refused_and_not_cached(self) -> defer.Deferred[None]:
        """The index publishes the right wheel's ``#sha256=``, the origin
        serves other bytes of the same length: pip's install fails, curl's
        transfer breaks off before the last byte, the proxy
        stores nothing (the store has no entry, so the origin is asked
        again each time) and its access log shows the cut: status 200,
        MISS, one byte fewer than the file."""
        return run(self._tampered())

    async def _tampered(self) -> None:
        # Big enough to arrive in many segments: curl reads the head and
        # most of the body before the proxy cuts the connection.
        name, good = build_wheel(
            "demo-lib",
            "1.0",
            files={
                "demo_lib/__init__.py": b"VALUE = 'demo-lib 1.0'\n",
                "demo_lib/payload.bin": os.urandom(2 * 1024 * 1024),
            },
        )
        bad = good[:-1] + bytes([good[-1] ^ 0xFF])
        origin, oport = start_origin(self)
        serve_index(origin, {"demo-lib": [(name, good)]}, file_bodies={name: bad})
        base = f"http://127.0.0.1:{oport}/"
        log = os.path.abspath(self.mktemp())
        service, pport = start_proxy(
            self, mirrors=(Mirror("/pypi/", (base,)),), access_log=log
        )
        local = f"http://127.0.0.1:{pport}/pypi/"
        key = f"{base}packages/{name}"
        assert service.store is not None

        result, target = await pip_install(self, local + "simple/", "demo-lib")
        self.assertNotEqual(result.code, 0, result.output)
        self.assertFalse(os.path.exists(os.path.join(target, "demo_lib")))
        self.assertEqual(await service.store.lookup(key), [])
        # Recent pip resumes a broken download (--resume-retries) with a
        # Range request: each attempt is a new upstream fetch, cut again.
        fetched = origin.count(f"/packages/{name}")
        self.assertGreaterEqual(fetched, 1)
        attempts = [(s, n, c) for u, s, n, c in access_log(log) if u == key]
        self.assertEqual(len(attempts), fetched)
        self.assertEqual(attempts[0], ("200", len(good) - 1, "MISS"))
        for status, sent, cache in attempts:
            self.assertIn(status, ("200", "206"))
            self.assertLess(sent, len(good))
            self.assertEqual(cache, "MISS")

        need("curl")
        result = await curl(
            f"{local}packages/{name}", out=self.mktemp(), env=client_env()
        )
        # The proxy aborts the connection: curl sees a partial file (18) or
        # the reset (56), having received at most all but the last byte.
        self.assertIn(result.code, (18, 56), result.output)
        got = result.body
        self.assertLess(len(got), len(bad))
        self.assertEqual(got, bad[: len(got)])
        self.assertEqual(result.headers.get("x-cache"), "MISS")
        self.assertEqual(result.headers.get("content-length"), str(len(good)))
        self.assertEqual(await service.store.lookup(key), [])
        self.assertEqual(origin.count(f"/packages/{name}"), fetched + 1)
        self.flushLoggedErrors()


# -- documents -----------------------------------------------------------------


class RewrittenDocumentTests(TestCase):
    """What a client reads in an index served through the mirror."""

    def test_no_upstream_url_left(self) -> defer.Deferred[None]:
        """PEP 503 HTML (absolute, root-relative and page-relative links),
        PEP 691 JSON (absolute and root-relative ``url``) and an npm
        packument (absolute ``dist.tarball``; full and abbreviated) fetched
        through the mirror
        contain no upstream host:port, every link leads under the mirror's
        prefix on the Host the client used, and Content-Length is right;
        the stored bodies stay as the upstream sent them."""
        return run(self._documents())

    async def _documents(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        files = [("a-1.0.tar.gz", b"a"), ("a-1.1.tar.gz", b"b"), ("a-2.0.whl", b"c")]
        anchors = (
            f'<a href="{base}packages/a-1.0.tar.gz#sha256={_sha256(b"a")}">1</a>'
            f'<a href="/packages/a-1.1.tar.gz#sha256={_sha256(b"b")}">2</a>'
            f'<a href="../../packages/a-2.0.whl">3</a>'
        )
        html = f"<html><body>{anchors}</body></html>".encode()
        origin.static("/simple/a/", html, [("Content-Type", "text/html")])
        doc = json.loads(json_page("b", files[:1], f"{base}packages/"))
        doc["files"] += json.loads(json_page("b", files[1:], "/packages/"))["files"]
        pep691 = json.dumps(doc).encode()
        origin.static("/simple/b/", pep691, [("Content-Type", PEP691)])
        npm_doc = packument("c", b"tarball", base, {})
        origin.route("/c", registry_document(npm_doc))
        service, pport = start_proxy(self, mirrors=(Mirror("/m/", (base,)),))
        assert service.store is not None

        for host in (f"127.0.0.1:{pport}", f"localhost:{pport}"):
            local = f"http://{host}/m/"
            http = client(self)
            for kind, path, original, accept in (
                ("html", "simple/a/", html, "text/html"),
                ("json", "simple/b/", pep691, PEP691),
                ("npm", "c", npm_doc, "application/json"),
                ("npm", "c", npm_doc, CORGI),
            ):
                response, body = await fetch(http, local + path, {"Accept": accept})
                self.assertEqual(response.code, 200)
                self.assertEqual(response.length, len(body))
                assert_all_local(self, kind, body, local + path, local, base)
                entries = await service.store.lookup(base + path)
                self.assertTrue(entries)
                for entry in entries:
                    self.assertEqual(entry.size, len(original))

    def test_redirect_leads_into_the_mirror(self) -> defer.Deferred[None]:
        """A redirect from a mirrored upstream (pypiserver and PyPI answer a
        non-normalised project name with 301) names a URL under the mirror in
        ``Location``, absolute or root-relative alike, so the client's next
        request also goes through the cache instead of straight upstream (or
        to the proxy's own pages)."""
        return run(self._redirect())

    async def _redirect(self) -> None:
        origin, oport = start_origin(self)
        base = f"http://127.0.0.1:{oport}/"
        for name, location in (
            ("Demo_App", f"{base}simple/demo-app/"),
            ("Demo.Lib", "/simple/demo-lib/"),
        ):
            origin.static(f"/simple/{name}/", b"", [("Location", location)], 301)
        _, pport = start_proxy(self, mirrors=(Mirror("/pypi/", (base,)),))
        local = f"http://127.0.0.1:{pport}/pypi/"
        http = client(self)
        for name, project in (("Demo_App", "demo-app"), ("Demo.Lib", "demo-lib")):
            response = await http.get(f"{local}simple/{name}/", allow_redirects=False)
            await response.content()
            self.assertEqual(response.code, 301)
            self.assertEqual(
                urljoin(f"{local}simple/{name}/", header(response, "location") or ""),
                f"{local}simple/{project}/",
            )


# -- the shipped client snippets -----------------------------------------------


class ClientSnippetTests(TestCase):
    """``etc/clients/mirror/``: the snippets the README shows."""

    def test_shipped_pip_conf(self) -> defer.Deferred[None]:
        """``pip.conf``, with the proxy's address filled in, is all pip
        needs: an install with no ``--index-url`` goes through the mirror."""
        return run(self._pip_conf())

    async def _pip_conf(self) -> None:
        wheels = _demo_wheels()
        origin, oport = start_origin(self)
        serve_index(origin, {p: [w] for p, w in wheels.items()})
        _, pport = start_proxy(
            self, mirrors=(Mirror("/pypi/", (f"http://127.0.0.1:{oport}/",)),)
        )
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            f.write(snippet("pip.conf", f"localhost:{pport}"))
        result, target = await pip_install(self, None, "demo-app", config=config)
        self.assertEqual(result.code, 0, result.output)
        self.assertIn(f"http://localhost:{pport}/pypi/simple/", result.output)
        self.assertEqual(
            await import_value(target, "demo_app"), "demo-app uses demo-lib 1.0"
        )
        for name, _ in wheels.values():
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}"))

    def test_snippets_agree(self) -> None:
        """Every snippet names the URL the ``pypi``/``npm`` presets serve
        (``/pypi/simple/``, ``/npm/``) on the same example address, and the
        proxy's own ``cachingproxy.toml`` there is a valid config that sets
        those presets up under that name."""
        import tomllib

        from cachingproxy.tap import Options

        pypi = f"http://{EXAMPLE}/pypi/simple/"
        npm = f"http://{EXAMPLE}/npm/"
        with open(os.path.join(SNIPPETS, "uv.toml"), "rb") as f:
            self.assertEqual(tomllib.load(f)["index"][0]["url"], pypi)
        with open(os.path.join(SNIPPETS, "poetry-pyproject.toml"), "rb") as f:
            (source,) = tomllib.load(f)["tool"]["poetry"]["source"]
        self.assertEqual((source["url"], source["priority"]), (pypi, "primary"))
        self.assertIn(f"index-url = {pypi}\n", snippet("pip.conf", EXAMPLE))
        self.assertIn(f"registry={npm}\n", snippet("npmrc", EXAMPLE))
        self.assertIn(f'npmRegistryServer: "{npm}"\n', snippet("yarnrc.yml", EXAMPLE))

        options = Options()
        options.parseOptions(
            [
                "--config",
                os.path.join(SNIPPETS, "cachingproxy.toml"),
                "--cache-dir",
                os.path.abspath(self.mktemp()),
            ]
        )
        config = options.proxy_config
        self.assertIn(EXAMPLE.split(":")[0], config.names)
        self.assertLessEqual(
            {"/pypi/", "/pypi-files/", "/npm/"}, {m.prefix for m in config.mirrors}
        )


# -- the command line ----------------------------------------------------------


class TwistdMirrorTests(TestCase):
    """``twistd cachingproxy --mirror …`` end to end."""

    def test_preset_overridden_on_the_command_line(self) -> defer.Deferred[None]:
        """``--mirror pypi --mirror /pypi/=http://127.0.0.1:ORIGIN/``: the
        later route replaces the preset's ``/pypi/`` → pypi.org, so ``pip
        download`` through a real twistd process gets demo-app and demo-lib
        from the local index (each wheel fetched once, via the proxy), and
        the wheel then is a HIT naming the local upstream."""
        return run(self._twistd())

    async def _twistd(self) -> None:
        wheels = _demo_wheels()
        origin, oport = start_origin(self)
        serve_index(origin, {p: [w] for p, w in wheels.items()})
        base = f"http://127.0.0.1:{oport}/"
        log = os.path.abspath(self.mktemp())
        proxy = Twistd(
            self,
            self.mktemp(),
            *("--mirror", "pypi", "--mirror", f"/pypi/={base}"),
            *("--access-log", log),
        )
        await proxy.wait_listening()
        local = f"http://127.0.0.1:{proxy.port}/pypi/"
        dest = os.path.abspath(self.mktemp())
        result = await pip(
            "download", "--index-url", local + "simple/", "-d", dest, "demo-app"
        )
        self.assertEqual(result.code, 0, result.output + proxy.log())
        for name, data in wheels.values():
            with open(os.path.join(dest, name), "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(origin.count(f"/packages/{name}"), 1)
            self.assertTrue(came_through_proxy(origin, f"/packages/{name}"))
        name = wheels["demo-lib"][0]
        wheel = f"{base}packages/{name}"
        # The MISS's line (written by whichever worker served it) before the
        # HIT's, so that the log keeps their order.
        await wait_for(
            lambda: os.path.exists(log) and bool(caches_of(access_log(log), wheel))
        )
        response, _ = await fetch(client(self), f"{local}packages/{name}")
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(header(response, "x-cache-upstream"), base)
        await proxy.stop()
        lines = access_log(log)
        self.assertEqual(caches_of(lines, wheel), ["MISS", "HIT"])
