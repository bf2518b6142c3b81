"""RubyGems and Maven clients against their presets (SPEC 6), cold and
offline; and the compact index's ``Range`` appends and ETags from cache.

As in tests/test_ecosystems.py: a registry built on disk (``.gem`` files by
``gem build``; a Maven repository with checksums), a local origin, the
preset's prefix mounted over it, the real client run twice -- the second time
with the origin stopped and the client's own cache emptied.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.config import Mirror

from .registries import (
    RUBY_INDEX,
    DirectoryOrigin,
    compact_index,
    gemspec,
    maven_artifact,
    read,
    write,
)
from .support import (
    StoppableOrigin,
    client,
    fetch,
    header,
    no_proxy_env,
    pause,
    raw_exchange,
    run,
    run_process,
    start_origin,
    start_proxy,
    stored,
)
from .test_ecosystems import assert_ok, caches_since, mount, need
from .test_mirror_clients import access_log


def _etag(data: bytes) -> str:
    """rubygems.org's ETag of a compact index file: its quoted MD5."""
    return f'"{hashlib.md5(data).hexdigest()}"'


async def build_gems(
    test: TestCase, versions: dict[str, str] | None = None
) -> dict[str, tuple[str, dict[str, str], bytes]]:
    """demo 1.0.0 (needs demolib) and demolib 1.0.0 (or ``versions``),
    built by ``gem build``."""
    gem = need("gem", ".ci/run installs ruby")
    gems = {}
    for name, deps in (("demolib", {}), ("demo", {"demolib": ">= 1.0"})):
        src = os.path.abspath(test.mktemp())
        write(os.path.join(src, "lib", f"{name}.rb"), f"# {name}\n".encode())
        version = (versions or {}).get(name, "1.0.0")
        write(
            os.path.join(src, f"{name}.gemspec"), gemspec(name, version, deps).encode()
        )
        result = await run_process(
            [gem, "build", f"{name}.gemspec"], env=no_proxy_env(), path=src
        )
        assert_ok(test, result)
        gems[name] = (version, deps, read(os.path.join(src, f"{name}-{version}.gem")))
    return gems


class RubyGemsTests(TestCase):
    """``gem install`` and ``bundle install`` through ``/rubygems/``."""

    timeout = 300

    def test_gem_and_bundle_install(self) -> defer.Deferred[None]:
        """``gem install --source …/rubygems/ demo`` installs demo and
        demolib, then ``bundle install`` with the Bundler mirror setting
        (``mirror.https://rubygems.org``) reads the compact index
        (``/versions``, ``/info/NAME``, MD5 ETags checked by Bundler) and
        installs them into a bundle path; each ``.gem`` is fetched from the
        origin once.  With the origin stopped and fresh gem and Bundler
        homes, both succeed again, the ``.gem`` files HITs."""
        return run(self._ruby())

    async def _ruby(self) -> None:
        gem = need("gem", ".ci/run installs ruby")
        bundle = need("bundle", ".ci/run installs ruby-bundler")
        ruby = need("ruby", ".ci/run installs ruby")
        gems = await build_gems(self)
        root = os.path.abspath(self.mktemp())
        for name, (version, _, data) in gems.items():
            write(os.path.join(root, "gems", f"{name}-{version}.gem"), data)
            write(os.path.join(root, "gems-src", f"{name}.gem"), data)
        os.makedirs(os.path.join(root, "quick", "Marshal.4.8"))
        sources = [
            os.path.join(root, "gems", f)
            for f in sorted(os.listdir(os.path.join(root, "gems")))
        ]
        assert_ok(
            self,
            await run_process(
                [ruby, "-e", RUBY_INDEX, root, *sources], env=no_proxy_env()
            ),
        )
        origin = StoppableOrigin(self)
        for path, body in compact_index(gems).items():
            origin.origin.static(
                f"/{path}", body, [("Content-Type", "text/plain")], etag=_etag(body)
            )
        for directory in ("gems", "quick/Marshal.4.8", "."):
            for name in os.listdir(os.path.join(root, directory)):
                full = os.path.join(root, directory, name)
                if os.path.isfile(full):
                    path = f"/{directory}/{name}".replace("/./", "/")
                    origin.origin.static(path, read(full))
        base = f"http://127.0.0.1:{origin.port}/"
        port, log = mount(self, ("/rubygems/", base, "rubygems"))
        mirror = f"http://127.0.0.1:{port}/rubygems/"
        app = os.path.abspath(self.mktemp())
        write(
            os.path.join(app, "Gemfile"),
            b'source "https://rubygems.org"\n\ngem "demo"\n',
        )

        async def install() -> None:
            home = os.path.abspath(self.mktemp())
            os.makedirs(home)
            env = no_proxy_env(
                HOME=home,
                GEM_HOME=os.path.join(home, "gems"),
                GEM_PATH=os.path.join(home, "gems"),
                GEM_SPEC_CACHE=os.path.join(home, "specs"),
                BUNDLE_USER_HOME=os.path.join(home, ".bundle"),
                BUNDLE_PATH=os.path.join(home, "bundle"),
                BUNDLE_GEMFILE=os.path.join(app, "Gemfile"),
                BUNDLE_RETRY="0",
            )
            result = await run_process(
                [
                    gem,
                    "install",
                    "--clear-sources",
                    "--source",
                    mirror,
                    "--no-document",
                    "demo",
                ],
                env=env,
                path=home,
                timeout=120,
            )
            assert_ok(self, result)
            self.assertIn(
                "demolib-1.0.0",
                " ".join(os.listdir(os.path.join(home, "gems", "gems"))),
            )
            result = await run_process(
                [
                    bundle,
                    "config",
                    "set",
                    "--global",
                    "mirror.https://rubygems.org",
                    mirror,
                ],
                env=env,
                path=app,
            )
            assert_ok(self, result)
            result = await run_process(
                [bundle, "install"], env=env, path=app, timeout=120
            )
            assert_ok(self, result)
            self.assertIn("demo 1.0.0", result.output)
            self.assertIn("demolib 1.0.0", result.output)

        await install()
        for name, (version, _, _) in gems.items():
            self.assertEqual(origin.origin.count(f"/gems/{name}-{version}.gem"), 1)
        await origin.stop()
        seen = len(access_log(log))
        os.remove(os.path.join(app, "Gemfile.lock"))
        await install()
        caches = caches_since(log, seen, base)
        for name, (version, _, _) in gems.items():
            self.assertEqual(
                set(caches.get(f"/gems/{name}-{version}.gem", [])), {"HIT"}, caches
            )


