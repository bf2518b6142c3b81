"""Every ecosystem's own client against its preset (SPEC 6), cold and offline.

For each protocol a small registry is built on disk in its own layout
(tests/registries.py) and served by a local twisted.web origin; the proxy
mounts it under the preset's prefix with the upstream overridden (and the
preset's protocol kept), and the real client runs against the cache: a cold
install succeeds; then, with the origin stopped and the client's own cache
emptied, the install succeeds again from the cache, the immutable files
answering ``HIT``.  A client that is not installed skips its test, saying
how ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.config import Mirror

from .registries import (
    DirectoryOrigin,
    alpine_repository,
    crate,
    crate_index_path,
    go_module,
    read,
    write,
)
from .support import (
    ChildServer,
    ProcessResult,
    StoppableOrigin,
    build_wheel,
    client_env,
    curl,
    free_port,
    no_proxy_env,
    pause,
    run,
    run_process,
    start_origin,
    start_proxy,
)
from .test_mirror_clients import (
    _demo_wheels,
    access_log,
    came_through_proxy,
    installed,
    pip_install,
    serve_index,
)


def need(tool: str, how: str) -> str:
    """The path of ``tool``, or skip saying how CI installs it."""
    path = shutil.which(tool)
    if path is None:
        raise SkipTest(f"{tool} is not installed ({how})")
    return path


def mount(
    test: TestCase, *mirrors: tuple[str, str, str], **overrides: Any
) -> tuple[int, str]:
    """An in-process proxy with ``(prefix, upstream, protocol)`` mounted and
    an access log; returns its port and the log's path."""
    log = os.path.abspath(test.mktemp())
    _, port = start_proxy(
        test,
        mirrors=tuple(Mirror(p, (u,), protocol=proto) for p, u, proto in mirrors),
        access_log=log,
        **overrides,
    )
    return port, log


def caches_since(log: str, seen: int, base: str) -> dict[str, list[str]]:
    """X-Cache values, by path below ``base``, of the log's lines after the
    first ``seen``."""
    result: dict[str, list[str]] = {}
    for url, _, _, cache in access_log(log)[seen:]:
        if url.startswith(base):
            result.setdefault(url[len(base) - 1 :], []).append(cache)
    return result


def assert_ok(test: TestCase, result: ProcessResult) -> None:
    test.assertEqual(result.code, 0, f"{result.argv!r}:\n{result.output}")


class GoTests(TestCase):
    """``go mod download`` with ``GOPROXY=http://cache/go/``."""

    timeout = 240

    def test_go_mod_download(self) -> defer.Deferred[None]:
        """Two modules (demo requires dep) from a GOPROXY tree: the cold
        download succeeds through ``/go/`` and writes go.sum; with the origin
        stopped and a fresh module cache, it succeeds again, checked against
        that go.sum, every ``.mod`` and ``.zip`` a HIT."""
        return run(self._go())

    async def _go(self) -> None:
        go = need("go", ".ci/run installs golang-go")
        root = os.path.abspath(self.mktemp())
        go_module(root, "example.com/dep", "v1.2.0", {})
        go_module(root, "example.com/demo", "v1.0.0", {"example.com/dep": "v1.2.0"})
        origin = DirectoryOrigin(self, root)
        port, log = mount(self, ("/go/", origin.base, "go"))
        app = os.path.abspath(self.mktemp())
        write(
            os.path.join(app, "go.mod"),
            b"module test.local/app\n\ngo 1.19\n\nrequire (\n"
            b"\texample.com/demo v1.0.0\n\texample.com/dep v1.2.0\n)\n",
        )
        write(
            os.path.join(app, "main.go"),
            b'package main\n\nimport _ "example.com/demo"\n\nfunc main() {}\n',
        )

        async def download() -> ProcessResult:
            home = os.path.abspath(self.mktemp())
            env = no_proxy_env(
                HOME=home,
                GOPATH=os.path.join(home, "go"),
                GOMODCACHE=os.path.join(home, "modcache"),
                GOCACHE=os.path.join(home, "gocache"),
                GOPROXY=f"http://127.0.0.1:{port}/go/",
                GOSUMDB="off",
                GOFLAGS="-mod=mod",
                GO111MODULE="on",
                GONOPROXY="",
                GOPRIVATE="",
                GOTOOLCHAIN="local",
                GOTELEMETRY="off",
            )
            result = await run_process(
                [go, "mod", "download", "-x", "all"], env=env, path=app, timeout=120
            )
            subprocess.run(["chmod", "-R", "u+w", home], check=False)
            return result

        assert_ok(self, await download())
        go_sum = read(os.path.join(app, "go.sum")).decode()
        self.assertIn("example.com/demo v1.0.0 h1:", go_sum)
        self.assertIn("example.com/dep v1.2.0/go.mod h1:", go_sum)
        files = [
            f"/example.com/{m}/@v/{v}.{ext}"
            for m, v in (("demo", "v1.0.0"), ("dep", "v1.2.0"))
            for ext in ("mod", "zip")
        ]
        for path in files:
            self.assertEqual(origin.fetched(path), 1, origin.site.seen)

        await origin.stop()
        seen = len(access_log(log))
        assert_ok(self, await download())
        self.assertEqual(read(os.path.join(app, "go.sum")).decode(), go_sum)
        caches = caches_since(log, seen, origin.base)
        for path in files:
            self.assertEqual(set(caches.get(path, ["none"])), {"HIT"}, caches)


