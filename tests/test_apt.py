"""apt for real: ``apt-get update`` and ``apt-get download`` through the proxy.

A tiny Debian repository is built at test time (a ``.deb`` made by
``dpkg-deb``, indexes by ``apt-ftparchive``) with two suites: ``stable``
declares ``Acquire-By-Hash`` (so apt fetches its Packages file under
``by-hash/``), ``legacy`` does not (apt fetches ``Packages.gz`` by name). A
twisted.web static origin in the test's reactor serves it on 127.0.0.1 and
records what it is asked for; the proxy runs in-process. apt is a child
process with a configuration of its own (``APT_CONFIG``: none of this
machine's apt settings, sources, lists or hooks), so nothing outside the
test's temporary directory is read or written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.static import File

from cachingproxy.cache import policy

from .support import (
    ProcessResult,
    TrackingSite,
    no_proxy_env,
    run,
    run_process,
    start_proxy,
)

PACKAGE = "cachingproxy-demo"
DEB = f"{PACKAGE}_1.0_all.deb"
TOOLS = ("apt-get", "apt-ftparchive", "dpkg-deb", "dpkg")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


async def _check(argv: list[str], path: str | None = None) -> ProcessResult:
    result = await run_process(argv, env=no_proxy_env(LC_ALL="C"), path=path)
    if result.code != 0:
        raise AssertionError(f"{argv!r} failed:\n{result.output}")
    return result


async def build_repository(test: TestCase, root: str, arch: str) -> bytes:
    """A Debian repository in ``root`` with one package; returns its .deb."""
    package = test.mktemp()
    _write(
        os.path.join(package, "DEBIAN", "control"),
        (
            f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
            "Maintainer: cachingproxy tests <tests@example.invalid>\n"
            "Description: a package served by the cachingproxy apt test\n"
        ).encode(),
    )
    # Some incompressible bytes, so the .deb is not trivially small.
    _write(os.path.join(package, "usr", "share", PACKAGE, "data"), os.urandom(100_000))
    deb = os.path.join(root, "pool", "main", "c", PACKAGE, DEB)
    os.makedirs(os.path.dirname(deb))
    await _check(["dpkg-deb", "--root-owner-group", "--build", package, deb])
    packages = (await _check(["apt-ftparchive", "packages", "pool"], path=root)).out
    for suite, by_hash in (("stable", True), ("legacy", False)):
        binary = os.path.join(root, "dists", suite, "main", f"binary-{arch}")
        compressed = gzip.compress(packages, mtime=0)
        _write(os.path.join(binary, "Packages"), packages)
        _write(os.path.join(binary, "Packages.gz"), compressed)
        if by_hash:
            # apt asks for the strongest hash the Release file lists.
            for data in (packages, compressed):
                for name in ("SHA256", "SHA512"):
                    digest = hashlib.new(name.lower(), data).hexdigest()
                    _write(os.path.join(binary, "by-hash", name, digest), data)
        release = await _check(
            [
                "apt-ftparchive",
                "-o",
                f"APT::FTPArchive::Release::Suite={suite}",
                "-o",
                f"APT::FTPArchive::Release::Codename={suite}",
                "-o",
                f"APT::FTPArchive::Release::Architectures={arch}",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "-o",
                "APT::FTPArchive::Release::Acquire-By-Hash="
                + ("yes" if by_hash else "no"),
                "release",
                ".",
            ],
            path=os.path.join(root, "dists", suite),
        )
        _write(os.path.join(root, "dists", suite, "Release"), release.out)
    return _read(deb)


class _RecordingSite(TrackingSite):
    """A static site that records the path and status of every request."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.seen: list[tuple[str, int]] = []

    def log(self, request: Any) -> None:
        self.seen.append((request.uri.decode(), request.code))


