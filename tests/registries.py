"""Small package registries built on disk in each ecosystem's own layout,
served by a local twisted.web origin (tests/test_ecosystems.py).

Every builder writes real artifacts a real client accepts: a Go module
proxy tree (``@v/list``, ``.info``, ``.mod``, ``.zip``), a crates.io sparse
index with ``.crate`` files, a RubyGems compact index with ``.gem`` files
(built by ``gem build``), a Maven repository with checksums, and an Alpine
repository's ``APKINDEX.tar.gz`` and ``.apk`` files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zipfile
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import NoResource, Resource
from twisted.web.static import File

from .support import TrackingSite

_EPOCH = (2024, 1, 1, 0, 0, 0)


def write(path: str, data: bytes) -> bytes:
    """Write ``data`` to ``path`` (directories made); returns ``data``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _RecordingSite(TrackingSite):
    """A static site that records the path and status of every request."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.seen: list[tuple[str, int]] = []

    def log(self, request: Any) -> None:
        self.seen.append((request.uri.decode(), request.code))


_TYPES = {".json": "application/json", ".xml": "application/xml"}


class _Files(Resource):
    """The file at the request's path in the first of ``roots`` that has it,
    served by twisted.web's ``File`` (Range, HEAD, Last-Modified, ETag from
    mtime and size); 404 for anything else."""

    isLeaf = True

    def __init__(self, roots: tuple[str, ...]) -> None:
        super().__init__()
        self.roots = roots

    def render(self, request: Any) -> Any:
        parts = [unquote(p) for p in request.path.decode().split("/")[1:]]
        if parts and all(p not in ("", ".", "..") and "/" not in p for p in parts):
            for root in self.roots:
                path = os.path.join(root, *parts)
                if os.path.isfile(path):
                    resource = File(path, defaultType="application/octet-stream")
                    resource.contentTypes = {**resource.contentTypes, **_TYPES}
                    return resource.render(request)
        return NoResource().render(request)


class DirectoryOrigin:
    """The files under ``roots`` (the first that has a path wins) served on
    127.0.0.1, recording every request; ``stop()`` closes it for good, as a
    registry that went down."""

    def __init__(self, test: TestCase, *roots: str) -> None:
        self.site = _RecordingSite(_Files(roots))
        self._port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self._port.getHost().port}/"
        self.running = True
        test.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop()))

    def fetched(self, path: str) -> int:
        """How many times ``path`` was answered 200 or 206."""
        return sum(1 for p, code in self.site.seen if p == path and code in (200, 206))

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self._port.stopListening()
            await self.site.close_all()


# -- Go module proxy ------------------------------------------------------------


def go_module(
    root: str,
    module: str,
    version: str,
    requires: dict[str, str],
    payload: bytes = b"",
) -> None:
    """One version of ``module`` in GOPROXY layout under ``root`` (with a
    ``payload.bin`` of ``payload`` when given)."""
    name = module.rsplit("/", 1)[-1]
    lines = [f"module {module}", "", "go 1.19", ""]
    if requires:
        lines += ["require ("]
        lines += [f"\t{m} {v}" for m, v in sorted(requires.items())]
        lines += [")", ""]
    mod = "\n".join(lines).encode()
    imports = "".join(f'import _ "{m}"\n' for m in sorted(requires))
    source = f'package {name}\n\n{imports}\nconst Version = "{version}"\n'.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        files = [("go.mod", mod), (f"{name}.go", source)]
        if payload:
            files.append(("payload.bin", payload))
        for path, data in files:
            info = zipfile.ZipInfo(f"{module}@{version}/{path}", _EPOCH)
            archive.writestr(info, data)
    base = os.path.join(root, *module.split("/"), "@v")
    write(os.path.join(base, "list"), f"{version}\n".encode())
    info_doc = {"Version": version, "Time": "2024-01-01T00:00:00Z"}
    write(os.path.join(base, f"{version}.info"), json.dumps(info_doc).encode())
    write(os.path.join(base, f"{version}.mod"), mod)
    write(os.path.join(base, f"{version}.zip"), buffer.getvalue())


# -- crates.io sparse index -------------------------------------------------------


def crate_index_path(name: str) -> str:
    """Where the sparse index keeps ``name``'s file."""
    name = name.lower()
    if len(name) <= 2:
        return f"{len(name)}/{name}"
    if len(name) == 3:
        return f"3/{name[0]}/{name}"
    return f"{name[:2]}/{name[2:4]}/{name}"


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as archive,
    ):
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 1_704_067_200
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def crate(
    index: str,
    files: str,
    name: str,
    version: str,
    deps: dict[str, str],
    payload: bytes = b"",
) -> bytes:
    """``name`` ``version`` as a ``.crate`` under ``files``
    (``NAME/VERSION/download``) and a line of its index file under
    ``index``; returns the .crate."""
    manifest = (
        f'[package]\nname = "{name}"\nversion = "{version}"\nedition = "2021"\n'
        + "\n[dependencies]\n"
        + "".join(f'{d} = "{r}"\n' for d, r in sorted(deps.items()))
    ).encode()
    data = _tar_gz(
        {
            f"{name}-{version}/Cargo.toml": manifest,
            f"{name}-{version}/src/lib.rs": f'pub const VERSION: &str = "{version}";\n'.encode(),
            **({f"{name}-{version}/payload.bin": payload} if payload else {}),
        }
    )
    write(os.path.join(files, name, version, "download"), data)
    entry = {
        "name": name,
        "vers": version,
        "deps": [
            {
                "name": d,
                "req": r,
                "features": [],
                "optional": False,
                "default_features": True,
                "target": None,
                "kind": "normal",
            }
            for d, r in sorted(deps.items())
        ],
        "cksum": hashlib.sha256(data).hexdigest(),
        "features": {},
        "yanked": False,
    }
    path = os.path.join(index, crate_index_path(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
    return data


# -- Alpine -----------------------------------------------------------------------


def alpine_repository(root: str, branch: str, arch: str) -> dict[str, bytes]:
    """An Alpine repository directory: ``APKINDEX.tar.gz`` and two ``.apk``
    files (gzip'd tars with ``.PKGINFO``); returns path → bytes."""
    here = os.path.join(root, branch, "main", arch)
    made: dict[str, bytes] = {}
    records = []
    for name, version in (("demo", "1.0-r0"), ("demo-lib", "2.1-r0")):
        info = f"pkgname = {name}\npkgver = {version}\narch = {arch}\n".encode()
        apk = _tar_gz({".PKGINFO": info, f"usr/share/{name}/README": b"demo\n"})
        path = f"{branch}/main/{arch}/{name}-{version}.apk"
        made[path] = write(os.path.join(root, path), apk)
        digest = hashlib.sha1(apk).hexdigest()
        records.append(
            f"C:Q1{digest}\nP:{name}\nV:{version}\nA:{arch}\nS:{len(apk)}\n"
            f"I:{len(apk)}\nT:demo\n"
        )
    index = _tar_gz({"APKINDEX": "\n".join(records).encode() + b"\n"})
    made[f"{branch}/main/{arch}/APKINDEX.tar.gz"] = write(
        os.path.join(here, "APKINDEX.tar.gz"), index
    )
    return made


# -- Maven ------------------------------------------------------------------------


def maven_artifact(
    root: str, group: str, artifact: str, version: str, deps: list[str]
) -> bytes:
    """``group:artifact:version`` (a jar and a pom, each with ``.sha1``) and
    its ``maven-metadata.xml``; ``deps`` are ``group:artifact:version``."""
    base = os.path.join(root, *group.split("."), artifact)
    dependencies = "".join(
        "<dependency><groupId>{}</groupId><artifactId>{}</artifactId>"
        "<version>{}</version></dependency>".format(*d.split(":"))
        for d in deps
    )
    pom = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">'
        "<modelVersion>4.0.0</modelVersion>"
        f"<groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version><packaging>jar</packaging>"
        f"<dependencies>{dependencies}</dependencies></project>\n"
    ).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            zipfile.ZipInfo("META-INF/MANIFEST.MF", _EPOCH),
            b"Manifest-Version: 1.0\r\n\r\n",
        )
        archive.writestr(
            zipfile.ZipInfo(f"{artifact}/VERSION", _EPOCH), version.encode()
        )
    jar = buffer.getvalue()
    for suffix, data in ((".pom", pom), (".jar", jar)):
        path = os.path.join(base, version, f"{artifact}-{version}{suffix}")
        write(path, data)
        write(path + ".sha1", hashlib.sha1(data).hexdigest().encode())
    metadata = (
        "<?xml version='1.0' encoding='UTF-8'?>\n<metadata>"
        f"<groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<versioning><latest>{version}</latest><release>{version}</release>"
        f"<versions><version>{version}</version></versions>"
        "<lastUpdated>20240101000000</lastUpdated></versioning></metadata>\n"
    ).encode()
    write(os.path.join(base, "maven-metadata.xml"), metadata)
    write(
        os.path.join(base, "maven-metadata.xml.sha1"),
        hashlib.sha1(metadata).hexdigest().encode(),
    )
    return jar