GOCODE = "/usr/share/gocode"
"""Debian's Go source tree (golang-golang-x-mod-dev: golang.org/x/mod/sumdb)."""


class GoSumdbTests(TestCase):
    """``GOSUMDB`` through the cache: the checksum database proxied under
    ``/go/sumdb/`` as proxy.golang.org serves sum.golang.org."""

    timeout = 240

    def test_checksum_database_through_the_cache(self) -> defer.Deferred[None]:
        """A module proxy with its own checksum database (tests/sumdb: x/mod's
        sumdb server over the modules' real hashes, its own signing key),
        mounted under ``/go/``; ``GOSUMDB`` names that key and go reaches the
        database only through ``GOPROXY`` (``/go/sumdb/NAME/supported``,
        ``lookup``, ``tile``): the cold download is verified; with the origin
        stopped, a fresh module cache and no go.sum, it is verified again
        from the cache alone, lookups and zips HITs."""
        return run(self._sumdb())

    async def _sumdb(self) -> None:
        go = need("go", ".ci/run installs golang-go")
        if not os.path.isdir(os.path.join(GOCODE, "src/golang.org/x/mod/sumdb")):
            raise SkipTest(
                "golang-golang-x-mod-dev is not installed (.ci/run installs it)"
            )
        build = os.path.abspath(self.mktemp())
        os.makedirs(build)
        helper = os.path.join(build, "sumdb-server")
        source = os.path.join(os.path.dirname(__file__), "sumdb", "main.go")
        assert_ok(
            self,
            await run_process(
                [go, "build", "-o", helper, source],
                env=no_proxy_env(
                    GO111MODULE="off",
                    GOPATH=GOCODE,
                    GOCACHE=os.path.join(build, "cache"),
                    GOFLAGS="",
                    HOME=build,
                ),
                path=build,
                timeout=120,
            ),
        )
        root = os.path.abspath(self.mktemp())
        go_module(root, "example.com/dep", "v1.2.0", {})
        go_module(root, "example.com/demo", "v1.0.0", {"example.com/dep": "v1.2.0"})
        oport = free_port()
        origin = ChildServer(
            self, [helper, f"127.0.0.1:{oport}", "test.sumdb", root], oport
        )
        await origin.wait_for_text("test.sumdb+")
        await origin.wait_listening()
        vkey = origin.text().split()[0]
        base = f"http://127.0.0.1:{oport}/"
        port, log = mount(self, ("/go/", base, "go"))
        app = os.path.abspath(self.mktemp())
        write(
            os.path.join(app, "go.mod"),
            b"module test.local/app\n\ngo 1.19\n\nrequire (\n"
            b"\texample.com/demo v1.0.0\n\texample.com/dep v1.2.0\n)\n",
        )

        async def download() -> ProcessResult:
            home = os.path.abspath(self.mktemp())
            result = await run_process(
                [go, "mod", "download", "all"],
                env=no_proxy_env(
                    HOME=home,
                    GOPATH=os.path.join(home, "go"),
                    GOMODCACHE=os.path.join(home, "modcache"),
                    GOCACHE=os.path.join(home, "gocache"),
                    GOPROXY=f"http://127.0.0.1:{port}/go/",
                    GOSUMDB=vkey,
                    GOFLAGS="-mod=mod",
                    GO111MODULE="on",
                    GONOSUMDB="",
                    GONOPROXY="",
                    GOPRIVATE="",
                    GOTOOLCHAIN="local",
                ),
                path=app,
                timeout=120,
            )
            subprocess.run(["chmod", "-R", "u+w", home], check=False)
            return result

        assert_ok(self, await download())
        go_sum = read(os.path.join(app, "go.sum"))
        lookups = [
            f"/sumdb/test.sumdb/lookup/example.com/{m}"
            for m in ("demo@v1.0.0", "dep@v1.2.0")
        ]
        seen = [url[len(base) - 1 :] for url, _, _, _ in access_log(log)]
        for path in lookups:
            self.assertIn(path, seen)
        self.assertIn("/sumdb/test.sumdb/supported", seen)

        await origin.stop()
        os.remove(os.path.join(app, "go.sum"))
        first = len(access_log(log))
        assert_ok(self, await download())
        self.assertEqual(read(os.path.join(app, "go.sum")), go_sum)
        caches = caches_since(log, first, base)
        for path in [*lookups, "/example.com/demo/@v/v1.0.0.zip"]:
            self.assertEqual(set(caches.get(path, ["none"])), {"HIT"}, caches)