class AptThroughProxyTests(TestCase):
    """apt-get update and download work through the proxy, and again from
    the cache alone once the repository's server is gone."""

    timeout = 60

    def setUp(self) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise SkipTest(
                f"{', '.join(missing)} not installed (.ci/run installs apt-utils)"
            )

    def _apt_config(self, arch: str, sources: str) -> str:
        """An apt.conf that shuts out every apt setting of this machine."""
        base = os.path.abspath(self.mktemp())
        empty = os.path.join(base, "empty")
        os.makedirs(empty)
        status = os.path.join(base, "status")
        _write(status, b"")
        config = os.path.join(base, "apt.conf")
        lines = {
            # Read before the machine's apt.conf.d, so that it is never read.
            "Dir::Etc::Parts": empty,
            "Dir::Etc::Main": "/dev/null",
            "Dir::Etc::SourceList": sources,
            "Dir::Etc::SourceParts": empty,
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": empty,
            "Dir::Etc::TrustedParts": empty,
            "Dir::State": base,
            "Dir::State::status": status,
            "Dir::Log": base,
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Architecture": arch,
            "APT::Architectures": arch,
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Acquire::Retries": "0",
            "Acquire::http::Timeout": "10",
            "Acquire::Check-Valid-Until": "false",
            "Debug::NoLocking": "1",
        }
        _write(config, "".join(f'{k} "{v}";\n' for k, v in lines.items()).encode())
        return config

    async def _apt_run(
        self, config: str, proxy_port: int | None
    ) -> tuple[ProcessResult, ProcessResult, bytes]:
        """``apt-get update`` then ``apt-get download`` with fresh lists and
        cache directories (through the proxy at ``proxy_port``, or straight
        to the sources' URLs when None); returns both results and the
        downloaded .deb."""
        run = os.path.abspath(self.mktemp())
        lists, cache, here = (os.path.join(run, d) for d in ("lists", "cache", "cwd"))
        for d in (
            os.path.join(lists, "partial"),
            os.path.join(cache, "archives", "partial"),
            here,
        ):
            os.makedirs(d)
        options = [
            "-o",
            f"Dir::State::Lists={lists}",
            "-o",
            f"Dir::Cache={cache}",
            "-o",
            "Acquire::http::Proxy="
            + ("DIRECT" if proxy_port is None else f"http://127.0.0.1:{proxy_port}/"),
        ]
        env = no_proxy_env(
            APT_CONFIG=config, LC_ALL="C", DEBIAN_FRONTEND="noninteractive"
        )
        update = await run_process(
            ["apt-get", "-q", *options, "update"], env=env, path=here, timeout=30
        )
        download = await run_process(
            ["apt-get", "-q", *options, "download", PACKAGE],
            env=env,
            path=here,
            timeout=30,
        )
        deb = os.path.join(here, DEB)
        return update, download, _read(deb) if os.path.exists(deb) else b""

    def test_update_and_download_then_from_cache_alone(self) -> defer.Deferred[None]:
        """apt-get update + download succeed through the proxy (origin sees
        each file once); with the origin stopped, a fresh apt run succeeds from
        the cache (Release and Packages.gz served STALE, the by-hash index,
        the .deb and the 404 for InRelease as HIT), the .deb byte for byte; Release/InRelease/Packages
        fall under the index-TTL rule, .deb and by-hash files under forever."""
        return run(self._update_and_download())

    async def _update_and_download(self) -> None:
        arch = (await _check(["dpkg", "--print-architecture"])).out.decode().strip()
        root = os.path.abspath(self.mktemp())
        deb = await build_repository(self, root, arch)

        site = _RecordingSite(File(root))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        stopped: list[bool] = []

        async def stop_origin() -> None:
            if not stopped:
                stopped.append(True)
                await port.stopListening()
                await site.close_all()

        self.addCleanup(lambda: run(stop_origin()))
        base = f"http://127.0.0.1:{port.getHost().port}"
        sources = os.path.abspath(self.mktemp())
        _write(
            sources,
            (
                f"deb [trusted=yes] {base}/ stable main\n"
                f"deb [trusted=yes] {base}/ legacy main\n"
            ).encode(),
        )
        config = self._apt_config(arch, sources)
        access_log = os.path.abspath(self.mktemp())
        # Index TTL 0: every index is revalidated, so with the origin gone it
        # can only come from stale-on-error.
        _, proxy_port = start_proxy(self, access_log=access_log, index_ttl=0.0)

        update, download, got = await self._apt_run(config, proxy_port)
        self.assertEqual(update.code, 0, update.output)
        self.assertNotIn("W:", update.output)
        self.assertEqual(download.code, 0, download.output)
        self.assertEqual(got, deb)
        fetched = [path for path, code in site.seen if code == 200]
        self.assertEqual(len(fetched), len(set(fetched)), site.seen)
        binary = f"main/binary-{arch}"
        by_hash = [p for p in fetched if "/by-hash/" in p]
        self.assertEqual(
            sorted(p for p in fetched if "/by-hash/" not in p),
            sorted(
                [
                    "/dists/legacy/Release",
                    f"/dists/legacy/{binary}/Packages.gz",
                    "/dists/stable/Release",
                    f"/pool/main/c/{PACKAGE}/{DEB}",
                ]
            ),
            site.seen,
        )
        self.assertEqual(len(by_hash), 1, site.seen)
        self.assertTrue(by_hash[0].startswith(f"/dists/stable/{binary}/by-hash/"))

        # What the default rules make of each URL apt asked for.
        rules = policy.default_rules(0.0)
        seen_urls = {path: base + path for path, _ in site.seen}
        kinds = {
            path: policy.select_rule(rules, url).name for path, url in seen_urls.items()
        }
        for path in ("/dists/stable/InRelease", "/dists/stable/Release"):
            self.assertEqual(kinds[path], "metadata", path)
        self.assertEqual(kinds[f"/dists/legacy/{binary}/Packages.gz"], "metadata")
        self.assertEqual(kinds[by_hash[0]], "immutable")
        self.assertEqual(kinds[f"/pool/main/c/{PACKAGE}/{DEB}"], "immutable")
        self.assertEqual(
            policy.select_rule(rules, f"{base}/dists/stable/{binary}/Packages").name,
            "metadata",
        )

        await stop_origin()
        with open(access_log) as f:
            first_lines = len(f.readlines())
        update2, download2, got2 = await self._apt_run(config, proxy_port)
        self.assertEqual(update2.code, 0, update2.output)
        self.assertNotIn("W:", update2.output)
        self.assertEqual(download2.code, 0, download2.output)
        self.assertEqual(got2, deb)
        with open(access_log) as f:
            second = [line.split() for line in f.readlines()[first_lines:]]
        cache_status = {fields[3][len(base) :]: fields[7] for fields in second}
        self.assertEqual(cache_status[f"/pool/main/c/{PACKAGE}/{DEB}"], "HIT")
        self.assertEqual(cache_status[by_hash[0]], "HIT")
        # apt's 404s (no InRelease: the repository is unsigned) come from the
        # negative cache.
        self.assertEqual(cache_status["/dists/stable/InRelease"], "HIT")
        self.assertEqual(cache_status["/dists/stable/Release"], "STALE")
        self.assertEqual(cache_status["/dists/legacy/Release"], "STALE")
        self.assertEqual(cache_status[f"/dists/legacy/{binary}/Packages.gz"], "STALE")

    def test_debian_preset_as_mirror(self) -> defer.Deferred[None]:
        """The ``debian`` preset's ``/debian/`` mounted over the repository
        (upstream overridden, apt protocol kept) in ``sources.list`` as
        ``http://cache/debian/``, no proxy setting: update and download
        succeed; with the origin stopped and fresh apt lists and cache, again,
        the ``.deb`` and the by-hash index HITs and the Release file served
        from the cache within ``--index-ttl``."""
        return run(self._mirror())

    async def _mirror(self) -> None:
        from cachingproxy.mirror.mirrors import combine, parse_mirror

        arch = (await _check(["dpkg", "--print-architecture"])).out.decode().strip()
        root = os.path.abspath(self.mktemp())
        deb = await build_repository(self, root, arch)
        site = _RecordingSite(File(root))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        stopped: list[bool] = []

        async def stop_origin() -> None:
            if not stopped:
                stopped.append(True)
                await port.stopListening()
                await site.close_all()

        self.addCleanup(lambda: run(stop_origin()))
        base = f"http://127.0.0.1:{port.getHost().port}/"
        mirrors = combine([*parse_mirror("debian"), *parse_mirror(f"/debian/={base}")])
        self.assertIn("apt", {m.protocol for m in mirrors if m.prefix == "/debian/"})
        access_log = os.path.abspath(self.mktemp())
        _, proxy_port = start_proxy(self, access_log=access_log, mirrors=mirrors)
        sources = os.path.abspath(self.mktemp())
        _write(
            sources,
            f"deb [trusted=yes] http://127.0.0.1:{proxy_port}/debian/ stable main\n".encode(),
        )
        config = self._apt_config(arch, sources)
        update, download, got = await self._apt_run(config, None)
        self.assertEqual(update.code, 0, update.output)
        self.assertNotIn("W:", update.output)
        self.assertEqual(download.code, 0, download.output)
        self.assertEqual(got, deb)
        pool = f"/pool/main/c/{PACKAGE}/{DEB}"
        self.assertEqual([c for p, c in site.seen if p == pool], [200])

        await stop_origin()
        with open(access_log) as f:
            first_lines = len(f.readlines())
        update2, download2, got2 = await self._apt_run(config, None)
        self.assertEqual(update2.code, 0, update2.output)
        self.assertEqual(download2.code, 0, download2.output)
        self.assertEqual(got2, deb)
        with open(access_log) as f:
            second = [line.split() for line in f.readlines()[first_lines:]]
        cache_status = {fields[3][len(base) - 1 :]: fields[7] for fields in second}
        self.assertEqual(cache_status[pool], "HIT")
        self.assertEqual(cache_status["/dists/stable/Release"], "HIT")
        by_hash = [p for p in cache_status if "/by-hash/" in p]
        self.assertEqual(len(by_hash), 1, cache_status)
        self.assertEqual(cache_status[by_hash[0]], "HIT")