# -- RubyGems ---------------------------------------------------------------------

RUBY_INDEX = r"""
require "rubygems/package"
out = ARGV.shift
specs = ARGV.map { |f| Gem::Package.new(f).spec }
specs.each do |s|
  File.binwrite(File.join(out, "quick/Marshal.4.8/#{s.full_name}.gemspec.rz"),
                Gem.deflate(Marshal.dump(s)))
end
tuples = specs.map { |s| [s.name, s.version, s.original_platform] }
%w[specs latest_specs].each do |name|
  File.binwrite(File.join(out, "#{name}.4.8.gz"), Gem::Util.gzip(Marshal.dump(tuples)))
end
File.binwrite(File.join(out, "prerelease_specs.4.8.gz"), Gem::Util.gzip(Marshal.dump([])))
"""


def gemspec(
    name: str, version: str, deps: dict[str, str], files: tuple[str, ...] = ()
) -> str:
    """A gemspec for ``gem build`` (``lib/NAME.rb`` and ``files``)."""
    lines = [
        "Gem::Specification.new do |s|",
        f'  s.name = "{name}"',
        f'  s.version = "{version}"',
        '  s.summary = "a gem served by the cachingproxy tests"',
        '  s.authors = ["tests"]',
        '  s.license = "MIT"',
        f"  s.files = {[f'lib/{name}.rb', *files]!r}".replace("'", '"'),
        *(f'  s.add_runtime_dependency "{d}", "{r}"' for d, r in deps.items()),
        "end",
    ]
    return "\n".join(lines) + "\n"


def compact_index(
    gems: dict[str, tuple[str, dict[str, str], bytes]],
) -> dict[str, bytes]:
    """``/versions`` and ``/info/NAME`` for ``name → (version, deps, .gem)``,
    as rubygems.org writes them (``versions`` lists each info file's MD5)."""
    files: dict[str, bytes] = {}
    lines = ["created_at: 2024-01-01T00:00:00Z", "---"]
    for name, (version, deps, data) in sorted(gems.items()):
        requirements = ",".join(f"{d}:{r}" for d, r in deps.items())
        checksum = hashlib.sha256(data).hexdigest()
        info = f"---\n{version} {requirements}|checksum:{checksum}\n".encode()
        files[f"info/{name}"] = info
        lines.append(f"{name} {version} {hashlib.md5(info).hexdigest()}")
    files["versions"] = ("\n".join(lines) + "\n").encode()
    return files


__all__ = [
    "RUBY_INDEX",
    "DirectoryOrigin",
    "alpine_repository",
    "compact_index",
    "crate",
    "crate_index_path",
    "gemspec",
    "go_module",
    "maven_artifact",
    "read",
    "write",
]