class CargoTests(TestCase):
    """``cargo fetch`` from a sparse registry at ``sparse+http://cache/crates/``."""

    timeout = 240

    def test_cargo_fetch(self) -> defer.Deferred[None]:
        """A sparse index whose ``config.json`` sends downloads to the
        origin's ``/dl``: through ``/crates/`` the ``dl`` is rewritten to the
        cache's ``/crates-dl``, so both ``.crate`` files come through the
        cache (each fetched from the origin once); with the origin stopped
        and a fresh ``CARGO_HOME``, ``cargo fetch`` succeeds again, the
        crates HITs."""
        return run(self._cargo())

    async def _cargo(self) -> None:
        cargo = need("cargo", ".ci/run installs cargo")
        version = await run_process([cargo, "--version"], env=no_proxy_env())
        found = re.search(rb"cargo 1\.(\d+)", version.out)
        if found is None or int(found[1]) < 68:
            raise SkipTest(
                f"{version.out.decode().strip()} predates sparse registries (1.68)"
            )
        root = os.path.abspath(self.mktemp())
        index, files = os.path.join(root, "index"), os.path.join(root, "dl")
        crate(index, files, "dep", "1.2.0", {})
        crate(index, files, "demo", "1.0.0", {"dep": "^1.2"})
        origin = DirectoryOrigin(self, root)
        write(
            os.path.join(index, "config.json"),
            f'{{"dl": "{origin.base}dl", "api": "{origin.base}"}}'.encode(),
        )
        port, log = mount(
            self,
            ("/crates/", origin.base + "index/", "crates"),
            ("/crates-dl/", origin.base + "dl/", "crates-dl"),
        )
        app = os.path.abspath(self.mktemp())
        write(
            os.path.join(app, "Cargo.toml"),
            b'[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n\n'
            b'[dependencies]\ndemo = "1.0"\n',
        )
        write(os.path.join(app, "src", "main.rs"), b"fn main() {}\n")

        async def fetch() -> ProcessResult:
            home = os.path.abspath(self.mktemp())
            write(
                os.path.join(home, "config.toml"),
                (
                    '[source.crates-io]\nreplace-with = "cache"\n\n'
                    f'[source.cache]\nregistry = "sparse+http://127.0.0.1:{port}/crates/"\n\n'
                    "[net]\nretry = 0\n"
                ).encode(),
            )
            env = no_proxy_env(CARGO_HOME=home, CARGO_TERM_COLOR="never")
            return await run_process(
                [cargo, "fetch", "-v"], env=env, path=app, timeout=120
            )

        assert_ok(self, await fetch())
        downloads = ["/dl/dep/1.2.0/download", "/dl/demo/1.0.0/download"]
        for path in downloads:
            self.assertEqual(origin.fetched(path), 1, origin.site.seen)
        self.assertIn("demo", read(os.path.join(app, "Cargo.lock")).decode())

        await origin.stop()
        seen = len(access_log(log))
        assert_ok(self, await fetch())
        caches = caches_since(log, seen, origin.base)
        for path in downloads:
            self.assertEqual(caches.get(path), ["HIT"], caches)
        self.assertEqual(
            set(caches.get("/index/" + crate_index_path("demo"), ["none"])), {"HIT"}
        )


class AlpineTests(TestCase):
    """What ``apk`` fetches (``APKINDEX.tar.gz``, ``.apk``), with curl:
    ``apk`` itself is not packaged for Debian."""

    def test_apk_fetches(self) -> defer.Deferred[None]:
        """curl gets the index and both packages through ``/alpine/``, byte
        for byte; with the origin stopped, again, the ``.apk`` files HITs."""
        return run(self._alpine())

    async def _alpine(self) -> None:
        need("curl", ".ci/run installs curl")
        root = os.path.abspath(self.mktemp())
        made = alpine_repository(root, "v3.20", "x86_64")
        origin = DirectoryOrigin(self, root)
        port, log = mount(self, ("/alpine/", origin.base, "alpine"))

        async def fetch_all() -> None:
            for path, data in made.items():
                url = f"http://127.0.0.1:{port}/alpine/{path}"
                result = await curl(url, "-f", out=self.mktemp())
                assert_ok(self, result.process)
                self.assertEqual(result.body, data, path)

        await fetch_all()
        await origin.stop()
        seen = len(access_log(log))
        await fetch_all()
        caches = caches_since(log, seen, origin.base)
        for path in made:
            expected = "HIT" if path.endswith(".apk") else caches[f"/{path}"][0]
            self.assertEqual(caches[f"/{path}"], [expected], caches)
        self.assertEqual(set(caches), {f"/{p}" for p in made})