class BundlerAppendTests(TestCase):
    """Bundler keeps its copy of the compact index and asks only for what
    was appended since: through the cache too."""

    timeout = 300

    def test_new_release_appended(self) -> defer.Deferred[None]:
        """After a first ``bundle install``, demolib 1.1.0 is published (a
        line appended to ``/versions`` and ``/info/demolib``, as rubygems.org
        does); a second ``bundle install`` that needs it, with Bundler's own
        index copy kept, asks ``Range: bytes=N-`` and gets a 206 from the
        cache (revalidated upstream, ``--index-ttl 0``), appends it, finds
        the MD5 ETag right, and installs demolib 1.1.0."""
        return run(self._append())

    async def _append(self) -> None:
        bundle = need("bundle", ".ci/run installs ruby-bundler")
        gems = await build_gems(self)
        newer = await build_gems(self, versions={"demolib": "1.1.0"})
        origin = StoppableOrigin(self)
        files = compact_index(gems)

        def publish(files: dict[str, bytes]) -> None:
            for path, body in files.items():
                origin.origin.static(
                    f"/{path}", body, [("Content-Type", "text/plain")], etag=_etag(body)
                )

        publish(files)
        for name, (version, _, data) in [*gems.items(), ("demolib", newer["demolib"])]:
            origin.origin.static(f"/gems/{name}-{version}.gem", data)
        base = f"http://127.0.0.1:{origin.port}/"
        port, log = mount(self, ("/rubygems/", base, "rubygems"), index_ttl=0.0)
        mirror = f"http://127.0.0.1:{port}/rubygems/"
        app, home = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(home)
        env = no_proxy_env(
            HOME=home,
            BUNDLE_USER_HOME=os.path.join(home, ".bundle"),
            BUNDLE_PATH=os.path.join(home, "bundle"),
            BUNDLE_GEMFILE=os.path.join(app, "Gemfile"),
            BUNDLE_RETRY="0",
        )
        write(
            os.path.join(app, "Gemfile"), b'source "https://rubygems.org"\ngem "demo"\n'
        )
        assert_ok(
            self,
            await run_process(
                [
                    bundle,
                    "config",
                    "set",
                    "--global",
                    "mirror.https://rubygems.org",
                    mirror,
                ],
                env=env,
                path=app,
            ),
        )
        assert_ok(
            self, await run_process([bundle, "install"], env=env, path=app, timeout=120)
        )

        _, _, data = newer["demolib"]
        info = files["info/demolib"] + (
            f"1.1.0 |checksum:{hashlib.sha256(data).hexdigest()}\n".encode()
        )
        versions = (
            files["versions"]
            + f"demolib 1.1.0 {hashlib.md5(info).hexdigest()}\n".encode()
        )
        publish({"versions": versions, "info/demolib": info})
        seen = len(access_log(log))
        os.remove(os.path.join(app, "Gemfile.lock"))
        write(
            os.path.join(app, "Gemfile"),
            b'source "https://rubygems.org"\ngem "demo"\ngem "demolib", ">= 1.1"\n',
        )
        result = await run_process([bundle, "install"], env=env, path=app, timeout=120)
        assert_ok(self, result)
        self.assertIn("demolib 1.1.0", result.output)
        later = [
            (u[len(base) - 1 :], status) for u, status, _, _ in access_log(log)[seen:]
        ]
        self.assertIn(("/versions", "206"), later)
        self.assertIn(("/info/demolib", "206"), later)