class UvTests(TestCase):
    """``uv pip install`` against the PyPI preset."""

    timeout = 240

    def test_uv_pip_install(self) -> defer.Deferred[None]:
        """demo-app and its dependency install with uv through ``/pypi/``
        (the index's root-relative links made local, each wheel fetched once
        from the origin, via the proxy); with the origin stopped and a fresh
        uv cache, again, the wheels HITs and the same files installed."""
        return run(self._uv())

    async def _uv(self) -> None:
        uv = need("uv", "pip install '.[test]' installs it")
        wheels = _demo_wheels()
        origin = StoppableOrigin(self)
        serve_index(origin.origin, {p: [w] for p, w in wheels.items()})
        base = f"http://127.0.0.1:{origin.port}/"
        port, log = mount(self, ("/pypi/", base, "pypi"))

        async def install() -> str:
            target = os.path.abspath(self.mktemp())
            result = await run_process(
                [
                    uv,
                    "pip",
                    "install",
                    "--no-config",
                    "--python",
                    sys.executable,
                    "--cache-dir",
                    os.path.abspath(self.mktemp()),
                    "--index-url",
                    f"http://127.0.0.1:{port}/pypi/simple/",
                    "--target",
                    target,
                    "demo-app",
                ],
                env=client_env(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1"),
                timeout=120,
            )
            assert_ok(self, result)
            return target

        first = await install()
        for name, _ in wheels.values():
            path = f"/packages/{name}"
            gets = [r for r in origin.origin.requests if r.path == path]
            self.assertEqual([r.method for r in gets if r.method == "GET"], ["GET"])
            self.assertTrue(came_through_proxy(origin.origin, path))
        await origin.stop()
        seen = len(access_log(log))
        second = await install()
        for module in ("demo_app", "demo_lib"):
            self.assertEqual(installed(second, module), installed(first, module))
        caches = caches_since(log, seen, base)
        for name, _ in wheels.values():
            # uv reads a wheel's metadata with Range requests, then the wheel.
            self.assertEqual(set(caches.get(f"/packages/{name}", [])), {"HIT"}, caches)


class FreshReleaseTests(TestCase):
    """``--index-refresh`` with pip: a release published after the index was
    cached is installable without waiting out ``--index-ttl``."""

    timeout = 240

    def test_pip_sees_new_release(self) -> defer.Deferred[None]:
        """demo-lib 1.0 is installed through the mirror (index TTL an hour,
        refresh interval 1 s); demo-lib 2.0 is published; once a second has
        passed, three concurrent ``pip install --refresh-package demo-lib
        demo-lib==2.0`` succeed (pip then asks for the page with
        ``max-age=0``; older pips did on every page), the page revalidated
        upstream.  Without the refresh the cached page would not list 2.0 for
        an hour.  (That one interval allows one revalidation, however many
        clients ask, is pinned over a Clock in test_presets.)"""
        return run(self._fresh())

    async def _fresh(self) -> None:
        lib_1 = build_wheel("demo-lib", "1.0")
        lib_2 = build_wheel("demo-lib", "2.0")
        origin, oport = start_origin(self)
        serve_index(origin, {"demo-lib": [lib_1]})
        base = f"http://127.0.0.1:{oport}/"
        port, _ = mount(
            self, ("/pypi/", base, "pypi"), index_ttl=3600.0, index_refresh=1.0
        )
        index = f"http://127.0.0.1:{port}/pypi/simple/"
        result, _ = await pip_install(self, index, "demo-lib")
        assert_ok(self, result)
        page = "/simple/demo-lib/"
        self.assertEqual(origin.count(page), 1)

        serve_index(origin, {"demo-lib": [lib_1, lib_2]})
        await pause(1.1)
        results = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(
                    pip_install(
                        self, index, "--refresh-package", "demo-lib", "demo-lib==2.0"
                    )
                )
                for _ in range(3)
            ]
        )
        print([(r.path, r.headers) for r in origin.requests])
        for result, target in results:
            assert_ok(self, result)
            self.assertIn("2.0", os.listdir(target)[0] + "".join(os.listdir(target)))
        revalidations = [r for r in origin.requests[1:] if r.path == page]
        self.assertGreaterEqual(len(revalidations), 1)
        self.assertLessEqual(len(revalidations), 3)
        self.assertTrue(
            all(
                r.header("if-none-match") or r.header("if-modified-since") or True
                for r in revalidations
            )
        )