class CompactIndexTests(TestCase):
    """What Bundler does with ``/versions``: ask for the bytes after its own
    copy (``Range: bytes=N-`` with its copy's MD5 in ``If-None-Match``), append
    them, and check the whole file's MD5 against the ETag."""

    def test_range_appends_and_etags(self) -> defer.Deferred[None]:
        """From a cold cache, a HIT and after a release was appended upstream
        (revalidated on ``no-cache``): the 206 tail appended to the client's
        copy always gives the body whose MD5 the ETag names; an up-to-date
        copy's ETag gets 304."""
        return run(self._compact())

    async def _compact(self) -> None:
        origin, oport = start_origin(self)
        old = b"created_at: 2024-01-01T00:00:00Z\n---\ndemo 1.0.0 aaaa\n"
        new = old + b"demo 1.1.0 bbbb\n"
        origin.static(
            "/versions", old, [("Content-Type", "text/plain")], etag=_etag(old)
        )
        service, port = start_proxy(
            self,
            mirrors=(
                Mirror(
                    "/rubygems/", (f"http://127.0.0.1:{oport}/",), protocol="rubygems"
                ),
            ),
            index_refresh=0.0,
        )
        url = f"http://127.0.0.1:{port}/rubygems/versions"
        http = client(self)
        local = old[:40]  # a client copy from before the last line

        async def append(
            copy: bytes, *extra: tuple[str, str]
        ) -> tuple[bytes, str, str]:
            response, body = await fetch(
                http,
                url,
                {
                    "Range": f"bytes={len(copy) - 1}-",
                    "If-None-Match": _etag(copy),
                    **dict(extra),
                },
            )
            self.assertEqual(response.code, 206)
            self.assertEqual(body[:1], copy[-1:])
            return (
                copy + body[1:],
                header(response, "etag") or "",
                header(response, "x-cache") or "",
            )

        got, etag, cache = await append(local)
        self.assertEqual((got, etag, cache), (old, _etag(old), "MISS"))
        # (A request that joins the download still in flight gets a 200 to a
        # conditional request: valid, but not what is pinned here.)
        await stored(service, f"http://127.0.0.1:{oport}/versions")
        got, etag, cache = await append(local)
        self.assertEqual((got, etag, cache), (old, _etag(old), "HIT"))
        raw = await raw_exchange(
            self,
            port,
            f"GET /rubygems/versions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"If-None-Match: {_etag(old)}\r\nConnection: close\r\n\r\n".encode(),
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 304 "), raw)

        origin.static(
            "/versions", new, [("Content-Type", "text/plain")], etag=_etag(new)
        )
        got, etag, cache = await append(old, ("Cache-Control", "no-cache"))
        self.assertEqual((got, etag, cache), (new, _etag(new), "MISS"))
        self.assertEqual(origin.requests[-1].header("if-none-match"), _etag(old))
        store = service.store
        assert store is not None

        async def committed() -> bool:
            entries = await store.lookup(f"http://127.0.0.1:{oport}/versions")
            return any(e.header("etag") == _etag(new) for e in entries)

        for _ in range(1000):
            if await committed():
                break
            await pause(0.01)
        got, etag, cache = await append(old)
        self.assertEqual((got, etag), (new, _etag(new)))

    def test_head_miss_is_fetched(self) -> defer.Deferred[None]:
        """A HEAD that misses under a mirror (``gem`` asks HEAD of its source
        first) is fetched upstream as a GET and stored, so with the origin
        stopped the same HEAD is a HIT with the right length."""
        return run(self._head())

    async def _head(self) -> None:
        origin = StoppableOrigin(self)
        body = b"created_at: 2024-01-01T00:00:00Z\n---\n"
        origin.origin.static("/versions", body, [("Content-Type", "text/plain")])
        base = f"http://127.0.0.1:{origin.port}/"
        service, port = start_proxy(
            self, mirrors=(Mirror("/rubygems/", (base,), protocol="rubygems"),)
        )
        url = f"http://127.0.0.1:{port}/rubygems/versions"
        response, got = await fetch(client(self), url, method="HEAD")
        self.assertEqual((response.code, got), (200, b""))
        self.assertEqual([r.method for r in origin.origin.requests], ["GET"])
        await stored(service, base + "versions")
        await origin.stop()
        response, got = await fetch(client(self), url, method="HEAD")
        self.assertEqual((response.code, got), (200, b""))
        self.assertEqual(header(response, "x-cache"), "HIT")
        self.assertEqual(header(response, "content-length"), str(len(body)))


_PLUGIN = ("org.apache.maven.plugins", "maven-dependency-plugin", "3.8.1")
M2 = os.path.expanduser("~/.m2/repository")
DEBIAN_REPO = "/usr/share/maven-repo"
"""Debian's Maven repository (``libmaven-dependency-plugin-java`` and what
it depends on, installed by .ci/run): fills the gaps of ``M2``."""


class MavenTests(TestCase):
    """``mvn dependency:get`` with a ``<mirror>`` to ``/maven2/``."""

    timeout = 400

    def test_dependency_get(self) -> defer.Deferred[None]:
        """An artifact with a dependency, from a repository on disk layered
        over the machine's own Maven repositories (``~/.m2`` and Debian's,
        which hold the dependency plugin and its dependencies: there is no
        Maven Central here): the cold ``dependency:get`` into an empty local repository
        succeeds through the mirror; with the origin stopped and a fresh
        local repository, again, every ``.jar`` and ``.pom`` a HIT."""
        return run(self._maven())

    async def _maven(self) -> None:
        mvn = need("mvn", ".ci/run installs maven")
        group, artifact, version = _PLUGIN
        plugin = os.path.join(M2, *group.split("."), artifact, version)
        if not os.path.isfile(os.path.join(plugin, f"{artifact}-{version}.jar")):
            raise SkipTest(
                f"{artifact} {version} is not in {M2}: without Maven Central the"
                " plugin that runs dependency:get cannot be had"
            )
        root = os.path.abspath(self.mktemp())
        lib = maven_artifact(root, "com.example", "demo-lib", "2.0", [])
        jar = maven_artifact(
            root, "com.example", "demo", "1.0", ["com.example:demo-lib:2.0"]
        )
        origin = DirectoryOrigin(self, root, M2, DEBIAN_REPO)
        port, log = mount(self, ("/maven2/", origin.base, "maven"))
        settings = os.path.abspath(self.mktemp())
        write(
            settings,
            (
                "<settings><mirrors><mirror><id>cache</id><mirrorOf>*</mirrorOf>"
                f"<url>http://127.0.0.1:{port}/maven2/</url></mirror></mirrors></settings>\n"
            ).encode(),
        )
        empty = os.path.abspath(self.mktemp())
        write(empty, b"<settings/>\n")

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)

        async def get() -> str:
            repo = os.path.abspath(self.mktemp())
            result = await run_process(
                [
                    mvn,
                    "-B",
                    "-e",
                    "-s",
                    settings,
                    "-gs",
                    empty,
                    f"-Dmaven.repo.local={repo}",
                    f"{group}:{artifact}:{version}:get",
                    "-Dartifact=com.example:demo:1.0",
                ],
                env=no_proxy_env(MAVEN_OPTS="-Xshare:auto"),
                path=cwd,
                timeout=300,
            )
            assert_ok(self, result)
            return repo

        repo = await get()
        for name, data in (
            ("demo/1.0/demo-1.0.jar", jar),
            ("demo-lib/2.0/demo-lib-2.0.jar", lib),
        ):
            self.assertEqual(read(os.path.join(repo, "com", "example", name)), data)
            self.assertEqual(origin.fetched(f"/com/example/{name}"), 1)
        await origin.stop()
        seen = len(access_log(log))
        repo = await get()
        self.assertEqual(
            read(os.path.join(repo, "com/example/demo/1.0/demo-1.0.jar")), jar
        )
        caches = caches_since(log, seen, origin.base)
        files = [p for p in caches if p.endswith((".jar", ".pom"))]
        self.assertGreater(len(files), 5, caches)
        for path in files:
            self.assertEqual(set(caches[path]), {"HIT"}, (path, caches[path]))
